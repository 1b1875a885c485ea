"""The ``generate`` command refuses what it cannot answer with: counts below one, a device this
machine does not have, and inference settings a thoughts-mode cell was not trained for, each named
and with exit status 2."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.parametrize("option, value", [("--steps", "0"), ("--max-new-tokens", "0"), ("--top-k", "-1")])
def test_a_count_below_one_is_refused_by_its_option_name(option, value, tmp_path, capsys):
    from slr_zoo import generate

    with pytest.raises(SystemExit) as exit_:
        generate.main([str(tmp_path), "--prompt", "1 2 ?", option, value])
    assert exit_.value.code == 2
    assert f"argument {option}: must be an integer >= 1, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [
    ("tpu", r"argument --device: 'tpu' is not a torch device"),
    ("meta", r"argument --device: 'meta' tensors hold no values"),
    pytest.param("cuda", r"argument --device: 'cuda': CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_a_device_this_machine_cannot_use_is_refused_by_name(device, message, tmp_path, capsys):
    import re

    from slr_zoo import generate

    with pytest.raises(SystemExit) as exit_:
        generate.main([str(tmp_path), "--prompt", "1 2 ?", "--device", device])
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.fixture(scope="module")
def thoughts_cell(tmp_path_factory):
    """A tiny Coconut cell: every thought made in two loop iterations, trained for two steps."""
    import yaml

    from slr_zoo import fit

    out = tmp_path_factory.mktemp("thoughts")
    recipe = {"name": "th", "task": {"name": "iterate", "n_train": 32, "n_val": 4, "hops": [1, 3]},
              "backbone": {"name": "gpt2", "hidden_size": 32, "heads": 2, "prelude_layers": 1, "core_layers": 1,
                           "coda_layers": 0},
              "loop": {"mode": "thoughts", "max_steps": 2},
              "training": {"encoding": "latent", "curriculum": {"max_latent_stage": 1}},
              "trainer": {"max_steps": 2, "batch_size": 8, "progress_bar": False, "threads": 1}}
    (out / "th.yaml").write_text(yaml.safe_dump(recipe))
    assert fit.main([str(out / "th.yaml"), f"output_dir={out}"]) == 0
    return out / "th" / "default"


def test_a_thoughts_cell_refuses_a_halting_policy_and_a_depth_it_was_not_trained_with(thoughts_cell, capsys):
    """Pass i of a thoughts cell reads stabiliser indices i·T + 1 .. i·T + T: at --steps 1 its
    thought 1 would read the prompt pass's second iteration, and fit allows no halting but fixed."""
    from slr_zoo import evaluate, generate

    question = "1 2 ?"
    assert generate.main([str(thoughts_cell), "--prompt", question, "--halting", "kl"]) == 2
    assert "--halting kl: a loop.mode: thoughts cell runs every thought at its trained depth" in capsys.readouterr().err
    assert generate.main([str(thoughts_cell), "--prompt", question, "--steps", "1"]) == 2
    assert "--steps 1: a loop.mode: thoughts cell makes every thought in its trained 2 iterations" \
        in capsys.readouterr().err
    assert evaluate.main([str(thoughts_cell), "--steps", "1", "2", "--show", "0"]) == 2
    assert "--steps 1: a loop.mode: thoughts cell" in capsys.readouterr().err
    # what it was trained with still answers, and evaluate's default is the trained depth alone
    for extra in ([], ["--steps", "2", "--halting", "fixed"]):
        assert generate.main([str(thoughts_cell), "--prompt", question, "--max-new-tokens", "2", *extra]) == 0
    assert evaluate.main([str(thoughts_cell), "--show", "0"]) == 0
    report = json.loads((thoughts_cell / "eval.json").read_text())
    assert [row["steps"] for row in report["by_depth"]] == [2]
    assert len(report["stability"]["delta"]) == 2  # the prompt pass's own iterations, none of thought 1's
