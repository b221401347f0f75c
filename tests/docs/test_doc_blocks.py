"""The documentation's tests themselves: every block is in scope, every link stays inside.

The blocks run through the Sybil set up in the repository's conftest.py
(``pytest README.md CONTRIBUTING.md docs``); these tests check that nothing
escapes it and that its evaluators fail when they should.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from doc_blocks import (
    LANGUAGES,
    console_commands,
    documentation_sybil,
    fenced_blocks,
    shell_commands,
)
from doc_workspace import MODELS, N_CLASSES, N_SAMPLES, PREDICTIONS, build_workspace
from sybil.example import SybilFailure

from modelfuse.arrays import resolve_kind
from modelfuse.checkpoint import open_checkpoint
from modelfuse.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = sorted(
    [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")]
)
MAX_SKIPS = 2


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_fenced_block_has_a_language_that_runs(document):
    blocks = fenced_blocks(document.read_text())
    unknown = [(line, lang) for line, lang in blocks if lang not in LANGUAGES]
    assert unknown == [], (
        f"{_name(document)}: blocks at these lines would not run; give them one of "
        f"{', '.join(LANGUAGES)} as their language: {unknown}"
    )


def test_skipped_blocks_are_few_and_give_their_reason():
    skips = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in re.finditer(r"^[ \t]*<!--+\s*skip:(.*?)-->", text, re.S | re.M):
            skips.append((_name(document), match.group(1).strip()))
    assert len(skips) <= MAX_SKIPS, skips
    for where, arguments in skips:
        assert re.fullmatch(r'next "[^"]{20,}"', arguments), (where, arguments)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(document: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", document.read_text(), flags=re.S | re.M)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|<([^>\s]+)>|^\[[^\]]+\]:\s*(\S+)", re.M)


def _links(document: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", document.read_text(), flags=re.S | re.M)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    found = []
    for match in LINK.finditer(text):
        target = next(g for g in match.groups() if g)
        if match.group(2) is not None and not re.match(r"[a-z]+:|\.|/|#", target):
            continue  # an HTML tag such as <br>, not an autolink
        found.append(target)
    return found


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_link_resolves_inside_the_repository(document):
    for target in _links(document):
        if re.match(r"https?://", target):
            continue
        assert not re.match(r"[a-z]+:", target), f"{_name(document)}: {target} is not a web link"
        path, _, anchor = target.partition("#")
        resolved = (document.parent / path).resolve() if path else document
        assert resolved.is_relative_to(ROOT), f"{_name(document)}: {target} leaves the repository"
        assert resolved.exists(), f"{_name(document)}: {target} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{_name(document)}: no heading #{anchor}"


ABSOLUTE_PATH = re.compile(r"(?:^|[\s`(\"'])(/[A-Za-z][\w.-]*/[\w./-]+)", re.M)


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_no_absolute_paths_of_some_machine(document):
    found = ABSOLUTE_PATH.findall(document.read_text())
    assert found == [], f"{_name(document)} names paths of one machine: {found}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_relative_paths_in_text_stay_inside_the_repository(document):
    for path in re.findall(r"(?<![\w.])((?:\.\./)+[\w./-]*)", document.read_text()):
        resolved = (document.parent / path).resolve()
        assert resolved.is_relative_to(ROOT), f"{_name(document)}: {path} leaves the repository"


def test_the_path_checker_finds_absolute_paths_only():
    text = "see `/opt/data/x.npy` and (/srv/a)\nnot https://e.org/a/b, docs/a.md or n/a\n"
    assert ABSOLUTE_PATH.findall(text) == ["/opt/data/x.npy", "/srv/a"]


def test_the_link_checker_sees_links_and_anchors(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "# Top `code`\n\nsee [a](docs/a.md#the-command-line), <https://e.org/x>,\n"
        "![img](pic.png) and `[not](a link)`\n\n[ref]: ../outside.md\n"
    )
    assert _links(doc) == ["docs/a.md#the-command-line", "https://e.org/x", "../outside.md"]
    assert _anchors(doc) == {"top-code"}
    assert _slug("Comparing predictions: `compare_predictions` and `modelfuse compare`") == (
        "comparing-predictions-compare_predictions-and-modelfuse-compare"
    )


def test_fenced_blocks_include_unlabelled_and_nested_fences():
    text = "```sh\nmodelfuse a\n```\n\n````\n```python\nx\n```\n````\n~~~yaml\na: 1\n~~~\n"
    assert fenced_blocks(text) == [(1, "sh"), (5, ""), (10, "yaml")]


def test_shell_and_console_commands_are_split_like_a_shell():
    assert shell_commands("modelfuse x 'a b' \\\n  --y=1  # c\n# only a comment\n") == [
        ["modelfuse", "x", "a b", "--y=1"]
    ]
    source = "$ modelfuse a \\\n    -o b\nline 1\nline 2\n$ modelfuse c\n"
    assert console_commands(source) == [
        (["modelfuse", "a", "-o", "b"], "line 1\nline 2\n"),
        (["modelfuse", "c"], ""),
    ]


def test_workspace_holds_what_it_promises(tmp_path):
    build_workspace(tmp_path)
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (N_SAMPLES,) and set(np.unique(y)) <= set(range(N_CLASSES))
    for name, (accuracy, kind) in PREDICTIONS.items():
        array = np.load(tmp_path / f"{name}.npy")
        assert array.shape == (N_SAMPLES, N_CLASSES)
        assert resolve_kind(array, "auto") == kind, name
        hit = float(np.mean(array.argmax(axis=1) == y))
        assert abs(hit - accuracy) < 0.1, (name, hit, accuracy)
    for folder in MODELS:
        with open_checkpoint(tmp_path / folder) as checkpoint:
            keys = list(checkpoint.keys())
        assert "model.layers.1.mlp.down_proj.weight" in keys and len(keys) == 21
        config = json.loads((tmp_path / folder / "config.json").read_text())
        assert config["num_hidden_layers"] == 2


def _evaluate(tmp_path: Path, monkeypatch, markdown: str) -> list[str | None]:
    """Run every example of ``markdown`` in a fresh workspace; the failures (or None) in order."""
    tmp_path.mkdir(exist_ok=True)
    doc = tmp_path / "doc.md"
    doc.write_text(markdown)
    work = tmp_path / "work"
    build_workspace(work)
    monkeypatch.chdir(work)
    document = documentation_sybil(tmp_path, ["doc.md"]).parse(doc)
    results: list[str | None] = []
    for example in document:
        try:
            example.evaluate()
        except SybilFailure as failure:
            results.append(str(failure))
        else:
            results.append(None)
    return results


def test_console_blocks_compare_what_was_printed(tmp_path, monkeypatch):
    good = "```console\n$ modelfuse methods linear\n...linear...\n```\n"
    bad = "```console\n$ modelfuse methods linear\nsomething else entirely\n```\n"
    assert _evaluate(tmp_path, monkeypatch, good) == [None]
    [failure] = _evaluate(tmp_path / "b", monkeypatch, bad)
    assert "instead of" in failure and "something else entirely" in failure


def test_shell_blocks_fail_on_a_non_zero_exit(tmp_path, monkeypatch):
    markdown = (
        "```sh\nmodelfuse methods linear\n```\n\n"
        "```sh\nmodelfuse compare -p nope.npy -y y.npy -o out\n```\n"
    )
    ok, failure = _evaluate(tmp_path, monkeypatch, markdown)
    assert ok is None
    assert "exited with 2" in failure and "nope.npy" in failure


def test_shell_blocks_run_only_modelfuse(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="only modelfuse commands run"):
        _evaluate(tmp_path, monkeypatch, "```sh\nrm -rf ./llama-base\n```\n")
    assert (tmp_path / "work" / "llama-base" / "model.safetensors").is_file()


def test_yaml_blocks_are_validated_and_written_when_named(tmp_path, monkeypatch):
    named = "```yaml\n# mine.yaml\nmerge_method: linear\nmodels: [./llama-base, ./clean]\n```\n"
    assert _evaluate(tmp_path, monkeypatch, named) == [None]
    assert "merge_method: linear" in (tmp_path / "work" / "mine.yaml").read_text()
    with pytest.raises(ConfigError, match="no_such_key"):
        _evaluate(tmp_path / "b", monkeypatch, "```yaml\nmerge_method: linear\nno_such_key: 1\n```\n")


def test_doctest_blocks_compare_their_output(tmp_path, monkeypatch):
    good = "```python\n>>> 1 + 1\n2\n```\n"
    bad = "```python\n>>> 1 + 1\n3\n```\n"
    assert _evaluate(tmp_path, monkeypatch, good) == [None]
    [failure] = _evaluate(tmp_path / "b", monkeypatch, bad)
    assert "Expected:" in failure and "3" in failure
