"""Statistics of ProsQA records, generated against published, side by side.

    python -m slr_zoo.tasks.stats [--file ../shared/data/prosqa/valid.json] [--n 2000] [--seed 0]
                                  [--hops 3 6] [--nodes 20 26] [--markdown]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

from slr_zoo.arguments import positive_int
from slr_zoo.tasks.base import Record, distances

DEFAULT_FILE = "../shared/data/prosqa/valid.json"


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {sd:.1f} [{min(values):.3g}, {max(values):.3g}]"


def _percent(flags: list[bool]) -> str:
    return f"{100 * sum(flags) / len(flags):.0f}%" if flags else "-"


def _histogram(values: list[int]) -> str:
    counts = Counter(values)
    return " ".join(f"{k}:{100 * counts[k] / len(values):.0f}%" for k in sorted(counts))


def prosqa_stats(records: Iterable[Record]) -> dict[str, str]:
    """Graph size, depth, distractor structure and surface form of ProsQA records, as strings."""
    rows: dict[str, list] = {}

    def add(name: str, value) -> None:
        rows.setdefault(name, []).append(value)

    for r in records:
        n, edges = len(r["idx_to_symbol"]), r["edges"]
        children: list[list[int]] = [[] for _ in range(n)]
        has_parent = [False] * n
        for p, c in edges:
            children[p].append(c)
            has_parent[c] = True
        root, other = r["root"], 1 - r["root"] if r["root"] in (0, 1) else None
        from_root = distances(children, root)
        from_other = distances(children, other) if other is not None else {}
        people = n - sum(has_parent)
        leaves = [i for i in range(n) if not children[i]]
        options = r["question"].rsplit("?", 1)[0].split()[-3:]
        add("nodes", n)
        add("edges (= question sentences)", len(edges))
        add("people (sources)", people)
        add("leaves", len(leaves))
        add("parents per concept", len(edges) / max(1, n - people))
        add("nodes reached from root only", sum(i in from_root and i not in from_other for i in range(n)))
        add("nodes reached from the other person only", sum(i in from_other and i not in from_root for i in range(n)))
        add("nodes reached from both", sum(i in from_root and i in from_other for i in range(n)))
        add("hops (len(steps))", len(r["steps"]))
        add("hops (histogram)", len(r["steps"]))
        add("neg_target distance from the other person", from_other.get(r["neg_target"], -1))
        add("question words", len(r["question"].split()))
        add("steps = a shortest path", len(r["steps"]) == from_root.get(r["target"]))
        add("target is deepest node from root", from_root.get(r["target"]) == max(from_root.values()))
        add("target, neg_target are leaves", not children[r["target"]] and not children[r["neg_target"]])
        add("neg_target unreachable from root", r["neg_target"] not in from_root)
        add("target named first in question", options[0] == r["idx_to_symbol"][r["target"]])
        add("answer = '<root> is a <target>.'",
            r["answer"] == f"{r['idx_to_symbol'][root]} is a {r['idx_to_symbol'][r['target']]}.")
    summary: dict[str, str] = {}
    for name, values in rows.items():
        if isinstance(values[0], bool):
            summary[name] = _percent(values)
        elif "histogram" in name:
            summary[name] = _histogram(values)
        else:
            summary[name] = _spread(values)
    return summary


def table(columns: dict[str, dict[str, str]], markdown: bool = False) -> str:
    names = list(next(iter(columns.values())))
    header = ["statistic", *columns]
    body = [[name, *(col.get(name, "-") for col in columns.values())] for name in names]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header, *body])


def compare(file: str, n: int = 2000, seed: int = 0, hops=(3, 6), nodes=(20, 26),
            generator: Callable | None = None) -> dict[str, dict[str, str]]:
    from slr_zoo.tasks.json_file import read_records
    from slr_zoo.tasks.prosqa import generate

    generator = generator or generate
    rng = random.Random(f"prosqa-stats/{seed}")
    generated = prosqa_stats(generator(rng, tuple(hops), tuple(nodes)) for _ in range(n))
    try:
        published = prosqa_stats(read_records(file))
    except (KeyError, TypeError, IndexError) as err:
        raise ValueError(f"{file} does not hold ProsQA records (graph fields missing or malformed: {err!r})") from None
    return {f"generated (n={n})": generated, Path(file).name: published}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m slr_zoo.tasks.stats", description=__doc__.splitlines()[0])
    parser.add_argument("--file", default=DEFAULT_FILE, help="ProsQA records (default: the published "
                        "validation split, relative to a clone of the repository)")
    parser.add_argument("--n", type=positive_int, default=2000, help="generated questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hops", type=int, nargs=2, default=[3, 6])
    parser.add_argument("--nodes", type=int, nargs=2, default=[20, 26])
    parser.add_argument("--markdown", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from slr_zoo.registry import ArgumentError
    from slr_zoo.tasks.prosqa import ProsQATask

    args = parse_args(argv)
    try:
        ProsQATask(hops=args.hops, nodes=args.nodes)  # the generator's own checks, by flag name
    except ArgumentError as err:
        print(f"stats: --{err.argument}: {err.message}", file=sys.stderr)
        return 2
    try:
        print(table(compare(args.file, args.n, args.seed, args.hops, args.nodes), args.markdown))
    except (OSError, ValueError) as err:
        print(f"stats: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
