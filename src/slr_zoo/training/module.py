"""The LightningModule around a LoopedLM: depth sampling, loss on the answer, metrics, optimiser."""

from __future__ import annotations

import math
import time
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
    if not out.step_weights:
        return F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
    total = out.logits.new_zeros((), dtype=torch.float32)
    for logits, weight in zip(out.step_logits, out.step_weights):
        ce = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=IGNORE, reduction="none")
        w = weight if weight.dim() == 2 else weight[:, None]
        total = total + (w.float() * ce * mask).sum() / n
    return total


def step_loss(out: LoopOutput, step_labels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-iteration supervision: iteration t's decoded state is trained toward the answer after
    min(t, hops) hops (``step_labels`` [B, H, S], see ``tasks.encoding.step_labels``), and the last
    iteration toward the final answer (``labels``) even when it comes before the last hop, so a loop
    shorter than the chain (``loop.max_steps=1``) is still trained to answer. The mean over
    iterations; iterations run without a graph (``loop.backprop_steps``) are left out."""
    last = len(out.step_logits)
    terms = [
        F.cross_entropy(logits.flatten(0, 1).float(),
                        (labels if t == last else step_labels[:, min(t, step_labels.size(1)) - 1]).flatten(),
                        ignore_index=IGNORE)
        for t, logits in enumerate(out.step_logits, start=1) if logits.requires_grad
    ]
    return torch.stack(terms).mean()


def reach_loss(out: LoopOutput, reach: torch.Tensor) -> torch.Tensor:
    """Per-token supervision of the search itself: iteration t's probe says, for every labelled
    question token, whether its word has been reached within t hops (``reach`` [B, S], the hop
    that reaches it, IGNORE where unlabelled). Binary cross-entropy, mean over labelled tokens,
    then over iterations. Dense where the answer gives one bit per question: every mention of a
    concept tells the loop how far its search should have got."""
    labelled = reach != IGNORE
    terms = [
        F.binary_cross_entropy_with_logits(logits[labelled].float(), (reach[labelled] <= t).float())
        for t, logits in enumerate(out.step_reach, start=1)
    ]
    return torch.stack(terms).mean()


@torch.no_grad()
def reach_accuracy(out: LoopOutput, reach: torch.Tensor) -> list[float]:
    """Per iteration, the share of labelled tokens whose reached / not-yet-reached the probe gets
    right: shows how many hops the loop has learnt to take, iteration by iteration."""
    labelled = reach != IGNORE
    return [float(((logits[labelled] > 0) == (reach[labelled] <= t)).float().mean())
            for t, logits in enumerate(out.step_reach, start=1)]


def question_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, S] True up to and including the first labelled position (the separator, which predicts
    the first answer token): all a per-sample halting decision may read, since at validation the
    gold answer sits in the input after it. Rows without labels are all question."""
    labelled = labels != IGNORE
    first = torch.where(labelled.any(dim=1), labelled.int().argmax(dim=1), labels.size(1) - 1)
    return torch.arange(labels.size(1), device=labels.device) <= first[:, None]


class LoopedLMModule(L.LightningModule):
    def __init__(self, model: LoopedLM, optim: dict, seed: int = 0, on_nonfinite: str = "stop", log_every: int = 25,
                 step_supervision: float = 0.0, reach_supervision: float = 0.0):
        super().__init__()
        self.model = model
        self.optim = optim
        self.seed = seed
        self.on_nonfinite = on_nonfinite
        self.log_every = log_every
        self.step_supervision = step_supervision
        self.reach_supervision = reach_supervision
        self.val_accuracy = MeanMetric()
        self.val_steps = MeanMetric()
        self.val_depth = DepthHistogram(model.max_steps)
        self.skipped_batches = 0
        self._skip_update = False
        self.last_train: dict[str, Any] = {}
        self.hop_correct: dict[int, list[int]] = {}

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        steps = self.model.depth_sampler.sample(depth_generator(self.seed, self.global_step))
        labels = batch["labels"]
        tokens = (labels != IGNORE).sum()
        task = aux = None
        failure, detail = 0, ""  # 0: finite; 1: the loss; t + 1: the state at loop iteration t
        try:
            supervise = self.step_supervision > 0
            out = self.model(batch["input_ids"], steps=steps, query_mask=question_mask(batch["labels"]),
                             real_mask=batch.get("real_mask"), decode_steps=supervise,
                             probe_steps=self.reach_supervision > 0)
            task = answer_loss(out, labels)
            if supervise:  # the same answer tokens: the DDP token weighting below still holds
                w = self.step_supervision
                task = (1 - w) * task + w * step_loss(out, batch["step_labels"], labels)
            aux = out.aux_loss
            if self.reach_supervision > 0:  # like the halting regulariser: not weighted by answer tokens
                reach = reach_loss(out, batch["reach"])
                self.log("train/reach_loss", reach.detach())
                if self.global_step % self.log_every == 0:
                    for t, hit in enumerate(reach_accuracy(out, batch["reach"]), start=1):
                        self.log(f"train/reach_accuracy_t{t}", hit)
                reach = self.reach_supervision * reach
                aux = reach if aux is None else aux + reach
            total = task if aux is None else task + aux
            if not torch.isfinite(total):
                failure, detail = 1, f"non-finite loss {total.item()}"
        except FloatingPointError as err:
            failure = err.step + 1 if isinstance(err, NonFiniteStateError) else 1
            detail = str(err)
        everyone = self._share_step(steps, tokens, failure, task, aux)
        failure = int(everyone[:, 2].max())
        if failure:
            if self.on_nonfinite == "skip":
                self.skipped_batches += 1
                self._skip_update = True
                self.log("train/skipped_batches", float(self.skipped_batches))
                self.last_train = {"step": self.global_step, "loss": float("nan"), "depth": steps, "skipped": True}
                return self._null_loss()
            ranks = "" if len(everyone) == 1 else f" (on {int((everyone[:, 2] > 0).sum())} of {len(everyone)} ranks)"
            what = (f"the hidden state became non-finite at loop iteration {failure - 1}" if failure > 1
                    else detail or "the loss became non-finite")
            raise FloatingPointError(
                f"training diverged at global step {self.global_step} (depth {steps}): {what}{ranks}. "
                "Set trainer.on_nonfinite=skip to skip such batches instead"
            )
        # every rank's share of the global answer-token count: DDP's gradient average then equals
        # the gradient of one big batch's mean token loss (exact for any split of the batch)
        n_global = everyone[:, 1].sum()
        loss = task * (tokens * len(everyone) / n_global)
        if aux is not None:
            loss = loss + aux
        global_loss = (everyone[:, 3].sum() / n_global + everyone[:, 4].mean()).item()
        self.last_train = {"step": self.global_step, "loss": global_loss, "depth": steps, "skipped": False}
        self.log("train/loss", global_loss, prog_bar=True)
        self.log("train/depth", float(steps))
        if self.global_step % self.log_every == 0:
            for t, (norm, delta) in enumerate(zip(out.norms, out.deltas), start=1):
                self.log(f"stability/norm_t{t}", norm)
                self.log(f"stability/delta_t{t}", delta)
            for name, value in self.model_monitors().items():
                self.log(f"stability/{name}", value)
        return loss

    def _share_step(self, steps: int, tokens: torch.Tensor, failure: int, task, aux) -> torch.Tensor:
        """One all-gather per step, [world, 5]: each rank's depth, answer tokens, failure code, token
        loss sum and auxiliary loss. Ranks then agree to stop or skip together (a rank that raised
        alone would leave the others waiting in the gradient all-reduce), normalise by the global
        token count, and log the global loss. Depth must match on every rank; it is checked here."""
        zero = torch.zeros((), device=self.device)
        ok = not failure and task is not None
        local = torch.stack([
            zero + steps,
            tokens.to(zero.device).float(),
            zero + failure,
            task.detach().float() * tokens if ok else zero,
            aux.detach().float().reshape(()) if ok and aux is not None else zero,
        ])
        everyone = self.all_gather(local).reshape(-1, 5)
        if not bool((everyone[:, 0] == everyone[0, 0]).all()):
            raise RuntimeError(f"ranks drew different loop depths at global step {self.global_step}: "
                               f"{everyone[:, 0].long().tolist()}; the depth sampler must use only its generator")
        return everyone

    def _null_loss(self) -> torch.Tensor:
        """Zero with a (zero) gradient for every trainable parameter: DDP's reducer still sees every
        parameter, so all ranks run the same all-reduce; the update itself is skipped in optimizer_step."""
        from torch.distributed.tensor import DTensor

        params = [p.to_local() if isinstance(p, DTensor) else p for p in self.model.parameters() if p.requires_grad]
        return torch.stack([p.sum() * 0.0 for p in params]).sum() if params else torch.zeros((), requires_grad=True)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """With ``on_nonfinite: skip``, run training_step and backward first and leave the weights,
        Adam moments and weight decay untouched when the batch was skipped (on every rank at once)."""
        if self.on_nonfinite != "skip":
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._skip_update = False
        loss = optimizer_closure()
        if self._skip_update:
            optimizer.zero_grad(set_to_none=True)
            return None
        return optimizer.step(closure=lambda: loss)

    def configure_model(self) -> None:
        """FSDP2 under ``strategy: fsdp`` (Lightning's ModelParallelStrategy sets the device mesh)."""
        if self.device_mesh is not None:
            from slr_zoo.training.trainer import shard_fsdp2

            shard_fsdp2(self.model, self.device_mesh["data_parallel"])

    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
        from slr_zoo.training.trainer import gather_fsdp2

        gather_fsdp2(self.model, True)

    def on_validation_model_train(self) -> None:
        from slr_zoo.training.trainer import gather_fsdp2

        gather_fsdp2(self.model, False)
        super().on_validation_model_train()

    def model_monitors(self) -> dict[str, float]:
        """Scalars components expose through a ``monitors()`` method (alpha, gate mean, contraction)."""
        values = {}
        for name, module in self.model.named_children():
            if hasattr(module, "monitors"):
                values.update({f"{name}/{k}": float(v) for k, v in module.monitors().items()})
        return values

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        out = self.model(batch["input_ids"], query_mask=question_mask(batch["labels"]), real_mask=batch.get("real_mask"))
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
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            # each rank validated its own shard of the examples (see data.shard_batches)
            shards: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(shards, self.hop_correct)
            self.hop_correct = {}
            for shard in shards:
                for hops, (correct, seen) in shard.items():
                    tally = self.hop_correct.setdefault(hops, [0, 0])
                    tally[0] += correct
                    tally[1] += seen
        self.log("val/accuracy", self.val_accuracy.compute(), prog_bar=True, sync_dist=False)
        self.log("val/mean_steps", self.val_steps.compute(), sync_dist=False)
        histogram = self.val_depth.compute().reshape(-1)  # torchmetrics squeezes a 1-bin histogram to 0-d
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

    # wall time spent in fit, summed over resumes: a killed and resumed cell reports its whole cost
    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter()

    def train_seconds(self) -> float:
        started = getattr(self, "_fit_started", None)
        return getattr(self, "train_seconds_before", 0.0) + (time.perf_counter() - started if started else 0.0)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["skipped_batches"] = self.skipped_batches
        checkpoint["train_seconds"] = self.train_seconds()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_batches = checkpoint.get("skipped_batches", 0)
        self.train_seconds_before = float(checkpoint.get("train_seconds", 0.0))
