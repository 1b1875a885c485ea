"""How ``fit`` treats a cell folder that already exists: skip, resume, refuse, replace, and the
grid table that covers every cell run under one name."""

from __future__ import annotations

import csv
import json
from pathlib import Path

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


def test_a_failed_attempt_is_moved_aside_when_the_recipe_is_fixed(tmp_path):
    # the first attempt fails while building (a bad backbone value only the builder can check)
    assert run(tmp_path, "backbone.heads=3") == 1
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
    recipe = ROOT / "recipes/ablation_residual.yaml"
    assert fit.main([str(recipe), "--cell", "6", f"output_dir={tmp_path}", "--list", "trainer.max_steps=2"]) == 0
    assert "max_steps=1__core_layers=6" in capsys.readouterr().out
