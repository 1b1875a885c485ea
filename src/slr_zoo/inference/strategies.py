"""What later tokens read where a token exited early.

Under a per-token halting policy a generated token may stop at iteration t < T. It then writes
no keys or values for iterations t+1..T, yet a later token running to iteration T attends to
every earlier position at each of its iterations. A cache strategy says what it finds there:

- ``latest`` (default; Huginn's default lookup, "latest-m4" in Geiping et al. 2025): the entries
  of the latest iteration that position reached. The exited token leaves the batch, so its
  iterations are really saved.
- ``frozen``: the exited token stays in the batch with its state frozen, as in the uncached loop,
  and writes every later iteration's entries from that frozen state. Generation then equals the
  uncached loop token for token (a decoding step costs the full depth; only the output is the
  early exit's), which makes it the reference the others are measured against.

Huginn also offers ``skip`` (later tokens do not attend to the missing entries at all) and
compressed caches that reuse a few iteration slots; neither is implemented here. A new strategy
subclasses :class:`CacheStrategy` and registers a name.
"""

from __future__ import annotations

import torch

from slr_zoo.backbones.cache import LoopKVCache
from slr_zoo.registry import Registry


class CacheStrategy:
    """``compact``: halted tokens leave the batch (their later iterations are not computed)."""

    compact: bool = True

    def after_pass(self, cache: LoopKVCache, reached: torch.Tensor, last: int, start: int, end: int) -> None:
        """After a pass over positions [start, end) in which row b ran iterations 1..reached[b]
        of ``last``: fill in what later tokens will read at the iterations it skipped."""


CACHE_STRATEGIES = Registry("cache_strategy", CacheStrategy)


@CACHE_STRATEGIES.register("latest")
class LatestIteration(CacheStrategy):
    def after_pass(self, cache, reached, last, start, end):
        if bool((reached < last).any()):
            cache.copy_forward(reached, last, start, end)


@CACHE_STRATEGIES.register("frozen")
class FrozenState(CacheStrategy):
    compact = False
