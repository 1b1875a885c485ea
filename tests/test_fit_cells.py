"""How ``fit`` treats a cell folder that already exists: skip, resume, refuse, replace, and the
grid table that covers every cell run under one name."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from slr_zoo import fit

ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path, *extra, name="cells"):
    recipe = tmp_path / "r.yaml"
    if not recipe.exists():
        recipe.write_text((ROOT / "recipes/quickstart.yaml").read_text())
    tiny = [f"output_dir={tmp_path}/runs", f"name={name}", "task.n_train=64", "task.n_val=16",
            "trainer.max_steps=3", "trainer.batch_size=16", "backbone.hidden_size=32", "trainer.progress_bar=false",
            "loop.max_steps=2"]
    return fit.main([str(recipe), *tiny, *extra])


def summary(tmp_path, cell="default", name="cells"):
    return json.loads((tmp_path / "runs" / name / cell / "summary.json").read_text())


def test_a_finished_cell_of_another_recipe_is_refused_not_reused(tmp_path, capsys):
    assert run(tmp_path) == 0
    before = summary(tmp_path)
    capsys.readouterr()
    assert run(tmp_path, "optim.lr=0.01") == 2
    err = capsys.readouterr().err
    assert "holds a finished run of a different recipe (optim.lr: 0.001 -> 0.01)" in err
    assert "name=" in err and "--rerun" in err
    assert summary(tmp_path) == before                       # nothing trained, nothing overwritten
    assert run(tmp_path, "trainer.threads=1") == 0           # presentation keys do not count


def test_rerun_trains_from_scratch_and_keeps_the_old_run(tmp_path):
    assert run(tmp_path) == 0
    assert run(tmp_path, "optim.lr=0.01", "--rerun") == 0
    new = summary(tmp_path)
    assert new["train_steps"] == 3 and new["train_seconds"] > 0
    assert "lr: 0.01" in (tmp_path / "runs/cells/default/config.yaml").read_text()
    kept = list((tmp_path / "runs/cells/.replaced").iterdir())
    assert len(kept) == 1 and "lr: 0.001" in (kept[0] / "config.yaml").read_text()


PLANT = "loop.combine={_component_: nan_plant.NaNAtStep, at_step: 1}"  # diverges at its first step


def test_a_failed_attempt_is_moved_aside_when_the_recipe_is_fixed(tmp_path):
    # the first attempt fails while training
    assert run(tmp_path, PLANT) == 1
    assert summary(tmp_path)["status"] == "failed"
    assert run(tmp_path) == 0
    assert summary(tmp_path)["status"] == "ok"
    assert len(list((tmp_path / "runs/cells/.replaced").iterdir())) == 1


def test_resume_flag_stops_when_there_is_nothing_to_resume(tmp_path, capsys):
    assert run(tmp_path, "--resume") == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_a_smaller_run_under_the_same_name_adds_to_the_table(tmp_path):
    assert run(tmp_path, "grid={seed: [0, 1]}") == 0
    assert run(tmp_path) == 0                                 # one more cell, "default"
    with open(tmp_path / "runs/cells/results.csv") as f:
        cells = [row["cell"] for row in csv.DictReader(f)]
    assert cells == ["default", "seed=0", "seed=1"]


def test_a_grid_can_be_started_from_the_command_line_and_a_swept_override_is_flagged(tmp_path, capsys):
    assert run(tmp_path, "grid.seed=[0, 1]", "--list") == 0
    assert capsys.readouterr().out.split() == ["0", "seed=0", "1", "seed=1"]
    assert run(tmp_path, "grid.seed=[0, 1]", "seed=5", "--list") == 0
    assert "note: seed is set by the grid (seed)" in capsys.readouterr().err


def test_options_may_sit_between_overrides(tmp_path, capsys):
    recipe = ROOT / "recipes/ablation_residual_all.yaml"
    assert fit.main([str(recipe), "--cell", "6", f"output_dir={tmp_path}", "--list", "trainer.max_steps=2"]) == 0
    assert "max_steps=1__core_layers=6" in capsys.readouterr().out


def test_parallel_cells_train_each_cell_in_its_own_process_and_fill_one_table(tmp_path, capsys):
    grid = ["grid.loop.max_steps=[1,2,3]", "trainer.parallel_cells=2", "trainer.threads=1"]
    # one cell finished before: it is skipped, the other two run side by side
    assert run(tmp_path, *grid, "--cell", "0", "trainer.parallel_cells=1") == 0
    first = summary(tmp_path, "max_steps=1")
    capsys.readouterr()
    assert run(tmp_path, *grid) == 0
    out = capsys.readouterr().out
    assert "max_steps=1: done already, skipped" in out
    assert out.count(": started (output in") == 2
    assert summary(tmp_path, "max_steps=1") == first
    for cell in ("max_steps=2", "max_steps=3"):
        assert summary(tmp_path, cell)["status"] == "ok"
        assert "val_accuracy=" in (tmp_path / "runs/cells/.logs" / f"{cell}.log").read_text()
    rows = list(csv.DictReader((tmp_path / "runs/cells/results.csv").open()))
    assert sorted(r["loop.max_steps"] for r in rows) == ["1", "2", "3"]


def test_a_failing_parallel_cell_is_reported_and_the_grid_exits_1(tmp_path, capsys, monkeypatch):
    # the second cell diverges while training, inside its child process
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))   # the children import nan_plant
    grid = ["grid.loop.combine=[{name: none}, {_component_: nan_plant.NaNAtStep, at_step: 1}]",
            "trainer.parallel_cells=2", "trainer.threads=1"]
    assert run(tmp_path, *grid) == 1
    captured = capsys.readouterr()
    assert "combine=NaNAtStep-at_step1: FAILED: FloatingPointError" in captured.err
    assert "combine=none: val_accuracy=" in captured.out
    assert summary(tmp_path, "combine=none")["status"] == "ok"


def test_parallel_cells_refuse_multi_device_cells(tmp_path, capsys):
    assert run(tmp_path, "grid.seed=[0,1]", "trainer.parallel_cells=2", "trainer.devices=2") == 2
    assert "trainer.parallel_cells: runs several single-process cells at once" in capsys.readouterr().err


def test_a_grid_key_from_the_command_line_is_one_dotted_key_and_reaches_every_product():
    from slr_zoo.recipe import expand, load

    single = expand(load(str(ROOT / "recipes/quickstart.yaml"), ["grid.loop.max_steps=[1,2]"]))
    assert [c.keys for c in single] == [{"loop.max_steps": 1}, {"loop.max_steps": 2}]
    # the residual ablation is a list of products (variants, then baselines): seeds go on each
    cells = expand(load(str(ROOT / "recipes/ablation_residual_all.yaml"), ["grid.seed=[0,1]"]))
    plain = expand(load(str(ROOT / "recipes/ablation_residual_all.yaml")))
    assert len(cells) == 2 * len(plain)
    assert {c.recipe["seed"] for c in cells} == {0, 1} and all("seed" in c.keys for c in cells)


def test_loading_a_cell_that_failed_before_training_says_so_with_its_error(tmp_path):
    from slr_zoo.files import write_json
    from slr_zoo.recipe import load_cell

    write_json(tmp_path / "summary.json", {"status": "failed", "error": "task.train: no such records file"})
    with pytest.raises(FileNotFoundError, match=r"a cell that failed before it trained: task\.train: no such records"):
        load_cell(tmp_path)
