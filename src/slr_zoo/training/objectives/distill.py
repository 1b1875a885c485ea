"""Distillation from a chain-of-thought teacher (``training.distill``).

The teacher is a trained CoT cell (``runs/<name>/<cell>``), frozen. It reads each record's CoT
encoding, and its hidden state at the last token of reasoning step s is the target for the
student's latent computation that stands for that step: with c = ``thoughts_per_step`` latent
computations per step, the last of step s's c, that is the loop state h_{s·c} at the end of the
question (depth mode) or continuous thought s·c (thoughts mode). A thoughts student compares
thoughts only: a batch without slots (curriculum stage 0) has nothing to distil. ``layer``: the teacher's final loop state (``state``) or
its decoder features before the head (``features``); a thoughts student is always compared
through its thoughts, which are decoder features. ``loss``: mean squared error or 1 - cosine, over
the steps both have (the first min(T, steps) of them). CODI distils the same way, from itself.

The teacher is not a submodule: it is neither trained nor saved in the student's checkpoints; a
student is loaded again with the teacher's run directory at hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slr_zoo.looped import thought_features
from slr_zoo.registry import ArgumentError
from slr_zoo.training.objectives.base import OBJECTIVES, Objective

LOSSES = ("mse", "cosine")
LAYERS = ("state", "features")


@OBJECTIVES.register("distill")
class Distillation(Objective):
    path_args = ("teacher",)
    record = frozenset({"states"})
    data = frozenset({"teacher"})
    logits_at = ()

    def __init__(self, teacher: str, loss: str = "mse", layer: str = "state", weight: float = 1.0,
                 hidden_size: int = 0, teacher_model=None, thoughts_per_step: int = 1, thoughts_mode: bool = False):
        super().__init__(weight)
        if loss not in LOSSES:
            raise ArgumentError("loss", f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
        if layer not in LAYERS:
            raise ArgumentError("layer", f"unknown layer {layer!r}; choose one of {', '.join(LAYERS)}")
        self.teacher_dir, self.loss, self.layer = teacher, loss, layer
        self.per_step, self.thoughts_mode = thoughts_per_step, thoughts_mode
        if teacher_model is not None:
            teacher_model.requires_grad_(False).eval()
        self._teacher = [teacher_model]  # a list: kept out of the module tree, the state dict and the optimiser

    @property
    def teacher(self):
        return self._teacher[0]

    @torch.no_grad()
    def targets(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, K, d] the teacher's hidden state at the end of each step, [B, K] which exist)."""
        teacher = self.teacher
        if teacher is None:
            raise ValueError("distillation needs its teacher model (recipe.build_cell loads it)")
        ids = batch["teacher_ids"]
        teacher.to(ids.device)
        out = teacher(ids, steps=teacher.max_steps, query_mask=batch["teacher_query_mask"],
                      real_mask=batch["teacher_real_mask"], record=("states",) if self.layer == "state" else (),
                      features=self.layer == "features", compact=False)
        hidden = out.states[-1] if self.layer == "state" else out.features
        ends = batch["teacher_step_ends"]
        picked = hidden.gather(1, ends.clamp_min(0)[..., None].expand(-1, -1, hidden.size(-1)))
        return picked, ends >= 0

    def student(self, batch: dict[str, torch.Tensor], out) -> torch.Tensor:
        """[B, K', d]: for each replaced step s, thought s·c (thoughts mode) or h_{s·c} at the
        question's last position (depth mode)."""
        c = self.per_step
        if self.thoughts_mode:
            thoughts = None if out.features is None else thought_features(out.features, batch.get("slot_mask"))
            if thoughts is None:  # no thoughts in this batch
                return out.logits.new_zeros(batch["input_ids"].size(0), 0, 0)
            return thoughts[:, c - 1::c]
        query = batch["query_mask"]
        last = query.size(1) - 1 - query.flip(1).int().argmax(dim=1)  # each row's last question position
        rows = torch.arange(query.size(0), device=query.device)
        return torch.stack([h[rows, last] for h in out.states], dim=1)[:, c - 1::c]

    def forward(self, batch, out, detail=False):
        target, valid = self.targets(batch)
        student = self.student(batch, out)
        k = min(student.size(1), target.size(1))
        if k == 0 or not bool(valid[:, :k].any()):
            return student.sum() * 0.0, {"distill_loss": 0.0}
        s, t, v = student[:, :k].float(), target[:, :k].float(), valid[:, :k]
        if self.loss == "mse":
            per = (s - t).pow(2).mean(-1)
        else:
            per = 1 - F.cosine_similarity(s, t, dim=-1)
        loss = per[v].mean()
        return loss, {"distill_loss": float(loss.detach())}
