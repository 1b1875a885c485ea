"""Data-parallel throughput and per-rank memory on this machine.

    python benchmarks/distributed.py [--hidden 256] [--steps 12] [--batch 32] [--depth 4] [--json PATH]

Runs the same training (a looped Llama-style model on the iterate task, one global batch per step)
as 1 process, DDP over 2 processes, and FSDP2 over 2 processes, through the real path
(``recipe.build_cell`` + ``make_trainer``; ranks are forked with torchrun's environment by
``fork_workers``), and prints:

- throughput: answer+question tokens trained per second (global), timed after ``--warmup`` steps;
- peak memory per rank: the growth of the process's peak resident set over its size before the
  model was built (``ru_maxrss``: what the OS had to give it), and the exact bytes of parameters,
  gradients and AdamW state each rank holds (what FSDP2 shards).

On CPU every rank uses one thread; the single process is run with one thread and with as many
threads as DDP has ranks (the same cores). On a shared machine the numbers move with its load,
which is printed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from slr_zoo.files import write_json
from slr_zoo.recipe import build_cell, set_key, validate
from slr_zoo.recipe.schema import defaults
from slr_zoo.training.trainer import fork_workers, make_trainer


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


class Meter(Callback):
    """Times training steps on every rank and writes the rank's numbers at the end of training."""

    def __init__(self, out: Path, warmup: int, rss_before: int):
        self.out, self.warmup, self.rss_before = out, warmup, rss_before
        self.times: list[float] = []
        self.tokens: list[int] = []

        self.step_rss = 0

    def on_train_start(self, trainer, pl_module):
        # hand memory freed while building and sharding the model back to the OS, so that the
        # samples below see what training holds (glibc otherwise keeps it in its arenas)
        ctypes.CDLL("libc.so.6").malloc_trim(0)

    def _sample(self) -> None:
        self.step_rss = max(self.step_rss, _rss_kib())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_before_backward(self, trainer, pl_module, loss):
        self._sample()  # activations of the whole loop alive

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._sample()  # gradients alive

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)
        self.tokens.append(int(batch["input_ids"].numel()))
        self._sample()

    def on_train_end(self, trainer, pl_module):
        from torch.distributed.tensor import DTensor

        def local(t):
            return t.to_local() if isinstance(t, DTensor) else t

        def nbytes(tensors):
            return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)

        params = list(pl_module.parameters())
        optimizer = trainer.optimizers[0]
        states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        w = self.warmup
        record = {
            "rank": trainer.global_rank,
            "step_seconds": sum(self.times[w:]),
            "tokens": sum(self.tokens[w:]),
            "peak_rss_growth_mib": (peak - self.rss_before) / 1024,
            "step_rss_growth_mib": (self.step_rss - self.rss_before) / 1024,
            "param_mib": nbytes(params) / 2**20,
            "grad_mib": nbytes(p.grad for p in params) / 2**20,
            "optimizer_mib": nbytes(states) / 2**20,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def recipe_for(args, strategy: str, devices: int) -> dict:
    recipe = defaults()
    recipe["backbone"] = {"name": "llama", "hidden_size": args.hidden, "heads": 4, "prelude_layers": 1,
                          "core_layers": 2, "coda_layers": 1}
    recipe["task"] = {"name": "iterate", "n_train": 2048, "n_val": 8}
    recipe["loop"]["max_steps"] = args.depth
    for key, value in {"max_steps": args.steps, "batch_size": args.batch // devices, "strategy": strategy,
                       "devices": devices, "accelerator": "cpu", "progress_bar": False, "log_every": 10**6,
                       "precision": "32-true"}.items():
        recipe = set_key(recipe, f"trainer.{key}", value)
    validate(recipe)
    return recipe


def train(recipe: dict, out: Path, warmup: int) -> None:
    rss_before = _rss_kib()
    parts = build_cell(recipe, out)
    trainer = make_trainer(parts.trainer, out, enable_checkpointing=False)
    trainer.callbacks.append(Meter(out, warmup, rss_before))
    trainer.fit(parts.module, datamodule=parts.data)


def run(args, name: str, strategy: str, devices: int, root: Path, threads: int = 1) -> list[dict]:
    out = root / name
    out.mkdir(parents=True)
    recipe = recipe_for(args, strategy, devices)
    # the single process is forked too, so that its peak RSS is its own
    errors = fork_workers(train, (recipe, out, args.warmup), world=devices, timeout=3600, threads=threads)
    if errors:
        sys.exit(f"{name} failed:\n{errors[0][1]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4, help="loop steps per batch")
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results = {
            "1 process, 1 thread": run(args, "single1", "auto", 1, root, threads=1),
            "1 process, 2 threads": run(args, "single2", "auto", 1, root, threads=2),
            "DDP x2": run(args, "ddp", "ddp", 2, root),
            "FSDP2 x2": run(args, "fsdp", "fsdp", 2, root),
        }
    print(f"looped llama: hidden {args.hidden}, 1+2+1 layers, depth {args.depth}, global batch {args.batch}, "
          f"{args.steps} steps ({args.warmup} warm-up), {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}; ranks use 1 thread each")
    print("memory per rank, MiB: peak RSS growth over the process before the model was built (whole run); the same")
    print("sampled during training steps (after malloc_trim); exact bytes of parameters + gradients + AdamW state")
    print(f"{'run':<22} {'tokens/s':>9} {'peak RSS':>9} {'RSS in steps':>13} {'model states':>13}")
    rows = {}
    figures = {"setting": {k: v for k, v in vars(args).items() if k != "json"}, "cpu_count": os.cpu_count(),
               "torch": torch.__version__}
    for name, ranks in results.items():
        seconds = max(r["step_seconds"] for r in ranks)
        tokens = sum(r["tokens"] for r in ranks)
        rss = max(r["peak_rss_growth_mib"] for r in ranks)
        step_rss = max(r["step_rss_growth_mib"] for r in ranks)
        states = max(r["param_mib"] + r["grad_mib"] + r["optimizer_mib"] for r in ranks)
        rows[name] = (tokens / seconds, rss, step_rss, states)
        figures[name] = {"tokens_per_second": round(tokens / seconds, 1), "peak_rss_growth_mib": round(rss, 1),
                         "step_rss_growth_mib": round(step_rss, 1), "model_states_mib": round(states, 1)}
        print(f"{name:<22} {tokens / seconds:>9.0f} {rss:>9.1f} {step_rss:>13.1f} {states:>13.1f}")
    best = max(rows["1 process, 1 thread"][0], rows["1 process, 2 threads"][0])
    ddp, fsdp = rows["DDP x2"], rows["FSDP2 x2"]
    figures["ratio_ddp_over_best_single"] = round(ddp[0] / best, 3)
    fsdp_over_ddp = figures["ratio_fsdp_over_ddp"] = {
        "throughput": round(fsdp[0] / ddp[0], 3), "peak_rss": round(fsdp[1] / ddp[1], 3),
        "step_rss": round(fsdp[2] / ddp[2], 3), "model_states": round(fsdp[3] / ddp[3], 3)}
    print(f"DDP x2 / best single process throughput: {ddp[0] / best:.2f}x "
          f"(/ 1 thread: {ddp[0] / rows['1 process, 1 thread'][0]:.2f}x)")
    print(f"FSDP2 / DDP per rank: peak RSS {fsdp_over_ddp['peak_rss']:.2f}, RSS in steps {fsdp_over_ddp['step_rss']:.2f}, "
          f"model states {fsdp_over_ddp['model_states']:.2f}; throughput {fsdp_over_ddp['throughput']:.2f}x")
    if args.json:
        write_json(args.json, figures)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
