"""``python -m slr_zoo.testing``: the tiny stand-in checkpoints land where the command line names
them, and what it cannot write is refused by name before anything is written."""

from __future__ import annotations

import pytest

from slr_zoo.testing import main


def test_a_gguf_path_names_the_file_and_the_directory_goes_beside_it(tmp_path):
    assert main([str(tmp_path / "tiny.gguf"), "--gguf", "--layers", "3"]) == 0
    assert (tmp_path / "tiny.gguf").is_file() and (tmp_path / "tiny" / "config.json").is_file()
    with (tmp_path / "tiny.gguf").open("rb") as f:
        assert f.read(4) == b"GGUF"


@pytest.mark.parametrize("args, message", [
    (["x.gguf"], r"x\.gguf ends in \.gguf: add --gguf"),
    (["q", "--family", "qwen2", "--gguf"], r"--gguf writes llama\.cpp's llama layout only; use --family llama"),
    (["taken", "--gguf"], r"taken\.gguf is a directory"),
    (["a_file"], r"a_file is a file; give a directory"),
    (["x", "--layers", "0"], r"argument --layers: must be an integer >= 1"),
])
def test_what_cannot_be_written_is_refused_before_anything_is(args, message, tmp_path, monkeypatch, capsys):
    import re

    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken.gguf").mkdir()
    (tmp_path / "a_file").write_text("")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
