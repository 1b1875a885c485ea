"""The training objective contract: a small module that turns a batch and the loop's output into
a loss and the scalars to log.

An objective names what it needs, so that nobody pays for what no objective reads:

- ``record``: per-iteration records the loop must keep (``states``, ``logits``; see
  ``LoopedLM.forward``);
- ``data``: what the batches must carry beyond ids and labels (``step_answers``: each hop's
  answer, ``reach``: each question token's reach step);
- ``modes``: the loop modes it can read (``loop.mode``; the recipe check refuses the others);
- ``per_answer_token``: the loss is a mean over answer tokens. The training module then weights
  it by each rank's share of the global answer-token count, so that DDP's gradient average equals
  the gradient of one big batch. Other losses (a probe's, a regulariser) are added as they are.

A recipe weights each objective (``weight``); a new one is one file with a registration.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slr_zoo.registry import ArgumentError, Registry


class Objective(nn.Module):
    record: frozenset[str] = frozenset()
    data: frozenset[str] = frozenset()
    modes: frozenset[str] = frozenset({"depth", "thoughts"})
    per_answer_token: bool = False

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


# what the cell gives an objective, never recipe keys
OBJECTIVES = Registry("objective", Objective,
                      context=("hidden_size", "teacher_model", "thoughts_per_step", "thoughts_mode"))
