"""Per-iteration supervision: iteration t's decoded state is trained toward the answer after
min(t, hops) hops (``Task.step_answers``), and the last iteration toward the final answer even
when it comes before the last hop, so a loop shorter than the chain (``loop.max_steps=1``) is
still trained to answer. The mean over the iterations that have a graph (``loop.backprop_steps``
leaves the earlier ones out)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slr_zoo.looped import at_kept
from slr_zoo.tasks.encoding import IGNORE
from slr_zoo.training.objectives.base import OBJECTIVES, Objective


def step_loss(step_logits: list[torch.Tensor | None], step_labels: torch.Tensor,
              labels: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """``step_logits``: one entry per iteration run, None where it ran without a graph;
    ``step_labels`` [B, H, S]: the labels with the answer after each hop (``encoding.step_labels``);
    ``kept``: the entries the logits were kept at (``LoopOutput.logits_kept``), None for all."""
    last = len(step_logits)
    terms = []
    for t, logits in enumerate(step_logits, start=1):
        if logits is None:
            continue
        target = labels if t == last else step_labels[:, min(t, step_labels.size(1)) - 1]
        terms.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                     at_kept(target, kept).reshape(-1), ignore_index=IGNORE))
    return torch.stack(terms).mean()


@OBJECTIVES.register("step_supervision")
class StepSupervision(Objective):
    record = frozenset({"logits"})
    data = frozenset({"step_answers"})
    per_answer_token = True  # the same answer tokens as the answer loss
    logits_at = ("labels",)  # each hop's targets replace the answer's tokens, at the same positions

    def forward(self, batch, out, detail=False):
        return step_loss(out.step_logits, batch["step_labels"], batch["labels"], getattr(out, "logits_kept", None)), {}
