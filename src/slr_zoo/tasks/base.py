"""Tasks yield reasoning records in Coconut's format and score predicted answers.

A record is a dict with ``question`` (str), ``steps`` (list of str: the chain of thought) and
``answer`` (str), plus any structure fields of its own (``hops`` is used for per-hop metrics).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator

from slr_zoo.registry import Registry

Record = dict[str, Any]


class Task:
    """A source of train / val records. ``path_args`` name constructor arguments that are files,
    checked for existence when the recipe is validated."""

    path_args: tuple[str, ...] = ()

    def records(self, split: str) -> Iterable[Record]:
        """The records of ``split`` ("train" or "val"), in a fixed order for a fixed seed."""
        raise NotImplementedError

    def normalize(self, answer: str) -> str:
        """The canonical form two answers are compared in."""
        return re.sub(r"\s+", " ", answer.strip().rstrip(".")).lower()

    def score(self, predicted: str, record: Record) -> bool:
        return self.normalize(predicted) == self.normalize(str(record["answer"]))


TASKS = Registry("task", Task)


def check_record(record: Any, index: int, source: str = "") -> Record:
    """Raise a ValueError naming the record when it lacks the fields every task relies on."""
    where = f"record {index}" + (f" of {source}" if source else "")
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with question/steps/answer, got {type(record).__name__}")
    for key in ("question", "answer"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {record.get(key)!r}")
    steps = record.get("steps", [])
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise ValueError(f"{where}: field 'steps' must be a list of strings, got {steps!r}")
    return record


def take(records: Iterable[Record], n: int) -> Iterator[Record]:
    for i, record in enumerate(records):
        if i >= n:
            return
        yield record
