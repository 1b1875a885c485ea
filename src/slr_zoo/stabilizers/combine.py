"""Loop residuals: how the core's output is merged with the initial and previous states."""

from __future__ import annotations

import torch
from torch import nn

from slr_zoo.registry import Registry


class Combine(nn.Module):
    """``(new, h0, prev, t) -> h``: the state carried into the next iteration."""

    def forward(self, new: torch.Tensor, h0: torch.Tensor, prev: torch.Tensor, t: int) -> torch.Tensor:
        raise NotImplementedError


COMBINES = Registry("combine", Combine, context=("hidden_size", "max_steps"))


@COMBINES.register("none")
class NoCombine(Combine):
    def forward(self, new, h0, prev, t):
        return new


class _AlphaResidual(Combine):
    """``alpha * new + (1 - alpha) * anchor``; alpha = 1 is exactly no residual."""

    def __init__(self, alpha: float = 0.5):
        super().__init__()
        self.alpha = alpha

    def mix(self, new: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        if self.alpha == 1.0:
            return new
        return self.alpha * new + (1.0 - self.alpha) * anchor


@COMBINES.register("residual_initial")
class ResidualInitial(_AlphaResidual):
    """Option A: pull every state back towards h0."""

    def forward(self, new, h0, prev, t):
        return self.mix(new, h0)


@COMBINES.register("residual_previous")
class ResidualPrevious(_AlphaResidual):
    """Option B: an exponential moving average over iterations."""

    def forward(self, new, h0, prev, t):
        return self.mix(new, prev)
