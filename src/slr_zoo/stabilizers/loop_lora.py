"""Loop-wise LoRA: a different low-rank adapter on the shared core at each iteration."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from slr_zoo.registry import Registry


class LoopLoRA(nn.Module):
    """Adapters on the core's linears, selected by the loop step.

    The loop enters ``at_step(t)`` around each core call; the adapter reads the step from there, so
    a recomputation under activation checkpointing (which re-enters the same closure) sees the
    right step too.
    """

    def __init__(self):
        super().__init__()
        self.step = 0

    @contextlib.contextmanager
    def at_step(self, t: int) -> Iterator[None]:
        previous, self.step = self.step, t
        try:
            yield
        finally:
            self.step = previous


LOOP_LORAS = Registry("loop_lora", LoopLoRA, context=("core", "max_steps", "hidden_size"))


@LOOP_LORAS.register("none")
class NoLoopLoRA(LoopLoRA):
    pass
