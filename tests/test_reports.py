"""The grid report: how fast each cell fitted, read from its training curve, in the table and as a plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from slr_zoo.recipe import expand, load
from slr_zoo.reports.results import steps_to_fit, write_reports

ROOT = Path(__file__).resolve().parents[1]


def write_curve(path: Path, losses: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.write("step,loss,depth,skipped\n")
        for step, loss in enumerate(losses):
            f.write(f"{step},{loss},6,False\n")


def test_steps_to_fit_is_the_end_of_the_first_block_under_5_percent_of_the_start(tmp_path):
    curve = tmp_path / "train_curve.csv"
    write_curve(curve, [2.0] * 100 + [0.5] * 50 + [0.09] * 50 + [0.5] * 50)
    assert steps_to_fit(curve) == 200          # 0.09 < 0.05 * 2.0 = 0.1, in the block of steps 150..199
    write_curve(curve, [2.0] * 100 + [0.11] * 100)
    assert steps_to_fit(curve) is None         # never under 0.1
    write_curve(curve, [2.0] * 60)
    assert steps_to_fit(curve) is None         # one block: nothing to compare
    assert steps_to_fit(tmp_path / "missing.csv") is None


def test_the_results_table_shows_steps_to_fit_and_the_loss_plot(tmp_path):
    recipe = load(str(ROOT / "recipes/quickstart.yaml"), ["grid.seed=[0,1]"])
    cells = expand(recipe)
    run_dir = tmp_path / "quickstart"
    for cell, tail in zip(cells, ([0.05] * 100, [0.5] * 100)):
        directory = run_dir / cell.label
        write_curve(directory / "train_curve.csv", [2.0] * 100 + tail)
        (directory / "summary.json").write_text(json.dumps({
            "status": "ok", "val_accuracy": 0.5, "mean_steps": 6.0, "train_seconds": 10.0, "train_steps": 200,
            "params": 1000, "hop_accuracy": {"1": 1.0}}))
    text = write_reports(recipe, cells, run_dir)
    assert "steps to fit" in text
    assert "| 150 (1/2 fit) |" in text         # one seed fitted at step 150, the other never
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert [r["steps_to_fit"] for r in rows] == ["150", ""]
    assert (run_dir / "training_loss.png").stat().st_size > 0
