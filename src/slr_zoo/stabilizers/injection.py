"""Input injection: feed the prelude's output h0 back into every iteration."""

from __future__ import annotations

import torch
from torch import nn

from slr_zoo.registry import Registry


class Injection(nn.Module):
    """``(h, h0) -> h``: mix the initial state into the core's input."""

    def forward(self, h: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


INJECTIONS = Registry("injection", Injection, context=("hidden_size",))


@INJECTIONS.register("none")
class NoInjection(Injection):
    def forward(self, h, h0):
        return h


@INJECTIONS.register("add")
class AddInjection(Injection):
    def forward(self, h, h0):
        return h + h0
