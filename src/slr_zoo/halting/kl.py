"""Huginn's exit (Geiping et al. 2025, "Scaling up Test-Time Compute with Latent Reasoning"):
stop a token once its predicted distribution no longer changes from one step to the next."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from slr_zoo.halting.base import HALTING, Decision, Granularity, HaltingPolicy, fp32
from slr_zoo.registry import ArgumentError


@HALTING.register("kl")
class KLHalting(HaltingPolicy):
    """Done when KL(p_{t-1} || p_t) < ``threshold``, with p_t = softmax(decoder(h_t)).

    Nothing halts at step 1 (there is no previous distribution). Per token by default (causal:
    a token's distribution depends only on earlier positions); ``granularity: sample`` reduces the
    KL over the query positions with ``reduce``. Each step decodes the state, so every step costs
    a decoder pass on top of the core.
    """

    def __init__(
        self,
        threshold: float = 5e-4,
        granularity: Granularity = "token",
        reduce: Literal["max", "mean", "last"] = "max",
    ):
        super().__init__()
        if granularity not in ("token", "sample"):
            raise ArgumentError("granularity", f"must be 'token' or 'sample', got {granularity!r}")
        self.threshold, self.reduce = threshold, reduce
        self.per_token = granularity == "token"

    def observe(self, state, t, h, prev, logits, last):
        with torch.no_grad():  # a decision, not a loss: no graph through it
            decoded = logits()  # under the run's autocast, like the output it may become
            at_decision = not self.per_token and self.reduce == "last"
            if at_decision:  # one position decides: compare only its distribution, [B, V]
                decoded = self.at_decision(state, decoded)
            with fp32(h.device):
                log_p = F.log_softmax(decoded.float(), dim=-1)
                previous = state.get("log_p")
                state["log_p"] = log_p
                if previous is None:
                    shape = state["query"].shape if self.per_token else state["query"].shape[:1]
                    return Decision(done=torch.zeros(shape, dtype=torch.bool, device=h.device))
                kl = (previous.exp() * (previous - log_p)).sum(dim=-1)
                if not self.per_token and not at_decision:
                    kl = self.over_query(state, kl, self.reduce)
                return Decision(done=kl < self.threshold)
