"""``python -m slr_zoo.evaluate RUN_DIR [--steps 1 2 4 8] [--split val] [--show 3]``

Evaluates a trained cell (the directory holding its ``config.yaml``, tokenizer and checkpoints) by
cached greedy generation, scored with the task's own extraction and exact match (the same
``Task.score`` as the answer format of training-time validation). For each loop depth it reports
accuracy, by hop count too, and the loop iterations every generated token used under the run's
halting policy: RQ2's accuracy-versus-iterations curve, past the trained depth. It then shows
what the intermediate states decode to (a logit lens at the answer position) for a few examples.
Writes ``eval.json`` and ``accuracy_vs_steps.png`` into RUN_DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from slr_zoo.files import atomic_write
from slr_zoo.recipe import load_cell
from slr_zoo.generate import precision_context
from slr_zoo.tasks.encoding import prompt_ids
from slr_zoo.training.checkpoint import CheckpointError


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m slr_zoo.evaluate", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_dir", type=Path, help="a cell directory: runs/<name>/<cell>")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="loop depths to evaluate (default: 1 .. 2 x the trained max_steps)")
    parser.add_argument("--split", default="val", choices=["train", "val"])
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N records only")
    parser.add_argument("--show", type=int, default=3, help="examples whose intermediate states are shown")
    parser.add_argument("--batch-size", type=int, default=64)
    return parser.parse_args(argv)


@torch.no_grad()
def logit_lens(model, tokenizer, prompt: list[int], steps: int, top: int = 3) -> list[str]:
    """What each iteration's state decodes to at the position that predicts the first answer token."""
    ids = torch.tensor([prompt])
    query = torch.ones_like(ids, dtype=torch.bool)  # the whole prompt is question
    result = model(ids, steps=steps, record=("states",), query_mask=query)
    ctx = model.backbone.context(ids, prefix=query)
    lines = []
    for t, state in enumerate(result.states, start=1):
        probs = model.decoder(state, model.backbone, ctx)[0, -1].float().softmax(-1)
        p, idx = probs.topk(top)
        words = ", ".join(f"{tokenizer.convert_ids_to_tokens(int(i))} {float(q):.2f}" for q, i in zip(p, idx))
        lines.append(f"    step {t}: {words}")
    return lines


def evaluate(run_dir: Path, depths=None, split="val", limit=None, show=3, batch_size=64) -> dict:
    from slr_zoo.inference.answers import score_answers

    parts = load_cell(run_dir)
    task, tokenizer, model = parts.task, parts.tokenizer, parts.module.model
    encoding = parts.module.answer_scorer.encoding  # the prompt, thoughts and answer format it was trained with
    records = list(task.records(split))[:limit]
    if not records:
        raise ValueError(f"task has no {split!r} records")
    trained = model.max_steps
    depths = depths or sorted({1, *range(1, 2 * trained + 1)})
    rows = []
    from tqdm import tqdm

    with precision_context(parts.trainer.precision, next(model.parameters()).device):
        for steps in tqdm(depths, desc="depths", file=sys.stderr):
            correct, token_steps = [], []
            for start in range(0, len(records), batch_size):
                scored = score_answers(model, tokenizer, task, records[start:start + batch_size], steps=steps,
                                       first_index=start, encoding=encoding)
                correct += scored.correct
                token_steps += scored.steps
            by_hops: dict[str, list[bool]] = {}
            for record, ok in zip(records, correct):
                by_hops.setdefault(str(record.get("hops", "?")), []).append(ok)
            every = [s for row in token_steps for s in row]
            first = [row[0] for row in token_steps if row]
            rows.append({
                "steps": steps,
                "accuracy": round(sum(correct) / len(correct), 4),
                # the iterations of every generated token, its EOS included
                "mean_steps": round(sum(every) / max(1, len(every)), 3),
                "mean_steps_first_token": round(sum(first) / max(1, len(first)), 3),
                "generated_tokens": len(every),
                "accuracy_by_hops": {h: round(sum(v) / len(v), 4) for h, v in sorted(by_hops.items())},
            })
    lens = {}
    for record in records[:show]:
        lens[record["question"]] = {"answer": str(record["answer"]),
                                    "states": logit_lens(model, tokenizer, prompt_ids(tokenizer, record["question"]),
                                                         trained)}
    report = {"run_dir": str(run_dir), "split": split, "records": len(records), "trained_max_steps": trained,
              "by_depth": rows, "logit_lens": lens}
    atomic_write(run_dir / "eval.json", json.dumps(report, indent=2))
    _plot(rows, trained, run_dir / "accuracy_vs_steps.png")
    return report


def _plot(rows, trained: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r["steps"] for r in rows]
    ax.plot(xs, [r["accuracy"] for r in rows], marker="o", label="all")
    hops = sorted({h for r in rows for h in r["accuracy_by_hops"]}, key=lambda h: (len(h), h))
    if len(hops) > 1:
        for h in hops:
            ax.plot(xs, [r["accuracy_by_hops"].get(h, float("nan")) for r in rows], lw=1, alpha=0.6, label=f"{h} hops")
    ax.axvline(trained, color="grey", ls=":", label="trained depth")
    ax.set_xlabel("loop iterations at inference")
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.steps and min(args.steps) < 1:
        print(f"evaluate: --steps must be loop depths >= 1, got {args.steps}", file=sys.stderr)
        return 2
    try:
        report = evaluate(args.run_dir, args.steps, args.split, args.limit, args.show, args.batch_size)
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    print(f"{report['records']} {args.split} records, trained at max_steps={report['trained_max_steps']}")
    print("| steps | accuracy | iterations per generated token | by hops |")
    print("|---|---|---|---|")
    for r in report["by_depth"]:
        hops = " ".join(f"{h}:{a:.2f}" for h, a in r["accuracy_by_hops"].items())
        print(f"| {r['steps']} | {r['accuracy']:.3f} | {r['mean_steps']:.2f} | {hops} |")
    for question, item in report["logit_lens"].items():
        print(f"\n{question}  -> gold {item['answer']}")
        print("\n".join(item["states"]))
    print(f"\nwrote {args.run_dir}/eval.json and accuracy_vs_steps.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
