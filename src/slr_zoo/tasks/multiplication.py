"""Multi-digit multiplication with partial products as the chain of thought (the 4x4 and 5x5
tasks of implicit chain of thought, Deng et al. 2023, "Implicit Chain of Thought Reasoning via
Knowledge Distillation").

Numbers are written one digit per token, **least significant digit first** by default (as iCoT
does): generating the product from its lowest digit lets each carry be computed before the digit it
feeds, which is the order a person adds in. ``order: msd`` writes them the usual way round.
Digits are separated by spaces, which a word-level tokenizer needs; ``separator: ""`` writes them
together, for a pretrained tokenizer that splits numbers into digits itself (Llama 3, SmolLM2,
Qwen2), where a space would be a token of its own before every digit.

    2365 x 4347, lsd:
    question: "5 6 3 2 * 7 4 3 4"
    steps:    ["5 5 5 6 1",                          # 2365 * 7 = 16555
               "0 0 6 4 9 ( 5 5 1 1 1 1 )",          # 2365 * 40 = 94600 ( running sum 111155 )
               "0 0 5 9 0 7 ( 5 5 6 0 2 8 )",        # 2365 * 300 = 709500 ( 820655 )
               "0 0 0 0 6 4 9 ( 5 5 6 0 8 2 0 1 )"]  # 2365 * 4000 = 9460000 ( 10280655 )
    answer:   "5 5 6 0 8 2 0 1"

One step per digit of the second factor, so ``hops`` equals its number of digits. For step
supervision, hop t's answer is that running sum, a * (b mod 10^t), written with as many digits as
the product (zeros in front): its lowest t digits are already the product's.
"""

from __future__ import annotations

import functools
import random
from typing import Literal

from slr_zoo.registry import ArgumentError
from slr_zoo.tasks.base import TASKS, Record, Task


def spaced(text: str, order: str, separator: str = " ") -> str:
    """A decimal string one digit per token, lowest digit first for ``lsd``."""
    return separator.join(reversed(text) if order == "lsd" else text)


def generate(rng: random.Random, sizes: tuple[int, int] = (4, 4), order: str = "lsd",
             separator: str = " ") -> Record:
    spaced_ = functools.partial(spaced, order=order, separator=separator)
    d = rng.randint(*sizes)
    a, b = (rng.randint(10 ** (d - 1), 10 ** d - 1) for _ in range(2))
    steps, total = [], 0
    for j, digit in enumerate(reversed(str(b))):  # from the lowest digit of b
        total += a * int(digit) * 10**j
        partial = spaced_(str(a * int(digit)) + "0" * j)  # shifted by j places
        steps.append(partial if j == 0 else f"{partial} ( {spaced_(str(total))} )")
    return {
        "question": f"{spaced_(str(a))} * {spaced_(str(b))}",
        "steps": steps,
        "answer": spaced_(str(a * b)),
        "a": a,
        "b": b,
        "hops": d,
    }


@TASKS.register("multiplication")
class MultiplicationTask(Task):
    """``digits: [4, 4]`` is iCoT's 4x4 task, ``[5, 5]`` its 5x5; ``[4, 5]`` mixes both."""

    answer_format = "digits"

    def __init__(
        self,
        n_train: int = 20000,
        n_val: int = 500,
        digits: list[int] = [4, 4],  # noqa: B006  (recipes give lists; never mutated)
        order: Literal["lsd", "msd"] = "lsd",
        separator: Literal[" ", ""] = " ",
        seed: int = 0,
    ):
        if len(digits) != 2 or not 1 <= digits[0] <= digits[1] <= 20:
            raise ArgumentError("digits", f"must be [min, max] with 1 <= min <= max <= 20, got {digits}")
        self.n = {"train": n_train, "val": n_val}
        self.sizes, self.order, self.separator, self.seed = tuple(digits), order, separator, seed

    def records(self, split):
        rng = random.Random(f"multiplication/{self.seed}/{split}")
        for _ in range(self.n[split]):
            yield generate(rng, self.sizes, self.order, self.separator)

    def step_answers(self, record):
        """The running sum after each digit of b, padded to the product's length so that every
        hop's answer is as many tokens as the answer: [a * (b mod 10), a * (b mod 100), ..., a * b]."""
        if "a" not in record or "b" not in record:
            return None
        a, b = int(record["a"]), int(record["b"])
        width = len(str(a * b))
        return [spaced(str(a * (b % 10 ** t)).zfill(width), self.order, self.separator)
                for t in range(1, len(str(b)) + 1)]

    def normalize(self, answer: str) -> str:
        """The product as a number written the usual way, whatever the digit order."""
        found = super().normalize(answer)
        return found[::-1] if self.order == "lsd" else found
