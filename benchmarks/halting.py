"""Does halting save real compute, and does learned halting spend it where it is needed?

    python benchmarks/halting.py [--recipe recipes/quickstart.yaml] [--minutes 4] [--json PATH] [key=value ...]

Part 1, halting at inference. One model is trained once (the recipe as it is: the quickstart trains
every iteration toward the answer after that many hops, so the state is decodable at every depth
and the output settles once the hops are done), then evaluated on the validation set with every
step (``fixed``), ``threshold`` and ``kl``. Their thresholds are chosen on a separate calibration split (same task, another seed): the largest one
whose calibration accuracy stays within ``--tolerance`` of fixed depth. Wall times are medians of
``--repeats`` interleaved runs, single-threaded; the figure of merit is
``time(halting) / time(fixed)`` against ``mean_steps / max_steps + 0.1``. The ``ideal`` column is
the best ratio any policy could reach at its mean_steps: the cost outside the loop (prelude and
final decoding, measured from fixed depth at 1 and at max_steps steps) does not shrink.

Part 2, learned halting. A model is trained with ``exit_gate`` (or ``--learned act`` / ``ponder``)
and its mean steps per hop count are printed: samples with more hops should use more steps. It
trains with ``loop.step_supervision=0.5`` (before your overrides): a learned policy learns when to
stop only through the answer loss, which a weight of 1 would switch off.

Each training stops after ``--minutes`` (Lightning's Timer). Results go to ``--json`` (default ``--out``/results.json).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Timer

from slr_zoo.files import write_json
from slr_zoo.halting import HALTING
from slr_zoo.recipe import build_cell, build_task, load, validate
from slr_zoo.tasks.encoding import answer_correct, collate
from slr_zoo.training.data import encode_split
from slr_zoo.training.module import question_mask
from slr_zoo.training.trainer import make_trainer

REPO = Path(__file__).resolve().parents[1]
THRESHOLD_EPSILONS = [1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.3]
KL_THRESHOLDS = [1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"))
    p.add_argument("--minutes", type=float, default=4.0, help="training time cap per model")
    p.add_argument("--repeats", type=int, default=5, help="timed evaluations per policy (median)")
    p.add_argument("--tolerance", type=float, default=0.005, help="calibration accuracy loss allowed")
    p.add_argument("--reduce", default="last", choices=["last", "max", "mean"],
                   help="question positions a per-sample threshold/kl decision reads: last = the separator, "
                        "which predicts the answer; max = every question position has settled")
    p.add_argument("--learned", default="exit_gate", choices=["act", "exit_gate", "ponder"])
    p.add_argument("--skip", choices=["inference", "learned"], action="append", default=[])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/benchmark_halting", help="the trained models and logs")
    p.add_argument("--json", type=Path, default=None, help="write the figures here (default: OUT/results.json)")
    p.add_argument("overrides", nargs="*", help="recipe overrides for both trainings (dotted.key=value)")
    return p.parse_args(argv)


# ------------------------------------------------------------------ training
def train(recipe: dict, directory: Path, minutes: float, threads: int):
    """The library's own training path (as ``slr_zoo.fit``), capped in wall time."""
    torch.set_num_threads(threads)
    parts = build_cell(recipe, directory)
    task, tokenizer, module = parts.task, parts.tokenizer, parts.module
    trainer = make_trainer(parts.trainer, directory, grad_clip=parts.grad_clip, enable_checkpointing=False)
    trainer.callbacks.append(Timer(duration=timedelta(minutes=minutes), interval="step"))
    start = time.perf_counter()
    trainer.fit(module, datamodule=parts.data)
    print(f"  trained {trainer.global_step} steps in {time.perf_counter() - start:.0f} s", flush=True)
    model = module.model.eval()
    return task, tokenizer, model, trainer.global_step


def batches(task, tokenizer, split: str, size: int) -> list[dict]:
    encoded = encode_split(task, split, tokenizer)
    items = [encoded[i] for i in range(len(encoded))]
    out = []
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        batch = collate([e for e, _ in chunk], tokenizer.pad_token_id)
        batch["hops"] = torch.tensor([h for _, h in chunk])
        batch["query"] = question_mask(batch["labels"])
        out.append(batch)
    return out


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model, data: list[dict]) -> dict:
    correct, steps, hops, sep_steps = [], [], [], []
    for batch in data:
        out = model(batch["input_ids"], query_mask=batch["query"], real_mask=batch["real_mask"])
        correct.append(answer_correct(out.logits, batch["labels"]))
        steps.append(out.steps)
        hops.append(batch["hops"])
        if out.token_steps is not None:   # a per-token policy: the separator's own halting step
            sep = batch["query"].sum(dim=1) - 1
            sep_steps.append(out.token_steps[torch.arange(len(sep)), sep])
    correct, steps, hops = torch.cat(correct).float(), torch.cat(steps).float(), torch.cat(hops)
    result = {"accuracy": float(correct.mean()), "mean_steps": float(steps.mean()), "per_hop": {}}
    sep_steps = torch.cat(sep_steps).float() if sep_steps else None
    for h in sorted(set(hops.tolist())):
        rows = hops == h
        entry = {"n": int(rows.sum()), "accuracy": round(float(correct[rows].mean()), 4),
                 "mean_steps": round(float(steps[rows].mean()), 3)}
        if sep_steps is not None:
            entry["separator_steps"] = round(float(sep_steps[rows].mean()), 3)
        result["per_hop"][int(h)] = entry
    return result


@torch.no_grad()
def wall_times(model, runs: dict[str, tuple], data: list[dict], repeats: int) -> dict[str, float]:
    """Median seconds per pass over ``data`` for each ``name -> (policy, steps)``, runs interleaved
    so that load on a shared machine hits every policy alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats + 1):   # the first round warms up and is dropped
        for name, (policy, steps) in runs.items():
            model.halting = policy
            start = time.perf_counter()
            for batch in data:
                model(batch["input_ids"], steps=steps, query_mask=batch["query"], real_mask=batch["real_mask"])
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts[1:]) for name, ts in times.items()}


def calibrate(model, node: dict, key: str, values: list[float], calib: list[dict], floor: float) -> dict:
    """``node`` with the largest ``key`` whose calibration accuracy is at least ``floor``."""
    chosen, table = None, []
    for value in values:
        model.halting = HALTING.build({**node, key: value})
        result = evaluate(model, calib)
        table.append((value, round(result["accuracy"], 4), round(result["mean_steps"], 2)))
        if result["accuracy"] >= floor:
            chosen = value
    print(f"  calibration {node}.{key}: (value, accuracy, mean_steps) {table}", flush=True)
    return {**node, key: chosen if chosen is not None else values[0]}


def part_inference(args, out: Path) -> dict:
    recipe = load(args.recipe, args.overrides)
    recipe["loop"]["halting"] = {"name": "fixed"}
    validate(recipe)
    print(f"part 1: train once ({recipe['loop']['depth_sampler']}, {recipe['loop']['injection']}), "
          f"evaluate with fixed / threshold / kl", flush=True)
    task, tokenizer, model, trained = train(recipe, out / "inference", args.minutes, args.threads)
    size = recipe["trainer"]["eval_batch_size"] or recipe["trainer"]["batch_size"]
    val = batches(task, tokenizer, "val", size)
    calib_recipe = copy.deepcopy(recipe)
    calib_recipe["seed"] = recipe["seed"] + 1000    # another stream of the same task
    calib = batches(build_task(calib_recipe), tokenizer, "val", size)

    model.halting = HALTING.build({"name": "fixed"})
    floor = evaluate(model, calib)["accuracy"] - args.tolerance
    policies = {
        "fixed": HALTING.build({"name": "fixed"}),
        # per sample, decided where --reduce says (by default the separator, which predicts the answer)
        "threshold": HALTING.build(calibrate(model, {"name": "threshold", "reduce": args.reduce}, "epsilon",
                                             THRESHOLD_EPSILONS, calib, floor)),
        "kl": HALTING.build(calibrate(model, {"name": "kl", "granularity": "sample", "reduce": args.reduce},
                                      "threshold", KL_THRESHOLDS, calib, floor)),
        "kl_default": HALTING.build({"name": "kl"}),  # Huginn's: per token, 5e-4
    }
    results = {}
    for name, policy in policies.items():
        model.halting = policy
        results[name] = evaluate(model, val)
    T = recipe["loop"]["max_steps"]
    runs = {name: (policy, None) for name, policy in policies.items()}
    runs["fixed@1"] = (policies["fixed"], 1)
    seconds = wall_times(model, runs, val, args.repeats)
    # the cost outside the loop (prelude, final decoding) does not shrink with halting: measured
    # from fixed depth at T and at 1 step, it gives the best ratio any policy can reach
    per_step = (seconds["fixed"] - seconds["fixed@1"]) / max(1, T - 1)
    outside = seconds["fixed@1"] - per_step
    print(f"  cost outside the loop: {outside / seconds['fixed']:.1%} of a fixed-depth pass", flush=True)
    rows = {}
    for name, result in results.items():
        ratio = seconds[name] / seconds["fixed"]
        bound = result["mean_steps"] / T + 0.1
        ideal = (outside + result["mean_steps"] * per_step) / seconds["fixed"]
        rows[name] = {
            "policy": {k: v for k, v in vars(policies[name]).items() if k in ("epsilon", "threshold")},
            "accuracy": round(result["accuracy"], 4),
            "accuracy_delta_points": round(100 * (result["accuracy"] - results["fixed"]["accuracy"]), 2),
            "mean_steps": round(result["mean_steps"], 3),
            "seconds": round(seconds[name], 4),
            "time_ratio": round(ratio, 3),
            "bound": round(bound, 3),
            "within_bound": ratio <= bound,
            "ideal_ratio": round(ideal, 3),
            "per_hop": result["per_hop"],
        }
    print(f"\n  trained {trained} steps; max_steps {T}; val {sum(len(b['hops']) for b in val)} samples")
    print(f"  {'policy':11s} {'setting':>10s} {'acc':>7s} {'Δacc pt':>8s} {'steps':>6s} {'time s':>8s} "
          f"{'ratio':>6s} {'bound':>6s} {'ideal':>6s}")
    for name, row in rows.items():
        setting = ",".join(f"{v:g}" for v in row["policy"].values()) or "-"
        print(f"  {name:11s} {setting:>10s} {row['accuracy']:7.3f} {row['accuracy_delta_points']:8.1f} "
              f"{row['mean_steps']:6.2f} {row['seconds']:8.3f} {row['time_ratio']:6.3f} {row['bound']:6.3f} "
              f"{row['ideal_ratio']:6.3f}{'  ok' if row['within_bound'] else '  OVER'}")
    return {"train_steps": trained, "max_steps": T, "recipe": recipe, "outside_loop_fraction":
            round(outside / seconds["fixed"], 3), "policies": rows}


def part_learned(args, out: Path) -> dict:
    recipe = load(args.recipe, ["loop.step_supervision=0.5", *args.overrides])
    recipe["loop"]["halting"] = {"name": args.learned}
    validate(recipe)
    print(f"\npart 2: train with {recipe['loop']['halting']}, mean steps per hop count", flush=True)
    task, tokenizer, model, trained = train(recipe, out / "learned", args.minutes, args.threads)
    size = recipe["trainer"]["eval_batch_size"] or recipe["trainer"]["batch_size"]
    result = evaluate(model, batches(task, tokenizer, "val", size))
    print(f"  trained {trained} steps: accuracy {result['accuracy']:.3f}, mean steps {result['mean_steps']:.2f}")
    print(f"  {'hops':>4s} {'n':>4s} {'acc':>6s} {'sample steps':>13s} {'separator steps':>16s}")
    for h, e in result["per_hop"].items():
        print(f"  {h:4d} {e['n']:4d} {e['accuracy']:6.3f} {e['mean_steps']:13.2f} {e.get('separator_steps', float('nan')):16.2f}")
    hops = sorted(result["per_hop"])
    key = "separator_steps" if "separator_steps" in result["per_hop"][hops[0]] else "mean_steps"
    steps = [result["per_hop"][h][key] for h in hops]
    corr = float(torch.corrcoef(torch.tensor([hops, steps], dtype=torch.float))[0, 1]) if len(hops) > 1 else float("nan")
    print(f"  correlation(hops, {key}) over hop counts: {corr:.3f}")
    return {"train_steps": trained, "recipe": recipe, "result": result, "hop_step_correlation": corr}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    if "inference" not in args.skip:
        report["inference"] = part_inference(args, out)
    if "learned" not in args.skip:
        report["learned"] = part_learned(args, out)
    path = args.json or out / "results.json"
    write_json(path, report, default=str)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
