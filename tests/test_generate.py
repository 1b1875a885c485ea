"""The ``generate`` command refuses what it cannot answer with: counts below one, a device this
machine does not have, and inference settings a thoughts-mode cell was not trained for, each named
and with exit status 2."""

from __future__ import annotations

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
