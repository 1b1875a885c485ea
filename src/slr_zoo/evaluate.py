"""``python -m slr_zoo.evaluate RUN_DIR [--steps 1 2 4 8] [--split val] [--show 3]``

Evaluates a trained cell (the directory holding its ``config.yaml``, tokenizer and checkpoints) by
greedy decoding, scored with the task's own extraction and exact match (the same ``Task.score``
as the answer format of training-time validation). For each loop depth it reports accuracy, by hop
count too, and the iterations used: RQ2's accuracy-versus-iterations curve, past the trained depth.
It then shows what the intermediate states decode to (a logit lens at the answer position) for a
few examples. Writes ``eval.json`` and ``accuracy_vs_steps.png`` into RUN_DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from slr_zoo.files import atomic_write
from slr_zoo.recipe import resolve_stored
from slr_zoo.tasks.encoding import special_ids, text_ids
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


def load_cell(run_dir: Path):
    """The recipe, task, tokenizer and trained model of a cell directory."""
    from slr_zoo.training.checkpoint import resume_point
    from slr_zoo.training.run import build_everything

    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{run_dir} is not a cell directory (no config.yaml); pass runs/<name>/<cell>")
    recipe = resolve_stored(yaml.safe_load(config.read_text()) or {})  # older runs lack newer keys
    task, tokenizer, module = build_everything(recipe, run_dir)
    checkpoint = resume_point(run_dir, module)  # checked: a corrupt file stops with its name
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints/last.ckpt not found: the cell has not been trained")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict(state)
    return recipe, task, tokenizer, module.model.eval()


@torch.no_grad()
def generate(model, prompts: list[list[int]], steps: int, eos: int, pad: int, max_new: int):
    """Greedy decoding without a cache: each new token reruns the loop on the whole prefix, so an
    answer token sees exactly the computation it was trained with. Returns ids and loop steps used."""
    out = [list(p) for p in prompts]
    done = [False] * len(prompts)
    used = torch.zeros(len(prompts))
    for i in range(max_new):
        live = [j for j, d in enumerate(done) if not d]
        if not live:
            break
        width = max(len(out[j]) for j in live)
        ids = torch.full((len(live), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        query = torch.zeros_like(ids, dtype=torch.bool)  # the prompt: what per-sample halting reads
        for row, j in enumerate(live):  # left padding: the last position is every row's next token
            start = width - len(out[j])
            ids[row, start:] = torch.tensor(out[j])
            mask[row, start:] = 1
            query[row, start : start + len(prompts[j])] = True
        result = model(ids, attention_mask=mask, steps=steps, query_mask=query)
        nxt = result.logits[:, -1].argmax(-1).tolist()
        for row, j in enumerate(live):
            if i == 0:
                used[j] = float(result.steps[row])
            if nxt[row] == eos:
                done[j] = True
            else:
                out[j].append(nxt[row])
    return [o[len(p):] for o, p in zip(out, prompts)], used


@torch.no_grad()
def logit_lens(model, tokenizer, prompt: list[int], steps: int, top: int = 3) -> list[str]:
    """What each iteration's state decodes to at the position that predicts the first answer token."""
    ids = torch.tensor([prompt])
    query = torch.ones_like(ids, dtype=torch.bool)  # the whole prompt is question
    result = model(ids, steps=steps, keep_states=True, query_mask=query)
    ctx = model.backbone.context(ids, prefix=query)
    lines = []
    for t, state in enumerate(result.states, start=1):
        probs = model.decoder(state, model.backbone, ctx)[0, -1].float().softmax(-1)
        p, idx = probs.topk(top)
        words = ", ".join(f"{tokenizer.convert_ids_to_tokens(int(i))} {float(q):.2f}" for q, i in zip(p, idx))
        lines.append(f"    step {t}: {words}")
    return lines


def evaluate(run_dir: Path, depths=None, split="val", limit=None, show=3, batch_size=64) -> dict:
    recipe, task, tokenizer, model = load_cell(run_dir)
    sep, eos = special_ids(tokenizer)
    records = list(task.records(split))[:limit]
    if not records:
        raise ValueError(f"task has no {split!r} records")
    prompts = [text_ids(tokenizer, r["question"]) + [sep] for r in records]
    max_new = 2 + max(len(text_ids(tokenizer, " " + str(r["answer"]).strip())) for r in records)
    trained = recipe["loop"]["max_steps"]
    depths = depths or sorted({1, *range(1, 2 * trained + 1)})
    rows = []
    from tqdm import tqdm

    for steps in tqdm(depths, desc="depths", file=sys.stderr):
        correct, used = [], []
        for start in range(0, len(records), batch_size):
            chunk = prompts[start:start + batch_size]
            answers, steps_used = generate(model, chunk, steps, eos, tokenizer.pad_token_id, max_new)
            for record, answer in zip(records[start:start + batch_size], answers):
                correct.append(task.score(tokenizer.decode(answer, skip_special_tokens=True), record))
            used.append(steps_used)
        by_hops: dict[str, list[bool]] = {}
        for record, ok in zip(records, correct):
            by_hops.setdefault(str(record.get("hops", "?")), []).append(ok)
        rows.append({
            "steps": steps,
            "accuracy": round(sum(correct) / len(correct), 4),
            "mean_steps": round(float(torch.cat(used).mean()), 3),
            "accuracy_by_hops": {h: round(sum(v) / len(v), 4) for h, v in sorted(by_hops.items())},
        })
    lens = {}
    for record, prompt in list(zip(records, prompts))[:show]:
        lens[record["question"]] = {"answer": str(record["answer"]),
                                    "states": logit_lens(model, tokenizer, prompt, trained)}
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
    print("| steps | accuracy | mean steps used | by hops |")
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
