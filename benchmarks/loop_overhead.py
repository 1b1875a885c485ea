"""What the loop costs: one training step (forward + backward) of a looped model, T iterations of a
k-layer core, against a plain Hugging Face model of the same dims with prelude + k*T + coda layers
(the same FLOPs), timed in the same run. Prints the ratio; the target is <= 1.05.

    python benchmarks/loop_overhead.py [--hidden 256 --steps 6 --core 1 --batch 16 --seq 64] [--json PATH]

Rounds alternate between the two models and the median is reported, because a shared machine is
noisy; the halting policy is `fixed` and every stabiliser is `none`, so any difference is the loop's
own bookkeeping (halting, mixing, compaction) and the split backbone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from slr_zoo.files import write_json


def build(args):
    from same_flops import looped_and_plain

    looped, plain = looped_and_plain(args.hidden, args.heads, args.core, args.steps, args.vocab)
    return looped.train(), plain.train()


def step_seconds(model, ids, labels) -> float:
    start = time.perf_counter()
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--core", type=int, default=1, help="layers in the looped core (k)")
    parser.add_argument("--steps", type=int, default=6, help="loop iterations (T)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the figures here")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    looped, plain = build(args)
    n_looped = sum(p.numel() for p in looped.parameters())
    n_plain = sum(p.numel() for p in plain.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    for _ in range(3):  # warm-up: allocator, kernels
        step_seconds(looped, ids, labels)
        step_seconds(plain, ids, labels)
    times = {"looped": [], "plain": []}
    for r in range(args.rounds):
        order = [("looped", looped), ("plain", plain)]
        for name, model in order if r % 2 == 0 else order[::-1]:
            times[name].append(step_seconds(model, ids, labels))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"looped: 1 + {args.core}x{args.steps} + 1 layer applications, {n_looped / 1e6:.2f}M parameters")
    print(f"plain HF Llama: {2 + args.core * args.steps} layers, {n_plain / 1e6:.2f}M parameters")
    print(f"batch {args.batch} x {args.seq} tokens, d={args.hidden}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} alternating rounds")
    print(f"  step (fwd+bwd): looped {med['looped'] * 1e3:.1f} ms, plain {med['plain'] * 1e3:.1f} ms")
    print(f"  ratio looped / plain = {med['looped'] / med['plain']:.3f}   (target <= 1.05)")
    if args.json:
        figures = {"setting": {k: v for k, v in vars(args).items() if k != "json"},
                   "threads": torch.get_num_threads(), "looped_ms": round(med["looped"] * 1e3, 2),
                   "plain_ms": round(med["plain"] * 1e3, 2), "ratio": round(med["looped"] / med["plain"], 4)}
        write_json(args.json, figures)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
