"""Coconut-format files read unchanged: GSM8k, ProntoQA and ProsQA as published.

A file is a JSON list of records (parsed whole; fine up to ~100 MB) or JSON Lines, one record per
line (streamed, for larger files). Published files store some structure fields as Python-literal
strings (ProsQA's ``edges`` is sometimes ``"[[0, 2], [1, 3]]"``); those fields are parsed with
``ast.literal_eval``. Numeric answers become strings. Records without ``hops`` get
``len(steps)``, which for ProsQA is the shortest-path length. A malformed record stops the run with
its index, the file and the reason.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Iterator, Literal

from slr_zoo.tasks.base import TASKS, Record, Task, check_record
from slr_zoo.tasks.scoring import EXTRACTORS, guess_format

LITERAL_FIELDS = ("edges", "idx_to_symbol", "root", "target", "neg_target", "hops")


def _raw_records(path: Path) -> Iterator[object]:
    with path.open(encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from None
            if not data:
                raise ValueError(f"{path} holds no records (an empty list)")
            yield from data
            return
        found = False
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    whole = _whole_file(path) if not found and head.startswith("{") else None
                    if isinstance(whole, dict):  # one object spread over lines
                        raise _object_error(path, _records_key(whole)) from None
                    raise ValueError(f"{path} line {line_no}: not valid JSON ({err})") from None
                if not found and _records_key(value):
                    raise _object_error(path, _records_key(value))
                yield value
                found = True
        if not found:
            raise ValueError(f"{path} holds no records (the file is empty)")


def _records_key(value: object) -> str | None:
    """The key of an object that holds the records rather than being one (``{"records": [...]}``,
    as some exports wrap them): a field without a question whose value is a list of objects."""
    if isinstance(value, dict) and "question" not in value:
        return next((key for key, v in value.items()
                     if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)), None)
    return None


def _whole_file(path: Path) -> object:
    """The file parsed whole, or None: read only when its first line is not JSON, to tell a
    pretty-printed object from a broken JSON Lines file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def _object_error(path: Path, key: str | None) -> ValueError:
    where = f" with its records under {key!r}" if key else ""
    return ValueError(f"{path} holds a JSON object{where}; a records file is a JSON list of records, or JSON "
                      "Lines with one record per line")


def clean_record(raw: object, index: int, source: str, literal_fields=LITERAL_FIELDS) -> Record:
    """Parse literal-string fields, stringify numeric answers, default ``hops``; then check."""
    where = f"record {index} of {source}"
    if not isinstance(raw, dict):
        check_record(raw, index, source)  # raises with the type it got
    record = dict(raw)
    for key in literal_fields:
        value = record.get(key)
        if isinstance(value, str):
            try:
                record[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
                # literal_eval's ValueError shows a parse-tree node (<ast.Name object at 0x...>), not the text
                why = f" ({err.msg})" if isinstance(err, SyntaxError) else ""
                raise ValueError(f"{where}: field {key!r} is not a Python literal{why}: {value[:80]!r}") from None
    answer = record.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        record["answer"] = str(answer)
    if "hops" not in record and isinstance(record.get("steps", []), list):
        record["hops"] = len(record.get("steps", []))
    return check_record(record, index, source)


def read_records(path: str | Path, literal_fields=LITERAL_FIELDS) -> Iterator[Record]:
    """The checked records of a Coconut-format file, in file order."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a records file (a JSON list of records, or JSON Lines)")
    if not path.is_file():
        raise FileNotFoundError(f"no such records file: {path}")
    for i, raw in enumerate(_raw_records(path)):
        yield clean_record(raw, i, str(path), literal_fields)


@TASKS.register("json")
class JsonTask(Task):
    """Train and val records from Coconut-format files.

    ``answer_format: auto`` picks the extractor from each gold answer: True/False -> boolean,
    space-separated digits -> digits, a number -> number (GSM8k: the number after "####", else the
    last number of the prediction), anything else -> normalised text (ProsQA's sentences).
    """

    path_args = ("train", "val")

    def __init__(
        self,
        train: str,
        val: str,
        answer_format: Literal["auto", "text", "number", "boolean", "digits"] = "auto",
        literal_fields: list[str] = list(LITERAL_FIELDS),  # noqa: B006  (never mutated)
    ):
        self.files = {"train": train, "val": val}
        self.answer_format = answer_format
        self.literal_fields = tuple(literal_fields)

    def records_file(self, split):
        return self.files[split]

    def records(self, split):
        return read_records(self.files[split], self.literal_fields)

    def _format(self, gold: str) -> str:
        return guess_format(gold) if self.answer_format == "auto" else self.answer_format

    def normalize(self, answer: str) -> str:
        """In ``auto`` mode the format is guessed from ``answer`` itself: meant for gold answers."""
        return EXTRACTORS[self._format(answer)](answer)

    def score(self, predicted: str, record: Record) -> bool:
        extract = EXTRACTORS[self._format(str(record["answer"]))]
        gold = extract(str(record["answer"]))
        return bool(gold) and extract(predicted) == gold
