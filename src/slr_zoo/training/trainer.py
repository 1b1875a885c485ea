"""Lightning Trainer from the recipe's ``trainer`` group: strategy, precision, logging, checkpoints."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger


def quiet_lightning() -> None:
    """Keep the console for the progress bar and our own summary lines."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*LeafSpec.*", ".*is deprecated.*",
                    ".*Checkpoint directory.*exists and is not empty.*", ".*on_validation_epoch_end.*",
                    ".*smaller than the logging interval.*", ".*sync_dist=True.*"):
        warnings.filterwarnings("ignore", message=pattern)


def make_strategy(name: str, accelerator: str):
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if name in ("ddp", "ddp_spawn"):
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(
            process_group_backend="nccl" if on_gpu else "gloo",
            start_method="spawn" if name == "ddp_spawn" else "popen",
        )
    if name == "single":
        return "auto"
    if name == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(
            data_parallel_size="auto", tensor_parallel_size=1,
            process_group_backend="nccl" if on_gpu else "gloo",
            save_distributed_checkpoint=False,
        )
    return name


def make_trainer(cfg: dict, directory: Path, grad_clip: float | None = None,
                 enable_checkpointing: bool = True) -> L.Trainer:
    quiet_lightning()
    callbacks = []
    if enable_checkpointing:
        callbacks.append(ModelCheckpoint(dirpath=directory / "checkpoints", save_last=True, save_top_k=0,
                                         every_n_train_steps=cfg["val_every"] or max(1, cfg["max_steps"] // 4)))
    if cfg["progress_bar"]:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, cfg["log_every"] // 5)))
    accelerator = cfg["accelerator"]
    if accelerator == "auto" and not torch.cuda.is_available():
        accelerator = "cpu"
    return L.Trainer(
        max_steps=cfg["max_steps"],
        accelerator=accelerator,
        devices=cfg["devices"],
        num_nodes=cfg["num_nodes"],
        strategy=make_strategy(cfg["strategy"], accelerator),
        precision=cfg["precision"],
        logger=TensorBoardLogger(str(directory), name="tensorboard", version=""),
        callbacks=callbacks,
        enable_checkpointing=enable_checkpointing,
        enable_progress_bar=cfg["progress_bar"],
        enable_model_summary=False,
        log_every_n_steps=cfg["log_every"],
        val_check_interval=cfg["val_every"] or None,
        check_val_every_n_epoch=None if cfg["val_every"] else 10**6,
        num_sanity_val_steps=0,
        gradient_clip_val=grad_clip,
        max_epochs=-1,
    )
