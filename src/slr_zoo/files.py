"""Writing files so that a crash never leaves half of one behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside ``path``, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any, default=None) -> None:
    """``obj`` as indented JSON, written atomically; ``default`` as in ``json.dumps``."""
    atomic_write(path, json.dumps(obj, indent=2, default=default) + "\n")



def read_summary(path: Path) -> dict:
    """A cell's ``summary.json``: OSError when it is missing, a ValueError naming the file when it
    does not hold a JSON object (cut short by a crash, or edited by hand), so that a report or a
    grid evaluation can skip that cell and say why."""
    try:
        summary = json.loads(Path(path).read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path} holds {json.dumps(summary)[:60]}, not a cell's summary (a JSON object)")
    return summary


def summary_or_none(path: Path) -> dict | None:
    """``read_summary``, or None when the cell has no readable summary: for deciding whether a
    cell finished, where a damaged summary means it did not."""
    try:
        return read_summary(path)
    except (OSError, ValueError):
        return None


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists: where making ``path`` would start. A file
    there means ``path`` cannot be made a folder."""
    path = Path(path)
    for candidate in [path, *path.parents]:
        if os.path.lexists(candidate):  # a dangling link is in the way too
            return candidate
    return Path(".")


def cannot_make_folder(path: Path) -> str | None:
    """Why ``path`` cannot be made a folder (a file or a dangling link on its way, or a folder
    that is not writable), or None: checked before work whose output would have nowhere to go."""
    where = nearest_existing(path)
    if where.is_dir():
        return None if os.access(where, os.W_OK | os.X_OK) else f"{str(where)!r} is not writable"
    what = "a dangling link" if where.is_symlink() else "a file"
    return f"{str(where)!r} is {what}, where {str(path)!r} needs a folder"


def atomic_directory(out: Path, write) -> None:
    """``write(directory)`` into a new directory that becomes ``out`` only when it is complete: a
    failure halfway leaves ``out`` as it was (absent or empty)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        # mkdtemp's 0700, and writers that make their files private (safetensors' 0600), would hide
        # a shared export from its readers: the modes a plain new file and folder would get
        for path in tmp.rglob("*"):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        tmp.chmod(0o777 & ~umask)
        os.rename(tmp, out)  # refuses a target that is no longer empty
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
