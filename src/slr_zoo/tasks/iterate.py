"""The built-in default task: iterate a permutation given as a lookup table.

    question: "3 7 1 0 9 2 8 5 4 6 ? 4 3"   (f(0)=3, f(1)=7, ...; start at 4; apply f 3 times)
    steps:    ["4 9", "9 4", "4 9"]          (each application)
    answer:   "9"

Each hop is one table lookup, so the number of hops ``k`` sets how much sequential computation
the answer needs: a model that applies f once per loop iteration needs k iterations. A
permutation (rather than an arbitrary map) keeps orbits from collapsing into short cycles where
the answer would stop depending on k.
"""

from __future__ import annotations

import random

from slr_zoo.registry import ArgumentError
from slr_zoo.tasks.base import TASKS, Task


@TASKS.register("iterate")
class IterateTask(Task):
    def __init__(
        self,
        n_train: int = 20000,
        n_val: int = 500,
        symbols: int = 10,
        hops: list[int] = [1, 6],  # noqa: B006  (recipes give lists; never mutated)
        seed: int = 0,
    ):
        if not 2 <= symbols <= 100:
            raise ArgumentError("symbols", f"must be in [2, 100], got {symbols}")
        if len(hops) != 2 or not 1 <= hops[0] <= hops[1]:
            raise ArgumentError("hops", f"must be [min, max] with 1 <= min <= max, got {hops}")
        self.n = {"train": n_train, "val": n_val}
        self.symbols, self.hops, self.seed = symbols, tuple(hops), seed

    def records(self, split):
        # distinct, fixed streams per split; train and val never share a seed
        rng = random.Random(f"iterate/{self.seed}/{split}")
        for _ in range(self.n[split]):
            yield self.make(rng)

    def make(self, rng: random.Random) -> dict:
        table = list(range(self.symbols))
        rng.shuffle(table)
        x = rng.randrange(self.symbols)
        k = rng.randint(*self.hops)
        steps, v = [], x
        for _ in range(k):
            steps.append(f"{v} {table[v]}")
            v = table[v]
        question = " ".join(map(str, table)) + f" ? {x} {k}"
        return {"question": question, "steps": steps, "answer": str(v), "hops": k}

    def step_answers(self, record):
        return [step.split()[1] for step in record["steps"]]  # "v f(v)": f^t(x) after hop t
