"""Data-parallel training on this CPU with 2 processes: DDP and FSDP2 reproduce one process.

``launch`` forks two workers with the environment torchrun gives its workers (RANK, LOCAL_RANK,
WORLD_SIZE, GROUP_RANK, ...), so Lightning's TorchElasticEnvironment takes them for an external
launch, exactly as on a cluster, without paying a fresh interpreter's imports per test. The tests
marked slow go through ``python -m slr_zoo.fit`` and Lightning's own launcher instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe

from slr_zoo.looped import UniformDepth
from slr_zoo.stabilizers.combine import Combine
from slr_zoo.training.module import depth_generator
from slr_zoo.recipe import build_cell, set_key, train_cell
from slr_zoo.training.trainer import fork_workers, read_curve

REPO = Path(__file__).resolve().parents[1]
CUDA2 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                           reason="needs 2 CUDA devices (NCCL)")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ---------------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------------
def launch(recipe: dict, directory: Path, world: int = 2, target=train_cell) -> list[tuple[int, str]]:
    """``train_cell(recipe, directory)`` (or ``target``) in ``world`` torchrun-like processes; the ranks' errors."""
    return fork_workers(target, (recipe, directory), world=world, timeout=120)


def _recipe(tmp_path, **overrides) -> dict:
    # loop LoRA per step, ACT halting, random depth: the parts whose state differs step by step
    base = dict(output_dir=str(tmp_path), trainer__max_steps=6, trainer__val_every=3, trainer__batch_size=8,
                trainer__accelerator="cpu", task__n_val=15, optim__warmup_steps=2,
                loop__depth_sampler={"name": "uniform"},
                loop__loop_lora={"name": "per_step", "rank": 2, "targets": ["q_proj", "v_proj"]},
                loop__halting={"name": "act"})
    base.update(overrides)
    return tiny_recipe(**base)


def _weights(directory: Path) -> dict:
    return torch.load(directory / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def assert_same_run(a: Path, b: Path, tol: float = 1e-5) -> None:
    ca, cb = read_curve(a / "train_curve.csv"), read_curve(b / "train_curve.csv")
    assert [r["step"] for r in ca] == [r["step"] for r in cb] and ca
    assert [r["depth"] for r in ca] == [r["depth"] for r in cb]
    for ra, rb in zip(ca, cb):
        assert abs(ra["loss"] - rb["loss"]) <= tol, (ra, rb)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=tol, msg=key)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, global batch 8."""
    tmp = tmp_path_factory.mktemp("single")
    recipe = _recipe(tmp)
    summary = train_cell(recipe, tmp / "one")
    return recipe, tmp / "one", summary


# ---------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------
def test_ddp_two_processes_reproduce_one_process(single, tmp_path):
    recipe, one, summary = single
    two = tmp_path / "two"
    assert launch(_recipe(tmp_path, trainer__strategy="ddp", trainer__devices=2, trainer__batch_size=4), two) == []
    assert_same_run(one, two)
    # depths drawn identically on both ranks (checked every step) and equal to the generator's draws
    expected = [UniformDepth(max_steps=3).sample(depth_generator(recipe["seed"], s)) for s in range(6)]
    assert [r["depth"] for r in read_curve(two / "train_curve.csv")] == expected
    assert len(set(expected)) > 1
    # the summary of 2 ranks validating half the examples each is the summary of one process
    import json

    two_summary = json.loads((two / "summary.json").read_text())
    for key in ("val_accuracy", "mean_steps", "train_steps", "hop_accuracy", "skipped_batches"):
        assert two_summary[key] == summary[key], key


def test_ddp_is_exact_when_ranks_hold_different_numbers_of_answer_tokens(tmp_path):
    """Answers of 1-4 words: each rank's mean token loss is weighted by its share of the global
    token count, so the averaged gradient is the one-process gradient, not a mean of means."""
    import json
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(12)]
    for split, n in (("train", 64), ("val", 8)):
        records = [{"question": " ".join(rng.choices(words, k=6)), "steps": [],
                    "answer": " ".join(rng.choices(words, k=rng.randint(1, 4)))} for _ in range(n)]
        (tmp_path / f"{split}.json").write_text(json.dumps(records))
    task = {"name": "json", "train": str(tmp_path / "train.json"), "val": str(tmp_path / "val.json")}
    common = dict(task=task, loop__halting={"name": "fixed"}, trainer__val_every=None, trainer__max_steps=4)
    train_cell(_recipe(tmp_path, **common), tmp_path / "one")
    assert launch(_recipe(tmp_path, trainer__strategy="ddp", trainer__devices=2, trainer__batch_size=4, **common),
                  tmp_path / "two") == []
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_ddp_fork_from_python_reports_like_a_launched_run(single, tmp_path):
    _, one, summary = single
    two = tmp_path / "fork"
    forked = train_cell(_recipe(tmp_path, trainer__strategy="ddp_fork", trainer__devices=2, trainer__batch_size=4), two)
    assert_same_run(one, two)
    for key in ("val_accuracy", "mean_steps", "train_steps", "hop_accuracy", "skipped_batches"):
        assert forked[key] == summary[key], key


class GlobalRNGDepth(UniformDepth):
    """A faulty sampler: it ignores its generator, so each rank draws its own depth."""

    def sample(self, generator):
        return int(torch.randint(self.low, self.high + 1, (1,)))


def test_ranks_drawing_different_depths_are_stopped(tmp_path):
    recipe = _recipe(tmp_path, trainer__strategy="ddp", trainer__devices=2, trainer__batch_size=4,
                     loop__depth_sampler={"_component_": "test_distributed.GlobalRNGDepth"})
    errors = launch(recipe, tmp_path / "cell")
    assert [rank for rank, _ in errors] == [0, 1]
    assert all("ranks drew different loop depths at global step" in text for _, text in errors)


class NaNOnRankOne(Combine):
    """No residual; plants a NaN at loop iteration ``at`` on rank 1 only (a data-dependent blow-up)."""

    def __init__(self, at: int = 2, hidden_size: int = 0):
        super().__init__(hidden_size=hidden_size)
        self.at = at

    def forward(self, new, h0, prev, t):
        diverge = self.training and t == self.at and torch.distributed.is_initialized() and torch.distributed.get_rank() == 1
        return new + float("nan") if diverge else new


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_divergence_on_one_rank_stops_every_rank_with_its_iteration(tmp_path, strategy):
    recipe = _recipe(tmp_path, trainer__strategy=strategy, trainer__devices=2, trainer__batch_size=4,
                     loop__depth_sampler={"name": "fixed"}, loop__combine={"_component_": "test_distributed.NaNOnRankOne"})
    errors = launch(recipe, tmp_path / "cell")
    assert [rank for rank, _ in errors] == [0, 1]  # both stop, neither hangs in the all-reduce
    for _, text in errors:
        assert "the hidden state became non-finite at loop iteration 2 (on 1 of 2 ranks)" in text


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_divergence_on_one_rank_is_skipped_by_every_rank(tmp_path, strategy):
    recipe = _recipe(tmp_path, trainer__strategy=strategy, trainer__devices=2, trainer__batch_size=4,
                     trainer__on_nonfinite="skip", trainer__max_steps=3, trainer__val_every=None,
                     loop__depth_sampler={"name": "fixed"}, loop__combine={"_component_": "test_distributed.NaNOnRankOne"})
    assert launch(recipe, tmp_path / "cell") == []
    import json

    assert json.loads((tmp_path / "cell" / "summary.json").read_text())["skipped_batches"] == 3
    assert all(r["skipped"] for r in read_curve(tmp_path / "cell" / "train_curve.csv"))
    import lightning as L

    L.seed_everything(recipe["seed"], verbose=False)
    fresh = build_cell(recipe, tmp_path / "cell").module
    for key, value in fresh.state_dict().items():  # no rank moved: the skip was agreed
        assert torch.equal(_weights(tmp_path / "cell")[key], value), key


# ---------------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------------
def test_fsdp2_with_activation_checkpointing_reproduces_one_process(single, tmp_path):
    recipe, one, summary = single
    two = tmp_path / "fsdp"
    fsdp = _recipe(tmp_path, trainer__strategy="fsdp", trainer__devices=2, trainer__batch_size=4,
                   trainer__activation_checkpointing=True)
    assert launch(fsdp, two) == []
    assert_same_run(one, two)

    # the consolidated checkpoint loads into a single-process model and trains on from it
    module = build_cell(recipe, two).module
    module.load_state_dict(_weights(two), strict=True)
    onward = dict(recipe, trainer=dict(recipe["trainer"], max_steps=8))
    resumed = train_cell(onward, two)
    assert resumed["status"] == "ok" and resumed["train_steps"] == 8
    curve = read_curve(two / "train_curve.csv")
    assert [r["step"] for r in curve] == list(range(8))


def _check_fsdp2_units(recipe: dict, directory: Path) -> None:
    from conftest import tiny_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from slr_zoo.training.trainer import gather_fsdp2, shard_fsdp2

    torch.distributed.init_process_group("gloo")
    reference = tiny_model(recipe)
    model = tiny_model(recipe)
    shard_fsdp2(model, init_device_mesh("cpu", (2,)))
    backbone = model.backbone
    units = [*backbone.prelude.layers, backbone.core, *backbone.coda.layers, model]
    assert [m for m in model.modules() if isinstance(m, FSDPModule)] == [model, *backbone.prelude.layers,
                                                                        backbone.core, *backbone.coda.layers]
    assert all(isinstance(m, FSDPModule) for m in units)
    assert not any(isinstance(m, FSDPModule) for m in backbone.core.layers)  # the core is ONE unit
    rank = torch.distributed.get_rank()
    for name, p in model.named_parameters():  # every parameter, loop LoRA included, is sharded on dim 0
        assert isinstance(p, DTensor), name
        per_rank = -(-p.shape[0] // 2)
        assert p.to_local().shape[0] == max(0, min(per_rank, p.shape[0] - rank * per_rank)), name
    assert any(n.startswith("loop_lora.") for n, _ in model.named_parameters())
    tokens = torch.randint(4, 32, (2, 10), generator=torch.Generator().manual_seed(0))
    want = reference.eval()(tokens).logits
    # evaluation with the units gathered: ranks may run different numbers of steps and batches
    model.eval()
    gather_fsdp2(model, True)
    got = model(tokens).logits
    if rank == 0:
        model(tokens[:1], steps=1)  # an extra, uneven forward needs no collective
    gather_fsdp2(model, False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.distributed.destroy_process_group()


def test_fsdp2_shards_each_block_the_core_as_one_unit_and_the_root(tmp_path):
    recipe = tiny_recipe(loop__loop_lora={"name": "per_step", "rank": 2, "targets": ["q_proj", "v_proj"]},
                         loop__halting={"name": "act"})
    assert launch(recipe, tmp_path, target=_check_fsdp2_units) == []


def test_activation_checkpointing_gives_the_same_gradients():
    from conftest import tiny_model

    recipe = tiny_recipe(loop__loop_lora={"name": "per_step", "rank": 2, "targets": ["q_proj", "v_proj"]},
                         loop__step_embedding={"name": "learned"}, loop__halting={"name": "act"})
    tokens = torch.randint(4, 32, (3, 10), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(set_key(recipe, "trainer.activation_checkpointing", checkpointing)).train()
        assert model.checkpoint_core is checkpointing
        with torch.no_grad():  # non-zero LoRA B, so every step's adapter shapes the output
            for p in model.loop_lora.parameters():
                p.normal_(0, 0.1)
        out = model(tokens, steps=3)
        (out.logits.square().mean() + out.aux_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any("loop_lora" in n for n in grads[0])
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


# ---------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_trains_close_to_fp32(single, tmp_path, precision):
    _, one, _ = single
    run = _recipe(tmp_path, trainer__precision=precision, trainer__max_steps=3, trainer__val_every=None)
    summary = train_cell(run, tmp_path / "bf16")
    assert summary["status"] == "ok"
    reference = read_curve(one / "train_curve.csv")[:3]
    curve = read_curve(tmp_path / "bf16" / "train_curve.csv")
    assert [r["depth"] for r in curve] == [r["depth"] for r in reference]
    for got, want in zip(curve, reference):
        assert abs(got["loss"] - want["loss"]) < 0.03 * want["loss"], (precision, got, want)
    dtype = _weights(tmp_path / "bf16")["model.backbone.core.layers.0.mlp.up_proj.weight"].dtype
    assert dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)


@CUDA
def test_cuda_bf16_mixed_trains_close_to_fp32(tmp_path):
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        run = _recipe(tmp_path, trainer__precision=precision, trainer__accelerator="gpu", trainer__max_steps=3,
                      trainer__val_every=None)
        train_cell(run, tmp_path / precision)
        runs[precision] = read_curve(tmp_path / precision / "train_curve.csv")
    for got, want in zip(runs["bf16-mixed"], runs["32-true"]):
        assert abs(got["loss"] - want["loss"]) < 0.03 * want["loss"]


@CUDA2
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_nccl_two_gpus_reproduce_one_gpu(tmp_path, strategy):
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = dict(trainer__accelerator="gpu", trainer__precision="32-true")
    train_cell(_recipe(tmp_path, **gpu), tmp_path / "one")
    assert launch(_recipe(tmp_path, trainer__strategy=strategy, trainer__devices=2, trainer__batch_size=4, **gpu),
                  tmp_path / "two") == []
    assert_same_run(tmp_path / "one", tmp_path / "two", tol=1e-4)


# ---------------------------------------------------------------------------------------------
# Through the command line, with Lightning's own launcher
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_command_line_two_processes_reproduce_one_process(single, tmp_path, strategy):
    recipe, one, _ = single
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(dict(recipe, name="cli", output_dir=str(tmp_path))))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "tests"))
    done = subprocess.run([sys.executable, "-m", "slr_zoo.fit", str(path), f"trainer.strategy={strategy}",
                           "trainer.devices=2", "trainer.batch_size=4", "trainer.threads=1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(one, tmp_path / "cli" / "default")
