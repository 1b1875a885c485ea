"""``trainer.compile``: a training step (forward + backward) of a looped model with its core
compiled by torch.compile (inductor) against the same model in eager mode, timed in the same run,
and the one-off compile time. A second depth and a second batch shape are run after the first
compiled step, and the number of graphs compiled is reported (the target is one).

    python benchmarks/compile.py [--hidden 256 --steps 6 --core 2 --batch 16 --seq 80 --rounds 10] [--json PATH]

Rounds alternate between the two models and the median is reported (a shared machine is noisy).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from slr_zoo.files import write_json


def build(args, compiled: bool):
    from slr_zoo.recipe import build_backbone, build_model, validate
    from slr_zoo.recipe.schema import defaults

    recipe = defaults()
    recipe["backbone"] = {"name": "llama", "hidden_size": args.hidden, "heads": args.heads,
                          "prelude_layers": 1, "core_layers": args.core, "coda_layers": 1}
    recipe["loop"]["max_steps"] = args.steps
    recipe["loop"]["loop_lora"] = {"name": "per_step", "rank": 8}
    recipe["loop"]["step_embedding"] = {"name": "learned"}
    recipe["trainer"]["compile"] = compiled
    validate(recipe)
    torch.manual_seed(0)
    return build_model(recipe, build_backbone(recipe, vocab_size=args.vocab)).train()


def step_seconds(model, ids, steps: int) -> float:
    start = time.perf_counter()
    logits = model(ids, steps=steps).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--core", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=80)  # not head_dim (64): see docs/results.md
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> None:
    from torch._dynamo.utils import counters

    args = parse_args(argv)
    eager, compiled = build(args, False), build(args, True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    compile_seconds = step_seconds(compiled, ids, args.steps) - step_seconds(eager, ids, args.steps)
    step_seconds(compiled, ids, max(1, args.steps - 2))                          # another depth
    step_seconds(compiled, ids[: args.batch // 2, : args.seq // 2], args.steps)  # another batch shape
    graphs = counters["stats"]["unique_graphs"]
    times = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        times["eager"].append(step_seconds(eager, ids, args.steps))
        times["compiled"].append(step_seconds(compiled, ids, args.steps))
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    figures = {
        "hidden": args.hidden, "core_layers": args.core, "steps": args.steps, "batch": args.batch, "seq": args.seq,
        "eager_step_seconds": round(eager_s, 4), "compiled_step_seconds": round(compiled_s, 4),
        "speedup": round(eager_s / compiled_s, 3), "compile_seconds": round(compile_seconds, 1),
        "graphs_compiled": graphs, "threads": torch.get_num_threads(),
    }
    print(f"d={args.hidden}, core {args.core} x T={args.steps}, batch {args.batch} x {args.seq}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"| | step s (median of {args.rounds}) |\n|---|---|\n| eager | {eager_s:.4f} |\n| compiled | {compiled_s:.4f} |")
    print(f"speedup {figures['speedup']}x; compile time {figures['compile_seconds']} s; "
          f"graphs compiled over 2 depths and 2 batch shapes: {graphs}")
    if args.json:
        write_json(args.json, figures)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
