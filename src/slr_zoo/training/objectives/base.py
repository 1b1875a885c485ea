"""The training objective contract: a small module that turns a batch and the loop's output into
a loss and the scalars to log.

An objective names what it needs, so that nobody pays for what no objective reads:

- ``record``: per-iteration records the loop must keep (``states``, ``logits``; see
  ``LoopedLM.forward``);
- ``data``: what the batches must carry beyond ids and labels (``step_answers``: each hop's
  answer, ``reach``: each question token's reach step);
- ``modes``: the loop modes it can read (``loop.mode``; the recipe check refuses the others);
- ``logits_at``: the batch's label tensors at whose labelled positions it reads ``out.logits``
  (``()``: it never reads them; None, the default: it may read any position). When every
  objective names them, the head runs at those positions only, and an objective reads its labels
  at the kept positions with ``at_logits``;
- ``per_answer_token``: the loss is a mean over answer tokens. The training module then weights
  it by each rank's share of the global answer-token count, so that DDP's gradient average equals
  the gradient of one big batch. Other losses (a probe's, a regulariser) are added as they are.

A recipe weights each objective (``weight``); a new one is one file with a registration.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slr_zoo.looped import at_kept
from slr_zoo.registry import ArgumentError, Registry
from slr_zoo.tasks.encoding import IGNORE


class Objective(nn.Module):
    record: frozenset[str] = frozenset()
    data: frozenset[str] = frozenset()
    modes: frozenset[str] = frozenset({"depth", "thoughts"})
    per_answer_token: bool = False
    logits_at: tuple[str, ...] | None = None

    def __init__(self, weight: float = 1.0):
        super().__init__()
        if weight < 0:
            raise ArgumentError("weight", f"must be >= 0, got {weight}")
        self.weight = weight

    def forward(self, batch: dict[str, torch.Tensor], out: Any, detail: bool = False
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """(unweighted loss, scalars to log). ``detail``: also compute the costlier diagnostics
        (logged every ``trainer.log_every`` steps)."""
        raise NotImplementedError


def at_logits(out: Any, labels: torch.Tensor) -> torch.Tensor:
    """``labels`` [B, S] at the positions ``out.logits`` covers (``LoopOutput.logits_kept``), so
    that ``logits.reshape(-1, V)`` and ``labels.reshape(-1)`` pair up."""
    return at_kept(labels, getattr(out, "logits_kept", None))


def logit_positions(objectives: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor | int:
    """What the loop's head must compute for these objectives on this batch, as
    ``logits_to_keep``: a [B, S] mask of the entries labelled in any label tensor they read
    logits at, or 0 (every position) when one of them may read any."""
    keys: set[str] = set()
    for objective in objectives:
        if objective.logits_at is None:
            return 0
        keys.update(objective.logits_at)
    labelled = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for key in keys:
        if key in batch:
            labelled |= batch[key] != IGNORE
    return labelled


# what the cell gives an objective, never recipe keys
OBJECTIVES = Registry("objective", Objective,
                      context=("hidden_size", "teacher_model", "thoughts_per_step", "thoughts_mode"))
