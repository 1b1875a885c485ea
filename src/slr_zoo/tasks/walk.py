"""Follow a pointer table from a start symbol to its root: a fixed-point variant of ``iterate``.

    question: "a c b c c c d e e e ? a"   (layout pairs: a->c, b->c, c->c, d->e, e->e; start a)
    steps:    ["a c"]
    answer:   "c"

The table holds ``chains`` walks of exactly k pointers, each ending at a root that points to
itself; the start is the far end of one of them, and the remaining symbols hang below random
chain nodes. k (the hop count) sets how many sequential lookups the answer needs. A model that
applies f once per loop iteration has the answer after k iterations, and further iterations
leave it unchanged (a fixed point), so a fixed ``loop.max_steps`` >= k needs no counting and
convergence-based halting has something real to detect. Layouts: ``pairs`` ("a c"), ``words``
(one word per entry, "ac") or ``table`` (f(a) f(b) ... in alphabetical order).

Measured: a 1+1+1-layer d=64 Llama stays at the 1/chains root-guessing plateau for 1000+ steps
in every layout (docs/tasks.md); it is here for longer runs and for halting research, not as the
quickstart default.
"""

from __future__ import annotations

import random
from typing import Literal

from slr_zoo.registry import ArgumentError
from slr_zoo.tasks.base import TASKS, Task


LETTERS = "abcdefghijklmnopqrstuvwxyz"


@TASKS.register("walk")
class WalkTask(Task):
    def __init__(
        self,
        n_train: int = 20000,
        n_val: int = 500,
        symbols: int = 24,
        chains: int = 3,
        hops: list[int] = [1, 6],  # noqa: B006  (recipes give lists; never mutated)
        layout: Literal["pairs", "words", "table"] = "pairs",
        seed: int = 0,
    ):
        if not 2 <= symbols <= len(LETTERS):
            raise ArgumentError("symbols", f"must be in [2, {len(LETTERS)}], got {symbols}")
        if len(hops) != 2 or not 1 <= hops[0] <= hops[1]:
            raise ArgumentError("hops", f"must be [min, max] with 1 <= min <= max, got {hops}")
        if chains < 1 or chains * (hops[1] + 1) > symbols:
            raise ValueError(
                f"task.chains * (max hops + 1) must fit in task.symbols, "
                f"got chains={chains}, hops={hops}, symbols={symbols}"
            )
        self.n = {"train": n_train, "val": n_val}
        self.symbols, self.chains, self.hops, self.layout, self.seed = symbols, chains, tuple(hops), layout, seed

    def records(self, split):
        # distinct, fixed streams per split; train and val never share a seed
        rng = random.Random(f"walk/{self.seed}/{split}")
        for _ in range(self.n[split]):
            yield self.make(rng)

    def make(self, rng: random.Random) -> dict:
        k = rng.randint(*self.hops)
        names = list(LETTERS[: self.symbols])
        rng.shuffle(names)
        # `chains` walks of exactly k pointers, each ending at a self-pointing root; chain 0 holds the start
        table, placed = {}, []
        for c in range(self.chains):
            walk = names[c * (k + 1) : (c + 1) * (k + 1)]
            for a, b in zip(walk, walk[1:] + walk[-1:]):
                table[a] = b
            placed += walk
        path = names[: k + 1]
        # the other symbols hang below any chain node, so no chain is told apart by its size
        for v in names[self.chains * (k + 1) :]:
            table[v] = rng.choice(placed)
            placed.append(v)
        if self.layout == "table":
            entries = " ".join(table[v] for v in LETTERS[: self.symbols])
        else:
            keys = list(table)
            rng.shuffle(keys)
            sep = " " if self.layout == "pairs" else ""
            entries = " ".join(f"{v}{sep}{table[v]}" for v in keys)
        steps = [f"{a} {b}" for a, b in zip(path, path[1:])]
        return {"question": f"{entries} ? {path[0]}", "steps": steps, "answer": path[-1], "hops": k}
