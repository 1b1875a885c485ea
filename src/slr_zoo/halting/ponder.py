"""PonderNet (Banino et al. 2021, "PonderNet: Learning to Ponder", arXiv:2107.05407)."""

from __future__ import annotations

import math
from typing import Literal


from slr_zoo.halting.base import HALTING, Granularity
from slr_zoo.halting.exit_distribution import ExitDistributionHalting
from slr_zoo.registry import ArgumentError


@HALTING.register("ponder")
class PonderHalting(ExitDistributionHalting):
    """Expected loss over the exit distribution p, plus beta * KL(p || geometric(prior)).

    The prior is the exit distribution of a constant lambda = ``prior``: prior*(1-prior)^(t-1)
    for t < T and (1-prior)^(T-1) at the last step T, truncated the same way as p, so a unit that
    outputs ``prior`` everywhere has zero regulariser. Per sample by default, as in the paper (the
    halting unit reads the separator position); ``granularity: token`` gives every token its own p.
    """

    def __init__(
        self,
        hidden_size: int,
        beta: float = 0.01,
        prior: float = 0.2,
        granularity: Granularity = "sample",
        q: float = 0.5,
        inference: Literal["cdf", "sample"] = "cdf",
        init_bias: float = -1.0,
    ):
        if not 0 < prior < 1:
            raise ArgumentError("prior", f"must be in (0, 1), got {prior}")
        super().__init__(hidden_size, granularity, init_bias, q, inference)
        self.beta, self.prior = beta, prior

    def step_regulariser(self, t, log_p, last):
        log_prior = (t - 1) * math.log1p(-self.prior) + (0.0 if last else math.log(self.prior))
        return self.beta * log_p.exp() * (log_p - log_prior)
