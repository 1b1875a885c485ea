"""One grid cell, end to end: build, train (resuming if a checkpoint exists), validate, summarise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from slr_zoo.files import atomic_write
from slr_zoo.recipe import build_backbone, build_curriculum, build_model, build_task
from slr_zoo.training.checkpoint import remove_stale_temporaries, resume_point
from slr_zoo.training.data import ReasoningDataModule, load_or_build_tokenizer
from slr_zoo.training.module import LoopedLMModule
from slr_zoo.training.trainer import make_trainer


def build_everything(recipe: dict, directory: Path):
    """Task, tokenizer, model and LightningModule for a recipe; the tokenizer lives in ``directory``."""
    task = build_task(recipe)
    pretrained = recipe["backbone"].get("pretrained")
    if pretrained:
        backbone = build_backbone(recipe)
        tokenizer = load_or_build_tokenizer(task, directory / "tokenizer", backbone.tokenizer)
    else:
        stages = [stage for _, stage in build_curriculum(recipe)]
        tokenizer = load_or_build_tokenizer(task, directory / "tokenizer", stages=stages)
        backbone = build_backbone(recipe, vocab_size=len(tokenizer))
    model = build_model(recipe, backbone)
    model.checkpoint_core = recipe["trainer"].get("activation_checkpointing", False)
    module = LoopedLMModule(
        model, recipe["optim"], seed=recipe["seed"],
        on_nonfinite=recipe["trainer"]["on_nonfinite"], log_every=recipe["trainer"]["log_every"],
        step_supervision=recipe["loop"]["step_supervision"],
        reach_supervision=recipe["loop"]["reach_supervision"],
    )
    return task, tokenizer, module


def build_data(recipe: dict, task, tokenizer) -> ReasoningDataModule:
    """The recipe's DataModule, with per-hop targets when ``loop.step_supervision`` asks for them
    and per-token reach steps when ``loop.reach_supervision`` does."""
    tc = recipe["trainer"]
    return ReasoningDataModule(task, tokenizer, tc["batch_size"], tc["eval_batch_size"], seed=recipe["seed"],
                               num_workers=tc["num_workers"], step_answers=recipe["loop"]["step_supervision"] > 0,
                               reach=recipe["loop"]["reach_supervision"] > 0, curriculum=build_curriculum(recipe))


def run_cell(recipe: dict, directory: Path, keys: dict[str, Any] | None = None) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "config.yaml", yaml.safe_dump(recipe, sort_keys=False))
    tc = recipe["trainer"]
    if tc["threads"]:
        torch.set_num_threads(tc["threads"])
    L.seed_everything(recipe["seed"], workers=True, verbose=False)
    task, tokenizer, module = build_everything(recipe, directory)
    data = build_data(recipe, task, tokenizer)
    trainer = make_trainer(tc, directory, grad_clip=recipe["optim"]["grad_clip"], seed=recipe["seed"])
    if trainer.is_global_zero:
        remove_stale_temporaries(directory / "checkpoints")
        remove_stale_temporaries(directory)
    resume = resume_point(directory, module)  # checked first: a bad file stops with its name
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    train_seconds = module.train_seconds()  # includes the time before any resume
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    hop_accuracy = {str(h): round(c / n, 4) for h, (c, n) in sorted(module.hop_correct.items()) if n}
    summary = {
        "name": recipe["name"],
        "cell": directory.name,
        **{k: _plain(v) for k, v in (keys or {}).items()},
        "status": "ok",
        "val_accuracy": round(float(metrics["val/accuracy"]), 4),
        "mean_steps": round(float(metrics["val/mean_steps"]), 3),
        "train_seconds": round(train_seconds, 3),  # a few tiny steps can take under 0.05 s
        "train_steps": trainer.global_step,
        "params": sum(p.numel() for p in module.model.parameters()),
        "max_steps": recipe["loop"]["max_steps"],
        "hop_accuracy": hop_accuracy,
        "skipped_batches": module.skipped_batches,
    }
    if trainer.is_global_zero:
        atomic_write(directory / "summary.json", json.dumps(summary, indent=2))
    return summary


def _plain(value: Any) -> Any:
    from slr_zoo.recipe.grid import value_label

    return value_label(value) if isinstance(value, (dict, list)) else value
