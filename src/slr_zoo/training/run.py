"""One grid cell, end to end: train (resuming if a checkpoint exists), validate, summarise.

It receives built objects (``recipe.build_cell`` makes them from a recipe) and never reads a
recipe itself; the resolved recipe is only saved, as the cell's ``config.yaml``.
"""

from __future__ import annotations

import os

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from slr_zoo.files import atomic_write, write_json
from slr_zoo.tasks.base import Task
from slr_zoo.training.checkpoint import remove_stale_temporaries, resume_point, sha256_of
from slr_zoo.training.data import ReasoningDataModule
from slr_zoo.training.module import LoopedLMModule
from slr_zoo.training.settings import TrainerConfig
from slr_zoo.training.trainer import draws_bars, make_trainer


@dataclass
class CellParts:
    """Everything one cell trains with."""

    name: str
    seed: int
    task: Task
    tokenizer: Any
    module: LoopedLMModule
    data: ReasoningDataModule
    trainer: TrainerConfig
    grad_clip: float | None = None
    config: dict = field(default_factory=dict)  # the resolved recipe, written as config.yaml


def calibration_device(trainer) -> torch.device:
    """Where loop-LoRA calibration runs, before ``fit``: the training device when one process
    trains on one device. Otherwise the CPU: a fork or spawn launcher must not find CUDA started
    in its parent, and under FSDP every GPU would hold the whole unsharded model."""
    return trainer.strategy.root_device if trainer.world_size == 1 else torch.device("cpu")


def run_cell(parts: CellParts, directory: Path, keys: dict[str, Any] | None = None) -> dict:
    """``keys``: the cell's grid keys and their (plain, printable) values, stored in the summary."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "config.yaml", yaml.safe_dump(parts.config, sort_keys=False))
    if parts.trainer.threads:
        torch.set_num_threads(parts.trainer.threads)
    module, data = parts.module, parts.data
    params, trainable = module.parameter_counts()
    trainer = make_trainer(parts.trainer, directory, grad_clip=parts.grad_clip, seed=parts.seed)
    if trainer.is_global_zero:
        print(f"    parameters: {params:,}, trainable: {trainable:,}", flush=True)
        remove_stale_temporaries(directory / "checkpoints")
        remove_stale_temporaries(directory)
    resume = resume_point(directory, module)  # checked first: a bad file stops with its name
    if resume is not None and trainer.is_global_zero:
        step = torch.load(resume, map_location="cpu", weights_only=False, mmap=True).get("global_step", 0)
        print(f"    resumed from step {step} of {parts.trainer.max_steps} ({resume.name})", flush=True)
    if resume is None:
        calibrated = module.calibrate(data, device=calibration_device(trainer),
                                      progress=draws_bars(parts.trainer) and trainer.is_global_zero)
        if calibrated and trainer.is_global_zero:
            print(f"    loop LoRA calibrated on the inputs of the replaced layers over {calibrated} training examples",
                  flush=True)
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    last = directory / "checkpoints" / "last.ckpt"
    if _saved_step(last) != trainer.global_step:  # the final weights, not those of the last multiple of checkpoint_every
        trainer.save_checkpoint(last)
    train_seconds = module.train_seconds()  # includes the time before any resume
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    hop_accuracy = {str(h): round(c / n, 4) for h, (c, n) in sorted(module.hop_correct.items()) if n}
    summary = {
        "name": parts.name,
        "cell": directory.name,
        **(keys or {}),
        "status": "ok",
        "val_accuracy": round(float(metrics["val/accuracy"]), 4),
        "mean_steps": round(float(metrics["val/mean_steps"]), 3),
        "train_seconds": round(train_seconds, 3),  # a few tiny steps can take under 0.05 s
        "train_steps": trainer.global_step,
        "params": params,
        "trainable_params": trainable,
        "max_steps": module.model.max_steps,
        "hop_accuracy": hop_accuracy,
        "skipped_batches": module.skipped_batches,
        # where the recipe's relative paths (val_file, pretrained) were read from
        "working_directory": os.getcwd(),
        # what an answer costs (RQ4): written tokens, model calls one after another, thoughts, time
        "tokens_per_answer": round(float(metrics["val/tokens_per_answer"]), 3),
        "passes_per_answer": round(float(metrics["val/passes_per_answer"]), 3),
        "thoughts_per_answer": getattr(module.answer_scorer, "thoughts", 0),
        "seconds_per_example": round(float(metrics["val/seconds_per_example"]), 5),
        "flops_per_answer": answer_flops(module, data),
    }
    if trainer.global_step and module.skipped_batches >= trainer.global_step:
        summary["status"] = "failed"
        summary["error"] = (f"every one of the {trainer.global_step} training steps was skipped for non-finite values "
                            "(trainer.on_nonfinite=skip): nothing was learnt; lower optim.lr or find the divergence "
                            "with trainer.on_nonfinite=stop")
    if last.is_file():  # what a later run checks before it trusts this finished one
        summary["checkpoint_sha256"] = sha256_of(last)
    if trainer.is_global_zero:
        write_json(directory / "summary.json", summary)
    return summary



def answer_flops(module: LoopedLMModule, data: ReasoningDataModule, count: int = 16) -> float | None:
    """FLOPs per answer, counted over the first ``count`` validation records."""
    from slr_zoo.inference.answers import flops_per_answer

    records = data.val_records[:count]
    if not records or module.answer_scorer is None:
        return None
    was_training = module.model.training
    module.model.eval()
    try:
        return round(flops_per_answer(module.answer_scorer, module.model, records))
    finally:
        module.model.train(was_training)


def _saved_step(path: Path) -> int | None:
    if not path.is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("global_step", -1))
