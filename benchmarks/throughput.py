"""Tokens per second against loop depth T: a training step, a prefill (one no-grad forward over
the prompts) and cached greedy decoding.

    python benchmarks/throughput.py [--hidden 256 --core 2 --depths 1 2 4 8 16 32 --batch 8 --seq 128
                                     --new 32 --backprop 0] [--json PATH]

One model (Llama, 1 prelude + ``--core`` x T + 1 coda layers, random weights, every stabiliser
``none``) is timed at every depth in the same process, rounds alternating between depths so that
a change in the machine's load touches all of them alike. Each figure is printed with its ratio
to the first depth (``ratio_to_T1``) and with ``layer_efficiency``: that ratio times the layer
applications per token (2 + core x T) over the first depth's, so 1.0 when a token costs in
proportion to the layers it passes through, and below 1.0 when each iteration costs more than its
layers (the loop's own work, or memory traffic that grows with depth).
``--backprop N`` trains with truncated backprop through the last N iterations
(``loop.backprop_steps``), which flattens the training curve past T = N.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from slr_zoo.files import write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--core", type=int, default=2, help="layers in the looped core")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="loop iterations T")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128, help="tokens per row (training and prefill)")
    p.add_argument("--new", type=int, default=32, help="new tokens per row in the decoding figure")
    p.add_argument("--backprop", type=int, default=0, help="loop.backprop_steps of training (0: all)")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    return p.parse_args(argv)


def build(args, steps: int):
    from slr_zoo.recipe import build_backbone, build_model, set_key, validate
    from slr_zoo.recipe.schema import defaults

    recipe = defaults()
    recipe["backbone"] = {"name": "llama", "hidden_size": args.hidden, "heads": args.heads, "prelude_layers": 1,
                          "core_layers": args.core, "coda_layers": 1}
    recipe = set_key(recipe, "loop.max_steps", steps)
    recipe = set_key(recipe, "loop.depth_sampler", {"name": "fixed"})
    recipe = set_key(recipe, "loop.backprop_steps", args.backprop if 0 < args.backprop < steps else None)
    validate(recipe)
    torch.manual_seed(0)
    return build_model(recipe, build_backbone(recipe, vocab_size=args.vocab))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def workloads(args, model):
    """(name, tokens processed, fn) of the three measured jobs on one model."""
    from slr_zoo.inference import generate_ids

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        model.train()
        out = model(ids)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def prefill():
        model.eval()
        with torch.no_grad():
            model(ids)

    def decode():
        model.eval()
        with torch.no_grad():
            generate_ids(model, ids[:, : args.seq // 4], max_new_tokens=args.new, eos_token_id=None)

    return [("train", ids.numel(), train_step), ("prefill", ids.numel(), prefill),
            ("decode", args.batch * args.new, decode)]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {T: build(args, T) for T in args.depths}
    jobs = {T: workloads(args, m) for T, m in models.items()}
    for T in args.depths:  # warm-up: allocator, first-call overheads
        for _, _, fn in jobs[T]:
            fn()
    times: dict[tuple[int, str], list[float]] = {}
    for r in range(args.rounds):
        for T in (args.depths if r % 2 == 0 else args.depths[::-1]):
            for name, _, fn in jobs[T]:
                times.setdefault((T, name), []).append(timed(fn))
    base_T = args.depths[0]
    rows = []
    for T in args.depths:
        row = {"T": T}
        for name, tokens, _ in jobs[T]:
            seconds = statistics.median(times[(T, name)])
            row[f"{name}_tokens_per_second"] = round(tokens / seconds, 1)
            row[f"{name}_seconds"] = round(seconds, 4)
        rows.append(row)
    for name in ("train", "prefill", "decode"):
        base = rows[0][f"{name}_tokens_per_second"]
        for row in rows:
            ratio = row[f"{name}_tokens_per_second"] / base
            row[f"{name}_ratio_to_T{base_T}"] = round(ratio, 3)
            layers = (2 + args.core * row["T"]) / (2 + args.core * base_T)
            row[f"{name}_layer_efficiency"] = round(ratio * layers, 3)

    print(f"d={args.hidden}, 1 + {args.core} x T + 1 layer applications, batch {args.batch} x {args.seq} tokens, "
          f"{args.new} new tokens per row, backprop_steps {args.backprop or 'all'}, "
          f"{torch.get_num_threads()} threads; medians of {args.rounds} rounds\n"
          f"ratio: tokens/s over T = {base_T}'s; eff: ratio x layer applications per token over T = {base_T}'s")
    print(f"{'T':>4} | {'train tok/s':>11} {'ratio':>6} {'eff':>6} | {'prefill tok/s':>13} {'ratio':>6} {'eff':>6} | "
          f"{'decode tok/s':>12} {'ratio':>6} {'eff':>6}")
    for row in rows:
        cells = " | ".join(f"{row[f'{n}_tokens_per_second']:>{w}.0f} {row[f'{n}_ratio_to_T{base_T}']:>6.3f} "
                           f"{row[f'{n}_layer_efficiency']:>6.3f}" for n, w in (("train", 11), ("prefill", 13), ("decode", 12)))
        print(f"{row['T']:>4} | {cells}")
    if args.json:
        figures = {"setting": {"hidden": args.hidden, "heads": args.heads, "core_layers": args.core,
                               "batch": args.batch, "seq": args.seq, "new_tokens": args.new,
                               "backprop_steps": args.backprop or None, "threads": torch.get_num_threads(),
                               "rounds": args.rounds},
                   "rows": rows}
        write_json(args.json, figures)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
