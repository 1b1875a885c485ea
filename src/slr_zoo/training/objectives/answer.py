"""The answer loss: cross-entropy on the answer tokens (and the end token)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slr_zoo.tasks.encoding import IGNORE
from slr_zoo.training.objectives.base import OBJECTIVES, Objective, at_logits


def answer_loss(out, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the answer tokens of the output logits; under a loss-mixing halting policy
    (PonderNet, Ouro) the halting-weighted expected loss over the steps with a graph."""
    labels = at_logits(out, labels)  # [B, S], [B, K] or [N]: the entries the logits were kept at
    if not out.loss_terms:
        return F.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)).float(), labels.reshape(-1),
                               ignore_index=IGNORE)
    mask = labels != IGNORE
    n = mask.sum().clamp_min(1)
    total = out.logits.new_zeros((), dtype=torch.float32)
    for logits, weight in out.loss_terms:
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE,
                             reduction="none").view(labels.shape)
        w = weight if weight.shape == labels.shape else weight[:, None]
        total = total + (w.float() * ce * mask).sum() / n
    return total


@OBJECTIVES.register("answer")
class AnswerLoss(Objective):
    per_answer_token = True
    logits_at = ("labels",)

    def forward(self, batch, out, detail=False):
        return answer_loss(out, batch["labels"]), {}
