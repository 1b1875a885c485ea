"""The halting contract: what a policy sees at each loop step and what it tells the loop.

A policy is an ``nn.Module`` (it may own parameters, e.g. a halting unit) that keeps no state
between forward passes: per-forward state lives in the ``dict`` returned by :meth:`start`, whose
tensors are batch-first (or 0-dim accumulators) so that the loop can drop halted samples from it
(batch compaction).

:meth:`start` receives ``query`` [B, S] bool: the positions whose decisions count. For a
*per-sample* policy the loop sets it to the question (up to and including the separator whose
position predicts the first answer token), so that a per-sample decision never sees the answer
that teacher-forced validation puts in the input. For a *per-token* policy (causal by
construction) it is every real position: pads start done, and aux losses average over ``query``
so that padding changes nothing.

Each step the loop calls :meth:`observe` with the new state ``h`` [B, S, D], the previous state,
and ``logits()``, a function that decodes ``h`` only if the policy calls it (once; the result is
cached in the grad mode of the first call). The policy answers with a :class:`Decision`:

- ``done``: bool [B] (``per_token = False``) or [B, S] (``per_token = True``); once a sample or
  token is done it stays done. A done token's state is frozen; at inference a done sample leaves
  the batch, in training it is frozen instead (every step still runs for every sample: mask, do
  not skip), so distributed training sees the same parameters used on every rank.
- ``weight``: this step's share of the output, same shape as ``done`` (or ``None``). How weights
  are used is the policy's ``mixes`` attribute:

  * ``"last"``: the output is the state at the halting step (weights ignored);
  * ``"state"``: the output is ``sum_t weight_t * h_t`` (ACT);
  * ``"loss"``: the state at the halting step at inference; in training the loss is
    ``sum_t weight_t * loss_t`` over every step's decoded logits (PonderNet, Ouro).

:meth:`aux_loss` returns the policy's regulariser (ponder cost, KL to a prior, entropy bonus),
already scaled; the training loop adds it to the task loss.

Decisions and accumulators are computed in float32 with autocast off (:func:`fp32`), so a bf16
run halts where an fp32 run would: a probability summed over steps or a KL of 5e-4 is below
bf16's resolution near 1.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from slr_zoo.registry import ArgumentError, Registry

Granularity = Literal["token", "sample"]


class Decision(NamedTuple):
    done: torch.Tensor | None = None
    weight: torch.Tensor | None = None


@contextmanager
def fp32(device: torch.device) -> Iterator[None]:
    """Autocast off: halting arithmetic runs in float32 under bf16/fp16 mixed precision."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


class HaltingPolicy(nn.Module):
    """Decides, step by step, which samples or tokens have finished thinking."""

    per_token: bool = False
    mixes: Literal["last", "state", "loss"] = "last"

    def start(self, h0: torch.Tensor, query: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fresh per-forward state; tensors must be batch-first or 0-dim. Subclasses extend it."""
        return {"query": query}

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

    # ------------------------------------------------------------------ helpers for subclasses
    @staticmethod
    def decision_index(state: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B] the last query position: where a per-sample policy reads a learned halting unit."""
        query = state["query"]
        positions = torch.arange(query.size(1), device=query.device).expand_as(query)
        return torch.where(query, positions, 0).amax(dim=1)

    @classmethod
    def at_decision(cls, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, S, ...] at each row's decision index -> [B, ...]."""
        return x[torch.arange(x.size(0), device=x.device), cls.decision_index(state)]

    @staticmethod
    def over_query(state: dict[str, torch.Tensor], values: torch.Tensor,
                   reduce: Literal["max", "mean", "last"]) -> torch.Tensor:
        """A per-position signal [B, S] reduced to one number per sample over the query positions."""
        query = state["query"]
        if reduce == "max":
            return torch.where(query, values, float("-inf")).amax(dim=1)
        if reduce == "mean":
            return (values * query).sum(dim=1) / query.sum(dim=1).clamp_min(1)
        return HaltingPolicy.at_decision(state, values)


class HaltingUnit(nn.Module):
    """``z = Linear(rms_normalise(h))``: the logit of a learned halting probability, in float32.

    The state's norm drifts with depth; normalising it first (no parameters) keeps the unit's
    input on one scale at every step. The weight starts at zero, so every position starts with
    the same probability ``sigmoid(init_bias)`` and training decides what the unit reads.
    """

    def __init__(self, hidden_size: int, init_bias: float):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.constant_(self.linear.bias, init_bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with fp32(h.device):
            x = h.float()
            x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
            return F.linear(x, self.linear.weight.float(), self.linear.bias.float()).squeeze(-1)


class LearnedHalting(HaltingPolicy):
    """A policy with a halting unit, per token or per sample (read at the decision index)."""

    def __init__(self, hidden_size: int, granularity: Granularity, init_bias: float):
        super().__init__()
        if granularity not in ("token", "sample"):
            raise ArgumentError("granularity", f"must be 'token' or 'sample', got {granularity!r}")
        self.per_token = granularity == "token"
        self.unit = HaltingUnit(hidden_size, init_bias)

    def halting_logit(self, state: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        """[B, S] per token, [B] per sample; float32."""
        return self.unit(h if self.per_token else self.at_decision(state, h))

    def start(self, h0, query):
        state = super().start(h0, query)
        # aux losses average over these: real tokens, or samples
        count = query.sum() if self.per_token else query.size(0)
        state["entities"] = torch.as_tensor(count, dtype=torch.float32, device=h0.device).clamp_min(1)
        return state


HALTING = Registry("halting", HaltingPolicy, context=("hidden_size", "max_steps"))
