"""A grid that is killed, again and again, at random moments, whose checkpoint is corrupted and
whose disk fills up, ends exactly as the same grid run straight through, and never claims a cell
it has not finished."""

from __future__ import annotations

import csv
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.timeout(1200)

GRID = {
    "name": "faults", "task": {"name": "iterate", "n_train": 128, "n_val": 16, "hops": [1, 2]},
    "backbone": {"name": "gpt2", "hidden_size": 32, "heads": 2, "prelude_layers": 1, "core_layers": 1,
                 "coda_layers": 0, "dropout": 0.1},
    "decoder": {"name": "linear"}, "loop": {"max_steps": 2, "loop_lora": {"name": "per_step", "rank": 2}},
    "optim": {"warmup_steps": 2},
    "trainer": {"max_steps": 40, "batch_size": 8, "checkpoint_every": 3, "progress_bar": False, "threads": 1},
    "grid": {"seed": [0, 1]},
}


def fit(recipe: Path, out: Path, limit_bytes: int | None = None) -> subprocess.Popen:
    def limited():
        if limit_bytes is not None:  # a full disk: writes past the limit fail with EFBIG
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.Popen([sys.executable, "-m", "slr_zoo.fit", str(recipe), f"output_dir={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limited)


def progress(out: Path) -> int:
    """Training steps recorded so far, over every cell of the grid."""
    steps = 0
    for curve in (out / "faults").glob("*/train_curve.csv"):
        try:
            steps += max(0, len(curve.read_text().splitlines()) - 1)
        except OSError:
            pass
    return steps


def claims(out: Path) -> dict[str, dict]:
    """Every cell a summary.json calls finished."""
    found = {}
    for path in (out / "faults").glob("*/summary.json"):
        summary = json.loads(path.read_text())
        if summary["status"] == "ok":
            found[path.parent.name] = summary
    return found


def assert_honest(out: Path) -> None:
    for cell, summary in claims(out).items():
        assert summary["train_steps"] == GRID["trainer"]["max_steps"], cell
        state = torch.load(out / "faults" / cell / "checkpoints" / "last.ckpt", weights_only=False)
        assert state["global_step"] == GRID["trainer"]["max_steps"], cell


def table(out: Path) -> list[dict]:
    with (out / "faults" / "results.csv").open() as f:
        return [{k: v for k, v in row.items() if k not in ("train_seconds", "seconds_per_example", "checkpoint_sha256")}
                for row in csv.DictReader(f)]


def weights(out: Path, cell: str) -> dict:
    return torch.load(out / "faults" / cell / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def test_a_grid_killed_corrupted_and_starved_of_disk_ends_as_one_run_straight_through(tmp_path):
    recipe = tmp_path / "grid.yaml"
    recipe.write_text(yaml.safe_dump(GRID))
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    done = fit(recipe, straight)
    assert done.wait(600) == 0, done.stderr.read()[-3000:]

    # SIGKILL five times in a row, each at a random training step of the grid (both cells' steps
    # counted together), so that kills land mid-cell, between checkpoints and at cell boundaries
    total = 2 * GRID["trainer"]["max_steps"]
    targets = sorted(random.Random(0).sample(range(2, total - 1), 5))
    kills = 0
    for target in targets:
        process = fit(recipe, broken)
        while process.poll() is None and progress(broken) < target:
            time.sleep(0.002)
        if process.poll() is not None:
            break
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        kills += 1
        assert_honest(broken)
    assert kills == 5, "the grid finished before it could be killed five times"

    # a torn checkpoint of an unfinished cell is refused with what to do; doing it, the grid goes on
    unfinished = [p for p in (broken / "faults").iterdir() if p.is_dir() and not p.name.startswith(".")
                  and p.name not in claims(broken) and (p / "checkpoints" / "last.ckpt").exists()]
    if unfinished:
        last = unfinished[0] / "checkpoints" / "last.ckpt"
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
        process = fit(recipe, broken)
        assert process.wait(600) == 1
        message = process.stderr.read()
        assert "is unreadable" in message and f"delete {last}" in message and "Traceback" not in message
        last.unlink()
        assert_honest(broken)

    # a full disk: writes fail part way; nothing claims a cell it did not finish
    process = fit(recipe, broken, limit_bytes=20_000)
    process.wait(600)
    assert_honest(broken)

    process = fit(recipe, broken)
    assert process.wait(600) == 0, process.stderr.read()[-3000:]
    assert_honest(broken)
    assert table(broken) == table(straight)
    for cell in ("seed=0", "seed=1"):
        a, b = weights(straight, cell), weights(broken, cell)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), cell
