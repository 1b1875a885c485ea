"""Inference: cached, batched generation with per-sample and per-token adaptive depth."""

from slr_zoo.inference.generation import Generated, ReplayHalting, generate_ids
from slr_zoo.inference.strategies import CACHE_STRATEGIES, CacheStrategy

__all__ = ["CACHE_STRATEGIES", "CacheStrategy", "Generated", "ReplayHalting", "generate_ids"]
