"""Supervision of the search for Coconut's continuous thoughts (``loop.mode: thoughts``).

The depth loop's reach probe (``reach``) reads every question token's state at iteration t; a
continuous thought is one vector, and the question's states do not change while thoughts are
made. So here the probe asks thought t which question words the search has reached within t
hops (``Task.reach_steps``; ProsQA: a concept's distance from the root): a bilinear score
between the thought and each labelled question token's features, trained by binary
cross-entropy. It is what Coconut's analysis found its thoughts to hold (a breadth-first
frontier, several nodes at once), made a training signal; the probe is beside the answer's path,
trained with the model and saved in its checkpoints. A stage without thoughts (the curriculum's
first) gives no loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slr_zoo.looped import thought_features
from slr_zoo.tasks.encoding import IGNORE
from slr_zoo.training.objectives.base import OBJECTIVES, Objective


@OBJECTIVES.register("thought_reach")
class ThoughtReachProbe(Objective):
    data = frozenset({"reach"})
    modes = frozenset({"thoughts"})  # the depth loop's probe is loop.reach_supervision
    logits_at = ()

    def __init__(self, weight: float = 1.0, hidden_size: int = 0):
        super().__init__(weight)
        self.query = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, hidden_size))
        self.key = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.zeros(()))

    def logits(self, batch, out) -> torch.Tensor | None:
        """[B, n, S] the score of question position s at thought t = 1..n (None: no thoughts).
        Thought 1 is the features at [BOT], thought t + 1 those at slot t."""
        thoughts = thought_features(out.features, batch.get("slot_mask"))
        if thoughts is None:
            return None
        thoughts, keys = self.query(thoughts), self.key(out.features)
        return thoughts @ keys.mT / keys.size(-1) ** 0.5 + self.bias

    def forward(self, batch, out, detail=False):
        z = self.logits(batch, out)
        if z is None:  # no thoughts yet: a zero that still reaches every parameter (DDP)
            return sum(p.sum() for p in self.parameters()) * 0.0, {}
        reach = batch["reach"]
        labelled = reach != IGNORE                                   # [B, S]
        hops = torch.arange(1, z.size(1) + 1, device=z.device)[None, :, None]
        target = (reach[:, None, :] <= hops).float()                 # [B, n, S]
        mask = labelled[:, None, :].expand_as(z)
        loss = F.binary_cross_entropy_with_logits(z[mask].float(), target[mask])
        logs = {"thought_reach_loss": float(loss.detach())}
        if detail:
            with torch.no_grad():
                right = ((z > 0) == target.bool()) & mask
                for t in range(z.size(1)):
                    logs[f"thought_reach_accuracy_t{t + 1}"] = float(right[:, t].sum() / mask[:, t].sum())
        return loss, logs
