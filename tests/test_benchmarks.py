"""The benchmarks' shared contract: each takes ``--json PATH`` and writes its figures there, whole or
not at all."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from slr_zoo.files import write_json

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if '__name__ == "__main__"' in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_every_benchmark_takes_a_json_path(script, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # benchmarks import their shared helpers
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0 and "--json" in capsys.readouterr().out


def test_figures_are_written_into_a_new_folder_and_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "not" / "yet" / "figures.json"
    write_json(path, {"ratio": 0.5})
    assert json.loads(path.read_text()) == {"ratio": 0.5}
    with pytest.raises(TypeError):
        write_json(path, {"ratio": object()})
    assert json.loads(path.read_text()) == {"ratio": 0.5}
    assert [p.name for p in path.parent.iterdir()] == ["figures.json"]  # no temporary file left behind
    write_json(path, {"device": sys.platform, "when": Path("x")}, default=str)
    assert json.loads(path.read_text())["when"] == "x"


def _answer_cost(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import answer_cost

    return answer_cost


@pytest.mark.parametrize("option, value", [("--limit", "0"), ("--limit", "-1"), ("--rounds", "0"),
                                           ("--batch-size", "0"), ("--threads", "0")])
def test_answer_cost_refuses_a_count_below_one_by_its_option_name(option, value, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_:
        _answer_cost(monkeypatch).main([str(tmp_path), str(tmp_path), option, value])
    assert exit_.value.code == 2
    assert f"argument {option}: must be an integer >= 1, got '{value}'" in capsys.readouterr().err


def test_answer_cost_names_a_folder_that_is_not_a_trained_cell(tmp_path, capsys, monkeypatch):
    (tmp_path / "grid" / "seed=0").mkdir(parents=True)  # a grid's folder, not one of its cells
    assert _answer_cost(monkeypatch).main([str(tmp_path / "grid"), str(tmp_path / "nothing")]) == 2
    assert f"answer_cost: {tmp_path / 'grid'} is not a cell directory (no config.yaml)" in capsys.readouterr().err


def test_the_memory_benchmark_writes_its_ratio_and_truncated_backprop_keeps_depth_free(tmp_path):
    """benchmarks/memory.py at a tiny size: T = 32 with backprop_steps = 4 costs what T = 4 does,
    and full backprop through 32 iterations does not (what makes the first ratio mean something)."""
    import subprocess

    path = tmp_path / "memory.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--hidden", "32", "--core", "1",
                    "--batch", "2", "--seq", "8", "--json", str(path)], check=True, capture_output=True)
    figures = json.loads(path.read_text())
    assert figures["ratio_T32_over_T4"] <= 1.2
    assert figures["ratio_T32_full_over_T4"] > 1.5
