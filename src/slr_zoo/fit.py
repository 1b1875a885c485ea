"""``python -m slr_zoo.fit RECIPE [dotted.key=value ...] [--cell I]``

Validates the recipe and every grid cell before anything trains, then runs the cells one after
another under ``runs/<name>/<cell>/``. Cells whose ``summary.json`` says ``ok`` are skipped, so a
grid that is run again resumes; a cell interrupted mid-training resumes from its last checkpoint.
A cell that fails is recorded as failed and the others still run. Exit status: 0 when every
selected cell is ok, 1 when some failed, 2 for a bad recipe (nothing is trained).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from slr_zoo.files import atomic_write
from slr_zoo.recipe import expand, load, validate
from slr_zoo.registry import ComponentError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m slr_zoo.fit", description=__doc__.split("\n\n")[1])
    parser.add_argument("recipe", help="path to a YAML recipe")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. loop.max_steps=6")
    parser.add_argument("--cell", type=int, default=None, help="run only grid cell I (0-based)")
    parser.add_argument("--list", action="store_true", help="list the grid's cells and exit")
    parser.add_argument("--rerun", action="store_true", help="run cells again even if they finished")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = load(args.recipe, args.overrides)
        validate(recipe)
        cells = expand(recipe)
        for cell in cells:
            try:
                validate(cell.recipe)
            except ComponentError as err:
                raise ComponentError(err.path, f"{err.message} (in grid cell {cell.index}: {cell.label})") from None
        if args.cell is not None and not 0 <= args.cell < len(cells):
            raise ComponentError("--cell", f"{args.cell} is out of range: the grid has {len(cells)} cells (0..{len(cells) - 1})")
    except ComponentError as err:
        print(f"recipe error: {err}", file=sys.stderr)
        return 2

    run_dir = Path(recipe["output_dir"]) / recipe["name"]
    if args.list:
        for cell in cells:
            print(f"{cell.index:3d}  {cell.label}")
        return 0
    selected = [cells[args.cell]] if args.cell is not None else cells
    print(f"{recipe['name']}: {len(selected)} of {len(cells)} cell(s) -> {run_dir}/", flush=True)
    failures = 0
    for n, cell in enumerate(selected, start=1):
        directory = run_dir / cell.label
        summary_path = directory / "summary.json"
        if not args.rerun and _finished(summary_path):
            print(f"[{n}/{len(selected)}] {cell.label}: done already, skipped", flush=True)
            continue
        print(f"[{n}/{len(selected)}] {cell.label}", flush=True)
        summary = _run_guarded(cell, directory)
        if summary["status"] != "ok":
            failures += 1
            print(f"    FAILED: {summary['error']}", file=sys.stderr, flush=True)
        else:
            print(f"    val_accuracy={summary['val_accuracy']:.3f} mean_steps={summary['mean_steps']:.2f} "
                  f"train_seconds={summary['train_seconds']:.0f}", flush=True)

    if _is_global_zero():
        from slr_zoo.reports.results import write_reports

        print()
        print(write_reports(recipe, cells, run_dir))
        print(f"wrote {run_dir}/results.csv, results.md and plots")
    return 1 if failures else 0


def _finished(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def _run_guarded(cell, directory: Path) -> dict:
    """Run one cell; any exception becomes a failed summary so the rest of the grid still runs."""
    from slr_zoo.training.run import run_cell

    start = time.perf_counter()
    try:
        return run_cell(cell.recipe, directory, cell.keys)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001  (recorded, reported, and the grid goes on)
        summary = {
            "name": cell.recipe["name"], "cell": cell.label, "status": "failed",
            "error": f"{type(err).__name__}: {err}", "seconds": round(time.perf_counter() - start, 1),
        }
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / "error.log", traceback.format_exc())
        if _is_global_zero():
            atomic_write(directory / "summary.json", json.dumps(summary, indent=2))
        return summary


def _is_global_zero() -> bool:
    """Rank 0 of torchrun (RANK), srun (SLURM_PROCID) or Lightning's own launcher (LOCAL_RANK)."""
    import os

    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"))


if __name__ == "__main__":
    sys.exit(main())
