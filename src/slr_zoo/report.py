"""``python -m slr_zoo.report runs/<name>``: a grid's tables and plots, regenerated from its cells.

Reads every finished cell under the folder (its ``summary.json``, ``train_curve.csv``,
``val_curve.csv`` and, where ``evaluate`` ran, ``eval.json``) and writes:

- ``results.csv`` and ``results.md``: one row per cell, and mean ± std over seeds per variant,
  with what an answer costs where the cells recorded it;
- ``accuracy.png``, ``accuracy_by_hops.png``, ``training_loss.png`` (as ``fit`` writes them);
- ``accuracy_vs_depth.png``: accuracy against inference depth, one line per evaluated cell;
- ``accuracy_vs_step.png``: validation accuracy against training step, one line per cell;
- ``depth_histograms.png``: iterations used under each cell's halting policy;
- ``state_change.png``: ||h_t - h_{t-1}|| / ||h_{t-1}|| per iteration;
- TensorBoard's hparams tab (``runs/<name>/hparams``): each cell's grid keys and its scalars.

The variants are named by their grid keys ("combine=gated, max_steps=6"). The grid comes from
``runs/<name>/grid.yaml`` (``fit`` writes it); without it, the keys are the recipe leaves that
differ between the cells' ``config.yaml``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import textwrap
from pathlib import Path

import yaml

from slr_zoo.files import read_summary
from slr_zoo.recipe.grid import Cell, expand
from slr_zoo.reports.results import METRICS, write_reports


def _leaves(node, prefix=""):
    if isinstance(node, dict) and not ({"name", "_component_"} & set(node)):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, node


def grid_and_cells(run_dir: Path) -> tuple[dict, list]:
    """The grid recipe and its cells: from ``grid.yaml``, else derived from the cell folders."""
    stored = run_dir / "grid.yaml"
    if stored.is_file():
        recipe = _read_yaml(stored)
        if not isinstance(recipe, dict):
            raise ValueError(f"{stored} holds {'nothing' if recipe is None else 'a ' + type(recipe).__name__}, "
                             "not the grid's recipe; remove it to name the variants from the cells' config.yaml")
        recipe["name"] = recipe.get("name") or run_dir.name  # the report's title alone
        try:
            return recipe, expand(recipe)
        except ValueError as err:
            raise ValueError(f"{stored}: {err}") from None
    folders = sorted(p.parent for p in run_dir.glob("*/config.yaml") if not p.parent.name.startswith("."))
    if not folders:
        raise FileNotFoundError(f"{run_dir} holds no cells (no */config.yaml); pass runs/<name>")
    configs = {f.name: config for f in folders if (config := cell_config(f))}
    if not configs:
        raise ValueError(f"no cell of {run_dir} has a readable config.yaml (see above)")
    values: dict[str, set] = {}
    for config in configs.values():
        for key, value in _leaves(config):
            values.setdefault(key, set()).add(json.dumps(value, sort_keys=True, default=str))
    keys = [k for k, v in values.items() if len(v) > 1 and k not in ("name", "output_dir", "description")]
    first = next(iter(configs.values()))
    recipe = {"name": first.get("name", run_dir.name), "description": first.get("description", ""),
              "grid": {k: [] for k in keys}}
    return recipe, [Cell(i, label, {}, config) for i, (label, config) in enumerate(configs.items())]


def cell_config(cell_dir: Path) -> dict:
    """A cell's recipe as it saved it, or ``{}`` with a note on stderr when its config.yaml is
    missing or damaged: one such cell is left out of the names and plots, not the whole report."""
    from slr_zoo.recipe import read_config

    try:
        return read_config(cell_dir / "config.yaml")
    except (OSError, ValueError) as err:
        if cell_dir not in _NOTED:  # the names, the plots and the hparams each ask
            _NOTED.add(cell_dir)
            print(f"report: {cell_dir.name}: its recipe is left out ({err})", file=sys.stderr)
        return {}


_NOTED: set[Path] = set()


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"cannot parse {path}: {err}") from None


LINE_STYLES = ("-", "--", ":", "-.")


def line_style(label: str, labels: list[str]) -> tuple[int, str]:
    """(colour index, line style) of one cell's line: a variant keeps one colour over its seeds,
    and its seeds differ by line style, so a plot over seeds reads by variant at a glance."""

    def variant(name: str) -> str:
        return ", ".join(part for part in name.split(", ") if not part.startswith("seed="))

    variants = list(dict.fromkeys(variant(name) for name in labels))
    siblings = [name for name in labels if variant(name) == variant(label)]
    return variants.index(variant(label)), LINE_STYLES[siblings.index(label) % len(LINE_STYLES)]


def _plot_lines(series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, path: Path, log: bool = False,
                ylim=None) -> Path | None:
    series = {k: v for k, v in series.items() if v[0]}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for label, (xs, ys) in series.items():
        colour, dashes = line_style(label, list(series))
        ax.plot(xs, ys, marker="o", ms=3, label=textwrap.fill(label, 48), color=colours[colour % len(colours)],
                linestyle=dashes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: names are long
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _name(cell_dir: Path, keys: list[str], chosen: dict | None) -> str:
    """The cell's variant, named by its grid keys: as the grid wrote them (``chosen``) where the cell
    is one of the grid's, else from its stored config."""
    from slr_zoo.reports.results import lookup, shown_values, variant_name

    config = cell_config(cell_dir)
    if chosen is None:
        chosen = {k: lookup(config, k) for k in keys}
    return variant_name(shown_values(chosen, config, keys), keys) if keys else cell_dir.name


def extra_plots(run_dir: Path, keys: list[str], grid_cells: list = ()) -> list[Path]:
    chosen = {cell.label: cell.keys for cell in grid_cells}
    cells = sorted(p.parent for p in run_dir.glob("*/summary.json") if not p.parent.name.startswith("."))
    depth, steps, change, histograms = {}, {}, {}, {}
    for cell in cells:
        name = _name(cell, keys, chosen.get(cell.name))
        evaluation = cell / "eval.json"
        try:
            if evaluation.is_file():
                report = json.loads(evaluation.read_text())
                rows = report.get("by_depth") or []
                depth[name] = ([r["steps"] for r in rows], [100 * r["accuracy"] for r in rows])
                deltas = (report.get("stability") or {}).get("delta") or []
                change[name] = (list(range(1, len(deltas) + 1)), deltas)
                counts = (report.get("depth_histogram") or {}).get("first_token") or {}
                total = sum(counts.values()) or 1
                histograms[name] = ([int(k) for k in counts], [v / total for v in counts.values()])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            print(f"report: {cell.name}: {evaluation.name} left out of the plots (unreadable: {err})", file=sys.stderr)
        curve = cell / "val_curve.csv"
        try:
            if curve.is_file():
                with curve.open() as f:
                    rows = list(csv.DictReader(f))
                steps[name] = ([int(r["step"]) for r in rows], [100 * float(r["accuracy"]) for r in rows])
        except (ValueError, KeyError, TypeError) as err:
            print(f"report: {cell.name}: {curve.name} left out of the plots (unreadable: {err})", file=sys.stderr)
    written = [
        _plot_lines(depth, "loop iterations at inference", "validation accuracy (%)", run_dir / "accuracy_vs_depth.png",
                    ylim=(0, 102)),
        _plot_lines(steps, "training step", "validation accuracy (%)", run_dir / "accuracy_vs_step.png", ylim=(0, 102)),
        _plot_lines(histograms, "loop iterations used (first answer token)", "fraction of samples",
                    run_dir / "depth_histograms.png"),
        _plot_lines(change, "loop iteration t", "||h_t - h_t-1|| / ||h_t-1||", run_dir / "state_change.png", log=True),
    ]
    return [p for p in written if p is not None]


def write_hparams(run_dir: Path, keys: list[str]) -> int:
    """Each finished cell's grid keys and scalars on TensorBoard's hparams tab."""
    from torch.utils.tensorboard import SummaryWriter

    from slr_zoo.recipe.grid import value_label
    from slr_zoo.reports.results import lookup

    count = 0
    for summary_path in sorted(run_dir.glob("*/summary.json")):
        cell = summary_path.parent
        try:
            summary = read_summary(summary_path)
        except ValueError:  # the table's rows have said so
            continue
        config = cell_config(cell)
        hparams = {}
        for key in keys:
            value = lookup(config, key)
            hparams[key] = value if isinstance(value, (int, float, str, bool)) else value_label(value)
        metrics = {f"hparam/{m}": float(summary[m]) for m in METRICS if isinstance(summary.get(m), (int, float))}
        with SummaryWriter(str(run_dir / "hparams" / cell.name)) as writer:
            writer.add_hparams(hparams or {"cell": cell.name}, metrics, run_name=".")
        count += 1
    return count


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m slr_zoo.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a grid's folder: runs/<name>")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        recipe, cells = grid_and_cells(args.run_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"report: {err}", file=sys.stderr)
        return 2
    from slr_zoo.reports.results import grid_keys

    keys = [k for k in grid_keys(recipe.get("grid"))]
    print(write_reports(recipe, cells, args.run_dir))
    plots = extra_plots(args.run_dir, keys, cells)  # one line per cell, so seeds are named too
    cells_logged = write_hparams(args.run_dir, keys)
    print(f"wrote {args.run_dir}/results.csv, results.md, {', '.join(p.name for p in plots) or 'no extra plots'}; "
          f"hparams of {cells_logged} cell(s) in {args.run_dir}/hparams")
    return 0


if __name__ == "__main__":
    sys.exit(main())
