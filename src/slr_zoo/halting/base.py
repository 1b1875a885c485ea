"""The halting contract: what a policy sees at each loop step and what it tells the loop.

A policy is an ``nn.Module`` (it may own parameters, e.g. a halting unit) that keeps no state
between forward passes: per-forward state lives in the ``dict`` returned by :meth:`start`, whose
tensors are batch-first so that the loop can drop halted samples from it (batch compaction).

Each step the loop calls :meth:`observe` with the new state ``h`` [B, S, D], the previous state,
and ``logits()``, a function that decodes ``h`` only if the policy calls it. The policy answers
with a :class:`Decision`:

- ``done``: bool [B] (``per_token = False``) or [B, S] (``per_token = True``); once a sample or
  token is done it stays done. At inference a done sample leaves the batch and a done token's
  state is frozen. During training every step still runs for every sample (mask, do not skip), so
  distributed training sees the same parameters used on every rank.
- ``weight``: this step's share of the output, same shape as ``done`` (or ``None``). How weights
  are used is the policy's ``mixes`` attribute:

  * ``"last"``: the output is the state at the halting step (weights ignored);
  * ``"state"``: the output is ``sum_t weight_t * h_t`` (ACT);
  * ``"loss"``: the state at the halting step at inference; in training the loss is
    ``sum_t weight_t * loss_t`` over every step's decoded logits (PonderNet, Ouro).

:meth:`aux_loss` returns the policy's regulariser (ponder cost, KL to a prior, entropy bonus),
already scaled; the loop adds it to the task loss.
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import torch
from torch import nn

from slr_zoo.registry import Registry


class Decision(NamedTuple):
    done: torch.Tensor | None = None
    weight: torch.Tensor | None = None


class HaltingPolicy(nn.Module):
    """Decides, step by step, which samples or tokens have finished thinking."""

    per_token: bool = False
    needs_logits: bool = False
    mixes: Literal["last", "state", "loss"] = "last"

    def start(self, h0: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fresh per-forward state; tensors must be batch-first."""
        return {}

    def observe(
        self,
        state: dict[str, torch.Tensor],
        t: int,
        h: torch.Tensor,
        prev: torch.Tensor,
        logits: Callable[[], torch.Tensor],
        last: bool,
    ) -> Decision:
        raise NotImplementedError

    def aux_loss(self, state: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None


HALTING = Registry("halting", HaltingPolicy, context=("hidden_size", "max_steps"))
