"""Ouro's learned exit gate (Zhu et al. 2025, "Scaling Latent Reasoning via Looped Language
Models", arXiv:2510.25741)."""

from __future__ import annotations

from typing import Literal

from slr_zoo.halting.base import HALTING, Granularity
from slr_zoo.halting.exit_distribution import ExitDistributionHalting


@HALTING.register("exit_gate")
class ExitGateHalting(ExitDistributionHalting):
    """Expected loss over the exit distribution p minus beta * H(p): the entropy bonus keeps the
    gate from collapsing onto the deepest step early in training. Q-exit at inference: stop at the
    first step whose CDF reaches ``q``. Per token by default, as in Ouro."""

    def __init__(
        self,
        hidden_size: int,
        beta: float = 0.05,
        granularity: Granularity = "token",
        q: float = 0.5,
        inference: Literal["cdf", "sample"] = "cdf",
        init_bias: float = -1.0,
    ):
        super().__init__(hidden_size, granularity, init_bias, q, inference)
        self.beta = beta

    def step_regulariser(self, t, log_p, last):
        return self.beta * log_p.exp() * log_p  # -beta * (-p log p)
