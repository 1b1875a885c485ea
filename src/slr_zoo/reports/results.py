"""Grid results: ``results.csv`` (one row per cell), ``results.md`` (mean ± std over seeds) and plots."""

from __future__ import annotations

import csv
import io
import json
import statistics
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterable

from slr_zoo.files import atomic_write, read_summary

METRICS = ("val_accuracy", "mean_steps", "train_seconds", "train_steps", "params", "thoughts_per_answer",
           "tokens_per_answer", "passes_per_answer", "flops_per_answer", "seconds_per_example")
FIT_WINDOW, FIT_FRACTION = 50, 0.05
# what an answer costs at validation (RQ4), with the column each is shown under
COSTS = {"thoughts_per_answer": "thoughts", "mean_steps": "iterations per token",
         "tokens_per_answer": "tokens generated", "passes_per_answer": "sequential passes",
         "flops_per_answer": "FLOPs", "seconds_per_example": "ms per example"}


def read_curve(path: Path) -> tuple[list[int], list[float]]:
    """Steps and losses of a cell's ``train_curve.csv`` (empty when it is missing or unreadable)."""
    steps, losses = [], []
    try:
        with path.open() as f:
            for row in csv.DictReader(f):
                steps.append(int(row["step"]))
                losses.append(float(row["loss"]))
    except (OSError, ValueError, KeyError, TypeError):
        return [], []
    return steps, losses


def loss_blocks(path: Path) -> list[tuple[int, float]]:
    """A cell's training loss as (last step, mean) over consecutive blocks of ``FIT_WINDOW`` steps:
    what both ``steps_to_fit`` and ``training_loss.png`` read."""
    steps, losses = read_curve(path)
    return [(steps[i + FIT_WINDOW - 1] + 1, statistics.fmean(losses[i : i + FIT_WINDOW]))
            for i in range(0, len(losses) - FIT_WINDOW + 1, FIT_WINDOW)]


def fit_step(blocks: list[tuple[int, float]]) -> int | None:
    """The first block whose mean loss is under ``FIT_FRACTION`` of the first block's; None if none
    is (or there is nothing to compare). When every cell of a grid ends near 100%, how fast each got
    there is what still tells them apart."""
    if len(blocks) < 2:
        return None
    first = blocks[0][1]
    return next((step for step, mean in blocks[1:] if mean < FIT_FRACTION * first), None)


def steps_to_fit(path: Path) -> int | None:
    """``fit_step`` of a ``train_curve.csv``."""
    return fit_step(loss_blocks(path))


def grid_keys(grid: Any) -> list[str]:
    parts = grid if isinstance(grid, list) else [grid or {}]
    keys: list[str] = []
    for part in parts:
        keys += [k for k in part if k not in keys]
    return keys


def lookup(recipe: dict, dotted: str) -> Any:
    node: Any = recipe
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def shown_values(chosen: dict, recipe: dict, keys: list[str]) -> dict[str, Any]:
    """A cell's value of each grid key as the grid wrote it (``chosen``); a component or group of keys
    that the cell's part of the grid leaves alone would show every default of ``recipe``, so it
    reads "(recipe's)"."""
    from slr_zoo.recipe.grid import value_label

    out = {}
    for key in keys:
        value = chosen[key] if key in chosen else lookup(recipe, key)
        if isinstance(value, (dict, list)):
            value = value_label(value) if key in chosen else "(recipe's)"
        out[key] = value
    return out


def collect(run_dir: Path, cells: Iterable, keys: list[str]) -> list[dict]:
    """One row per cell, in grid order (cells not run yet are ``missing``), then one per other
    finished cell folder under ``run_dir``: a smaller grid or a single run under the same name
    adds to the table instead of hiding what is already there."""
    from slr_zoo.recipe import read_config

    rows = []
    cells = list(cells)
    others = sorted(p.parent.name for p in run_dir.glob("*/summary.json") if not p.parent.name.startswith("."))
    known = {cell.label for cell in cells}
    listed = [(cell.label, cell.recipe, cell.keys) for cell in cells]
    unreadable = {}  # a finished cell whose recipe is lost cannot be told apart from any other: out of every mean
    for label in others:
        if label not in known:
            try:
                config = read_config(run_dir / label / "config.yaml")
            except (OSError, ValueError) as err:
                config, unreadable[label] = {}, str(err)
            listed.append((label, config, {k: lookup(config, k) for k in keys}))
    for label, recipe, chosen in listed:
        row = {"cell": label}
        row.update(shown_values(chosen, recipe, keys))
        path = run_dir / label / "summary.json"
        try:
            summary = read_summary(path) if path.is_file() else None
        except ValueError as err:  # out of every mean, and its reason in the error column
            print(f"report: {label}: skipped ({err})", file=sys.stderr)
            summary = {"status": "unreadable", "error": str(err)}
        if label in unreadable and summary is not None:
            summary = {"status": "unreadable", "error": unreadable[label]}
        if summary is not None:
            row["status"] = summary.get("status", "ok")
            row.update({m: summary.get(m) for m in METRICS})
            row["error"] = summary.get("error", "")
            row["hop_accuracy"] = summary.get("hop_accuracy", {})
            row["_loss_blocks"] = loss_blocks(run_dir / label / "train_curve.csv")  # read once: table and plot
            row["steps_to_fit"] = fit_step(row["_loss_blocks"])
            row["by_depth"] = _depth_accuracy(run_dir / label / "eval.json")
        else:
            row["status"] = "missing"
        rows.append(row)
    return rows


def _depth_accuracy(path: Path) -> dict[int, float]:
    """Validation accuracy at each inference depth from a cell's ``eval.json`` (``evaluate``), or
    nothing when the cell was not evaluated on its validation split (``--ood``, ``--data``, train)
    or the file is unreadable: the table is still written without it."""
    try:
        report = json.loads(path.read_text())
        if report.get("split") != "val":
            return {}
        return {int(r["steps"]): float(r["accuracy"]) for r in report.get("by_depth") or []}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_csv(rows: list[dict], keys: list[str], path: Path) -> str:
    columns = ["cell", *keys, "status", *METRICS, "steps_to_fit", "error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue())
    return buffer.getvalue()


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def summarise(rows: list[dict], keys: list[str]) -> list[dict]:
    """Rows grouped by every grid key except ``seed``."""
    group_keys = [k for k in keys if k != "seed"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row.get(k)) for k in group_keys), []).append(row)
    table = []
    for values, members in groups.items():
        ok = [r for r in members if r["status"] == "ok"]
        entry = dict(zip(group_keys, values))
        entry.update(
            seeds=f"{len(ok)}/{len(members)}",
            accuracy=_mean_std([r["val_accuracy"] for r in ok], 100),
            mean_steps=_mean_std([r["mean_steps"] for r in ok], digits=2),
            train_seconds=_mean_std([r["train_seconds"] for r in ok], digits=0),
            steps_to_fit=_fit_column(ok),
            params=f"{ok[0]['params']:,}" if ok else "—",
            _accuracy=statistics.fmean([r["val_accuracy"] for r in ok]) if ok else None,
            _std=statistics.stdev([r["val_accuracy"] for r in ok]) if len(ok) > 1 else 0.0,
            _hops=_mean_hops(ok),
            _depth=_by_depth(ok),
            _cost={key: statistics.fmean(r[key] for r in ok) for key in COSTS
                   if ok and all(r.get(key) is not None for r in ok)},
        )
        table.append(entry)
    return table


def _fit_column(ok: list[dict]) -> str:
    fitted = [r["steps_to_fit"] for r in ok if r.get("steps_to_fit") is not None]
    text = _mean_std(fitted, digits=0)
    return text if len(fitted) == len(ok) else f"{text} ({len(fitted)}/{len(ok)} fit)"


def _by_depth(rows: list[dict]) -> dict:
    """Mean ± std over the evaluated seeds of the accuracy at each inference depth they all have."""
    evaluated = [r["by_depth"] for r in rows if r.get("by_depth")]
    if not evaluated:
        return {}
    depths = sorted(set.intersection(*(set(d) for d in evaluated)))
    return {"seeds": f"{len(evaluated)}/{len(rows)}",
            "accuracy": {t: _mean_std([d[t] for d in evaluated], 100) for t in depths}}


def _mean_hops(rows: list[dict]) -> dict[str, float]:
    hops: dict[str, list[float]] = {}
    for r in rows:
        for h, acc in (r.get("hop_accuracy") or {}).items():
            hops.setdefault(h, []).append(acc)
    return {h: statistics.fmean(v) for h, v in sorted(hops.items(), key=lambda kv: int(kv[0]))}


def write_markdown(name: str, table: list[dict], keys: list[str], rows: list[dict], path: Path,
                   description: str = "") -> str:
    group_keys = [k for k in keys if k != "seed"]
    names = list(key_names(group_keys).values())  # every table names the grid keys alike
    header = [*names, "seeds", "val accuracy (%)", "mean steps",
              "steps to fit", "train s", "params"]
    lines = [f"# {name}", ""]
    if description:
        lines += [description.strip(), ""]
    lines += ["Mean ± std over seeds (sample std). Train seconds are wall time on this run's machine. Steps to "
              f"fit: training steps until the loss ({FIT_WINDOW}-step mean) first falls under "
              f"{FIT_FRACTION:.0%} of its start (`training_loss.png` shows the curves).", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in table:
        cells = [str(entry[k]) for k in group_keys]
        cells += [entry["seeds"], entry["accuracy"], entry["mean_steps"], entry["steps_to_fit"], entry["train_seconds"],
                  entry["params"]]
        lines.append("| " + " | ".join(cells) + " |")
    hop_sets = sorted({h for e in table for h in e["_hops"]}, key=int)
    if hop_sets:
        lines += ["", "Validation accuracy (%) by number of hops:", ""]
        lines += ["| " + " | ".join([*names, *hop_sets]) + " |",
                  "|" + "---|" * (len(group_keys) + len(hop_sets))]
        for e in (e for e in table if e["_hops"]):  # cells not yet run have no row here
            cells = [str(e[k]) for k in group_keys]
            cells += [f"{100 * e['_hops'][h]:.1f}" if h in e["_hops"] else "—" for h in hop_sets]
            lines.append("| " + " | ".join(cells) + " |")
    evaluated = [e for e in table if e["_depth"]]
    depths = sorted({t for e in evaluated for t in e["_depth"]["accuracy"]})
    if depths:
        lines += ["", "Validation accuracy (%) by loop iterations at inference (`python -m slr_zoo.evaluate`, "
                  "greedy decoding at each depth; mean ± std over the evaluated seeds):", ""]
        lines += ["| " + " | ".join([*names, "seeds", *map(str, depths)]) + " |",
                  "|" + "---|" * (len(group_keys) + 1 + len(depths))]
        for e in evaluated:
            cells = [str(e[k]) for k in group_keys] + [e["_depth"]["seeds"]]
            cells += [e["_depth"]["accuracy"].get(t, "—") for t in depths]
            lines.append("| " + " | ".join(cells) + " |")
    costed = [e for e in table if "passes_per_answer" in e["_cost"]]
    if costed:
        columns = [k for k in COSTS if all(k in e["_cost"] for e in costed)]
        lines += ["", "What an answer costs (validation means): sequential passes are model calls one after "
                  "another (the prefill once, each thought, each later token); FLOPs count every matrix product "
                  "of the generation (torch.utils.flop_counter).", ""]
        lines += ["| " + " | ".join([*names, *(COSTS[k] for k in columns)]) + " |",
                  "|" + "---|" * (len(group_keys) + len(columns))]
        for e in costed:
            values = [_cost_text(k, e["_cost"][k]) for k in columns]
            lines.append("| " + " | ".join([*(str(e[k]) for k in group_keys), *values]) + " |")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed cells:", ""] + [f"- `{r['cell']}`: {r.get('error', '')}" for r in failed]
    text = "\n".join(lines) + "\n"
    atomic_write(path, text)
    return text


def _cost_text(key: str, value: float) -> str:
    if key == "flops_per_answer":
        return f"{value:.3g}"
    if key == "seconds_per_example":
        return f"{1000 * value:.1f}"
    return f"{value:.2f}"


def key_names(keys: list[str]) -> dict[str, str]:
    """Each dotted grid key by its last part ("combine"), or whole where two keys share that part
    ("loop.max_steps" beside "trainer.max_steps")."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (short if last.count(short) == 1 else k) for k, short in zip(keys, last)}


def variant_name(entry: dict, keys: list[str]) -> str:
    """A legend entry that says what varies: "combine=gated, max_steps=6"."""
    names = key_names(keys)
    return ", ".join(f"{names[k]}={entry[k]}" for k in keys) or "run"


def plot(table: list[dict], keys: list[str], directory: Path, rows: list[dict] = ()) -> list[Path]:
    """``accuracy.png`` (bars with seed std), ``accuracy_by_hops.png`` (one line per config),
    ``cost.png`` (accuracy against what an answer costs, when the cells measured it) and
    ``training_loss.png`` (one line per finished cell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group_keys = [k for k in keys if k != "seed"]
    done = [e for e in table if e["_accuracy"] is not None]
    if not done:
        return []
    labels = [variant_name(e, group_keys) for e in done]
    # horizontal bars with wrapped names: a grid over components or tasks has names of 100 characters
    wrapped = [textwrap.fill(label, 48) for label in labels]
    lines = sum(w.count("\n") + 1 for w in wrapped)
    written = []
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.17 * lines + 0.12 * len(done) + 1.2)))
    ax.barh(range(len(done)), [100 * e["_accuracy"] for e in done], xerr=[100 * e["_std"] for e in done], capsize=3)
    ax.set_yticks(range(len(done)), wrapped, fontsize=7)
    ax.invert_yaxis()  # the grid's order, top to bottom
    ax.set_xlabel("validation accuracy (%)")
    ax.set_xlim(0, 100)
    ax.set_title(textwrap.fill(" × ".join(key_names(group_keys).values()) or "accuracy", 80), fontsize=9)
    fig.tight_layout()
    written.append(directory / "accuracy.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    if any(e["_hops"] for e in done):
        fig, ax = plt.subplots(figsize=(9, 4))
        for e, label in zip(done, wrapped):
            hops = list(e["_hops"])
            ax.plot([int(h) for h in hops], [100 * e["_hops"][h] for h in hops], marker="o", label=label)
        ax.set_xlabel("hops")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_ylim(0, 102)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.tight_layout()
        written.append(directory / "accuracy_by_hops.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    points = cost_points(done, group_keys)
    if points:
        written.append(_plot_cost(points, directory / "cost.png"))
    curves = [(r["cell"], r.get("_loss_blocks") or []) for r in rows if r["status"] == "ok"]
    curves = [(cell, blocks) for cell, blocks in curves if blocks]
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for cell, blocks in curves:
            ax.plot([step for step, _ in blocks], [mean for _, mean in blocks], label=cell)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"training loss ({FIT_WINDOW}-step mean)")
        ax.legend(fontsize=6)
        fig.tight_layout()
        written.append(directory / "training_loss.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def cost_points(table: list[dict], keys: list[str]) -> list[dict]:
    """One point per finished variant whose answers were costed: its name, validation accuracy
    (%) with the seeds' std, sequential passes and FLOPs per answer (RQ4: what accuracy costs)."""
    def positive(x) -> bool:  # what a log axis can place (NaN, zero and None cannot)
        return x is not None and x > 0

    return [{"name": variant_name(e, keys), "accuracy": 100 * e["_accuracy"], "std": 100 * e["_std"],
             "passes": e["_cost"]["passes_per_answer"],
             "flops": e["_cost"]["flops_per_answer"] if positive(e["_cost"].get("flops_per_answer")) else None}
            for e in table if e["_accuracy"] is not None and e["_accuracy"] == e["_accuracy"]
            and positive(e["_cost"].get("passes_per_answer"))]


def _plot_cost(points: list[dict], path: Path) -> Path:
    """Accuracy against sequential passes per answer, and against FLOPs per answer where measured,
    both on log axes; the variants are numbered on the plot and named in the legend (a grid's
    names are too long to write beside a point)."""
    import matplotlib.pyplot as plt

    panels = [("passes", "sequential passes per answer")]
    if any(p["flops"] for p in points):  # a variant without FLOPs is left out of that panel only
        panels.append(("flops", "FLOPs per answer"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 3.5, 4.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for number, point in enumerate(points, start=1):
            if point[key] is None:
                continue
            ax.errorbar(point[key], point["accuracy"], yerr=point["std"], fmt="o", capsize=3, color=f"C{number % 10}",
                        label=textwrap.fill(f"{number}: {point['name']}", 60))
            ax.annotate(str(number), (point[key], point["accuracy"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy (%)")
        ax.set_ylim(0, 102)
    # every variant is in the first panel; the legend goes beside the last
    axes[0][-1].legend(*axes[0][0].get_legend_handles_labels(), fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reports(recipe: dict, cells: list, run_dir: Path) -> str:
    keys = grid_keys(recipe.get("grid"))
    rows = collect(run_dir, cells, keys)
    write_csv(rows, keys, run_dir / "results.csv")
    table = summarise(rows, keys)
    text = write_markdown(recipe["name"], table, keys, rows, run_dir / "results.md", recipe.get("description", ""))
    plot(table, keys, run_dir, rows)
    return text
