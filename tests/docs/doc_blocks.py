"""Run every code block of the documentation as a test, with Sybil.

Each fenced block carries its language, and each language is run its own way:

- ``python``: executed; blocks of ``>>>`` lines are doctests whose printed
  output must match. One namespace per document, so later blocks use earlier ones.
- ``yaml``: parsed and validated as a merge configuration
  (``modelfuse.merge.config.load_config``; each document of a multi-stage
  file, without its ``name:``). A block whose first line is a
  comment naming a file (``# ties.yaml``) is also written to that file, for
  the commands that follow.
- ``sh``: every command (``\\`` continues a line, ``#`` starts a comment) is a
  ``modelfuse`` command, run through ``modelfuse.cli.main``; it must exit 0.
- ``console``: ``$ modelfuse ...`` lines run as in ``sh`` and the lines after
  each must match what it printed (``...`` matches anything, as in doctests).

A document's blocks run in order in a fresh folder holding the files the docs
name (:func:`doc_workspace.build_workspace`). A block that cannot run is
preceded by ``<!-- skip: next "the reason" -->``.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from doc_workspace import build_workspace
from sybil import Document, Example, Region, Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser
from sybil.parsers.markdown.lexers import FencedCodeBlockLexer

__all__ = [
    "LANGUAGES",
    "console_commands",
    "documentation_sybil",
    "fenced_blocks",
    "run_modelfuse",
    "shell_commands",
]

LANGUAGES = ("python", "yaml", "sh", "console")
"""The languages a fenced block of the docs may have; each one runs."""

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$", re.MULTILINE)


def fenced_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, language)`` of every fenced block opened in ``text``.

    Examples
    --------
    >>> fenced_blocks("a\\n```sh\\nls\\n```\\n\\n```\\nx\\n```\\n")
    [(2, 'sh'), (6, '')]
    """
    blocks = []
    open_fence = None
    for match in FENCE.finditer(text):
        if open_fence is None:
            open_fence = match.group("fence")
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((line, match.group("info").strip()))
        else:
            fence = match.group("fence")
            closes = fence[0] == open_fence[0] and len(fence) >= len(open_fence)
            if closes and not match.group("info").strip():
                open_fence = None
    return blocks


def shell_commands(source: str) -> list[list[str]]:
    """The commands of a shell block: continued lines joined, comments dropped, split.

    Examples
    --------
    >>> shell_commands("modelfuse a b \\\\\\n  -o c   # note\\n\\nmodelfuse d")
    [['modelfuse', 'a', 'b', '-o', 'c'], ['modelfuse', 'd']]
    """
    joined = re.sub(r"\\\n", " ", source)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


def console_commands(source: str) -> list[tuple[list[str], str]]:
    """``(command, expected output)`` pairs of a console block (``$ `` starts a command).

    Examples
    --------
    >>> console_commands("$ modelfuse x \\\\\\n    -o y\\nprinted\\n$ modelfuse z\\n")
    [(['modelfuse', 'x', '-o', 'y'], 'printed\\n'), (['modelfuse', 'z'], '')]
    """
    pairs: list[tuple[list[str], str]] = []
    command: list[str] | None = None
    pending = ""
    expected: list[str] = []
    for line in source.splitlines():
        if pending:
            pending += " " + line.strip()
        elif line.startswith("$ "):
            if command is not None:
                pairs.append((command, "".join(expected)))
            command, expected, pending = None, [], line[2:]
        else:
            expected.append(line + "\n")
            continue
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        command, pending = shlex.split(pending, comments=True), ""
    if command is not None:
        pairs.append((command, "".join(expected)))
    return pairs


def run_modelfuse(words: list[str]) -> tuple[int, str, str]:
    """Run ``modelfuse ...`` through :func:`modelfuse.cli.main`: exit code, stdout, stderr."""
    from modelfuse.cli import main

    if not words or words[0] != "modelfuse":
        raise ValueError(
            f"{shlex.join(words)[:80]!r}: only modelfuse commands run in the docs' tests; "
            'mark the block with <!-- skip: next "reason" --> if it cannot run'
        )
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(words[1:])
    return code, out.getvalue(), err.getvalue()


def _evaluate_sh(example: Example) -> str | None:
    for words in shell_commands(example.parsed):
        code, out, err = run_modelfuse(words)
        if code != 0:
            return f"{shlex.join(words)} exited with {code}:\n{err}{out}"
    return None


_CHECKER = doctest.OutputChecker()


def _evaluate_console(example: Example) -> str | None:
    for words, expected in console_commands(example.parsed):
        code, out, err = run_modelfuse(words)
        if code != 0:
            return f"{shlex.join(words)} exited with {code}:\n{err}{out}"
        got = "\n".join(line.rstrip() for line in out.splitlines()) + "\n"
        want = "\n".join(line.rstrip() for line in expected.splitlines()) + "\n"
        if not _CHECKER.check_output(want, got, doctest.ELLIPSIS):
            return f"{shlex.join(words)} printed\n{got}instead of\n{want}"
    return None


def _evaluate_yaml(example: Example) -> str | None:
    import yaml

    from modelfuse.merge.config import load_config

    source = example.parsed
    documents = list(yaml.safe_load_all(source))
    if len(documents) > 1:  # a multi-stage file: each document is a merge with a name
        for document in documents:
            load_config({key: value for key, value in document.items() if key != "name"})
    else:
        load_config(documents[0] if documents else None)
    first = source.lstrip().splitlines()[0] if source.strip() else ""
    named = re.fullmatch(r"#\s*([\w.-]+\.ya?ml)\s*", first)
    if named:
        Path(named.group(1)).write_text(source)
    return None


class _BlockParser:
    """Regions of fenced blocks in one language, run by one evaluator."""

    def __init__(self, language: str, evaluator: Any) -> None:
        self.lexer = FencedCodeBlockLexer(language=language)
        self.evaluator = evaluator

    def __call__(self, document: Document) -> Iterable[Region]:
        for region in self.lexer(document):
            region.parsed = str(region.lexemes["source"])
            region.evaluator = self.evaluator
            yield region


def _setup(namespace: dict[str, Any]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="modelfuse-docs-"))
    build_workspace(folder)
    namespace["_docs_previous_folder"] = os.getcwd()
    namespace["_docs_folder"] = folder
    os.chdir(folder)


def _teardown(namespace: dict[str, Any]) -> None:
    os.chdir(namespace["_docs_previous_folder"])
    shutil.rmtree(namespace["_docs_folder"], ignore_errors=True)


def documentation_sybil(root: str | Path, patterns: Iterable[str]) -> Sybil:
    """The Sybil that runs the code blocks of the files matching ``patterns`` under ``root``."""
    return Sybil(
        parsers=[
            PythonCodeBlockParser(doctest_optionflags=doctest.ELLIPSIS),
            _BlockParser("yaml", _evaluate_yaml),
            _BlockParser("sh", _evaluate_sh),
            _BlockParser("console", _evaluate_console),
            SkipParser(),
        ],
        patterns=list(patterns),
        path=str(Path(root).resolve()),
        setup=_setup,
        teardown=_teardown,
    )
