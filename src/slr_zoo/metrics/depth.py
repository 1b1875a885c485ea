"""How many loop iterations samples used: a histogram synchronised across DDP ranks."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class DepthHistogram(Metric):
    """Counts of samples by loop steps used, bins 1..max_steps (summed across ranks)."""

    full_state_update = False

    def __init__(self, max_steps: int, **kwargs):
        super().__init__(**kwargs)
        self.max_steps = max_steps
        self.add_state("counts", default=torch.zeros(max_steps, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, steps: torch.Tensor) -> None:
        steps = steps.clamp(1, self.max_steps).long() - 1
        self.counts += torch.bincount(steps.flatten(), minlength=self.max_steps)

    def compute(self) -> torch.Tensor:
        return self.counts
