"""Memory and time of calibrating loop-wise LoRA (``loop_lora.calibration``): the input moments of
every replaced layer collected in one run and turned into adapters at the end ("at once": the
moments calibration held before 2026-12-07) against one replaced layer at a time ("by layer",
``PerStepLoRA.calibrate`` over ``Backbone.run_replaced``). Both run the originals layer by layer
over all texts; only what is held differs.

    python benchmarks/calibration.py [--hidden 576 --intermediate 1536 --core 2 --loops 8
                                      --texts 16 --tokens 128 --rank 64] [--json PATH]

A random Llama converted as 1 + core x loops + 1 (``backbone.share: average``), per-step LoRA on
every linear. Each way runs in a fresh process. "moments held" is counted exactly: the float64
[in, in] sums alive at the most (one per replaced linear, for one layer or for all of them);
"RSS growth" is the process's peak resident memory over the calibration (noisy: the allocator
keeps freed memory; on a GPU ``torch.cuda.max_memory_allocated``). Both ways must give the same
adapters: the largest difference between them is printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from slr_zoo.files import write_json

WAYS = ("at_once", "by_layer")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--core", type=int, default=2, help="layers of the looped core")
    p.add_argument("--loops", type=int, default=8, help="iterations the conversion replaces")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--texts", type=int, default=16, help="calibration texts")
    p.add_argument("--tokens", type=int, default=128, help="tokens per text")
    p.add_argument("--one", choices=WAYS, default=None, help=argparse.SUPPRESS)  # the child process
    p.add_argument("--adapters", type=Path, default=None, help=argparse.SUPPRESS)  # where the child saves them
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def one(args) -> dict:
    from memory import peak_bytes  # a sibling benchmark's helper (this folder is on the path)

    from slr_zoo import linears
    from slr_zoo.recipe import build_backbone, build_model, set_key, validate
    from slr_zoo.recipe.schema import defaults

    recipe = defaults()
    recipe["backbone"] = {"name": "llama", "hidden_size": args.hidden, "heads": args.heads,
                          "intermediate_size": args.intermediate, "prelude_layers": 1, "core_layers": args.core,
                          "coda_layers": 1, "share": "average", "loops": args.loops}
    recipe = set_key(recipe, "loop.max_steps", args.loops)
    recipe = set_key(recipe, "loop.loop_lora", {"name": "per_step", "rank": args.rank, "targets": ["all-linear"],
                                                "init": "svd"})
    validate(recipe)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build_model(recipe, build_backbone(recipe, vocab_size=1024)).to(device).eval()
    lora, backbone = model.loop_lora, model.backbone
    g = torch.Generator().manual_seed(1)
    texts = [torch.randint(0, 1024, (1, args.tokens), generator=g).to(device) for _ in range(args.texts)]

    held: list[int] = []  # bytes of the moment sums each InputMoments ends with
    exit_moments = linears.InputMoments.__exit__

    def counting_exit(self, *exc):
        held.append(sum(s.numel() * s.element_size() for s in self._sums.values()))
        return exit_moments(self, *exc)

    linears.InputMoments.__exit__ = counting_exit
    linears.low_rank_factors(torch.randn(8, 8, dtype=torch.float64), 2, torch.eye(8))  # load the linear algebra first
    before, start = peak_bytes(), time.perf_counter()
    with torch.no_grad():
        if args.one == "at_once":
            with linears.InputMoments(lora.replaced_linears()) as moments:
                backbone.run_replaced(texts)
            lora.init_from_replaced(moments.result())
            del moments
        else:
            lora.calibrate(lambda watch: backbone.run_replaced(texts, watch=watch))
    seconds = time.perf_counter() - start
    torch.save({k: v.cpu() for k, v in lora.state_dict().items()}, args.adapters)
    return {"way": args.one, "seconds": round(seconds, 2), "moments_held_mib": round(max(held) / 2**20, 1),
            "rss_growth_mib": round((peak_bytes() - before) / 2**20, 1), "replaced_layers": len(backbone.replaced_layers)}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return
    rows, adapters = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for way in WAYS:
            path = Path(tmp) / f"{way}.pt"
            command = [sys.executable, __file__, "--one", way, "--adapters", str(path)]
            for key in ("hidden", "intermediate", "heads", "core", "loops", "rank", "texts", "tokens"):
                command += [f"--{key}", str(getattr(args, key))]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"the {way} run failed:\n{done.stderr[-3000:]}")
            rows[way] = json.loads(done.stdout.strip().splitlines()[-1])
            adapters[way] = torch.load(path)
    difference = max(float((adapters["at_once"][k].double() - adapters["by_layer"][k].double()).abs().max())
                     for k in adapters["at_once"])
    print(f"Llama d={args.hidden}, MLP {args.intermediate}, 1 + {args.core} x {args.loops} + 1 "
          f"({rows['at_once']['replaced_layers']} replaced layers), rank {args.rank} on every linear, "
          f"{args.texts} texts x {args.tokens} tokens ({'CUDA' if torch.cuda.is_available() else 'CPU'})")
    print("| way | moments held MiB | RSS growth MiB | seconds |")
    print("|---|---|---|---|")
    for way, row in rows.items():
        print(f"| {way} | {row['moments_held_mib']:.1f} | {row['rss_growth_mib']:.1f} | {row['seconds']:.1f} |")
    figures = {"rows": rows, "max_adapter_difference": difference,
               "moments_ratio_by_layer_over_at_once": round(rows["by_layer"]["moments_held_mib"]
                                                            / rows["at_once"]["moments_held_mib"], 4),
               "time_ratio_by_layer_over_at_once": round(rows["by_layer"]["seconds"] / rows["at_once"]["seconds"], 3)}
    print(f"moments held, by layer / at once: {figures['moments_ratio_by_layer_over_at_once']}; time: "
          f"{figures['time_ratio_by_layer_over_at_once']}; largest adapter difference: {difference:.2e}")
    if args.json:
        write_json(args.json, figures)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
