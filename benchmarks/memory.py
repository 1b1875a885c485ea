"""Peak memory of a training step against loop depth: T = 32 with truncated backprop
(``backprop_steps``) against T = 4, and with the core recomputed in backward
(``trainer.activation_checkpointing``).

    python benchmarks/memory.py [--hidden 256 --core 2 --batch 16 --seq 64 --backprop 4] [--json PATH]

Each setting runs in a fresh process. The memory of a training step is counted exactly: the
parameters, their gradients and AdamW's two moments, plus every tensor autograd saves for the
backward pass (``torch.autograd.graph.saved_tensors_hooks``, each storage once), which is what
grows with depth. The growth of the process's peak resident memory over the step is printed
beside it (noisy: the allocator keeps freed memory); on a GPU ``torch.cuda.max_memory_allocated``
is the figure. ``ratio_T32_over_T4``: with ``backprop_steps = 4`` the 28 earlier iterations keep no
activations, so it should stay near 1 (target <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from slr_zoo.files import write_json

SETTINGS = {
    "T4": {"steps": 4, "backprop": None, "checkpoint": False},
    "T32_backprop4": {"steps": 32, "backprop": 4, "checkpoint": False},
    "T32_backprop4_checkpointed": {"steps": 32, "backprop": 4, "checkpoint": True},
    "T32_full_backprop": {"steps": 32, "backprop": None, "checkpoint": False},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--core", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--backprop", type=int, default=4, help="backprop_steps of the T = 32 settings")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # run one setting (the child process)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def peak_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def one(args) -> dict:
    from slr_zoo.recipe import build_backbone, build_model, set_key, validate
    from slr_zoo.recipe.schema import defaults

    setting = dict(SETTINGS[args.one])
    if setting["backprop"] is not None:
        setting["backprop"] = args.backprop
    recipe = defaults()
    recipe["backbone"] = {"name": "llama", "hidden_size": args.hidden, "heads": 4, "prelude_layers": 1,
                          "core_layers": args.core, "coda_layers": 1}
    recipe = set_key(recipe, "loop.max_steps", setting["steps"])
    recipe = set_key(recipe, "loop.backprop_steps", setting["backprop"])
    recipe = set_key(recipe, "trainer.activation_checkpointing", setting["checkpoint"])
    validate(recipe)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build_model(recipe, build_backbone(recipe, vocab_size=512)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 512, (args.batch, args.seq), device=device)

    def step():
        loss = torch.nn.functional.cross_entropy(model(ids).logits.flatten(0, 1).float(), ids.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    before = peak_bytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    static = sum(p.numel() * p.element_size() * 4 for p in model.parameters())  # weights, grads, 2 moments
    if torch.cuda.is_available():
        measured = torch.cuda.max_memory_allocated()
    else:
        measured = static + sum(saved.values())
    return {"setting": args.one, **setting, "step_peak_mib": round(measured / 2**20, 2),
            "saved_for_backward_mib": round(sum(saved.values()) / 2**20, 2),
            "rss_growth_mib": round((peak_bytes() - before) / 2**20, 1)}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return
    rows = {}
    for name in SETTINGS:
        command = [sys.executable, __file__, "--one", name, "--hidden", str(args.hidden), "--core", str(args.core),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--backprop", str(args.backprop)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
    base = rows["T4"]["step_peak_mib"]
    print(f"d={args.hidden}, core {args.core} layers, batch {args.batch} x {args.seq}; memory a training step adds "
          f"to the process's peak ({'CUDA' if torch.cuda.is_available() else 'CPU RSS'})")
    print("| setting | step memory MiB | of it saved for backward | vs T = 4 | RSS growth MiB |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['step_peak_mib']:.1f} | {row['saved_for_backward_mib']:.1f} | "
              f"{row['step_peak_mib'] / base:.2f} | {row['rss_growth_mib']:.1f} |")
    figures = {"rows": rows, "ratio_T32_over_T4": round(rows["T32_backprop4"]["step_peak_mib"] / base, 3),
               "ratio_T32_checkpointed_over_T4": round(rows["T32_backprop4_checkpointed"]["step_peak_mib"] / base, 3),
               "ratio_T32_full_over_T4": round(rows["T32_full_backprop"]["step_peak_mib"] / base, 3)}
    print(f"ratio T=32 (backprop {args.backprop}) / T=4: {figures['ratio_T32_over_T4']} (target <= 1.2)")
    if args.json:
        write_json(args.json, figures)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
