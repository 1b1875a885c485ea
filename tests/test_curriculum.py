"""``task.curriculum``: easier stages first, each drawing only from its own examples until its
step, resumable at any batch, and every mistake in a stage named by its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slr_zoo import fit
from slr_zoo.recipe import build_curriculum, load
from slr_zoo.training.data import ResumableBatchSampler

ROOT = Path(__file__).resolve().parents[1]
STAGES = [(0, 0, 40), (5, 40, 24), (9, 64, 50)]   # (first batch, first example, count)


def batches(sampler, n):
    out = []
    while len(out) < n:
        out += list(sampler)  # one epoch (or stage) per iter(), as Lightning does
    return out[:n]


def test_each_stage_draws_only_its_own_examples_from_its_first_batch_on():
    got = batches(ResumableBatchSampler(114, 8, seed=2, stages=STAGES), 20)
    for i, batch in enumerate(got):
        first, offset, count = STAGES[max(k for k, s in enumerate(STAGES) if s[0] <= i)]
        assert all(offset <= x < offset + count for x in batch), (i, batch)
    assert len({x for b in got[:5] for x in b}) == 40        # stage 0: one epoch of its 40 examples
    two = [a + b for a, b in zip(batches(ResumableBatchSampler(114, 4, seed=2, rank=0, world_size=2, stages=STAGES), 20),
                                 batches(ResumableBatchSampler(114, 4, seed=2, rank=1, world_size=2, stages=STAGES), 20))]
    assert two == got


def test_a_curriculum_resumes_at_any_batch():
    full = batches(ResumableBatchSampler(114, 8, seed=2, stages=STAGES), 20)
    for start in (3, 5, 7, 9, 15):
        assert batches(ResumableBatchSampler(114, 8, seed=2, start=start, stages=STAGES), 20 - start) == full[start:]


@pytest.mark.parametrize("stages, key, message", [
    ("[{until: 5, nodez: [8, 10]}]", "task.curriculum[0].nodez", "unknown key for task 'prosqa'"),
    ("[{until: 5}, {until: 5}]", "task.curriculum[1].until", "after the previous stage's end (5)"),
    ("[{hops: [1, 2]}]", "task.curriculum[0].until", "must be an integer step"),
    ("[{until: 5, name: iterate}]", "task.curriculum[0].name", "changes the task's keys, not the task"),
    ("[{until: 50}]", "task.curriculum[0].until", "leaves no step of trainer.max_steps (10)"),
    ("{until: 5}", "task.curriculum", "expected a non-empty list"),
])
def test_a_bad_stage_is_named(tmp_path, capsys, stages, key, message):
    args = [str(ROOT / "recipes/prosqa.yaml"), f"output_dir={tmp_path}", "trainer.max_steps=10",
            f"task.curriculum={stages}"]
    assert fit.main(args) == 2
    err = capsys.readouterr().err
    assert key in err and message in err, err


def test_fit_trains_through_a_curriculum(tmp_path):
    args = [f"output_dir={tmp_path}", "task.n_train=48", "trainer.max_steps=4", "trainer.batch_size=8",
            "trainer.val_every=4", "trainer.progress_bar=false", "name=staged",
            "task.curriculum=[{until: 2, hops: [1, 2], nodes: [8, 10], n_train: 16}]"]
    recipe = load(str(ROOT / "recipes/prosqa.yaml"), args[:1] + args[-1:])
    (until, stage), = build_curriculum(recipe)
    assert until == 2 and stage.hops == (1, 2) and stage.nodes == (8, 10) and stage.n["train"] == 16
    assert fit.main([str(ROOT / "recipes/prosqa.yaml"), *args]) == 0
    summary = json.loads((tmp_path / "staged/default/summary.json").read_text())
    assert summary["status"] == "ok" and summary["train_steps"] == 4
