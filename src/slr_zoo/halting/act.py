"""Adaptive Computation Time (Graves 2016, "Adaptive Computation Time for Recurrent Neural
Networks", arXiv:1603.08983), applied to loop iterations instead of RNN ticks."""

from __future__ import annotations

import torch

from slr_zoo.halting.base import HALTING, Decision, Granularity, LearnedHalting


@HALTING.register("act")
class ACTHalting(LearnedHalting):
    """A halting unit lambda_t = sigmoid(Linear(h_t)) accumulates until it reaches 1 - epsilon.

    With N the first step where lambda_1 + ... + lambda_N >= 1 - epsilon (or the last step), the
    remainder is R = 1 - (lambda_1 + ... + lambda_{N-1}); the step weights are lambda_t for t < N,
    R at N and 0 after, so they sum to 1 and the output is the weighted mixture of the states.
    The ponder cost tau * (N + R), averaged over tokens (or samples), is the auxiliary loss; only
    R carries its gradient (N is a count). Halted tokens are frozen in training and inference.
    """

    mixes = "state"

    def __init__(
        self,
        hidden_size: int,
        tau: float = 0.01,
        epsilon: float = 0.01,
        granularity: Granularity = "token",
        init_bias: float = -1.0,
    ):
        super().__init__(hidden_size, granularity, init_bias)
        self.tau, self.epsilon = tau, epsilon

    def start(self, h0, query):
        state = super().start(h0, query)
        shape = query.shape if self.per_token else query.shape[:1]
        state["cumulative"] = torch.zeros(shape, dtype=torch.float32, device=h0.device)
        state["halted"] = torch.zeros(shape, dtype=torch.bool, device=h0.device)
        state["ponder"] = torch.zeros((), dtype=torch.float32, device=h0.device)  # sum of N + R
        return state

    def observe(self, state, t, h, prev, logits, last):
        lam = torch.sigmoid(self.halting_logit(state, h))
        cumulative, halted = state["cumulative"], state["halted"]
        stop = ~halted & ((cumulative + lam >= 1 - self.epsilon) | last)
        remainder = 1 - cumulative
        weight = torch.where(halted, 0.0, torch.where(stop, remainder, lam))
        counted = stop & state["query"] if self.per_token else stop  # pads cost nothing
        state["ponder"] = state["ponder"] + torch.where(counted, t + remainder, 0.0).sum()
        state["cumulative"] = cumulative + weight
        state["halted"] = halted | stop
        return Decision(done=state["halted"], weight=weight)

    def aux_loss(self, state):
        return self.tau * state["ponder"] / state["entities"]
