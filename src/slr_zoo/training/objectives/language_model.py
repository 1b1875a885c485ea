"""The chain-of-thought language-model loss: cross-entropy on the reasoning steps the encoding
writes out (``text_labels``: every step under ``cot``, the steps not yet replaced by thoughts
under ``latent`` and ``pause``). A batch with no written step (the curriculum's last stage)
contributes zero, with a graph, so every rank still runs the same backward."""

from __future__ import annotations

import torch.nn.functional as F

from slr_zoo.tasks.encoding import IGNORE
from slr_zoo.training.objectives.base import OBJECTIVES, Objective, at_logits


@OBJECTIVES.register("language_model")
class LanguageModelLoss(Objective):
    data = frozenset({"text_labels"})
    logits_at = ("text_labels",)

    def forward(self, batch, out, detail=False):
        labels = at_logits(out, batch["text_labels"])
        if not bool((labels != IGNORE).any()):
            return out.logits.sum() * 0.0, {"text_loss": 0.0}
        loss = F.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)).float(), labels.reshape(-1),
                               ignore_index=IGNORE)
        return loss, {"text_loss": float(loss.detach())}
