"""Loop residuals: how the core's output is merged with the initial and previous states.

    A  residual_initial   h = alpha * h' + (1 - alpha) * h0
    B  residual_previous  h = alpha * h' + (1 - alpha) * h_{t-1}
    C  learned            h = A + W [h', h0, h_{t-1}] + b, W and b zero at init (so exactly A)
       gated              h = g * h' + (1 - g) * h_{t-1},  g = sigmoid(W [h', h_{t-1}] + b)

alpha = 1 is exactly "no residual". A learnable alpha is alpha = sigmoid(theta), which keeps it in
(0, 1); it must therefore start strictly below 1 (alpha = 1 is only available fixed). Every
member may normalise its output (``norm: true``, RMSNorm with a learned gain), which bounds the
state's norm whatever the core does. All members act per position, so ``thoughts`` mode (states
of shape [B, 1, D]) uses them unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slr_zoo.registry import ArgumentError, Registry


class Combine(nn.Module):
    """``(new, h0, prev, t) -> h``: the state carried into the next iteration.

    ``norm=True`` adds an RMSNorm that subclasses apply through :meth:`finish`."""

    def __init__(self, norm: bool = False, hidden_size: int = 0):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6) if norm else None

    def finish(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.norm is None else self.norm(h)

    def forward(self, new: torch.Tensor, h0: torch.Tensor, prev: torch.Tensor, t: int) -> torch.Tensor:
        raise NotImplementedError


COMBINES = Registry("combine", Combine, context=("hidden_size", "max_steps"))


def logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def check_alpha(alpha: float, learnable: bool, name: str = "alpha") -> None:
    if learnable and not 0.0 < alpha < 1.0:
        raise ArgumentError(name, f"must be in (0, 1) when learned (alpha = sigmoid(theta)), got {alpha}")
    if not 0.0 < alpha <= 1.0:
        raise ArgumentError(name, f"must be in (0, 1], got {alpha}")


@COMBINES.register("none")
class NoCombine(Combine):
    def __init__(self, norm: bool = False, hidden_size: int = 0):
        super().__init__(norm, hidden_size)

    def forward(self, new, h0, prev, t):
        return self.finish(new)


class _AlphaResidual(Combine):
    """``alpha * new + (1 - alpha) * anchor``; alpha = 1 (fixed) is exactly no residual."""

    def __init__(self, alpha: float = 0.5, learn_alpha: bool = False, norm: bool = False, hidden_size: int = 0):
        super().__init__(norm, hidden_size)
        check_alpha(alpha, learn_alpha)
        self.learn_alpha = learn_alpha
        if learn_alpha:
            self.alpha_logit = nn.Parameter(torch.tensor(logit(alpha)))
        else:
            self.fixed_alpha = float(alpha)

    @property
    def alpha(self) -> torch.Tensor | float:
        return torch.sigmoid(self.alpha_logit) if self.learn_alpha else self.fixed_alpha

    def mix(self, new: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        if not self.learn_alpha and self.fixed_alpha == 1.0:
            return self.finish(new)
        a = self.alpha
        if torch.is_tensor(a):
            a = a.to(new.dtype)
        return self.finish(a * new + (1.0 - a) * anchor)

    @torch.no_grad()
    def monitors(self) -> dict[str, float]:
        return {"alpha": float(self.alpha)}


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


@COMBINES.register("learned")
class LearnedCombine(_AlphaResidual):
    """Option C: a Linear over [h', h0, h_{t-1}] that starts exactly as option A.

    Written as option A plus a zero-initialised Linear correction, h = alpha h' + (1 - alpha) h0
    + W [h', h0, h_{t-1}] + b: the same function class as a free Linear initialised to
    [alpha I, (1 - alpha) I, 0], but a fresh module is bit-identical to option A, alpha may be
    fixed or learned like A's, and weight decay pulls towards option A rather than towards zero.

    ``monitors()`` reports alpha and the effective mean diagonal weight on each input."""

    def __init__(self, alpha: float = 0.5, learn_alpha: bool = False, norm: bool = False, hidden_size: int = 0):
        super().__init__(alpha, learn_alpha, norm, hidden_size)
        self.mixer = nn.Linear(3 * hidden_size, hidden_size)
        nn.init.zeros_(self.mixer.weight)
        nn.init.zeros_(self.mixer.bias)

    def forward(self, new, h0, prev, t):
        a = self.alpha
        if torch.is_tensor(a):
            a = a.to(new.dtype)
        correction = self.mixer(torch.cat([new, h0.to(new.dtype), prev.to(new.dtype)], dim=-1)).to(new.dtype)
        return self.finish(a * new + (1.0 - a) * h0 + correction)

    @torch.no_grad()
    def monitors(self) -> dict[str, float]:
        d = self.mixer.out_features
        diag = torch.diagonal(self.mixer.weight.view(d, 3, d), dim1=0, dim2=2).mean(-1)  # per input block
        a = float(self.alpha)
        return {"alpha": a, "alpha_new": a + diag[0].item(), "alpha_h0": 1.0 - a + diag[1].item(),
                "alpha_prev": diag[2].item()}


@COMBINES.register("gated")
class GatedCombine(Combine):
    """A per-channel gate between the new and the previous state (GRU-style update gate):
    g = sigmoid(W [h', h_{t-1}] + b), h = g * h' + (1 - g) * h_{t-1}.

    W starts at zero and b at logit(alpha), so a fresh gate is option B with that alpha; with
    ``learn_alpha: false`` the bias stays fixed and only the input-dependent part W learns.
    ``monitors()`` reports the mean gate of the last forward pass."""

    def __init__(self, alpha: float = 0.5, learn_alpha: bool = True, norm: bool = False, hidden_size: int = 0):
        super().__init__(norm, hidden_size)
        check_alpha(alpha, True)
        self.gate = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.gate.weight)
        bias = torch.full((hidden_size,), logit(alpha))
        if learn_alpha:
            self.gate_bias = nn.Parameter(bias)
        else:
            self.register_buffer("gate_bias", bias)
        self.register_buffer("last_gate_mean", torch.tensor(alpha), persistent=False)

    def forward(self, new, h0, prev, t):
        prev = prev.to(new.dtype)
        g = torch.sigmoid(self.gate(torch.cat([new, prev], dim=-1)) + self.gate_bias)
        with torch.no_grad():
            self.last_gate_mean.copy_(g.float().mean())
        g = g.to(new.dtype)
        return self.finish(g * new + (1.0 - g) * prev)

    @torch.no_grad()
    def monitors(self) -> dict[str, float]:
        return {"gate_mean": self.last_gate_mean.item(), "gate_bias_mean": torch.sigmoid(self.gate_bias).mean().item()}
