"""Every command the README and docs/ show is a command a reader will paste. Each ``python -m
slr_zoo.fit`` command must pass everything ``fit`` checks before training, as written; every
``evaluate``, ``generate``, ``report``, ``export``, ``tasks.stats`` and ``benchmarks/*.py`` command must be
accepted by its program's argument parser. A renamed key, flag or recipe then fails here, not in
a reader's terminal.

Commands with a placeholder (``<run dir>``, ``seed=S``, ``--cell I``, ``[--steps 12]``, ``...``)
cannot run as written and are left out; so are the shell's ``$VAR``s a block does not define."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from conftest import stand_ins
from markdown_it import MarkdownIt

from slr_zoo import fit

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FIT = "python -m slr_zoo.fit "
# the start of a command, and the program that parses it
PROGRAM = re.compile(r"python -m (slr_zoo\.(?:fit|evaluate|generate|report|tasks\.stats|export)) |python (benchmarks/\w+\.py)\b")
# a value a reader fills in: <anything>, a lone capital letter (seed=S, --cell I, encoding=E), $VAR,
# and a synopsis's optional part ([--steps 12]) or ellipsis
PLACEHOLDER = re.compile(r"<[^>]*>|(?:=|--cell\s+)[A-Z]\b|\$|\[--|\.\.\.")


def _block_commands(code: str) -> list[str]:
    """The commands of a shell block, its continuations joined and its ``VAR=...`` expanded."""
    found, variables = [], {}
    for line in code.replace("\\\n", " ").splitlines():
        balanced = line.count('"') % 2 == 0 and line.count("'") % 2 == 0
        words = shlex.split(line, comments=True) if balanced else []
        assignment = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", words[0]) if len(words) == 1 else None
        if assignment:
            variables[assignment[1]] = assignment[2]
            continue
        for name in sorted(variables, key=len, reverse=True):  # $NAME before $N
            line = line.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
        start = PROGRAM.search(line)
        if start:  # with any NAME=value the line sets for it (PYTHONPATH=examples)
            before = line[:start.start()]
            command = line.strip() if "=" in before and "|" not in before else line[start.start():]
            found.append(shlex.join(shlex.split(command, comments=True)) if balanced else command)
    return found


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every command in a code block or inline code span of the docs."""
    commands = []
    for path in DOCUMENTS:
        for token in MarkdownIt().parse(path.read_text()):
            where = f"{path.name}:{token.map[0] + 1}" if token.map else path.name
            if token.type in ("fence", "code_block"):
                commands += [(where, c) for c in _block_commands(token.content)]
            for child in token.children or []:
                start = PROGRAM.search(child.content) if child.type == "code_inline" else None
                if start:
                    commands.append((where, child.content[start.start():]))
    unique = {}
    for where, command in commands:
        unique.setdefault(" ".join(command.split()), where)
    return [(where, command) for command, where in unique.items()]


RUNNABLE = [(where, c) for where, c in documented_commands() if not PLACEHOLDER.search(c)]
FITS = [(where, c) for where, c in RUNNABLE if FIT in c]
OTHERS = [(where, c) for where, c in RUNNABLE if FIT not in c]


def _words(command: str, monkeypatch) -> list[str]:
    """The command's words from its program on, the environment it sets applied."""
    words = shlex.split(command, comments=True)
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        if name == "PYTHONPATH":
            monkeypatch.syspath_prepend(str(ROOT / value))
    return words


def test_the_docs_show_the_main_command_and_many_others():
    """The extraction itself: the README's main command and test command are among the commands
    checked below, and so is most of what the docs show."""
    assert "python -m slr_zoo.fit recipes/ablation_residual.yaml" in [c for _, c in FITS]
    assert len(FITS) >= 25 and len(OTHERS) >= 25, (len(FITS), len(OTHERS))
    programs = {PROGRAM.match(c)[1] or PROGRAM.match(c)[2] for _, c in OTHERS}
    assert {"slr_zoo.evaluate", "slr_zoo.generate", "slr_zoo.report", "benchmarks/train_step.py"} <= programs


@pytest.mark.parametrize("command", [c for _, c in FITS], ids=[w for w, _ in FITS])
def test_every_documented_fit_command_passes_fits_checks_as_written(command, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' paths are relative to a clone (recipes/, ../shared/data)
    words = _words(command, monkeypatch)
    args = fit.parse_args(words[len(FIT.split()):])
    overrides = args.overrides + stand_ins(args.recipe, tmp_path, always=True)  # a tiny model for any checkpoint
    recipe, cells = fit.checked_cells(args.recipe, overrides, args.cell)
    assert cells and recipe["name"]


@pytest.mark.parametrize("command", [c for _, c in OTHERS], ids=[w for w, _ in OTHERS])
def test_every_other_documented_command_is_accepted_by_its_parser(command, monkeypatch, capsys):
    words = _words(command, monkeypatch)
    if words[1] == "-m":
        parse, argv = importlib.import_module(words[2]).parse_args, words[3:]
    else:
        spec = importlib.util.spec_from_file_location(Path(words[1]).stem, ROOT / words[1])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        parse, argv = module.parse_args, words[2:]
    try:
        parse(argv)
    except SystemExit as exit:
        pytest.fail(f"{command!r} is refused by its parser (exit {exit.code}): {capsys.readouterr().err}")
