"""Every ``python -m slr_zoo.fit`` command the README and docs/ show is a command a reader will
paste: each must pass everything ``fit`` checks before training, as written. A renamed key, a
removed recipe or a changed default then fails here, not in a reader's terminal.

Commands with a placeholder (``<run dir>``, ``seed=S``, ``--cell I``) cannot run as written and
are left out; so are the shell's ``$VAR``s a block does not define."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from conftest import stand_ins
from slr_zoo import fit

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = "python -m slr_zoo.fit "
# a value a reader fills in: <anything>, or a lone capital letter (seed=S, --cell I, encoding=E)
PLACEHOLDER = re.compile(r"<[^>]*>|(?:=|--cell\s+)[A-Z]\b|\$")


def _block_commands(code: str) -> list[str]:
    """The fit commands of a shell block, its continuations joined and its ``VAR=...`` expanded."""
    found, variables = [], {}
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True) if line.count('"') % 2 == 0 and line.count("'") % 2 == 0 else []
        assignment = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", words[0]) if len(words) == 1 else None
        if assignment:
            variables[assignment[1]] = assignment[2]
            continue
        for name, value in variables.items():
            line = line.replace("${" + name + "}", value).replace("$" + name, value)
        if COMMAND in line:  # with any NAME=value the shell line sets for it (PYTHONPATH=examples)
            found.append(line[line.index(COMMAND):] if "=" not in line.split(COMMAND)[0] else line.strip())
    return found


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every fit command in a code block or inline code span of the docs."""
    commands = []
    for path in DOCUMENTS:
        for token in MarkdownIt().parse(path.read_text()):
            where = f"{path.name}:{token.map[0] + 1}" if token.map else path.name
            if token.type in ("fence", "code_block"):
                commands += [(where, c) for c in _block_commands(token.content)]
            for child in token.children or []:
                if child.type == "code_inline" and COMMAND in child.content:
                    commands.append((where, child.content[child.content.index(COMMAND):]))
    unique = {}
    for where, command in commands:
        unique.setdefault(" ".join(command.split()), where)
    return [(where, command) for command, where in unique.items()]


RUNNABLE = [(where, c) for where, c in documented_commands() if not PLACEHOLDER.search(c)]


def test_the_docs_show_the_main_command_and_many_others():
    """The extraction itself: the README's main command is among the commands checked below,
    and so is most of what the docs show."""
    commands = [c for _, c in RUNNABLE]
    assert "python -m slr_zoo.fit recipes/ablation_residual.yaml" in commands
    assert len(RUNNABLE) >= 25, RUNNABLE


@pytest.mark.parametrize("command", [c for _, c in RUNNABLE], ids=[w for w, _ in RUNNABLE])
def test_every_documented_fit_command_passes_fits_checks_as_written(command, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' paths are relative to a clone (recipes/, ../shared/data)
    words = shlex.split(command, comments=True)
    while "=" in words[0]:  # the environment the line sets
        name, value = words.pop(0).split("=", 1)
        if name == "PYTHONPATH":
            monkeypatch.syspath_prepend(str(ROOT / value))
    args = fit.parse_args(words[len(COMMAND.split()):])
    overrides = args.overrides + stand_ins(args.recipe, tmp_path, always=True)  # a tiny model for any checkpoint
    recipe, cells = fit.checked_cells(args.recipe, overrides, args.cell)
    assert cells and recipe["name"]
