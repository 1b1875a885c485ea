"""Where a recipe's training step goes: collating the batch, the forward pass with its losses, the
backward pass and the optimiser, timed on the recipe's own model and data (by default the main
job's cell, ``recipes/ablation_residual.yaml``'s first).

    python benchmarks/train_step.py [RECIPE] [key=value ...] [--cell 0 --steps 40 --threads 1] [--json PATH]

The same model is timed again with the head's logits at every position (as the training step
computed them before it kept only the positions some objective has a label at): with a large
vocabulary, as in ``recipes/finetune_smollm2.yaml``, the head is a large part of a step.

For a from-scratch GPT-2 backbone the same model is also timed in the same run with Hugging Face's
default GPT-2 activation ("gelu_new", a chain of element-wise ops) in place of the fused kernel the
zoo builds ("gelu_pytorch_tanh", the same function to float rounding), and the ratio is printed:
on the main job's tiny model the activation was a quarter of the step. Rounds alternate between
the two so that a change in the machine's load touches both alike; medians are reported.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from slr_zoo.files import write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="?", default=str(Path(__file__).parent.parent / "recipes" / "ablation_residual.yaml"))
    p.add_argument("overrides", nargs="*", help="dotted.key=value recipe overrides")
    p.add_argument("--cell", type=int, default=0, help="the grid cell to time")
    p.add_argument("--steps", type=int, default=40, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    return p.parse_intermixed_args(argv)


def build(args, directory: Path):
    from slr_zoo.recipe import expand, load, validate
    from slr_zoo.recipe.instantiate import build_cell

    from slr_zoo.fit import warn_grid_overrides

    recipe = load(args.recipe, [*args.overrides, f"output_dir={directory}"])
    validate(recipe)
    warn_grid_overrides(args.overrides, recipe)  # a grid's own values win over the command line's
    cell = expand(recipe)[args.cell]
    parts = build_cell(cell.recipe, directory / "cell")
    parts.data.setup("fit")
    return cell, parts


STEP = itertools.count()  # a random-depth recipe draws each timed step's depth as training would


def time_steps(module, loader, optimizer, steps: int) -> dict[str, float]:
    """Milliseconds per step of each phase, summed over ``steps`` training steps: the training
    step's own forward pass (``forward_batch``: continuous thoughts and a curriculum's depth
    included) and losses."""
    phases = dict.fromkeys(("collate", "forward", "backward", "optimizer"), 0.0)
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        out = module.forward_batch(batch, module.training_depth(batch, next(STEP)))
        task, aux, _ = module.losses(batch, out)
        loss = task if aux is None else task + aux
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        for name, (a, b) in zip(phases, ((t0, t1), (t1, t2), (t2, t3), (t3, t4))):
            phases[name] += (b - a) * 1e3 / steps
    return phases


def _forever(dataloader):
    """The recipe's own batches, epoch after epoch, each collated when it is drawn."""
    while True:
        yield from dataloader


def set_activation(module, name: str) -> None:
    from transformers.activations import ACT2FN

    for layer in module.modules():
        if hasattr(layer, "act") and hasattr(layer, "c_fc"):  # a GPT-2 MLP
            layer.act = ACT2FN[name]


def set_head_positions(module, every: bool) -> None:
    """Make every objective claim it may read any position (``every``), or restore what it declares."""
    for objective in module.objectives.values():
        if every:
            objective.logits_at = None
        elif "logits_at" in objective.__dict__:
            del objective.logits_at


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cell, parts = build(args, Path(tmp))
    module = parts.module.train()
    loader = _forever(parts.data.train_dataloader())
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=parts.config["optim"]["lr"])
    gpt2 = parts.config["backbone"]["name"] == "gpt2" and not parts.config["backbone"].get("pretrained")
    variants = ["as built", "logits at every position"] + (["gelu_new"] if gpt2 else [])
    time_steps(module, loader, optimizer, 5)  # warm-up: allocator, kernels
    runs = {v: [] for v in variants}
    for r in range(args.rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            set_activation(module, "gelu_new" if variant == "gelu_new" else "gelu_pytorch_tanh")
            set_head_positions(module, every=variant == "logits at every position")
            runs[variant].append(time_steps(module, loader, optimizer, args.steps))
    figures = {v: {k: round(statistics.median(run[k] for run in runs[v]), 2) for k in runs[v][0]} for v in variants}
    for v in figures:
        figures[v]["step"] = round(sum(figures[v].values()), 2)
    print(f"{cell.label or parts.config['name']}: {sum(p.numel() for p in module.parameters()):,} parameters, "
          f"batch {parts.trainer.batch_size}, max depth {module.model.max_steps}, {torch.get_num_threads()} thread(s), "
          f"median of {args.rounds} rounds of {args.steps} steps")
    print("| model | collate ms | forward ms | backward ms | optimizer ms | step ms | ratio to as built |")
    print("|---|---|---|---|---|---|---|")
    base = figures["as built"]["step"]
    for v, f in figures.items():
        print(f"| {v} | {f['collate']:.1f} | {f['forward']:.1f} | {f['backward']:.1f} | {f['optimizer']:.1f} | "
              f"{f['step']:.1f} | {f['step'] / base:.3f} |")
    if args.json:
        out = {"recipe": args.recipe, "cell": cell.label, "threads": torch.get_num_threads(), "ms": figures,
               "ratio_every_position_over_built": round(figures["logits at every position"]["step"] / base, 4)}
        if gpt2:
            out["ratio_gelu_new_over_built"] = round(figures["gelu_new"]["step"] / base, 4)
        write_json(args.json, out)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
