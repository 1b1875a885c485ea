"""A key/value cache for a looped model: one slot per (iteration, layer).

Hugging Face's caches are keyed by ``layer_idx``. A looped core calls the same layers once per
iteration, so under such a cache iteration 2 would append to (or overwrite) iteration 1's keys.
Here every slot is keyed by ``(iteration, layer_idx)``: the prelude and the coda write iteration 0,
the core's layers write iterations 1..T. The decoder layers themselves stay unmodified; each call
receives a :class:`CacheView`, a small object with Hugging Face's ``update(key, value, layer_idx)``
signature that routes the layer's keys to its slot for the current iteration.

Buffers are allocated once per slot at the full length of the generation ([B, heads, max_length,
head_dim], zero-filled so that a masked position can never inject a NaN into attention), and a
forward pass over positions [offset, offset + S) writes there in place. Every row of a
left-padded batch shares the same positions, so one ``length`` describes the whole cache.

Training through the cache (Coconut's multi-pass thoughts): with ``differentiable=True`` every
write makes a new tensor (the cached positions, then the new ones) instead of writing in place, so
the keys an earlier pass's attention saved for backward are never overwritten, and gradients flow
from later passes back through the cached keys and values into the passes that made them.

Rows: a forward pass on part of the batch (samples that halted early have left it) passes
``rows``, the cache rows its batch rows stand for; they write and read only those rows.
"""

from __future__ import annotations

from typing import Any

import torch

Slot = tuple[int, int]  # (iteration, layer_idx)


class LoopKVCache:
    """Keys and values of every (iteration, layer) a generation has run."""

    def __init__(self, batch_size: int, max_length: int, differentiable: bool = False):
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"a cache needs batch_size >= 1 and max_length >= 1, got {batch_size}, {max_length}")
        self.batch_size, self.max_length = batch_size, max_length
        self.keys: dict[Slot, torch.Tensor] = {}
        self.values: dict[Slot, torch.Tensor] = {}
        self.length = 0  # positions written so far (the next forward pass starts here)
        self.differentiable = differentiable

    def __repr__(self) -> str:
        iterations = sorted({t for t, _ in self.keys})
        return f"LoopKVCache(batch={self.batch_size}, length={self.length}/{self.max_length}, iterations={iterations})"

    def _buffers(self, slot: Slot, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if slot not in self.keys:
            shape = (self.batch_size, like.size(1), self.max_length, like.size(3))
            self.keys[slot] = like.new_zeros(shape)
            self.values[slot] = like.new_zeros(shape)
        return self.keys[slot], self.values[slot]

    def write(self, slot: Slot, key: torch.Tensor, value: torch.Tensor, offset: int,
              rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key``/``value`` [b, heads, S, head_dim] at positions [offset, offset + S) and
        return every position up to there: what the layer's attention reads."""
        end = offset + key.size(2)
        if end > self.max_length:
            raise ValueError(f"the cache holds {self.max_length} positions; writing up to {end}")
        if self.differentiable:
            if rows is not None:
                raise ValueError("a differentiable cache keeps the whole batch (no compaction)")
            if slot in self.keys:
                key = torch.cat([self.keys[slot][:, :, :offset], key], dim=2)
                value = torch.cat([self.values[slot][:, :, :offset], value], dim=2)
            self.keys[slot], self.values[slot] = key, value
            return key, value
        keys, values = self._buffers(slot, key)
        if rows is None:
            keys[:, :, offset:end] = key
            values[:, :, offset:end] = value
            return keys[:, :, :end], values[:, :, :end]
        keys[rows, :, offset:end] = key
        values[rows, :, offset:end] = value
        return keys[rows, :, :end], values[rows, :, :end]

    def view(self, iteration: int, offset: int, rows: torch.Tensor | None = None) -> "CacheView":
        return CacheView(self, iteration, offset, rows)

    def core_layers(self) -> list[int]:
        return sorted({layer for t, layer in self.keys if t >= 1})

    def copy_forward(self, reached: torch.Tensor, last: int, start: int, end: int) -> None:
        """Positions [start, end) of row b ran iterations 1..reached[b] only: give iterations
        reached[b]+1..last the entries of the latest iteration they reached (Huginn's default
        lookup for tokens that exited early)."""
        low = int(reached.min())
        for t in range(max(low, 1) + 1, last + 1):
            rows = (reached < t).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            for layer in self.core_layers():
                source = (t - 1, layer)
                if source not in self.keys:
                    continue
                keys, values = self._buffers((t, layer), self.keys[source])
                keys[rows, :, start:end] = self.keys[source][rows, :, start:end]
                values[rows, :, start:end] = self.values[source][rows, :, start:end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop every other row for good (sequences that have finished)."""
        for store in (self.keys, self.values):
            for slot, buffer in store.items():
                store[slot] = buffer.index_select(0, rows)
        self.batch_size = int(rows.numel())


class CacheView:
    """What a decoder layer receives as its ``cache``: Hugging Face's ``update`` signature,
    routed to the slot (``iteration``, ``layer_idx``) of a :class:`LoopKVCache`."""

    def __init__(self, cache: LoopKVCache, iteration: int, offset: int, rows: torch.Tensor | None):
        self.cache, self.iteration, self.offset, self.rows = cache, iteration, offset, rows

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.write((self.iteration, layer_idx), key_states, value_states, self.offset, self.rows)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.length

    def select(self, keep: torch.Tensor) -> "CacheView":
        rows = keep if self.rows is None else self.rows.index_select(0, keep)
        return CacheView(self.cache, self.iteration, self.offset, rows)

    def at_iteration(self, iteration: int) -> "CacheView":
        return CacheView(self.cache, iteration, self.offset, self.rows)
