"""Divergence guards (a planted NaN, stop or skip) and grids that survive a failing cell."""

from __future__ import annotations

import csv
import json

import lightning as L
import pytest
import torch
import yaml
from conftest import tiny_model, tiny_recipe
from nan_plant import plant

from slr_zoo import fit
from slr_zoo import looped
from slr_zoo.looped import NonFiniteStateError, UniformDepth
from slr_zoo.training.module import depth_generator
from slr_zoo.recipe import build_cell, train_cell
from slr_zoo.training.trainer import read_curve


def _recipe(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path), trainer__max_steps=6, trainer__val_every=None, trainer__accelerator="cpu",
                optim__warmup_steps=2)
    base.update(overrides)
    return tiny_recipe(**base)


def test_planted_nan_is_caught_at_its_iteration(tokens, monkeypatch):
    model = tiny_model(tiny_recipe(loop__combine=plant(2))).train()
    with pytest.raises(NonFiniteStateError, match="loop iteration 2") as info:
        model(tokens, steps=3)
    assert info.value.step == 2
    # as under FSDP (every rank makes every all-gather): run the whole pass, then report the first bad iteration
    calls = []
    model.backbone.core.register_forward_hook(lambda m, i, o: calls.append(1))
    with monkeypatch.context() as patch:
        patch.setattr(looped, "_fully_sharded", lambda module: module is model)
        with pytest.raises(NonFiniteStateError) as info:
            model(tokens, steps=3)
    assert info.value.step == 2 and len(calls) == 3
    model.eval()  # the plant is for training runs only
    assert torch.isfinite(model(tokens, steps=3).logits).all()


def test_stop_names_the_iteration_and_the_step(tmp_path):
    recipe = _recipe(tmp_path, loop__combine=plant(2))
    with pytest.raises(FloatingPointError, match=r"global step 0 \(depth 3\): the hidden state became non-finite "
                                                 r"at loop iteration 2\. Set trainer\.on_nonfinite=skip"):
        train_cell(recipe, tmp_path / "cell")


def test_nan_in_the_loss_without_the_state_check_is_still_caught(tmp_path):
    recipe = _recipe(tmp_path, loop__combine=plant(2), loop__check_finite=False)
    with pytest.raises(FloatingPointError, match="non-finite loss nan"):
        train_cell(recipe, tmp_path / "cell")


def test_skip_counts_exactly_the_diverging_batches_and_trains_on_the_rest(tmp_path):
    # uniform depth in [1, 3] with a NaN at iteration 3: exactly the batches drawn with depth 3 diverge
    recipe = _recipe(tmp_path, trainer__max_steps=10, trainer__on_nonfinite="skip", loop__combine=plant(3),
                     loop__depth_sampler={"name": "uniform"})
    depths = [UniformDepth(max_steps=3).sample(depth_generator(0, s)) for s in range(10)]
    expected = sum(d == 3 for d in depths)
    assert 0 < expected < 10

    summary = train_cell(recipe, tmp_path / "cell")
    assert summary["status"] == "ok" and summary["skipped_batches"] == expected
    curve = read_curve(tmp_path / "cell" / "train_curve.csv")
    assert [r["depth"] for r in curve] == depths
    assert [r["skipped"] for r in curve] == [d == 3 for d in depths]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in curve if not r["skipped"])


def test_skipped_batches_leave_weights_and_optimizer_untouched(tmp_path):
    # every batch diverges at iteration 1: nothing may move, not even through Adam's momentum or weight decay
    recipe = _recipe(tmp_path, trainer__max_steps=3, trainer__on_nonfinite="skip", loop__combine=plant(1))
    L.seed_everything(recipe["seed"], verbose=False)
    fresh = build_cell(recipe, tmp_path / "cell").module
    summary = train_cell(recipe, tmp_path / "cell")
    assert summary["skipped_batches"] == 3
    checkpoint = torch.load(tmp_path / "cell" / "checkpoints" / "last.ckpt", weights_only=False)
    for key, value in fresh.state_dict().items():
        assert torch.equal(checkpoint["state_dict"][key], value), key
    assert checkpoint["optimizer_states"][0]["state"] == {}
    assert checkpoint["skipped_batches"] == 3


# ---------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------
def _grid_file(tmp_path):
    recipe = _recipe(tmp_path, trainer__max_steps=2)
    recipe["name"] = "faults"
    recipe["grid"] = {"loop.combine": [{"name": "none"}, plant(1)], "seed": [0, 1]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, tmp_path / "faults"


def _rows(run_dir):
    with (run_dir / "results.csv").open() as f:
        return {r["cell"]: r for r in csv.DictReader(f)}


def test_a_failing_cell_is_recorded_and_the_others_run(tmp_path, capsys):
    path, run_dir = _grid_file(tmp_path)
    assert fit.main([str(path)]) == 1
    rows = _rows(run_dir)
    assert len(rows) == 4
    failed = {c for c, r in rows.items() if r["status"] == "failed"}
    assert failed and all("NaNAtStep-at_step1" in c for c in failed) and len(failed) == 2
    for cell in failed:
        assert "loop iteration 1" in rows[cell]["error"]
        assert (run_dir / cell / "error.log").read_text().startswith("Traceback")
    assert all(r["status"] == "ok" and r["val_accuracy"] != "" for c, r in rows.items() if c not in failed)

    # a re-run retries the failed cells and a missing one, and leaves finished cells alone
    ok = sorted(set(rows) - failed)
    stamp = (run_dir / ok[0] / "summary.json").stat().st_mtime_ns
    missing = ok[1]
    for f in sorted((run_dir / missing).rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    (run_dir / missing).rmdir()
    capsys.readouterr()
    assert fit.main([str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{ok[0]}: done already, skipped" in out
    assert out.count("done already") == 1
    assert (run_dir / ok[0] / "summary.json").stat().st_mtime_ns == stamp
    assert json.loads((run_dir / missing / "summary.json").read_text())["status"] == "ok"
    assert {c for c, r in _rows(run_dir).items() if r["status"] == "failed"} == failed
