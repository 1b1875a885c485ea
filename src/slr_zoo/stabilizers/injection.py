"""Input injection: feed the prelude's output h0 back into every iteration.

Without injection the loop can forget its input after a few iterations; with plain addition the
map h -> h + h0 has gain 1 on h, so repeated application can let the state's norm grow. The
members below trade these off. All of them act per position, so they serve ``thoughts`` mode
(S = 1) as well as ``depth`` mode.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from slr_zoo.registry import ArgumentError, Registry


class Injection(nn.Module):
    """``(h, h0) -> h``: mix the initial state into the core's input."""

    def __init__(self):  # an explicit signature, so recipes cannot pass stray keys to nn.Module's **kwargs
        super().__init__()

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


@INJECTIONS.register("concat")
class ConcatInjection(Injection):
    """Huginn's adapter (Geiping et al. 2025, arXiv 2502.05171): Linear(2d -> d) over [h, h0].

    ``init``: ``add`` starts as h + h0 (weight [I | I]), ``identity`` as h (weight [I | 0]),
    ``random`` with PyTorch's default Linear init as in Huginn."""

    def __init__(self, init: Literal["add", "identity", "random"] = "add", bias: bool = False, hidden_size: int = 0):
        super().__init__()
        if init not in ("add", "identity", "random"):
            raise ArgumentError("init", f"must be 'add', 'identity' or 'random', got {init!r}")
        self.adapter = nn.Linear(2 * hidden_size, hidden_size, bias=bias)
        if init != "random":
            with torch.no_grad():
                eye = torch.eye(hidden_size)
                self.adapter.weight.copy_(torch.cat([eye, eye if init == "add" else torch.zeros_like(eye)], dim=1))
                if bias:
                    self.adapter.bias.zero_()

    def forward(self, h, h0):
        return self.adapter(torch.cat([h, h0.to(h.dtype)], dim=-1)).to(h.dtype)


def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


@INJECTIONS.register("diagonal")
class DiagonalInjection(Injection):
    """Parcae's contractive injection (Prairie et al. 2026, arXiv 2604.12946):

        h <- exp(-dt * A) * h + dt * (B h0)

    the zero-order-hold / Euler discretisation of dh/ds = -A h + B h0 with a diagonal, positive
    A (so the linear part has spectral radius exp(-dt*A) < 1) and a per-channel step dt > 0.
    A = exp(log_A) and dt = softplus(dt_raw) keep both positive whatever the optimiser does; B is
    a dense d x d matrix initialised to the identity, so a fresh module computes
    exp(-dt_init * a_init) * h + dt_init * h0. The contraction factor exp(-dt*A) is reported by
    ``monitors()``.
    """

    def __init__(self, a_init: float = 1.0, dt_init: float = 0.5, hidden_size: int = 0):
        super().__init__()
        if a_init <= 0 or dt_init <= 0:
            raise ArgumentError("a_init" if a_init <= 0 else "dt_init", f"a_init and dt_init must be > 0, got {a_init}, {dt_init}")
        self.log_A = nn.Parameter(torch.full((hidden_size,), math.log(a_init)))
        self.dt_raw = nn.Parameter(torch.full((hidden_size,), inverse_softplus(dt_init)))
        self.B = nn.Linear(hidden_size, hidden_size, bias=False)
        with torch.no_grad():
            self.B.weight.copy_(torch.eye(hidden_size))

    def dt(self) -> torch.Tensor:
        return F.softplus(self.dt_raw)

    def decay(self) -> torch.Tensor:
        """exp(-dt * A), per channel, in (0, 1)."""
        return torch.exp(-self.dt() * self.log_A.exp())

    def forward(self, h, h0):
        dt = self.dt()
        decay = torch.exp(-dt * self.log_A.exp())
        return (decay * h + dt * self.B(h0.to(h.dtype))).to(h.dtype)

    @torch.no_grad()
    def monitors(self) -> dict[str, float]:
        decay, dt = self.decay(), self.dt()
        return {
            "contraction_max": decay.max().item(),
            "contraction_mean": decay.mean().item(),
            "dt_mean": dt.mean().item(),
        }
