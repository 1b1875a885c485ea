"""``python -m slr_zoo.fit RECIPE [dotted.key=value ...] [--cell I] [--rerun] [--resume]``

Validates the recipe and every grid cell before anything trains, then runs the cells one after
another under ``runs/<name>/<cell>/``. Cells whose ``summary.json`` says ``ok`` are skipped, so a
grid that is run again resumes; a cell interrupted mid-training resumes from its last checkpoint.
A cell folder that holds a run of a *different* recipe is never reused silently: the command stops
before training (use a new ``name=`` or ``--rerun``), except that a failed attempt is moved aside
and retried. A cell that fails is recorded as failed and the others still run. Exit status: 0 when
every selected cell is ok, 1 when some failed, 2 for a bad recipe (nothing is trained).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import yaml

from slr_zoo.files import atomic_write, cannot_make_folder, summary_or_none, write_json
from slr_zoo.recipe import StoredConfigError, check_cell, differences, expand, load, read_stored, validate
from slr_zoo.registry import ComponentError
from slr_zoo.training.checkpoint import CheckpointError, check_finished

# keys that change how a run is watched, not what it computes: a cell may resume under new values
PRESENTATION_KEYS = (
    "description", "output_dir", "trainer.threads", "trainer.progress_bar", "trainer.num_workers", "trainer.log_every",
    "trainer.eval_batch_size", "trainer.val_every", "trainer.checkpoint_every", "trainer.parallel_cells",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m slr_zoo.fit", description=__doc__.split("\n\n")[1])
    parser.add_argument("recipe", help="path to a YAML recipe")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. loop.max_steps=6")
    parser.add_argument("--cell", type=int, default=None, help="run only grid cell I (0-based)")
    parser.add_argument("--list", action="store_true", help="list the grid's cells and exit")
    parser.add_argument("--rerun", action="store_true",
                        help="train cells again from scratch; an earlier run moves to <name>/.replaced/")
    parser.add_argument("--resume", action="store_true",
                        help="only continue runs: stop if a selected unfinished cell has no checkpoint")
    args = parser.parse_intermixed_args(argv)  # options may sit between overrides
    if args.rerun and args.resume:
        parser.error("--rerun trains from scratch and --resume only continues: give one of them")
    return args


def checked_cells(recipe_path: str | Path, overrides: list[str], cell: int | None = None):
    """The recipe with its overrides, and its grid's cells, each validated and checked as far as
    can be without training (``check_cell``): what ``fit`` does before any cell trains. Raises
    ``ComponentError`` naming the bad key, and the grid cell it is in."""
    recipe = load(recipe_path, overrides)
    validate(recipe)
    cells = expand(recipe)
    warn_grid_overrides(overrides, recipe)
    for each in cells:
        try:
            validate(each.recipe)
            check_cell(each.recipe)
        except ComponentError as err:
            where = f" (in grid cell {each.index}: {each.label})" if len(cells) > 1 else ""
            raise ComponentError(err.path, f"{err.message}{where}") from None
    if cell is not None and not 0 <= cell < len(cells):
        raise ComponentError("--cell", f"{cell} is out of range: the grid has {len(cells)} cells (0..{len(cells) - 1})")
    parallel_cells(recipe, cells)
    return recipe, cells


def check_output_dir(run_dir: Path) -> None:
    """The run's folder can be made (else every cell would fail after the checks said yes)."""
    problem = cannot_make_folder(run_dir)
    if problem:
        raise ComponentError("output_dir", f"{problem} (set output_dir or name)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe, cells = checked_cells(args.recipe, args.overrides, args.cell)
        run_dir = Path(recipe["output_dir"]) / recipe["name"]
        selected = [cells[args.cell]] if args.cell is not None else cells
        if args.list:
            for cell in cells:
                print(f"{cell.index:3d}  {cell.label}")
            return 0
        check_output_dir(run_dir)
        plan = {cell.label: _plan(cell, run_dir / cell.label, args) for cell in selected}
        jobs = parallel_cells(recipe, cells)
    except ComponentError as err:
        print(f"recipe error: {err}", file=sys.stderr)
        return 2

    print(f"{recipe['name']}: {len(selected)} of {len(cells)} cell(s) -> {run_dir}/", flush=True)
    if _is_global_zero():  # what `python -m slr_zoo.report` regenerates the tables from
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "grid.yaml", yaml.safe_dump(recipe, sort_keys=False))
    for n, cell in enumerate(selected, start=1):
        if plan[cell.label] == "skip":
            print(f"[{n}/{len(selected)}] {cell.label}: done already, skipped", flush=True)
    to_run = [(n, cell) for n, cell in enumerate(selected, start=1) if plan[cell.label] != "skip"]
    if jobs > 1 and len(to_run) > 1:
        failures = _run_in_processes(args, to_run, len(selected), run_dir, jobs)
    else:
        failures = 0
        for n, cell in to_run:
            print(f"[{n}/{len(selected)}] {cell.label}", flush=True)
            if plan[cell.label] == "replace":
                _move_aside(run_dir / cell.label)
            failures += not _report(_run_guarded(cell, run_dir / cell.label))

    if _is_global_zero():
        from slr_zoo.reports.results import write_reports

        print()
        print(write_reports(recipe, cells, run_dir))
        print(f"wrote {run_dir}/results.csv, results.md and plots")
    return 1 if failures else 0


def _report(summary: dict, prefix: str = "   ") -> bool:
    if summary["status"] != "ok":
        print(f"{prefix} FAILED: {summary['error']}", file=sys.stderr, flush=True)
        return False
    print(f"{prefix} val_accuracy={summary['val_accuracy']:.3f} mean_steps={summary['mean_steps']:.2f} "
          f"train_seconds={summary['train_seconds']:.0f}", flush=True)
    return True


def parallel_cells(recipe: dict, cells) -> int:
    """``trainer.parallel_cells``, checked against the cells' own device settings."""
    jobs = recipe["trainer"]["parallel_cells"]
    if jobs > 1 and any(c.recipe["trainer"]["devices"] not in (1, "1") or c.recipe["trainer"]["num_nodes"] > 1
                        for c in cells):
        raise ComponentError("trainer.parallel_cells", "runs several single-process cells at once; it cannot be "
                             "combined with trainer.devices or trainer.num_nodes > 1 (set it to 1)")
    return jobs


def _run_in_processes(args, to_run: list, total: int, run_dir: Path, jobs: int) -> int:
    """``trainer.parallel_cells``: each cell is ``fit RECIPE --cell I`` in a child process, ``jobs``
    at a time, its output in ``<name>/.logs/<cell>.log``. A small model does not use a second core
    well, so on a CPU two cells at once nearly halve a grid's wall time. Each child plans its own
    folder (skip, resume, move aside) exactly as a sequential run would."""
    import subprocess

    logs = run_dir / ".logs"
    logs.mkdir(parents=True, exist_ok=True)
    # unset threads would let every child claim every core
    threads = [] if to_run[0][1].recipe["trainer"]["threads"] else [f"trainer.threads={max(1, (os.cpu_count() or 1) // jobs)}"]
    flags = [flag for flag, on in (("--rerun", args.rerun), ("--resume", args.resume)) if on]
    pending, running, failures, last_status = list(to_run), {}, 0, time.monotonic()
    try:
        while pending or running:
            while pending and len(running) < jobs:
                n, cell = pending.pop(0)
                log = (logs / f"{cell.label}.log").open("w")
                command = [sys.executable, "-m", "slr_zoo.fit", args.recipe, *args.overrides, *threads,
                           "trainer.parallel_cells=1", "--cell", str(cell.index), *flags]
                running[subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)] = (n, cell, log)
                print(f"[{n}/{total}] {cell.label}: started (output in {log.name})", flush=True)
            time.sleep(0.2)
            if time.monotonic() - last_status > 30:  # the children's progress bars go to their logs
                last_status = time.monotonic()
                print("    running: " + "; ".join(f"{cell.label} step {_last_step(run_dir / cell.label)}/"
                                                  f"{cell.recipe['trainer']['max_steps']}" for _, cell, _ in running.values()),
                      flush=True)
            for process in [p for p in running if p.poll() is not None]:
                n, cell, log = running.pop(process)
                log.close()
                summary = summary_or_none(run_dir / cell.label / "summary.json") or {
                    "status": "failed", "error": f"exit status {process.returncode}, no summary; see {log.name}"}
                failures += not _report(summary, prefix=f"[{n}/{total}] {cell.label}:")
    finally:
        for process in running:  # interrupted: leave no orphan training in the background
            process.terminate()
            process.wait()
    return failures


def _last_step(directory: Path) -> int:
    """The last step in a cell's ``train_curve.csv`` (0 before its first step)."""
    try:
        with (directory / "train_curve.csv").open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - 200))
            return int(f.read().splitlines()[-1].split(b",")[0]) + 1
    except (OSError, ValueError, IndexError):
        return 0


def warn_grid_overrides(overrides: list[str], recipe: dict) -> None:
    """A command-line value for a key the grid sets is replaced by the grid's values: say so."""
    from slr_zoo.reports.results import grid_keys

    swept = grid_keys(recipe.get("grid"))
    for item in overrides:
        key = item.partition("=")[0].strip()
        hit = [k for k in swept if k == key or k.startswith(key + ".") or key.startswith(k + ".")]
        if hit:
            print(f"note: {key} is set by the grid ({', '.join(hit)}), so the command-line value is not used; "
                  f"override grid.{hit[0]} to change the swept values", file=sys.stderr)


def _status(directory: Path) -> str | None:
    summary = summary_or_none(directory / "summary.json")
    return None if summary is None else summary.get("status")


def _plan(cell, directory: Path, args) -> str:
    """What to do with a cell's folder: "run" (fresh or resuming), "skip" (finished with this
    recipe) or "replace" (move the old folder aside first). Raises when reusing it would mix two
    recipes' results."""
    status = _status(directory)
    has_checkpoint = (directory / "checkpoints" / "last.ckpt").is_file() or any(directory.glob("hpc_ckpt_*.ckpt"))
    if args.rerun:
        return "replace" if directory.exists() else "run"
    if args.resume and status != "ok" and not has_checkpoint:
        raise ComponentError(str(directory), "--resume: there is no checkpoint to resume from")
    try:
        stored = read_stored(directory)
    except FileNotFoundError:
        stored = None
    except StoredConfigError as err:
        if err.unreadable:  # not ours to move aside or to train over
            raise ComponentError(str(directory), str(err)) from None
        if status == "ok" or has_checkpoint:  # a run whose recipe cannot be compared: never reuse it blindly
            raise ComponentError(str(directory), f"holds a {'finished' if status == 'ok' else 'started'} run "
                                 f"whose recipe cannot be read ({err}). --rerun trains it again (the old run "
                                 "moves to .replaced/)") from None
        return "replace"  # nothing trained: retry cleanly
    new = yaml.safe_load(yaml.safe_dump(cell.recipe, sort_keys=False))  # as it would be saved
    changed = differences(stored, new, ignore=PRESENTATION_KEYS) if stored is not None else []
    if changed and (status == "ok" or (status is None and has_checkpoint)):
        shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise ComponentError(
            str(directory),
            f"holds a {'finished' if status == 'ok' else 'started'} run of a different recipe ({shown}). "
            "Use a new name= to keep both, or --rerun to replace it (the old run moves to .replaced/)",
        )
    if changed:   # a failed attempt, or a folder with nothing trained: retry the new recipe cleanly
        return "replace"
    if status == "ok":
        try:
            check_finished(directory)
        except CheckpointError as err:
            raise ComponentError(str(directory), str(err)) from None
        return "skip"
    return "run"


def _move_aside(directory: Path) -> None:
    """Keep an earlier run instead of deleting it: ``<name>/.replaced/<cell>-<time>``. Under a
    multi-process launch rank 0 moves it and the other ranks wait until it is gone."""
    if not directory.exists():
        return
    if _is_global_zero():
        target = directory.parent / ".replaced" / f"{directory.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        directory.rename(target)
        print(f"    moved the earlier run to {target}", flush=True)
        return
    old = (directory / "config.yaml").stat().st_ino if (directory / "config.yaml").exists() else None
    deadline = time.monotonic() + 600
    while old is not None and time.monotonic() < deadline:
        try:
            if (directory / "config.yaml").stat().st_ino != old:
                return
        except FileNotFoundError:
            return
        time.sleep(0.2)


def _run_guarded(cell, directory: Path) -> dict:
    """Run one cell; any exception becomes a failed summary so the rest of the grid still runs."""
    from slr_zoo.recipe import train_cell

    start = time.perf_counter()
    try:
        return train_cell(cell.recipe, directory, cell.keys)
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
            write_json(directory / "summary.json", summary)
        return summary


def _is_global_zero() -> bool:
    """Rank 0 of torchrun (RANK), srun (SLURM_PROCID) or Lightning's own launcher (LOCAL_RANK)."""
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"))


if __name__ == "__main__":
    sys.exit(main())
