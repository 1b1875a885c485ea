"""The grid report: how fast each cell fitted, read from its training curve, in the table and as a plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

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


def test_the_report_command_regenerates_a_2x2_grid_with_means_stds_and_named_plots(tmp_path):
    """A 2 x 2 grid (two combines x two hop ranges), two seeds each, read back from its cells'
    files: four rows, each the mean and sample std of its two seeds, legends named by grid key."""
    import yaml

    from slr_zoo import report
    from slr_zoo.recipe.grid import expand

    recipe = {"name": "g", "seed": 0, "task": {"name": "iterate"},
              "grid": {"loop.combine": [{"name": "none"}, {"name": "gated"}], "task.hops": [[1, 2], [1, 4]],
                       "seed": [0, 1]}}
    run_dir = tmp_path / "g"
    run_dir.mkdir()
    (run_dir / "grid.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))  # as fit writes it
    accuracy = {}
    for i, cell in enumerate(expand(recipe)):
        folder = run_dir / cell.label
        folder.mkdir()
        (folder / "config.yaml").write_text(yaml.safe_dump(cell.recipe))
        accuracy[cell.label] = 0.5 + 0.01 * i
        (folder / "summary.json").write_text(json.dumps({
            "status": "ok", "val_accuracy": accuracy[cell.label], "mean_steps": 4.0, "train_seconds": 1.0,
            "train_steps": 10, "params": 100, "hop_accuracy": {}}))
        (folder / "val_curve.csv").write_text("step,accuracy,mean_steps\n5,0.3,4.0\n10,0.5,4.0\n")
        # evaluate's accuracy by inference depth: 0.2 + 0.01 i at one iteration, 0.6 + 0.02 i at four
        (folder / "eval.json").write_text(json.dumps({"split": "val",
                                                      "by_depth": [{"steps": 1, "accuracy": 0.2 + 0.01 * i},
                                                                   {"steps": 4, "accuracy": 0.6 + 0.02 * i}],
                                                      "stability": {"delta": [0.5, 0.2 + 0.01 * i, 0.1]},
                                                      "depth_histogram": {"first_token": {"3": 2 + i, "4": 5}}}))
    assert report.main([str(run_dir)]) == 0
    text = (run_dir / "results.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| none") or line.startswith("| gated")]
    assert len(rows) == 4 + 4  # the table, then accuracy by inference depth (no hop counts recorded)
    # cells in grid order: seeds vary fastest, so variant k holds accuracies 0.5 + 0.01 (2k, 2k + 1)
    for k, row in enumerate(rows[:4]):
        mean, std = 100 * (0.5 + 0.01 * (2 * k + 0.5)), 100 * 0.01 / 2 ** 0.5
        assert f"| 2/2 | {mean:.1f} ± {std:.1f} |" in row, row
    depth_table = text.split("by loop iterations at inference")[1]
    assert "| combine | hops | seeds | 1 | 4 |" in depth_table
    for k, row in enumerate(rows[4:]):
        at_1 = f"{100 * (0.2 + 0.01 * (2 * k + 0.5)):.1f} ± {100 * 0.01 / 2 ** 0.5:.1f}"
        at_4 = f"{100 * (0.6 + 0.02 * (2 * k + 0.5)):.1f} ± {100 * 0.02 / 2 ** 0.5:.1f}"
        assert row.endswith(f"| 2/2 | {at_1} | {at_4} |"), row
    for png in ("accuracy.png", "accuracy_vs_step.png", "accuracy_vs_depth.png", "depth_histograms.png",
                "state_change.png"):
        assert (run_dir / png).stat().st_size > 10_000, png
    assert any((run_dir / "hparams").rglob("events.out.tfevents.*"))
    # an evaluation of another split is not validation accuracy: it leaves the table
    for folder in run_dir.glob("combine=*"):
        report_of = json.loads((folder / "eval.json").read_text())
        (folder / "eval.json").write_text(json.dumps({**report_of, "split": "ood"}))
    assert report.main([str(run_dir)]) == 0
    assert "by loop iterations at inference" not in (run_dir / "results.md").read_text()
    from slr_zoo.reports.results import variant_name

    assert variant_name({"loop.combine": "none", "loop.max_steps": 6}, ["loop.combine", "loop.max_steps"]) == \
        "combine=none, max_steps=6"


def test_a_variant_keeps_one_colour_over_its_seeds_which_differ_by_line_style():
    from slr_zoo.report import line_style

    labels = [f"combine={c}, seed={s}" for c in ("none", "gated") for s in (0, 1, 2)] + ["combine=none, max_steps=1"]
    styles = {label: line_style(label, labels) for label in labels}
    plain = [styles[f"combine=none, seed={s}"] for s in (0, 1, 2)]
    gated = [styles[f"combine=gated, seed={s}"] for s in (0, 1, 2)]
    assert {c for c, _ in plain} == {0} and {c for c, _ in gated} == {1}
    assert len({d for _, d in plain}) == 3 and [d for _, d in plain] == [d for _, d in gated]
    assert styles["combine=none, max_steps=1"] == (2, "-")  # another variant: a colour of its own


@pytest.mark.filterwarnings("error::UserWarning")  # matplotlib's "tight layout not applied": names cut off
def test_a_union_grid_over_components_is_named_as_the_grid_wrote_it(tmp_path):
    """compare_training-style grids: a component set in one part of the grid and left alone in
    another is named by what the grid wrote there, not by every default of the resolved recipe,
    and two keys that end alike ("loop.max_steps", "trainer.max_steps") are told apart."""
    recipe = load(str(ROOT / "recipes/quickstart.yaml"))
    recipe["grid"] = [{"training": [{"encoding": "cot"}], "loop.max_steps": [1]},
                      {"loop": [{"max_steps": 6, "reach_supervision": 0.0}], "trainer.max_steps": [30]}]
    cells = expand(recipe)
    run_dir = tmp_path / "union"
    for cell in cells[:1]:  # the second cell has not run yet
        write_curve(run_dir / cell.label / "train_curve.csv", [2.0] * 100)
        (run_dir / cell.label / "summary.json").write_text(json.dumps({
            "status": "ok", "val_accuracy": 0.5, "mean_steps": 6.0, "train_seconds": 10.0, "train_steps": 100,
            "params": 1000, "hop_accuracy": {"1": 0.5, "2": 0.5}}))
    text = write_reports(recipe, cells, run_dir)
    headers = [line for line in text.splitlines() if line.startswith("| training")]
    assert len(headers) == 2  # the main table and the one by hops, which names the keys alike
    assert all(h.startswith("| training | loop.max_steps | loop | trainer.max_steps |") for h in headers)
    assert "nan" not in text
    assert "| encodingcot | 1 | (recipe's) |" in text
    assert "| (recipe's) | 6 | max_steps6-reach_supervision0.0 | 30 |" in text
    assert max(len(line) for line in text.splitlines() if line.startswith("| ")) < 200


def _seed_grid(tmp_path: Path) -> Path:
    """A two-seed grid of finished cells, written as fit writes it."""
    import yaml

    from slr_zoo.recipe.grid import expand

    recipe = {"name": "g", "seed": 0, "task": {"name": "iterate"}, "grid": {"seed": [0, 1]}}
    run_dir = tmp_path / "g"
    run_dir.mkdir()
    (run_dir / "grid.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    for cell in expand(recipe):
        (run_dir / cell.label).mkdir()
        (run_dir / cell.label / "config.yaml").write_text(yaml.safe_dump(cell.recipe))
        (run_dir / cell.label / "summary.json").write_text(json.dumps({
            "status": "ok", "val_accuracy": 0.5, "mean_steps": 4.0, "train_seconds": 1.0, "train_steps": 10,
            "params": 100, "hop_accuracy": {}}))
    return run_dir


@pytest.mark.parametrize("damage", ["{bad", '"ok"', "[1, 2]"])
def test_a_damaged_summary_is_skipped_and_named_while_the_other_cells_are_reported(damage, tmp_path, capsys):
    from slr_zoo import evaluate, report

    run_dir = _seed_grid(tmp_path)
    (run_dir / "seed=1" / "summary.json").write_text(damage)
    assert report.main([str(run_dir)]) == 0
    assert f"report: seed=1: skipped ({run_dir / 'seed=1' / 'summary.json'} " in capsys.readouterr().err
    rows = {r["cell"]: r for r in csv.DictReader((run_dir / "results.csv").open())}
    assert rows["seed=0"]["status"] == "ok" and rows["seed=1"]["status"] == "unreadable"
    assert "| 1/2 | 50.0 |" in (run_dir / "results.md").read_text()
    # evaluate on the grid passes the cell by the same reading: no cell has weights, nothing is evaluated
    evaluate.evaluate_grid(run_dir, depths=[1])
    assert f"seed=1: skipped ({run_dir / 'seed=1' / 'summary.json'} " in capsys.readouterr().err


@pytest.mark.parametrize("grid, message", [
    ("", r"grid\.yaml holds nothing, not the grid's recipe; remove it"),
    ("[1, 2]", r"grid\.yaml holds a list, not the grid's recipe"),
    ("name: [a: b\n", r"cannot parse .*g/grid\.yaml"),
    ("name: g\ngrid: [3]\n", r"g/grid\.yaml: grid\[0\]: expected a mapping"),
])
def test_a_damaged_grid_yaml_is_named_with_exit_status_2(grid, message, tmp_path, capsys):
    import re

    from slr_zoo import report

    run_dir = _seed_grid(tmp_path)
    (run_dir / "grid.yaml").write_text(grid)
    assert report.main([str(run_dir)]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_grid_yaml_without_a_name_is_titled_by_its_folder(tmp_path):
    from slr_zoo import report

    run_dir = _seed_grid(tmp_path)
    (run_dir / "grid.yaml").write_text("grid: {seed: [0, 1]}\n")
    assert report.main([str(run_dir)]) == 0
    assert (run_dir / "results.md").read_text().startswith("# g\n")


@pytest.mark.filterwarnings("error::UserWarning")  # matplotlib's "tight layout not applied": names cut off
def test_costed_cells_are_plotted_as_accuracy_against_passes_and_flops_per_answer(tmp_path):
    """RQ4's picture: one point per variant at its mean accuracy over seeds (std as the error bar)
    and its mean sequential passes and FLOPs per answer; a grid whose cells were not costed gets
    no such plot."""
    from slr_zoo.reports.results import collect, cost_points, summarise

    recipe = load(str(ROOT / "recipes/quickstart.yaml"))
    recipe["grid"] = {"training.encoding": ["answer", "cot"], "seed": [0, 1]}
    cells = expand(recipe)
    run_dir = tmp_path / "rq4"
    costs = {"answer": (2.0, 1e8), "cot": (20.0, 3e8)}
    for cell, accuracy in zip(cells, (0.9, 1.0, 0.5, 0.6)):
        encoding = cell.recipe["training"]["encoding"]
        passes, flops = costs[encoding]
        write_curve(run_dir / cell.label / "train_curve.csv", [2.0] * 100)
        (run_dir / cell.label / "summary.json").write_text(json.dumps({
            "status": "ok", "val_accuracy": accuracy, "mean_steps": 1.0, "train_seconds": 1.0, "train_steps": 100,
            "params": 10, "hop_accuracy": {}, "thoughts_per_answer": 0, "tokens_per_answer": passes,
            "passes_per_answer": passes + cell.recipe["seed"], "flops_per_answer": flops,
            "seconds_per_example": 0.01}))
    keys = ["training.encoding", "seed"]
    points = cost_points(summarise(collect(run_dir, cells, keys), keys), ["training.encoding"])
    assert [p["name"] for p in points] == ["encoding=answer", "encoding=cot"]
    assert [p["accuracy"] for p in points] == pytest.approx([95.0, 55.0])
    assert [p["std"] for p in points] == pytest.approx([7.0711, 7.0711], abs=1e-3)
    assert [p["passes"] for p in points] == [2.5, 20.5] and [p["flops"] for p in points] == [1e8, 3e8]
    write_reports(recipe, cells, run_dir)
    assert (run_dir / "cost.png").stat().st_size > 0
    # what a log axis cannot place is left out: no passes measured (0, NaN) or no FLOPs (that panel only)
    entry = {"training.encoding": "x", "_accuracy": 0.5, "_std": 0.0}
    table = [dict(entry, _cost={"passes_per_answer": 0.0}), dict(entry, _cost={"passes_per_answer": float("nan")}),
             dict(entry, _cost={"passes_per_answer": 3.0, "flops_per_answer": 0.0}), dict(entry, _accuracy=None, _cost={})]
    assert cost_points(table, ["training.encoding"]) == [
        {"name": "encoding=x", "accuracy": 50.0, "std": 0.0, "passes": 3.0, "flops": None}]

    uncosted = tmp_path / "plain"
    for cell in cells:
        write_curve(uncosted / cell.label / "train_curve.csv", [2.0] * 100)
        (uncosted / cell.label / "summary.json").write_text(json.dumps({
            "status": "ok", "val_accuracy": 0.5, "mean_steps": 1.0, "train_seconds": 1.0, "train_steps": 100,
            "params": 10, "hop_accuracy": {}}))
    write_reports(recipe, cells, uncosted)
    assert (uncosted / "accuracy.png").is_file() and not (uncosted / "cost.png").exists()
