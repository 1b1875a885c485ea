"""Per-token supervision of the search itself (``Task.reach_steps``).

A probe (LayerNorm + Linear) reads iteration t's state at every question token whose word the task
labels and is trained, by binary cross-entropy, to say whether that word has been reached within
t hops (ProsQA: a concept's distance from the root). The mean over labelled tokens, then over the
iterations that have a graph, and over h_0, the prelude's output: within zero hops only the root
is reached, so the probe asks the prelude where the search starts. Without that term a model can
settle on spreading from every person in the graph (docs/results.md, ProsQA over seeds). Dense where the answer gives one bit per question: every mention of
a concept tells the loop how far its search should have got. The probe reads the loop, it is not
on the answer's path; it is trained with the model and saved in its checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slr_zoo.tasks.encoding import IGNORE
from slr_zoo.training.objectives.base import OBJECTIVES, Objective


@OBJECTIVES.register("reach")
class ReachProbe(Objective):
    record = frozenset({"states"})
    data = frozenset({"reach"})
    logits_at = ()

    def __init__(self, weight: float = 1.0, hidden_size: int = 0):
        super().__init__(weight)
        self.probe = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, 1))

    def step_logits(self, out) -> list[tuple[int, torch.Tensor]]:
        """(t, [B, S] logits) of h_0 and of every iteration that ran with autograd (all, outside training)."""
        first = out.first_graph_step if self.training else 1
        probed = [] if out.initial_state is None else [(0, self.probe(out.initial_state).squeeze(-1))]
        return probed + [(t, self.probe(h).squeeze(-1)) for t, h in enumerate(out.states, start=1) if t >= first]

    def forward(self, batch, out, detail=False):
        reach = batch["reach"]
        labelled = reach != IGNORE
        probed = self.step_logits(out)
        loss = torch.stack([
            F.binary_cross_entropy_with_logits(z[labelled].float(), (reach[labelled] <= t).float())
            for t, z in probed
        ]).mean()
        logs = {"reach_loss": float(loss.detach())}
        if detail:  # how many hops the loop has learnt to take, iteration by iteration
            with torch.no_grad():
                for t, z in probed:
                    logs[f"reach_accuracy_t{t}"] = float(((z[labelled] > 0) == (reach[labelled] <= t)).float().mean())
        return loss, logs
