"""A user component that returns the wrong shape (the loop must name it, not fail deep inside)."""

from __future__ import annotations

from slr_zoo.stabilizers.combine import Combine


class HalfWidth(Combine):
    def forward(self, new, h0, prev, t):
        return new[..., : new.size(-1) // 2]
