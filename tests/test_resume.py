"""Never lose a run: exact resume after a kill, atomic checkpoints, clear errors for bad ones."""

from __future__ import annotations

import csv
import multiprocessing
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe

from slr_zoo.training.checkpoint import CheckpointError, check_resumable, resume_point
from slr_zoo.training.trainer import AtomicCheckpointIO
from slr_zoo.training.data import ResumableBatchSampler, shard_batches
from slr_zoo.training.module import depth_generator
from slr_zoo.recipe import build_cell, train_cell
from slr_zoo.training.trainer import read_curve


# ---------------------------------------------------------------------------------------------
# The sampler: data order as a function of (seed, global batch index)
# ---------------------------------------------------------------------------------------------
def batches(sampler, n):
    out = []
    while len(out) < n:
        out += list(sampler)  # one epoch per iter(), as Lightning does
    return out[:n]


def test_two_ranks_split_the_global_batches_of_one_process():
    one = batches(ResumableBatchSampler(50, 8, seed=3), 15)  # 6 batches/epoch: crosses 2 epochs
    r0 = batches(ResumableBatchSampler(50, 4, seed=3, rank=0, world_size=2), 15)
    r1 = batches(ResumableBatchSampler(50, 4, seed=3, rank=1, world_size=2), 15)
    assert [a + b for a, b in zip(r0, r1)] == one


def test_resumed_sampler_continues_exactly_where_the_run_stopped():
    full = batches(ResumableBatchSampler(50, 8, seed=1), 20)
    for start in (0, 4, 6, 7, 13):
        assert batches(ResumableBatchSampler(50, 8, seed=1, start=start), 20 - start) == full[start:]


def test_epochs_are_new_permutations_of_every_example():
    sampler = ResumableBatchSampler(48, 8, seed=0)
    first, second = list(sampler), list(sampler)
    assert sorted(sum(first, [])) == list(range(48)) == sorted(sum(second, []))
    assert first != second
    assert list(ResumableBatchSampler(48, 8, seed=1)) != first


def test_sampler_rejects_a_set_smaller_than_one_global_batch():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableBatchSampler(7, 4, world_size=2)


def test_validation_shards_cover_every_example_once():
    shards = [shard_batches(11, 3, r, 2) for r in range(2)]
    flat = sorted(i for s in shards for b in s for i in b)
    assert flat == list(range(11))


def test_depth_is_a_function_of_seed_and_step_only():
    from slr_zoo.looped import UniformDepth

    sampler = UniformDepth(max_steps=6)
    draws = [sampler.sample(depth_generator(0, s)) for s in range(30)]
    torch.manual_seed(123)  # the global RNG plays no part
    assert draws == [sampler.sample(depth_generator(0, s)) for s in range(30)]
    assert len(set(draws)) > 1
    assert draws != [sampler.sample(depth_generator(1, s)) for s in range(30)]


# ---------------------------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------------------------
class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated by an object that cannot be pickled)")


def test_atomic_save_leaves_the_previous_checkpoint_when_a_save_fails(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "x": _Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=False)["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary left behind


@pytest.mark.parametrize("strategy", ["auto", "ddp", "fsdp"])
def test_every_strategy_saves_through_the_atomic_writer(tmp_path, strategy):
    from slr_zoo.training.trainer import make_trainer

    from slr_zoo.training.settings import TrainerConfig

    cfg = TrainerConfig(**tiny_recipe(trainer__strategy=strategy, trainer__accelerator="cpu")["trainer"])
    assert isinstance(make_trainer(cfg, tmp_path).strategy.checkpoint_io, AtomicCheckpointIO)


def _fit_recipe(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path), trainer__max_steps=24, trainer__val_every=None, trainer__checkpoint_every=2,
                trainer__batch_size=8, trainer__accelerator="cpu", loop__depth_sampler={"name": "uniform"},
                optim__warmup_steps=3)
    base.update(overrides)
    return tiny_recipe(**base)


def _state(directory: Path) -> dict:
    return torch.load(directory / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_corrupt_checkpoint_stops_with_an_error_naming_the_file(tmp_path):
    recipe = _fit_recipe(tmp_path, trainer__max_steps=2)
    directory = tmp_path / "cell"
    train_cell(recipe, directory)
    last = directory / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a torn write
    with pytest.raises(CheckpointError, match=f"checkpoint {last} is unreadable"):
        train_cell(recipe, directory)


def test_checkpoint_of_another_model_is_refused_with_the_mismatch(tmp_path):
    directory = tmp_path / "cell"
    train_cell(_fit_recipe(tmp_path, trainer__max_steps=2), directory)
    wider = _fit_recipe(tmp_path, trainer__max_steps=2, backbone__hidden_size=48)
    module = build_cell(wider, directory).module
    with pytest.raises(CheckpointError, match=r"does not fit this recipe's model \(different shape: .*48"):
        check_resumable(directory / "checkpoints" / "last.ckpt", module)


def test_resume_takes_the_furthest_checkpoint_including_slurm_preemption_ones(tmp_path):
    directory = tmp_path / "cell"
    recipe = _fit_recipe(tmp_path, trainer__max_steps=4)
    train_cell(recipe, directory)
    module = build_cell(recipe, directory).module
    last = directory / "checkpoints" / "last.ckpt"
    assert resume_point(directory, module) == last
    state = torch.load(last, weights_only=False)
    for step, winner in ((2, last), (6, directory / "hpc_ckpt_1.ckpt")):
        AtomicCheckpointIO().save_checkpoint(dict(state, global_step=step), directory / "hpc_ckpt_1.ckpt")
        assert resume_point(directory, module) == winner
    (directory / "hpc_ckpt_2.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="hpc_ckpt_2.ckpt is unreadable"):
        resume_point(directory, module)


def test_a_resumed_run_keeps_the_validation_made_at_its_checkpoint(tmp_path):
    """The validation at the checkpoint's own step is not run again on resume, so its row must
    survive: a run stopped at step 4 and continued to 6 lists validations 2, 4 and 6."""
    directory = tmp_path / "cell"
    train_cell(_fit_recipe(tmp_path, trainer__max_steps=4, trainer__val_every=2), directory)
    train_cell(_fit_recipe(tmp_path, trainer__max_steps=6, trainer__val_every=2), directory)
    with (directory / "val_curve.csv").open() as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [2, 4, 6]
    assert [row["step"] for row in read_curve(directory / "train_curve.csv")] == list(range(6))


def _train_in_child(recipe, directory):
    torch.set_num_threads(1)
    train_cell(recipe, directory)


def test_killed_run_resumes_to_exactly_the_weights_of_an_uninterrupted_run(tmp_path):
    """SIGKILL (no chance to clean up) after the first checkpoint, then run the cell again."""
    recipe = _fit_recipe(tmp_path, loop__loop_lora={"name": "per_step", "rank": 2},
                         backbone__dropout=0.1)  # dropout: the resumed run must draw the same masks
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train_cell(recipe, straight)

    child = multiprocessing.get_context("fork").Process(target=_train_in_child, args=(recipe, killed))
    child.start()
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 60
    while not last.exists() and child.is_alive() and time.time() < deadline:
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    interrupted_at = _state(killed)["global_step"]
    assert 0 < interrupted_at < recipe["trainer"]["max_steps"], "the kill came too late to test a resume"
    assert not (killed / "summary.json").exists()
    seconds_before_kill = _state(killed)["train_seconds"]
    assert seconds_before_kill > 0

    summary = train_cell(recipe, killed)
    assert summary["train_steps"] == recipe["trainer"]["max_steps"]
    assert summary["train_seconds"] >= round(seconds_before_kill, 1)   # the whole cost, not the last leg
    a, b = _state(straight), _state(killed)
    assert a["global_step"] == b["global_step"] == recipe["trainer"]["max_steps"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # the step-by-step record is the same too (rows after the last checkpoint were redone)
    assert read_curve(straight / "train_curve.csv") == read_curve(killed / "train_curve.csv")


# ---------------------------------------------------------------------------------------------
# The run's progress bar
# ---------------------------------------------------------------------------------------------
def test_progress_bar_spans_every_epoch_of_the_run_without_restarting_its_clock(tmp_path, monkeypatch):
    """One bar over trainer.max_steps: an epoch boundary must not reset its elapsed time and rate
    (Lightning resets its own bar at every epoch, which restarted the ETA of a multi-epoch run)."""
    import lightning as L

    from slr_zoo.training.trainer import StepProgressBar, make_trainer

    seen = []

    class EpochStarts(L.Callback):
        def on_train_epoch_start(self, trainer, *_):
            bar = trainer.progress_bar_callback.train_progress_bar
            seen.append((id(bar), bar.start_t, bar.n, bar.total, trainer.global_step))

    monkeypatch.setattr("slr_zoo.training.trainer._console_is_terminal", lambda: True)
    recipe = tiny_recipe(trainer__max_steps=20, trainer__progress_bar=True)  # 64 records of batch 8: 3 epochs
    parts = build_cell(recipe, tmp_path)
    trainer = make_trainer(parts.trainer, tmp_path, enable_checkpointing=False)
    assert isinstance(trainer.progress_bar_callback, StepProgressBar)
    trainer.callbacks.append(EpochStarts())
    trainer.fit(parts.module, datamodule=parts.data)
    assert len(seen) == 3
    assert len({(bar, start) for bar, start, *_ in seen}) == 1
    assert all(n == step and total == 20 for _, _, n, total, step in seen)
    assert trainer.progress_bar_callback.train_progress_bar.n == 20


def test_a_console_that_is_not_a_terminal_gets_plain_flushed_progress_lines(tmp_path, monkeypatch, capsys):
    """A log file (nohup, SLURM, a grid's child) gets whole lines: where the run is, its rate, the
    time left and the mean loss since the last line, and each validation's figures; no tqdm bar."""
    from slr_zoo.training.trainer import ProgressLines, make_trainer

    monkeypatch.setattr("slr_zoo.training.trainer._console_is_terminal", lambda: False)
    recipe = tiny_recipe(trainer__max_steps=6, trainer__progress_bar=True, trainer__val_every=3)
    parts = build_cell(recipe, tmp_path)
    trainer = make_trainer(parts.trainer, tmp_path, enable_checkpointing=False)
    assert trainer.progress_bar_callback is None
    (lines,) = [c for c in trainer.callbacks if isinstance(c, ProgressLines)]
    lines.interval = 0  # a line every step
    trainer.fit(parts.module, datamodule=parts.data)
    out = capsys.readouterr().out.splitlines()
    steps = [line for line in out if "train step" in line]
    assert [line.split(",")[0].strip() for line in steps] == [
        f"train step {n}/6 ({100 * n / 6:.0f}%)" for n in range(1, 7)]
    assert all(re.search(r"s/step, \d+:\d\d left, loss [\d.e+-]+ \(mean of 1 step\)$", line) for line in steps), steps
    validations = [line.strip() for line in out if "validation at step" in line]
    assert [v.split(":")[0] for v in validations] == ["validation at step 3", "validation at step 6"]
    assert all("val/accuracy=" in v and "val/mean_steps=" in v for v in validations)
    assert "\r" not in "".join(out) and "it/s" not in "".join(out)


def test_progress_lines_say_time_left_in_hours_minutes_and_seconds():
    from slr_zoo.training.trainer import _clock

    assert [_clock(s) for s in (0, 59.6, 245, 3600, 4092.4)] == ["0:00", "1:00", "4:05", "1:00:00", "1:08:12"]
