"""Tasks yield reasoning records in Coconut's format and score predicted answers.

A record is a dict with ``question`` (str), ``steps`` (list of str: the chain of thought) and
``answer`` (str), plus any structure fields of its own (``hops`` is used for per-hop metrics).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable

from slr_zoo.registry import Registry
from slr_zoo.tasks.scoring import EXTRACTORS

Record = dict[str, Any]


class Task:
    """A source of train / val records. ``path_args`` name constructor arguments that are files,
    checked for existence when the recipe is validated. ``answer_format`` picks the extractor in
    ``tasks/scoring.py`` that both the prediction and the gold answer go through before exact match."""

    path_args: tuple[str, ...] = ()
    answer_format: str = "text"

    def records(self, split: str) -> Iterable[Record]:
        """The records of ``split`` ("train" or "val"), in a fixed order for a fixed seed."""
        raise NotImplementedError

    def records_file(self, split: str) -> str | None:
        """The file ``split``'s records are read from; None when they are generated. Such a
        split is read whole before training, so ``records`` must name a broken record as it
        reads it (``json_file.read_records`` does), since any of them may be broken."""
        return None

    def normalize(self, answer: str) -> str:
        """The canonical form two answers are compared in."""
        return EXTRACTORS[self.answer_format](answer)

    def score(self, predicted: str, record: Record) -> bool:
        """Exact match after normalisation; a prediction from which nothing can be extracted is wrong."""
        gold = self.normalize(str(record["answer"]))
        return bool(gold) and self.normalize(predicted) == gold

    def step_answers(self, record: Record) -> list[str] | None:
        """The answer after each hop (the last is the answer), for ``loop.step_supervision``: loop
        iteration t is trained to predict entry min(t, hops). ``None``: the task has none."""
        return None

    def harder(self) -> "Task | None":
        """The task's harder generated split (``evaluate --ood``): longer chains and larger inputs
        than it trains on. ``None``: the task has none."""
        return None

    def reach_steps(self, record: Record) -> dict[str, int] | None:
        """For ``loop.reach_supervision``: the hop at which the reasoning reaches each word of the
        question it names (ProsQA: a concept's distance from the root; ``UNREACHED`` for one that
        is never reached). Every mention of such a word is labelled; other words are not.
        ``None``: the task has none."""
        return None


UNREACHED = 999  # a reach step beyond any loop depth (fits the int16 storage of encoded data)


def distances(children: list[list[int]], source: int) -> dict[int, int]:
    """Breadth-first hop counts from ``source`` over a graph given as each node's children: the
    reach steps of the graph tasks."""
    dist, queue = {source: 0}, deque([source])
    while queue:
        node = queue.popleft()
        for child in children[node]:
            if child not in dist:
                dist[child] = dist[node] + 1
                queue.append(child)
    return dist


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
    if "hops" in record and not (_is_int(record["hops"]) and record["hops"] >= 0):
        raise ValueError(f"{where}: field 'hops' must be a non-negative int, got {record['hops']!r}")
    if "edges" in record or "idx_to_symbol" in record:
        _check_graph(record, where)
    return record


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_graph(record: Record, where: str) -> None:
    """ProsQA structure: symbols, parent->child edges between them, and root/target/neg_target nodes."""
    symbols = record.get("idx_to_symbol")
    if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
        raise ValueError(f"{where}: field 'idx_to_symbol' must be a list of strings, got {symbols!r}")
    edges = record.get("edges")
    if not isinstance(edges, list):
        raise ValueError(f"{where}: field 'edges' must be a list of [parent, child] pairs, got {edges!r}")
    for edge in edges:
        if not (isinstance(edge, (list, tuple)) and len(edge) == 2 and all(_is_int(v) for v in edge)
                and all(0 <= v < len(symbols) for v in edge)):
            raise ValueError(f"{where}: edge {edge!r} is not a pair of node indices in [0, {len(symbols)})")
    for key in ("root", "target", "neg_target"):
        if key in record and not (_is_int(record[key]) and 0 <= record[key] < len(symbols)):
            raise ValueError(f"{where}: field {key!r} must be a node index in [0, {len(symbols)}), "
                             f"got {record[key]!r}")
