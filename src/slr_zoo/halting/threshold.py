"""Stop when the state has stopped moving: a fixed point of the loop needs no more iterations."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from slr_zoo.halting.base import HALTING, Decision, Granularity, HaltingPolicy, fp32
from slr_zoo.registry import ArgumentError


@HALTING.register("threshold")
class ThresholdHalting(HaltingPolicy):
    """Done when the step's change falls below ``epsilon``.

    ``metric``: ``relative`` = ||h_t - h_{t-1}|| / ||h_{t-1}|| per position; ``cosine`` =
    1 - cos(h_t, h_{t-1}). Per sample (the default), the change of a sample is the ``reduce``
    (``max``: every question position has settled; ``mean``; ``last``: the separator position
    alone) over its query positions, never over the answer. ``min_steps`` forbids halting earlier.
    """

    def __init__(
        self,
        epsilon: float = 1e-2,
        metric: Literal["relative", "cosine"] = "relative",
        granularity: Granularity = "sample",
        reduce: Literal["max", "mean", "last"] = "max",
        min_steps: int = 1,
    ):
        super().__init__()
        if granularity not in ("token", "sample"):
            raise ArgumentError("granularity", f"must be 'token' or 'sample', got {granularity!r}")
        self.epsilon, self.metric, self.reduce, self.min_steps = epsilon, metric, reduce, min_steps
        self.per_token = granularity == "token"

    def change(self, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """[B, S] float32 change of each position."""
        with fp32(h.device):
            h, prev = h.detach().float(), prev.detach().float()
            if self.metric == "cosine":
                return 1 - F.cosine_similarity(h, prev, dim=-1, eps=1e-12)
            return (h - prev).norm(dim=-1) / prev.norm(dim=-1).clamp_min(1e-12)

    def observe(self, state, t, h, prev, logits, last):
        change = self.change(h, prev)
        if not self.per_token:
            change = self.over_query(state, change, self.reduce)
        return Decision(done=(change < self.epsilon) & (t >= self.min_steps))
