"""Run every loop step: the baseline every other policy is compared with."""

from __future__ import annotations

from slr_zoo.halting.base import HALTING, Decision, HaltingPolicy


@HALTING.register("fixed")
class FixedHalting(HaltingPolicy):
    def observe(self, state, t, h, prev, logits, last):
        return Decision()
