"""A test-only component that makes a training run diverge where a test wants it to."""

from __future__ import annotations

from slr_zoo.stabilizers.combine import Combine


class NaNAtStep(Combine):
    """No residual, except that in training the state of iteration ``at_step`` becomes NaN."""

    def __init__(self, at_step: int = 1, hidden_size: int = 0):
        super().__init__(hidden_size=hidden_size)
        self.at_step = at_step

    def forward(self, new, h0, prev, t):
        return new + float("nan") if self.training and t == self.at_step else new


def plant(at_step: int) -> dict:
    """The recipe node: ``loop.combine`` planting a NaN at ``at_step``."""
    return {"_component_": "nan_plant.NaNAtStep", "at_step": at_step}
