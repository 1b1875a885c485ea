"""The user-defined policy of examples/entropy_halting.py, named by import path in a recipe and run
through ``python -m slr_zoo.fit`` from outside the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

RECIPE = """
name: entropy_example
seed: 0
task: {name: iterate, n_train: 64, n_val: 24, hops: [1, 3]}
backbone: {name: llama, hidden_size: 32, heads: 2, prelude_layers: 1, core_layers: 1, coda_layers: 1}
loop:
  max_steps: 4
  halting: {_component_: entropy_halting.EntropyHalting, max_entropy: 100.0, min_steps: 2}
decoder: {name: coda}
optim: {lr: 1.0e-3, warmup_steps: 1}
trainer: {max_steps: 3, batch_size: 8, progress_bar: false, log_every: 1, threads: 1}
"""


def test_entropy_halting_example_runs_through_fit(tmp_path):
    recipe = tmp_path / "entropy.yaml"
    recipe.write_text(RECIPE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "examples"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "slr_zoo.fit", str(recipe), f"output_dir={tmp_path / 'runs'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    cell = tmp_path / "runs" / "entropy_example" / "default"
    summary = json.loads((cell / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["train_steps"] == 3
    # every token is below an entropy of 100 nats, so the policy's own min_steps decides: 2 of 4
    assert summary["mean_steps"] == 2.0
    config = yaml.safe_load((cell / "config.yaml").read_text())
    assert config["loop"]["halting"]["_component_"] == "entropy_halting.EntropyHalting"


def test_the_example_is_not_importable_without_its_path(tmp_path):
    """The recipe names a module outside the package: without examples/ on the path, validation
    stops with the node's key before anything trains."""
    recipe = tmp_path / "entropy.yaml"
    recipe.write_text(RECIPE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-m", "slr_zoo.fit", str(recipe), f"output_dir={tmp_path / 'runs'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2
    assert "loop.halting._component_" in done.stderr and "entropy_halting" in done.stderr
