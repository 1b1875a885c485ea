"""Timestep embeddings: tell the shared core which iteration it is running."""

from __future__ import annotations

import torch
from torch import nn

from slr_zoo.registry import Registry


class StepEmbedding(nn.Module):
    """``(h, t) -> h``: mark state ``h`` with the (1-based) loop step ``t``."""

    def forward(self, h: torch.Tensor, t: int) -> torch.Tensor:
        raise NotImplementedError


STEP_EMBEDDINGS = Registry("step_embedding", StepEmbedding, context=("hidden_size", "max_steps"))


@STEP_EMBEDDINGS.register("none")
class NoStepEmbedding(StepEmbedding):
    def forward(self, h, t):
        return h
