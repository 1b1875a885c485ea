"""The exit distribution shared by PonderNet and Ouro's exit gate.

A halting unit gives lambda_t = sigmoid(Linear(h_t)), the probability of stopping at step t given
that no earlier step stopped. The exit distribution is p_t = lambda_t * prod_{j<t} (1 - lambda_j),
and the last step of the forward (``max_steps`` at inference, the sampled depth in training)
takes the remaining mass prod_{j<T} (1 - lambda_j), so sum_t p_t = 1 exactly. Training minimises
the expected loss sum_t p_t * loss_t (``mixes = "loss"``) plus a regulariser on p; no step halts
in training. At inference a sample (or token) stops at the first step whose CDF reaches ``q``
(``inference: cdf``, deterministic) or with probability lambda_t at each step (``inference:
sample``, which draws the exit step from p).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from slr_zoo.halting.base import Decision, Granularity, LearnedHalting
from slr_zoo.registry import ArgumentError


class ExitDistributionHalting(LearnedHalting):
    mixes = "loss"

    def __init__(self, hidden_size: int, granularity: Granularity, init_bias: float, q: float,
                 inference: Literal["cdf", "sample"]):
        super().__init__(hidden_size, granularity, init_bias)
        if not 0 < q <= 1:
            raise ArgumentError("q", f"must be in (0, 1], got {q}")
        if inference not in ("cdf", "sample"):
            raise ArgumentError("inference", f"must be 'cdf' or 'sample', got {inference!r}")
        self.q, self.inference = q, inference

    def start(self, h0, query):
        state = super().start(h0, query)
        shape = query.shape if self.per_token else query.shape[:1]
        state["log_survival"] = torch.zeros(shape, dtype=torch.float32, device=h0.device)  # log prod(1 - lambda)
        state["regulariser"] = torch.zeros((), dtype=torch.float32, device=h0.device)
        return state

    def observe(self, state, t, h, prev, logits, last):
        z = self.halting_logit(state, h)
        log_survival = state["log_survival"]
        # log p_t: log(lambda_t) + log prod_{j<t}(1 - lambda_j); the last step keeps all survivors.
        # torch.where keeps the unit in the graph at T = 1 too, so DDP always sees it used
        last_step = torch.tensor(last, device=z.device)
        log_p = torch.where(last_step, log_survival, F.logsigmoid(z) + log_survival)
        state["log_survival"] = log_survival + F.logsigmoid(-z)
        if self.training:
            term = self.step_regulariser(t, log_p, last)
            if self.per_token:
                term = torch.where(state["query"], term, 0.0)  # pads add nothing
            state["regulariser"] = state["regulariser"] + term.sum()
            return Decision(weight=log_p.exp())
        if last:
            done = torch.ones_like(z, dtype=torch.bool)
        elif self.inference == "sample":
            done = torch.rand_like(z) < torch.sigmoid(z)
        else:
            done = 1 - state["log_survival"].exp() >= self.q  # CDF after step t
        return Decision(done=done, weight=log_p.exp())

    def step_regulariser(self, t: int, log_p: torch.Tensor, last: bool) -> torch.Tensor:
        """This step's term of the regulariser for each token or sample (summed over steps)."""
        raise NotImplementedError

    def aux_loss(self, state):
        if not self.training:
            return None
        return state["regulariser"] / state["entities"]
