"""Lightning Trainer from the recipe's ``trainer`` group: strategy, precision, logging, checkpoints.

Strategies: ``auto``/``single`` (one device), ``ddp`` (one process per device, launched by Lightning,
torchrun or SLURM; gloo on CPU, NCCL on GPUs), ``ddp_spawn``/``ddp_fork`` (same, started from inside
Python), and ``fsdp``: FSDP2 ``fully_shard`` per transformer block through Lightning's
``ModelParallelStrategy`` (gloo on CPU, NCCL on GPUs). See docs/distributed.md.
"""

from __future__ import annotations

import csv
import logging
import multiprocessing
import os
import socket
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch import nn

from slr_zoo.training.checkpoint import atomic_torch_save
from slr_zoo.training.settings import TrainerConfig


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoints through :func:`~slr_zoo.training.checkpoint.atomic_torch_save`.

    Lightning's own ``_atomic_save`` writes through an fsspec transaction whose temporary file lives
    in the system temp directory; committing it is ``shutil.move``, which degrades to copy-then-delete
    when the run directory is on another filesystem (a cluster's scratch or network disk), so a kill
    during the copy leaves a truncated ``last.ckpt``, and nothing is fsync'ed."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's own transaction is the best available
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_torch_save(checkpoint, Path(path))


def quiet_lightning() -> None:
    """Keep the console for the progress bar and our own summary lines."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*LeafSpec.*", ".*is deprecated.*",
                    ".*Checkpoint directory.*exists and is not empty.*", ".*on_validation_epoch_end.*",
                    ".*smaller than the logging interval.*", ".*sync_dist=True.*",
                    # the train sampler resumes mid-epoch itself (data.ResumableBatchSampler)
                    ".*dataloader is not resumable.*",
                    # a batch skipped by on_nonfinite=skip skips optimizer.step but not the schedule
                    ".*lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`.*"):
        warnings.filterwarnings("ignore", message=pattern)


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------
class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with every process in one data-parallel (FSDP2) dimension.

    The parent's ``"auto"`` sizes give one data-parallel group per node and tensor parallelism
    inside it; this zoo shards only (``LoopedLMModule.configure_model``), so the data-parallel
    size is the world size and the tensor-parallel size 1.
    """

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


class _ReportingLauncher(_MultiProcessingLauncher):
    """``ddp_spawn``/``ddp_fork`` train in child processes and send back only the weights and the
    logged metrics; this also sends what ``run_cell`` reports (steps trained, skipped batches,
    per-hop tallies), so the summary of a spawned run is the summary of a launched one."""

    def get_extra_results(self, trainer) -> dict:
        extra = super().get_extra_results(trainer)
        module = trainer.lightning_module
        extra["slr_zoo"] = {"global_step": trainer.global_step,
                            **{k: getattr(module, k) for k in ("skipped_batches", "hop_correct") if hasattr(module, k)}}
        return extra

    def update_main_process_results(self, trainer, extra: dict) -> None:
        super().update_main_process_results(trainer, extra)
        state = dict(extra.get("slr_zoo", {}))
        if trainer.state.fn == "fit":
            trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total.completed = \
                state.pop("global_step", trainer.global_step)
        state.pop("global_step", None)
        for key, value in state.items():
            setattr(trainer.lightning_module, key, value)


class _DDPStrategy(DDPStrategy):
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _MultiProcessingLauncher):
            self._launcher = _ReportingLauncher(self, start_method=self._start_method)


def make_strategy(name: str, accelerator: str):
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    backend = "nccl" if on_gpu else "gloo"
    if name in ("ddp", "ddp_spawn", "ddp_fork"):
        start = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork"}[name]
        # gradients live in DDP's all-reduce buckets instead of beside them: one copy fewer
        return _DDPStrategy(process_group_backend=backend, start_method=start, gradient_as_bucket_view=True)
    if name == "fsdp":
        return FSDP2Strategy(process_group_backend=backend, save_distributed_checkpoint=False)
    if name == "single":
        return "auto"
    return name


def shard_fsdp2(model: nn.Module, mesh, extra: list[nn.Module] = ()) -> None:
    """FSDP2 units: each prelude and coda layer; the looped core as ONE unit that stays gathered
    from its first forward call to the end of backward (it runs T times each way, so resharding
    after every call would all-gather it 2T times); the root (embeddings, head, step embedding,
    injection, loop LoRA, combine, halting, decoder) last. ``extra``: modules outside the model
    that hold parameters (an objective's probe), each a unit of its own. Called again by a later
    ``trainer.validate``: a model already sharded is left alone."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return
    backbone = model.backbone
    for layer in [*backbone.prelude.layers, *backbone.coda.layers]:
        fully_shard(layer, mesh=mesh)
    fully_shard(backbone.core, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)
    for module in extra:
        if any(True for _ in module.parameters()):
            fully_shard(module, mesh=mesh)


def gather_fsdp2(model: nn.Module, gathered: bool) -> None:
    """Hold every FSDP2 unit gathered during evaluation (``gathered=True``), then shard again.

    At inference ranks run different numbers of loop steps (halted samples leave the batch) and
    different numbers of batches (unpadded validation shards); with the parameters gathered up
    front the forward passes need no collective, so they cannot fall out of step.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        return
    core = model.backbone.core
    for unit in units:
        unit.set_reshard_after_forward(not gathered and unit is not core and unit is not model, recurse=False)
        if gathered:
            unit.unshard()
        else:
            unit.reshard()


# ---------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------
class StepSeed(Callback):
    """Seeds torch's global RNG from (seed, global step, rank) before every training step.

    Dropout and any random initial state then depend only on where the run is, so a resumed run
    draws what the uninterrupted run drew, without storing every rank's RNG state.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.manual_seed((self.seed * 1_000_003 + trainer.global_step * 8_191 + trainer.global_rank) % 2**63)


class _StepCsv(Callback):
    """A per-step CSV of rank 0. On resume the rows the killed run wrote after the checkpoint it
    resumes from are dropped, so the file of a resumed run is the file of the uninterrupted one."""

    columns: tuple[str, ...] = ()
    # a training row's step is the step it trained (the checkpoint at global step N holds steps
    # 0..N-1); a validation row's is the global step it validated, and the validation at N ran
    # on the checkpoint's own weights, which the resumed run does not validate again
    keeps_resume_step = False

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        rows = []
        if self.path.is_file():
            with self.path.open() as f:
                last = trainer.global_step + self.keeps_resume_step
                rows = [r for r in csv.DictReader(f) if int(r["step"]) < last]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)


class TrainCurve(_StepCsv):
    """``train_curve.csv``: the global loss, depth and skip flag of every training step."""

    columns = ("step", "loss", "depth", "skipped")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = getattr(pl_module, "last_train", None)
        if trainer.is_global_zero and record:
            self.append({k: record[k] for k in self.columns})


class ValCurve(_StepCsv):
    """``val_curve.csv``: validation accuracy and mean iterations at every validation during
    training, for the report's accuracy-against-training-step plot."""

    columns = ("step", "accuracy", "mean_steps")
    keeps_resume_step = True

    def on_validation_end(self, trainer, pl_module) -> None:  # after the module has logged its metrics
        metrics = trainer.callback_metrics
        if not trainer.is_global_zero or trainer.sanity_checking or "val/accuracy" not in metrics or \
                not self.path.is_file() or trainer.state.fn != "fit":
            return
        self.append({"step": trainer.global_step, "accuracy": round(float(metrics["val/accuracy"]), 4),
                     "mean_steps": round(float(metrics.get("val/mean_steps", float("nan"))), 3)})


class StepProgressBar(TQDMProgressBar):
    """One bar over the whole run, 0..trainer.max_steps, counted in training steps: a resumed run's
    bar starts where it resumed instead of at the start of a (partial) epoch. Lightning resets its
    bar at every epoch, which would restart the elapsed time and the rate (and so the ETA) of a
    bar that spans epochs; this one is set up once, at the first epoch this process trains."""

    _bar_trainer = None  # the trainer whose run the bar was set up for

    def on_train_epoch_start(self, trainer, *_) -> None:
        if self.train_progress_bar is not None and self._bar_trainer is trainer:
            return
        self._bar_trainer = trainer
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        bar.total = trainer.max_steps
        # the rate counts from where this process started, not from step 0 of a resumed run
        bar.n = bar.last_print_n = bar.initial = trainer.global_step
        bar.set_description("train")
        bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = trainer.global_step
        if self.train_progress_bar is not None and self._should_update(n, trainer.max_steps):
            self.train_progress_bar.n = n
            self.train_progress_bar.refresh()
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


class ProgressLines(Callback):
    """The progress of a run whose console is not a terminal (a log file, nohup, SLURM, a grid's
    child process): a plain line every ``interval`` seconds, and one per validation, each flushed
    at once. A tqdm bar there is redrawn with carriage returns into one ever-growing line and sits
    in the stream's buffer, so a long run's log showed nothing until its end."""

    def __init__(self, interval: float = 60.0, first: float = 15.0, stream=None):
        self.interval, self.first, self.stream = interval, first, stream
        self._start = self._last = None  # wall clock at this process's first step, at the last line
        self._start_step = 0
        self._loss, self._losses, self._skipped = 0.0, 0, 0  # since the last line

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._start, self._start_step = time.monotonic(), trainer.global_step
        self._last = self._start - max(0.0, self.interval - self.first)  # the first line comes sooner

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = getattr(pl_module, "last_train", None) or {}  # the run's loss over every rank
        if record.get("skipped"):
            self._skipped += 1
        elif "loss" in record:
            self._loss, self._losses = self._loss + record["loss"], self._losses + 1
        now, step, total = time.monotonic(), trainer.global_step, trainer.max_steps
        if not trainer.is_global_zero or (now - self._last < self.interval and step < total):
            return
        self._last = now
        rate = (now - self._start) / max(1, step - self._start_step)  # seconds per step, this process
        parts = [f"train step {step}/{total} ({100 * step / total:.0f}%)", f"{rate:.2f} s/step",
                 f"{_clock(rate * (total - step))} left"]
        if self._losses:
            parts.append(f"loss {self._loss / self._losses:.4g} (mean of {self._losses} "
                         f"step{'s' if self._losses > 1 else ''})")
        if self._skipped:
            parts.append(f"{self._skipped} skipped (non-finite)")
        self._loss, self._losses, self._skipped = 0.0, 0, 0
        self._print("    " + ", ".join(parts))

    def on_validation_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if trainer.is_global_zero and not trainer.sanity_checking and metrics and trainer.state.fn == "fit":
            self._print(f"    validation at step {trainer.global_step}: "
                        + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))


def _clock(seconds: float) -> str:
    """``1:08:12`` (hours:minutes:seconds), or ``4:05`` under an hour."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _console_is_terminal() -> bool:
    return sys.stdout.isatty()


def draws_bars(cfg: TrainerConfig) -> bool:
    """Whether progress is drawn as tqdm bars (a terminal) rather than written as lines."""
    return cfg.progress_bar and _console_is_terminal()


def read_curve(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [{"step": int(r["step"]), "loss": float(r["loss"]), "depth": int(r["depth"]),
                 "skipped": r["skipped"] == "True"} for r in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------
# The Trainer
# ---------------------------------------------------------------------------------------------
def make_trainer(cfg: TrainerConfig, directory: Path, grad_clip: float | None = None,
                 enable_checkpointing: bool = True, seed: int = 0) -> L.Trainer:
    quiet_lightning()
    directory = Path(directory)
    callbacks: list[Callback] = [StepSeed(seed), TrainCurve(directory / "train_curve.csv"),
                                 ValCurve(directory / "val_curve.csv")]
    if enable_checkpointing:
        every = cfg.checkpoint_every or cfg.val_every or max(1, cfg.max_steps // 4)
        callbacks.append(ModelCheckpoint(dirpath=directory / "checkpoints", save_last=True, save_top_k=0,
                                         every_n_train_steps=every))
    bar = draws_bars(cfg)
    if bar:
        callbacks.append(StepProgressBar(refresh_rate=max(1, cfg.log_every // 5)))
    elif cfg.progress_bar:
        callbacks.append(ProgressLines())
    accelerator = cfg.accelerator
    if accelerator == "auto" and not torch.cuda.is_available():
        accelerator = "cpu"
    return L.Trainer(
        max_steps=cfg.max_steps,
        accelerator=accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=make_strategy(cfg.strategy, accelerator),
        precision=cfg.precision,
        plugins=[AtomicCheckpointIO()],
        # data.ResumableBatchSampler shards the batches itself (the same global batches for any
        # number of processes); Lightning's DistributedSampler would reorder them
        use_distributed_sampler=False,
        logger=TensorBoardLogger(str(directory), name="tensorboard", version=""),
        default_root_dir=str(directory),  # where SLURM preemption checkpoints (hpc_ckpt_N.ckpt) go
        callbacks=callbacks,
        enable_checkpointing=enable_checkpointing,
        enable_progress_bar=bar,
        enable_model_summary=False,
        log_every_n_steps=cfg.log_every,
        val_check_interval=cfg.val_every or None,
        check_val_every_n_epoch=None if cfg.val_every else 10**6,
        num_sanity_val_steps=0,
        gradient_clip_val=grad_clip,
        max_epochs=-1,
    )


# ---------------------------------------------------------------------------------------------
# Local multi-process runs (tests, benchmarks)
# ---------------------------------------------------------------------------------------------
def _torchrun_worker(rank: int, world: int, port: int, target, args: tuple, errors, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", ROLE_RANK=str(rank),
                      NODE_RANK="0", TORCHELASTIC_RUN_ID="local")
    torch.set_num_threads(threads)
    try:
        target(*args)
    except BaseException:  # noqa: BLE001  (sent to the parent, then re-raised for the exit code)
        errors.put((rank, traceback.format_exc()))
        raise


def fork_workers(target, args: tuple, world: int = 2, timeout: float = 300, threads: int = 1) -> list[tuple[int, str]]:
    """Run ``target(*args)`` in ``world`` forked processes that carry torchrun's environment
    (RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK, ...), so Lightning's TorchElasticEnvironment treats
    them as externally launched workers, as on a cluster. Forking skips a fresh interpreter's
    imports, which makes multi-process tests and benchmarks on one machine cheap. Returns the
    ``(rank, traceback)`` of every rank that raised; raises if a rank hangs past ``timeout``.
    """
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_torchrun_worker, args=(r, world, port, target, args, errors, threads))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    if hung:
        raise TimeoutError(f"{len(hung)} of {world} rank(s) still running after {timeout} s (a collective out of step?)")
    found = []
    while not errors.empty():
        found.append(errors.get())
    if not found and any(p.exitcode != 0 for p in procs):
        found = [(r, f"exit code {p.exitcode}") for r, p in enumerate(procs) if p.exitcode != 0]
    return sorted(found)
