"""The LightningModule around a LoopedLM: depth sampling, the objectives' losses, metrics, optimiser."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from slr_zoo.looped import LoopedLM, LoopOutput, NonFiniteStateError
from slr_zoo.metrics.depth import DepthHistogram
from slr_zoo.tasks.encoding import IGNORE
from slr_zoo.training.objectives import Objective, logit_positions
from slr_zoo.training.settings import OptimConfig


def depth_generator(seed: int, step: int) -> torch.Generator:
    """The same generator on every rank for a given global step, and again after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def question_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, S] True up to and including the first labelled position (the separator, which predicts
    the first answer token): all a per-sample halting decision may read, since at validation the
    gold answer sits in the input after it. Rows without labels are all question."""
    labelled = labels != IGNORE
    first = torch.where(labelled.any(dim=1), labelled.int().argmax(dim=1), labels.size(1) - 1)
    return torch.arange(labels.size(1), device=labels.device) <= first[:, None]


def batch_question(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's question positions: the encoding's own prompt extent when it has one (a
    chain-of-thought encoding's written steps are not question), else up to the first label."""
    return batch["query_mask"] if "query_mask" in batch else question_mask(batch["labels"])


class LoopedLMModule(L.LightningModule):
    """Trains a LoopedLM on the weighted sum of its ``objectives`` (name -> Objective)."""

    def __init__(self, model: LoopedLM, objectives: dict[str, Objective], optim: OptimConfig, seed: int = 0,
                 on_nonfinite: str = "stop", log_every: int = 25, save_trainable_only: bool = False,
                 base_fingerprint: str | None = None, answer_scorer=None, reset_optimizer_per_stage: bool = False):
        """``answer_scorer(model, records) -> ScoredAnswers``: how validation answers and scores
        (greedy generation and the task's scoring, ``inference.answers``: the path ``evaluate``
        takes too). ``save_trainable_only``: checkpoints leave out the frozen parameters (a
        fine-tuned pretrained base, read again from ``base_fingerprint``'s checkpoint) and say
        which base they belong to. ``reset_optimizer_per_stage``: a latent curriculum's batches say
        their stage, and AdamW's moments start afresh when it changes (Coconut)."""
        super().__init__()
        if not any(o.per_answer_token for o in objectives.values()):
            raise ValueError("training needs an objective on the answer tokens (e.g. 'answer')")
        self.model = model
        self.objectives = nn.ModuleDict(objectives)
        self.record = frozenset().union(*(o.record for o in objectives.values()))
        self.optim = optim
        self.seed = seed
        self.on_nonfinite = on_nonfinite
        self.log_every = log_every
        self.val_accuracy = MeanMetric()
        self.val_steps = MeanMetric()
        self.val_depth = DepthHistogram(model.max_steps)
        self.val_tokens = MeanMetric()   # tokens generated per answer
        self.val_passes = MeanMetric()   # sequential model calls per answer
        self.val_seconds = 0.0           # wall time of answering, summed over this rank's examples
        self.val_examples = 0
        self.skipped_batches = 0
        self._skip_update = False
        self.last_train: dict[str, Any] = {}
        self.hop_correct: dict[int, list[int]] = {}
        self.save_trainable_only = save_trainable_only
        self.base_fingerprint = base_fingerprint
        self.answer_scorer = answer_scorer
        self.strict_loading = not save_trainable_only
        self.reset_optimizer_per_stage = reset_optimizer_per_stage
        self.stage: int | None = None  # the curriculum stage of the last training batch

    def checkpoint_keys(self) -> set[str]:
        """The state-dict entries a checkpoint of this module holds."""
        state = self.state_dict(keep_vars=True)
        if not self.save_trainable_only:
            return set(state)
        frozen = {id(p) for p in self.parameters() if not p.requires_grad}  # tied weights too
        return {k for k, v in state.items() if id(v) not in frozen}

    def parameter_counts(self) -> tuple[int, int]:
        """(all parameters, trainable ones)."""
        params = list(self.parameters())
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    @torch.no_grad()
    def calibrate(self, data, device: torch.device | str | None = None, progress: bool = False) -> int:
        """Show a loop LoRA that asks for it (``calibration: N``) how the layers it stands for see
        real text: N training examples run through the original layers, before the first step (a
        resumed run has its weights already). ``device``: where to run them (the device training
        will use: the originals' forward over N examples is the costly part); the model goes back
        where it was afterwards. ``progress``: a bar over the replaced layers (on stderr). Returns
        the examples used (0: nothing asked)."""
        lora = self.model.loop_lora
        count = getattr(lora, "calibration", 0)
        if not count:
            return 0
        batches = data.calibration_batches(count)
        backbone = self.model.backbone
        home = next(self.model.parameters()).device
        device = torch.device(device) if device is not None else home
        input_ids = [batch["input_ids"].to(device) for batch in batches]
        prefixes = [batch_question(batch).to(device) for batch in batches] if backbone.attention == "prefix" else None

        def run_originals(watch) -> None:
            from tqdm import tqdm

            with tqdm(total=len(backbone.replaced_layers), desc="calibrating loop LoRA", unit="layer",
                      file=sys.stderr, disable=not progress) as bar:

                @contextlib.contextmanager
                def counted(index: int):
                    with watch(index):
                        yield
                    bar.update()

                backbone.run_replaced(input_ids, prefixes, watch=counted)

        self.model.to(device)
        try:
            lora.calibrate(run_originals)
        finally:
            self.model.to(home)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # give the calibration's blocks back before training allocates
        return len(batches)

    # ------------------------------------------------------------------ training
    def losses(self, batch: dict[str, torch.Tensor], out: LoopOutput, detail: bool = False):
        """(loss on the answer tokens, everything else or None, scalars to log). The first is
        what DDP weights by each rank's share of answer tokens; the halting policy's regulariser
        and probe losses are added as they are."""
        task, aux, logs = [], [], {}
        for objective in self.objectives.values():
            loss, extra = objective(batch, out, detail)
            (task if objective.per_answer_token else aux).append(objective.weight * loss)
            logs.update(extra)
        if out.aux_loss is not None:
            aux.append(out.aux_loss)
        return sum(task[1:], task[0]), (sum(aux[1:], aux[0]) if aux else None), logs

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "scheduled_stage" not in batch:
            return
        stage = int(batch["scheduled_stage"])
        if self.stage is not None and stage != self.stage and self.reset_optimizer_per_stage:
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()  # AdamW makes fresh moments at its next step
        self.stage = stage

    def training_depth(self, batch: dict[str, torch.Tensor], step: int | None = None) -> int:
        """The loop depth this training batch runs at, drawn for global step ``step`` (default:
        the trainer's)."""
        if "loop_steps" in batch:  # a depth-mode latent curriculum: the stage sets the depth
            return int(batch["loop_steps"])
        return self.model.depth_sampler.sample(depth_generator(self.seed, self.global_step if step is None else step))

    def forward_batch(self, batch: dict[str, torch.Tensor], steps: int, detail: bool = False) -> LoopOutput:
        """The model's pass over a training batch, continuous thoughts included, recording what the
        objectives read (and the stability statistics when ``detail``); ``benchmarks/train_step.py``
        times this same call."""
        return self.model(batch["input_ids"], batch.get("attention_mask"), steps=steps, query_mask=batch_question(batch),
                          real_mask=batch.get("real_mask"), slot_mask=batch.get("slot_mask"),
                          record=self.record | ({"stability"} if detail else set()),
                          logits_to_keep=logit_positions(self.objectives.values(), batch))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        steps = self.training_depth(batch)
        labels = batch["labels"]
        tokens = (labels != IGNORE).sum()
        detail = self.global_step % self.log_every == 0
        task = aux = out = None
        logs: dict[str, float] = {}
        failure, detail_text = 0, ""  # 0: finite; 1: the loss; t + 1: the state at loop iteration t
        try:
            out = self.forward_batch(batch, steps, detail)
            task, aux, logs = self.losses(batch, out, detail)
            total = task if aux is None else task + aux
            if not torch.isfinite(total):
                failure, detail_text = 1, f"non-finite loss {total.item()}"
        except FloatingPointError as err:
            failure = err.step + 1 if isinstance(err, NonFiniteStateError) else 1
            detail_text = str(err)
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
                    else detail_text or "the loss became non-finite")
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
        if "stage" in batch:
            self.log("train/stage", float(batch["stage"]))
        for name, value in logs.items():
            self.log(f"train/{name}", value)
        if detail:
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

        params = [p.to_local() if isinstance(p, DTensor) else p for p in self.parameters() if p.requires_grad]
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
        """FSDP2 under ``strategy: fsdp`` (Lightning's ModelParallelStrategy sets the device mesh);
        an objective with parameters of its own (a probe) is a unit of its own."""
        if self.device_mesh is not None:
            from slr_zoo.training.trainer import shard_fsdp2

            shard_fsdp2(self.model, self.device_mesh["data_parallel"], extra=list(self.objectives.values()))

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
    def validation_step(self, batch: dict[str, Any], batch_idx: int):
        if self.answer_scorer is None:
            raise ValueError("validation needs an answer_scorer (recipe.build_cell gives one)")
        started = time.perf_counter()
        scored = self.answer_scorer(self.model, batch["records"])
        self.val_seconds += time.perf_counter() - started
        self.val_examples += len(batch["records"])
        correct = torch.tensor(scored.correct, device=self.device)
        self.val_tokens.update(torch.tensor([float(len(row)) for row in scored.steps], device=self.device))
        self.val_passes.update(torch.tensor([float(p) for p in scored.passes], device=self.device))
        self.val_accuracy.update(correct.float())
        every_token = [s for row in scored.steps for s in row]  # the iterations of every generated token
        self.val_steps.update(torch.tensor(every_token or [0], dtype=torch.float, device=self.device))
        self.val_depth.update(torch.tensor(scored.first_token_steps, device=self.device))
        if "hops" in batch:
            for hops, ok in zip(batch["hops"].tolist(), correct.tolist()):
                tally = self.hop_correct.setdefault(int(hops), [0, 0])
                tally[0] += int(ok)
                tally[1] += 1

    def on_validation_epoch_start(self) -> None:
        self.hop_correct = {}
        self.val_seconds, self.val_examples = 0.0, 0

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
        self.log("val/tokens_per_answer", self.val_tokens.compute(), sync_dist=False)
        self.log("val/passes_per_answer", self.val_passes.compute(), sync_dist=False)
        self.log("val/seconds_per_example", self.val_seconds / max(1, self.val_examples), sync_dist=False)
        histogram = self.val_depth.compute().reshape(-1)  # torchmetrics squeezes a 1-bin histogram to 0-d
        if self.logger is not None and hasattr(self.logger, "experiment") and hasattr(self.logger.experiment, "add_histogram"):
            steps = torch.repeat_interleave(torch.arange(1, len(histogram) + 1), histogram.long().cpu())
            if len(steps):
                self.logger.experiment.add_histogram("val/depth", steps, self.global_step)
        self.val_accuracy.reset()
        self.val_steps.reset()
        self.val_depth.reset()
        self.val_tokens.reset()
        self.val_passes.reset()

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
        o = self.optim
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=tuple(o.betas),
        )
        total = max(1, self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 1)
        warmup, floor = o.warmup_steps, o.min_lr_ratio

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
        checkpoint["base_fingerprint"] = self.base_fingerprint
        checkpoint["curriculum_stage"] = self.stage
        if self.save_trainable_only:
            keep = self.checkpoint_keys()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_batches = checkpoint.get("skipped_batches", 0)
        self.stage = checkpoint.get("curriculum_stage")  # a resumed run resets only at a new stage
        self.train_seconds_before = float(checkpoint.get("train_seconds", 0.0))
