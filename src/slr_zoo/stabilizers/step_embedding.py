"""Timestep embeddings: tell the shared core which iteration it is running.

Every member maps a state ``h`` of shape [B, S, D] and the 1-based loop step ``t`` to a state of
the same shape; nothing depends on S, so the same module serves ``thoughts`` mode (S = 1: one
continuous thought at a time).

``mode: add`` adds e_t to the state; ``mode: concat`` appends e_t as extra channels and projects
[h, e_t] back to width D with a Linear initialised to [I | 0], so that a fresh module is the
identity on h. In ``add`` mode the embedding's last layer starts at zero for the same reason: a
freshly built step embedding never changes the backbone's function.

``noise_level`` (optional, ``noise_level: true`` in the recipe) is a second conditioning signal
for callers that corrupt the state on purpose, e.g. Huginn-style random initial states or
diffusion-style training that adds Gaussian noise of standard deviation sigma to ``h``: the caller
passes sigma (a float, or a tensor of shape [B] or [B, S]) and the embedding learns how to
treat a noisy state. sigma = 0 (or not passing it) means a clean state and contributes nothing.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
from torch import nn

from slr_zoo.registry import ArgumentError, Registry

NoiseLevel = Union[float, torch.Tensor, None]


class StepEmbedding(nn.Module):
    """``(h, t) -> h``: mark state ``h`` with the (1-based) loop step ``t``."""

    def __init__(self):  # an explicit signature, so recipes cannot pass stray keys to nn.Module's **kwargs
        super().__init__()

    def forward(self, h: torch.Tensor, t: int, noise_level: NoiseLevel = None) -> torch.Tensor:
        raise NotImplementedError


STEP_EMBEDDINGS = Registry("step_embedding", StepEmbedding, context=("hidden_size", "max_steps"))


@STEP_EMBEDDINGS.register("none")
class NoStepEmbedding(StepEmbedding):
    def forward(self, h, t, noise_level=None):
        return h


def noise_column(noise_level: NoiseLevel, h: torch.Tensor) -> torch.Tensor:
    """sigma as a [B|1, S|1, 1] column that broadcasts against ``h`` [B, S, D]."""
    sigma = torch.as_tensor(noise_level, dtype=torch.float32, device=h.device)
    if sigma.dim() == 0:
        return sigma.view(1, 1, 1)
    if sigma.dim() == 1:
        return sigma.view(-1, 1, 1)
    if sigma.dim() == 2:
        return sigma.unsqueeze(-1)
    raise ValueError(f"noise_level must be a float or a [B] / [B, S] tensor, got shape {tuple(sigma.shape)}")


class _ConditionedStep(StepEmbedding):
    """Shared plumbing of the table and sinusoidal members: add or concat+project."""

    def __init__(self, mode: str, dim: Optional[int], noise_level: bool, hidden_size: int):
        super().__init__()
        if mode not in ("add", "concat"):
            raise ArgumentError("mode", f"must be 'add' or 'concat', got {mode!r}")
        if mode == "add" and dim not in (None, hidden_size):
            raise ArgumentError("dim", f"applies to mode=concat only (add needs dim = hidden_size = {hidden_size})")
        self.mode = mode
        self.uses_noise = noise_level
        self.dim = hidden_size if mode == "add" else (dim or hidden_size)
        if mode == "concat":
            self.project = nn.Linear(hidden_size + self.dim, hidden_size)
            with torch.no_grad():
                self.project.weight.zero_()
                self.project.weight[:, :hidden_size].copy_(torch.eye(hidden_size))
                self.project.bias.zero_()

    def embedding(self, t: int, h: torch.Tensor, sigma: Optional[torch.Tensor]) -> torch.Tensor:
        """e_t, shaped [D_e] or (with a noise level) broadcastable to [B, S, D_e]."""
        raise NotImplementedError

    def forward(self, h, t, noise_level=None):
        sigma = noise_column(noise_level, h) if self.uses_noise and noise_level is not None else None
        e = self.embedding(t, h, sigma)
        if self.mode == "add":
            return h + e.to(h.dtype)
        e = e.to(h.dtype).expand(*h.shape[:-1], self.dim)
        return self.project(torch.cat([h, e], dim=-1)).to(h.dtype)


@STEP_EMBEDDINGS.register("learned")
class LearnedStepEmbedding(_ConditionedStep):
    """A table of ``max_steps`` vectors. Steps past the table reuse the last trained row, the
    only vector that has seen the deepest iterations.

    With ``noise_level`` the embedding is e_t + sigma * w for a learned vector w."""

    def __init__(
        self,
        mode: Literal["add", "concat"] = "add",
        dim: Optional[int] = None,
        noise_level: bool = False,
        init_std: float = 0.02,
        hidden_size: int = 0,
        max_steps: int = 1,
    ):
        super().__init__(mode, dim, noise_level, hidden_size)
        # add mode: zero rows keep a fresh model exact; concat: the [I | 0] projection already does
        std = 0.0 if mode == "add" else init_std
        self.table = nn.Parameter(torch.randn(max_steps, self.dim) * std)
        if noise_level:
            self.noise = nn.Parameter(torch.randn(self.dim) * std)

    def embedding(self, t, h, sigma):
        e = self.table[min(max(t, 1), self.table.size(0)) - 1]
        if self.uses_noise:  # sigma = 0 when not given: the parameter stays in the graph (DDP)
            e = e + (sigma if sigma is not None else e.new_zeros(1, 1, 1)) * self.noise
        return e


def sinusoidal_features(t: torch.Tensor, size: int, max_period: float = 10_000.0) -> torch.Tensor:
    """[cos(t w_k), sin(t w_k)] over geometrically spaced frequencies w_k (Vaswani et al. 2017;
    the diffusion timestep embedding of Ho et al. 2020). Defined for every real t, so it extends
    past the trained steps."""
    half = size // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[..., None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


@STEP_EMBEDDINGS.register("sinusoidal")
class SinusoidalStepEmbedding(_ConditionedStep):
    """Sinusoidal features of t through a 2-layer MLP (SiLU), as for diffusion timesteps.

    The features exist for any t, so steps past ``max_steps`` get a new (extrapolated) embedding;
    how well the MLP generalises there is an empirical question the ablations measure. With
    ``noise_level`` sigma enters the MLP as one extra input channel."""

    def __init__(
        self,
        mode: Literal["add", "concat"] = "add",
        dim: Optional[int] = None,
        noise_level: bool = False,
        features: int = 64,
        mlp_hidden: Optional[int] = None,
        max_period: float = 10_000.0,
        hidden_size: int = 0,
        max_steps: int = 1,
    ):
        super().__init__(mode, dim, noise_level, hidden_size)
        if features < 2 or features % 2:
            raise ArgumentError("features", f"must be an even number >= 2, got {features}")
        self.features, self.max_period = features, max_period
        width = mlp_hidden or self.dim
        self.mlp = nn.Sequential(nn.Linear(features + int(noise_level), width), nn.SiLU(), nn.Linear(width, self.dim))
        if mode == "add":  # zero output layer: e_t = 0 at init (the first layer trains once it moves)
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def embedding(self, t, h, sigma):
        x = sinusoidal_features(torch.tensor(float(t), device=h.device), self.features, self.max_period)
        if self.uses_noise:
            column = sigma if sigma is not None else x.new_zeros(1, 1, 1)
            x = torch.cat([x.expand(*column.shape[:-1], -1), column.to(x.dtype)], dim=-1)
        return self.mlp(x.to(self.mlp[0].weight.dtype))
