"""Generation speed: the per-iteration KV cache against re-running the loop, against Hugging Face's
``generate`` of a plain model with the same FLOPs per token, and per-token adaptive depth against
fixed depth.

    python benchmarks/generation.py [--hidden 256 --core 2 --steps 8 --batch 8 --prompt 128 --new 64]
                                    [--run RUN_DIR] [--json PATH]

Part 1 (random weights, every stabiliser ``none``, fixed depth): one batch of left-padded prompts,
``--new`` tokens each, no EOS, greedy.
- ``cached_speedup``: uncached / cached wall time (the same model, prompts and tokens), and
  ``tokens_identical``: whether both gave the same ids.
- ``ratio_to_plain_hf``: cached looped generation / HF ``generate`` of a plain Llama with
  prelude + core x T + coda layers of the same dims (the same FLOPs per token).
Timings are medians of ``--rounds`` alternating rounds.

Part 2 (a trained cell): greedy answers to its validation questions (one batch, EOS per sample) at
fixed depth and under the per-token ``kl`` policy (Huginn's zero-shot adaptive compute, cache
strategy ``latest``) at each ``--threshold``: accuracy, iterations per generated token, wall time,
and, for the decoding steps alone (every token after the first; the prefill runs all prompt
positions together, so a token's exit saves iterations only there), iterations / T against wall
time per token relative to fixed depth. Without ``--run`` it trains ``recipes/quickstart.yaml``
into a temporary directory first (~2 minutes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from slr_zoo.files import write_json

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--core", type=int, default=2, help="layers in the looped core (k)")
    p.add_argument("--steps", type=int, default=8, help="loop iterations (T)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=128, help="prompt length (the shortest row is a quarter shorter)")
    p.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--run", type=Path, default=None, help="a trained cell for part 2 (default: train the quickstart)")
    p.add_argument("--threshold", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4], help="kl thresholds of part 2")
    p.add_argument("--limit", type=int, default=500, help="validation questions of part 2")
    p.add_argument("--answer-tokens", type=int, default=16, help="new tokens at most per answer in part 2")
    p.add_argument("--skip", choices=["plain", "adaptive"], action="append", default=[])
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    return p.parse_args(argv)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# ------------------------------------------------------------------ part 1
def build(args):
    from same_flops import looped_and_plain

    looped, plain = looped_and_plain(args.hidden, args.heads, args.core, args.steps, args.vocab)
    plain.generation_config.eos_token_id = None  # both generate exactly --new tokens
    plain.generation_config.pad_token_id = 0
    return looped.eval(), plain.eval()


def prompts(args):
    g = torch.Generator().manual_seed(0)
    lengths = torch.linspace(args.prompt * 3 // 4, args.prompt, args.batch).long()
    ids = torch.zeros(args.batch, args.prompt, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths.tolist()):  # left padding
        ids[row, args.prompt - n:] = torch.randint(1, args.vocab, (n,), generator=g)
        mask[row, args.prompt - n:] = 1
    return ids, mask


def part_one(args) -> dict:
    from slr_zoo.inference import generate_ids

    looped, plain = build(args)
    ids, mask = prompts(args)
    run = {
        "cached": lambda: generate_ids(looped, ids, mask, max_new_tokens=args.new),
        "uncached": lambda: generate_ids(looped, ids, mask, max_new_tokens=args.new, use_cache=False),
    }
    if "plain" not in args.skip:
        run["plain_hf"] = lambda: plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new,
                                                 min_new_tokens=args.new, do_sample=False)
    with torch.no_grad():
        for fn in run.values():  # warm-up
            fn() if fn is not run["uncached"] else None
        times = {name: [] for name in run}
        outputs = {}
        for r in range(args.rounds):
            for name in (list(run) if r % 2 == 0 else list(run)[::-1]):
                seconds, outputs[name] = timed(run[name])
                times[name].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    figures = {
        "setting": {"hidden": args.hidden, "core_layers": args.core, "steps": args.steps, "batch": args.batch,
                    "prompt": args.prompt, "new_tokens": args.new, "threads": torch.get_num_threads()},
        "seconds": {k: round(v, 4) for k, v in med.items()},
        "cached_speedup": round(med["uncached"] / med["cached"], 2),
        "tokens_identical": bool(torch.equal(outputs["cached"].sequences, outputs["uncached"].sequences)),
    }
    if "plain_hf" in med:
        figures["ratio_to_plain_hf"] = round(med["cached"] / med["plain_hf"], 3)
    print(f"part 1: d={args.hidden}, 1 + {args.core}x{args.steps} + 1 layer applications, batch {args.batch} x "
          f"{args.prompt}-token prompts, {args.new} new tokens, {torch.get_num_threads()} threads")
    for name, value in med.items():
        print(f"  {name:9s} {value:8.3f} s")
    print(f"  cached speedup over uncached: {figures['cached_speedup']:.1f}x (target >= 10), "
          f"identical tokens: {figures['tokens_identical']}")
    if "ratio_to_plain_hf" in figures:
        print(f"  cached / plain HF generate at the same FLOPs: {figures['ratio_to_plain_hf']:.3f} (target <= 1.15)")
    return figures


# ------------------------------------------------------------------ part 2
def trained_cell(args) -> Path:
    if args.run is not None:
        return args.run
    from slr_zoo import fit

    out = Path(tempfile.mkdtemp(prefix="slr_generation_"))
    print(f"part 2: training recipes/quickstart.yaml into {out} ...", flush=True)
    code = fit.main([str(REPO / "recipes" / "quickstart.yaml"), f"output_dir={out}", "trainer.progress_bar=false"])
    if code:
        sys.exit(f"training the quickstart failed (exit {code})")
    return out / "quickstart" / "default"


class ForwardClock:
    """Times the model's forward passes: the first of a generation is the prefill, the others are
    decoding steps (one new token each)."""

    def __init__(self, model):
        self.marks: list[float] = []
        model.register_forward_pre_hook(lambda *_: self.marks.append(time.perf_counter()))
        model.register_forward_hook(lambda *_: self.marks.append(time.perf_counter()))

    def decoding(self) -> float:
        """Seconds from the end of the prefill to the end of the last decoding step: what follows
        the last forward pass (turning ids into texts) is not decoding."""
        return self.marks[-1] - self.marks[1]


def part_two(args) -> dict:
    from slr_zoo import generate
    from slr_zoo.halting.kl import KLHalting
    from slr_zoo.recipe import load_cell

    parts = load_cell(trained_cell(args))
    task, tokenizer, model = parts.task, parts.tokenizer, parts.module.model
    records = list(task.records("val"))[: args.limit]
    questions = [r["question"] for r in records]
    T = model.max_steps
    clock = ForwardClock(model)
    policies = {"fixed": None, **{f"kl {t:g}": KLHalting(threshold=t) for t in args.threshold}}
    rows = {}
    for name, policy in policies.items():
        best = None
        for _ in range(args.rounds):  # one batch, so that the prefill is one forward pass
            clock.marks.clear()
            start = time.perf_counter()
            result = generate(model, tokenizer, questions, max_new_tokens=args.answer_tokens, halting=policy,
                              steps=T, batch_size=len(questions))
            end = time.perf_counter()
            timing = (end - start, clock.decoding())
            best = timing if best is None or timing[0] < best[0] else best
        total, decoding = best
        later = [s for row in result.steps for s in row[1:]]  # tokens made by decoding steps
        correct = sum(task.score(text, record) for text, record in zip(result.texts, records))
        rows[name] = {
            "accuracy": round(correct / len(records), 4),
            "generated_tokens": sum(len(s) for s in result.steps),
            "mean_iterations": round(result.mean_steps, 3),
            "seconds": round(total, 4),
            "decoded_tokens": len(later),
            "decode_iterations": round(sum(later) / len(later), 3) if later else None,
            "decode_seconds_per_token": decoding / len(later) if later else None,
        }
    fixed = rows["fixed"]
    for row in rows.values():
        row["time_ratio"] = round(row["seconds"] / fixed["seconds"], 3)
        row["iteration_ratio"] = round(row["mean_iterations"] / T, 3)
        if row["decoded_tokens"]:
            row["decode_time_ratio"] = round(row["decode_seconds_per_token"] / fixed["decode_seconds_per_token"], 3)
            row["decode_iteration_ratio"] = round(row["decode_iterations"] / T, 3)
            row["within_target"] = (abs(row["decode_time_ratio"] - row["decode_iteration_ratio"]) <= 0.1
                                    and row["accuracy"] >= fixed["accuracy"] - 0.01)
    print(f"part 2: {len(records)} validation questions in one batch, T = {T}, cache strategy latest; "
          f"decoding = the tokens after the first (the prefill runs every prompt position together)")
    print("| policy | accuracy | iterations / token | time vs fixed | decoding: iterations / T | decoding: time / token vs fixed |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['accuracy']:.3f} | {row['mean_iterations']:.2f} | {row['time_ratio']:.3f} | "
              f"{row.get('decode_iteration_ratio')} | {row.get('decode_time_ratio')} |")
    return {"records": len(records), "max_steps": T, "policies": rows}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    figures = part_one(args)
    if "adaptive" not in args.skip:
        figures["adaptive"] = part_two(args)
    if args.json:
        write_json(args.json, figures)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
