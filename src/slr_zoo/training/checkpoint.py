"""Checkpoints that a crash cannot half-write, and a clear error when one cannot be resumed from.

:func:`atomic_torch_save` writes beside the target, fsyncs, and renames, so ``last.ckpt`` is always
either the previous checkpoint or the new one (``trainer.AtomicCheckpointIO`` puts Lightning's
checkpoints through it). This module does not import Lightning: ``fit`` reads finished runs with it
before deciding to train, and a refused recipe should not wait for Lightning to load.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slr_zoo.files import summary_or_none

TMP_MARK = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be resumed from; the message names the file."""


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); harmless where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_finished(directory: Path) -> None:
    """A finished cell's checkpoint is the one its summary names (``checkpoint_sha256``); raise
    CheckpointError, saying what to do, when it was cut short or replaced since."""
    directory = Path(directory)
    expected = (summary_or_none(directory / "summary.json") or {}).get("checkpoint_sha256")
    last = directory / "checkpoints" / "last.ckpt"
    if expected is None:
        return
    if not last.is_file():
        raise CheckpointError(f"{last} of this finished run is missing; train the cell again with --rerun")
    if sha256_of(last) != expected:
        raise CheckpointError(f"{last} does not match the checkpoint this finished run wrote (its checksum differs: "
                              "truncated or overwritten); train the cell again with --rerun")


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Temporary files left by a process killed mid-save; never a valid checkpoint."""
    stale = [p for p in Path(directory).glob(f".*{TMP_MARK}*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def check_resumable(path: Path, module: nn.Module) -> dict[str, Any]:
    """Read ``path`` and compare its weights with ``module``'s before Lightning touches either.

    Returns the checkpoint's training position (``global_step``, ``epoch``). Raises
    :class:`CheckpointError` naming the file when it is unreadable, is not a Lightning checkpoint,
    or holds weights of another model (missing, unexpected or reshaped tensors), which happens
    when a recipe changed under a run directory that still holds the old run's checkpoint.
    """
    path = Path(path)
    advice = (f"delete {path} (or move it away) to train this cell from scratch, "
              "or restore the recipe the checkpoint was written with")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); {advice}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (no 'state_dict'); {advice}")
    saved = checkpoint["state_dict"]
    wanted = module.checkpoint_keys() if hasattr(module, "checkpoint_keys") else None
    expected = {k: v for k, v in module.state_dict().items() if wanted is None or k in wanted}
    base = getattr(module, "base_fingerprint", None)
    if checkpoint.get("base_fingerprint", base) != base:
        raise CheckpointError(
            f"checkpoint {path} was trained on another base model (fingerprint {checkpoint['base_fingerprint']}; "
            f"backbone.pretrained now has {base}); point backbone.pretrained at the checkpoint it was trained on, "
            "or train this cell from scratch with --rerun")
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    reshaped = [f"{k}: {tuple(saved[k].shape)} in the file, {tuple(v.shape)} in the model"
                for k, v in expected.items()
                if k in saved and torch.is_tensor(v) and tuple(saved[k].shape) != tuple(v.shape)]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("different shape", reshaped)):
        if names:
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit this recipe's model ({'; '.join(problems)}); {advice}")
    return {"global_step": int(checkpoint.get("global_step", 0)), "epoch": int(checkpoint.get("epoch", 0))}


def resume_point(directory: Path, module: nn.Module) -> Path | None:
    """The checkpoint a cell resumes from: the furthest-trained of ``checkpoints/last.ckpt`` and
    the ``hpc_ckpt_N.ckpt`` Lightning writes into the cell directory when SLURM signals a
    preemption (``--signal=SIGUSR1@90``). Every candidate is checked with :func:`check_resumable`."""
    directory = Path(directory)
    candidates = [directory / "checkpoints" / "last.ckpt", *directory.glob("hpc_ckpt_*.ckpt")]
    steps = {path: check_resumable(path, module)["global_step"] for path in candidates if path.is_file()}
    return max(steps, key=lambda path: (steps[path], path.name != "last.ckpt")) if steps else None
