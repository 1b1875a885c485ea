"""The LightningModule around a LoopedLM: depth sampling, loss on the answer, metrics, optimiser."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from slr_zoo.looped import LoopedLM, LoopOutput, NonFiniteStateError
from slr_zoo.metrics.depth import DepthHistogram
from slr_zoo.tasks.encoding import IGNORE, answer_correct


def depth_generator(seed: int, step: int) -> torch.Generator:
    """The same generator on every rank for a given global step, and again after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def answer_loss(out: LoopOutput, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the answer tokens; the halting-weighted expected loss over steps when the
    policy mixes losses (PonderNet, Ouro) and step logits were kept."""
    mask = labels != IGNORE
    n = mask.sum().clamp_min(1)
    if not out.step_logits:
        return F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
    total = out.logits.new_zeros((), dtype=torch.float32)
    for logits, weight in zip(out.step_logits, out.step_weights):
        ce = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=IGNORE, reduction="none")
        w = weight if weight.dim() == 2 else weight[:, None]
        total = total + (w.float() * ce * mask).sum() / n
    return total


class LoopedLMModule(L.LightningModule):
    def __init__(self, model: LoopedLM, optim: dict, seed: int = 0, on_nonfinite: str = "stop", log_every: int = 25):
        super().__init__()
        self.model = model
        self.optim = optim
        self.seed = seed
        self.on_nonfinite = on_nonfinite
        self.log_every = log_every
        self.val_accuracy = MeanMetric()
        self.val_steps = MeanMetric()
        self.val_depth = DepthHistogram(model.max_steps)
        self.skipped_batches = 0
        self.hop_correct: dict[int, list[int]] = {}

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        steps = self.model.depth_sampler.sample(depth_generator(self.seed, self.global_step))
        try:
            out = self.model(batch["input_ids"], steps=steps)
            loss = answer_loss(out, batch["labels"])
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at global step {self.global_step}")
        except FloatingPointError as err:
            where = f"iteration {err.step}" if isinstance(err, NonFiniteStateError) else "the loss"
            if self.on_nonfinite == "skip":
                self.skipped_batches += 1
                self.log("train/skipped_batches", float(self.skipped_batches))
                return None
            raise FloatingPointError(
                f"{err} (global step {self.global_step}, depth {steps}); the state diverged at {where}. "
                "Set trainer.on_nonfinite=skip to skip such batches instead"
            ) from err
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/depth", float(steps))
        if self.global_step % self.log_every == 0:
            for t, (norm, delta) in enumerate(zip(out.norms, out.deltas), start=1):
                self.log(f"stability/norm_t{t}", norm)
                self.log(f"stability/delta_t{t}", delta)
            for name, value in self.model_monitors().items():
                self.log(f"stability/{name}", value)
        return loss

    def model_monitors(self) -> dict[str, float]:
        """Scalars components expose through a ``monitors()`` method (alpha, gate mean, contraction)."""
        values = {}
        for name, module in self.model.named_children():
            if hasattr(module, "monitors"):
                values.update({f"{name}/{k}": float(v) for k, v in module.monitors().items()})
        return values

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        out = self.model(batch["input_ids"])
        correct = answer_correct(out.logits, batch["labels"])
        self.val_accuracy.update(correct.float())
        self.val_steps.update(out.steps.float())
        self.val_depth.update(out.steps)
        if "hops" in batch:
            for hops, ok in zip(batch["hops"].tolist(), correct.tolist()):
                tally = self.hop_correct.setdefault(int(hops), [0, 0])
                tally[0] += int(ok)
                tally[1] += 1

    def on_validation_epoch_start(self) -> None:
        self.hop_correct = {}

    def on_validation_epoch_end(self) -> None:
        self.log("val/accuracy", self.val_accuracy.compute(), prog_bar=True, sync_dist=False)
        self.log("val/mean_steps", self.val_steps.compute(), sync_dist=False)
        histogram = self.val_depth.compute()
        if self.logger is not None and hasattr(self.logger, "experiment") and hasattr(self.logger.experiment, "add_histogram"):
            steps = torch.repeat_interleave(torch.arange(1, len(histogram) + 1), histogram.long().cpu())
            if len(steps):
                self.logger.experiment.add_histogram("val/depth", steps, self.global_step)
        self.val_accuracy.reset()
        self.val_steps.reset()
        self.val_depth.reset()

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
        o = self.optim
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o["lr"],
            betas=tuple(o["betas"]),
        )
        total = max(1, self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 1)
        warmup, floor = o["warmup_steps"], o["min_lr_ratio"]

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["skipped_batches"] = self.skipped_batches

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_batches = checkpoint.get("skipped_batches", 0)
