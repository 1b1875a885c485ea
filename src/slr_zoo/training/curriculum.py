"""Coconut's curriculum (``training.curriculum``): stage k replaces the first k written reasoning
steps with k·c continuous thoughts (or pause slots, or k·c more loop iterations in depth mode).

Stages advance every ``epochs_per_stage`` epochs of the training set (a fraction is allowed), up
to ``max_latent_stage``;
the stage is a pure function of the global batch index, so a resumed run lands in the stage it
left, and every rank trains the same stage. With ``uniform_prob`` a batch is drawn at a uniformly
random stage in [0, max_latent_stage] instead (Coconut mixes per example; here one batch holds one
stage, so that a thoughts pass runs over aligned columns and a depth-mode batch has one depth).
"""

from __future__ import annotations

import torch

from slr_zoo.training.settings import CurriculumConfig


class StageSchedule:
    def __init__(self, config: CurriculumConfig, batches_per_epoch: int, seed: int = 0):
        self.config, self.seed = config, seed
        # a fraction of an epoch suits a large generated set; a stage lasts at least one batch
        epochs = config.epochs_per_stage
        self.batches_per_stage = max(1, round(epochs * batches_per_epoch)) if epochs > 0 else 0

    @property
    def final(self) -> int:
        return self.config.max_latent_stage

    def scheduled(self, batch: int) -> int:
        """The stage of global batch ``batch`` (the final one from the start without a curriculum)."""
        if self.batches_per_stage == 0:
            return self.final
        return min(batch // self.batches_per_stage, self.final)

    def stage(self, batch: int) -> int:
        """The stage batch ``batch`` is encoded at: the scheduled one, or a uniform draw."""
        p = self.config.uniform_prob
        if p > 0:
            generator = torch.Generator().manual_seed((self.seed * 1_000_033 + batch * 7_717 + 17) % 2**63)
            if float(torch.rand((), generator=generator)) < p:
                return int(torch.randint(0, self.final + 1, (), generator=generator))
        return self.scheduled(batch)


class StagedBatchSampler(torch.utils.data.Sampler):
    """A batch sampler's batches as ``[(index, stage, scheduled stage), ...]``: what a staged
    dataset encodes each example at. ``sampler.position`` counts global batches."""

    def __init__(self, sampler, schedule: StageSchedule):
        self.sampler, self.schedule = sampler, schedule

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for batch in self.sampler:
            index = self.sampler.position - 1
            stage, scheduled = self.schedule.stage(index), self.schedule.scheduled(index)
            yield [(i, stage, scheduled) for i in batch]
