"""What an answer costs, trained cells side by side: greedy answers to the same validation records,
timed in one process in alternating rounds, so wall times compare (the figures a training run
writes in ``summary.json`` are measured while other jobs share the CPU).

    python benchmarks/answer_cost.py BASELINE_CELL CELL [CELL ...] [--limit 200] [--rounds 5]
                                     [--batch-size 100] [--threads 1] [--json PATH]

Each cell answers with the encoding it was trained with (its prompt, thoughts and token budget),
scored by its task. Per cell: accuracy, tokens generated and sequential forward passes per answer
(the prefill once, then one per thought and per later token), and the median wall time per
example over ``--rounds``; then each of those as a ratio to the first cell's (RQ4 compares the
SLR depth loop with CoT: ``passes_ratio`` <= 0.2 and ``seconds_ratio`` <= 1 are its targets).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from slr_zoo.files import write_json
from slr_zoo.arguments import positive_int
from slr_zoo.training.checkpoint import CheckpointError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cells", type=Path, nargs="+", help="trained cell directories; the first is the baseline")
    p.add_argument("--limit", type=positive_int, default=200, help="validation records answered by every cell")
    p.add_argument("--rounds", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    if len(args.cells) < 2:
        p.error("give a baseline cell and at least one cell to compare with it")
    return args


class Cell:
    def __init__(self, path: Path, limit: int, batch_size: int):
        from slr_zoo.recipe import load_cell

        parts = load_cell(path)
        self.path, self.task, self.tokenizer = path, parts.task, parts.tokenizer
        self.model = parts.module.model.eval()
        self.encoding = parts.module.answer_scorer.encoding
        self.records = list(self.task.records("val"))[:limit]
        self.batch_size = batch_size

    @torch.no_grad()
    def answer(self):
        from slr_zoo.inference.answers import score_answers

        correct, passes, tokens = [], [], []
        for start in range(0, len(self.records), self.batch_size):
            scored = score_answers(self.model, self.tokenizer, self.task, self.records[start:start + self.batch_size],
                                   first_index=start, encoding=self.encoding)
            correct += scored.correct
            passes += scored.passes
            tokens += [len(row) for row in scored.steps]
        return correct, passes, tokens


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        cells = [Cell(path, args.limit, args.batch_size) for path in args.cells]
    except (FileNotFoundError, ValueError, CheckpointError) as err:  # a folder that is not a trained cell
        print(f"answer_cost: {err}", file=sys.stderr)
        return 2
    questions = {tuple(r["question"] for r in cell.records) for cell in cells}
    if len(questions) != 1:
        print("answer_cost: the cells validate on different records; compare cells of one task and validation file",
              file=sys.stderr)
        return 2
    for cell in cells:  # warm-up, and the figures that do not depend on time
        cell.correct, cell.passes, cell.tokens = cell.answer()
    seconds = {cell.path: [] for cell in cells}
    for r in range(args.rounds):
        for cell in (cells if r % 2 == 0 else cells[::-1]):
            start = time.perf_counter()
            cell.answer()
            seconds[cell.path].append((time.perf_counter() - start) / len(cell.records))
    rows = []
    for cell in cells:
        n = len(cell.records)
        rows.append({
            "cell": str(cell.path),
            "accuracy": round(sum(cell.correct) / n, 4),
            "tokens_per_answer": round(sum(cell.tokens) / n, 3),
            "passes_per_answer": round(sum(cell.passes) / n, 3),
            "seconds_per_example": round(statistics.median(seconds[cell.path]), 6),
        })
    base = rows[0]
    for row in rows:
        row["passes_ratio"] = round(row["passes_per_answer"] / base["passes_per_answer"], 4)
        row["seconds_ratio"] = round(row["seconds_per_example"] / base["seconds_per_example"], 4)
    print(f"{len(cells[0].records)} validation records, batch {args.batch_size}, {args.threads} thread(s), "
          f"median of {args.rounds} alternating rounds; ratios against {base['cell']}")
    print("| cell | accuracy | tokens | passes | ms / example | passes ratio | time ratio |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['cell']} | {100 * row['accuracy']:.1f} | {row['tokens_per_answer']:.1f} | "
              f"{row['passes_per_answer']:.1f} | {1000 * row['seconds_per_example']:.2f} | "
              f"{row['passes_ratio']:.3f} | {row['seconds_ratio']:.3f} |")
    if args.json:
        write_json(args.json, {"threads": args.threads, "rounds": args.rounds, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
