"""Reading a multi-stage file: its documents, their names, references and order.

See :mod:`modelfuse.merge.multistage` for the rules; this module reads the
file (bounded as one configuration is), validates every document as a merge
configuration, finds which stage uses which, and orders them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from modelfuse.errors import ConfigError, ModelfuseError
from modelfuse.merge.config import MergeConfig, load_config
from modelfuse.merge.multistage_references import located
from modelfuse.merge.parameters import short
from modelfuse.merge.yaml_reading import (
    MAX_DEPTH,
    read_config_text,
    read_yaml_documents,
)

__all__ = [
    "Stage",
    "is_multistage",
    "read_stages",
    "stage_label",
    "stage_where",
]

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}")
"""A stage name: it names a folder of the intermediate outputs."""


@dataclass(frozen=True)
class Stage:
    """One document of the file.

    Attributes
    ----------
    name : str or None
        Its ``name:`` (None for the unnamed final merge).
    document : int
        Its position in the file (1 for the first).
    config : MergeConfig
        Its configuration, paths located beside the file where needed and
        references to other stages left as their names.
    uses : tuple of str
        The names of the stages whose outputs it reads, in order of appearance.
    """

    name: str | None
    document: int
    config: MergeConfig
    uses: tuple[str, ...]

    @property
    def label(self) -> str:
        return stage_label(self.name)


def stage_label(name: str | None) -> str:
    return name if name is not None else "the final merge"


def stage_where(path: Path, stage: Stage | tuple[str | None, int]) -> str:
    """How messages name a stage: the file, the stage's name and its document."""
    name, document = (stage.name, stage.document) if isinstance(stage, Stage) else stage
    if name is None:
        return f"{path}: the final merge (document {document}, no name)"
    return f"{path}: stage {name!r} (document {document})"


def is_multistage(path: str | Path) -> bool:
    """Whether the YAML file ``path`` holds more than one document (a multi-stage merge).

    Only the file's structure is read (parser events up to the second
    document), so the answer costs no more than the file's size. A file that
    cannot be read, or is larger than a configuration may be, is not
    multi-stage: reading it as one merge reports why.

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "two.yaml")
    >>> _ = open(path, "w").write("name: a\\nmerge_method: linear\\n---\\nmerge_method: slerp\\n")
    >>> is_multistage(path)
    True
    """
    try:
        text = read_config_text(Path(path))
    except (ModelfuseError, OSError):
        return False
    documents = depth = 0
    try:  # parser events only: no node is built, no alias expanded
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:  # reading it as one merge says why it is refused
                    return documents > 1
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            elif isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    return True
    except yaml.YAMLError:
        return documents > 1
    return False


def _read_documents(path: Path) -> list[Any]:
    """Every document of the file, each bounded as :func:`read_yaml` bounds one.

    Aliases may expand all documents together to at most
    ``max(10000, 4 * len(text))`` nodes, the budget of one file.
    """
    text = read_config_text(path)
    try:
        return read_yaml_documents(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = str(getattr(exc, "problem", None) or exc)[:200]
        raise ConfigError(f"{path}: not valid YAML{at} ({problem})") from None


def _stages(path: Path) -> list[Stage]:
    """Read, name and validate every document; refuse empty, unnamed twice, duplicates."""
    documents = _read_documents(path)
    if len(documents) < 2:
        raise ConfigError(
            f"{path}: holds {len(documents)} merge document(s); a multi-stage file holds several "
            "separated by '---' (merge a single configuration with merge())"
        )
    named: list[tuple[str | None, int, dict[str, Any]]] = []
    folded: dict[str, str] = {}
    for number, document in enumerate(documents, start=1):
        if document is None or document == {}:
            raise ConfigError(
                f"{path}: document {number} is empty; write a merge there or remove the "
                "extra '---'"
            )
        if not isinstance(document, dict):
            raise ConfigError(
                f"{path}: document {number}: expected a mapping with name, merge_method and "
                f"models, got {type(document).__name__}"
            )
        data = dict(document)
        name = data.pop("name", None)
        if name is not None:
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ConfigError(
                    f"{path}: document {number}: name: {short(name)} is not a stage name; "
                    "give up to 100 letters, digits, '_', '.', '+' or '-' (not starting with "
                    "'.', '+' or '-'): it names the stage's output folder"
                )
            if name.casefold() in folded:
                other = folded[name.casefold()]
                same = "is given twice" if other == name else f"and {other!r} differ only in case"
                raise ConfigError(
                    f"{path}: document {number}: the stage name {name!r} {same}; give every "
                    "stage its own name (it names the stage's output folder)"
                )
            folded[name.casefold()] = name
        if not data:
            raise ConfigError(
                f"{path}: document {number} holds only a name; write the merge (merge_method "
                "and models) or remove the document"
            )
        named.append((name, number, data))
    unnamed = [number for name, number, _ in named if name is None]
    if len(unnamed) > 1:
        listed = ", ".join(str(n) for n in unnamed)
        raise ConfigError(
            f"{path}: documents {listed} have no name; only the final merge may go without "
            "one: give every other document a name: key"
        )
    names = [name for name, _, _ in named if name is not None]
    folder = path.resolve().parent
    stages = []
    for name, number, data in named:
        context = stage_where(path, (name, number))
        try:
            config, _ = load_config(data)
        except ConfigError as exc:
            message = str(exc).removeprefix("configuration: ")
            raise ConfigError(f"{context}: {message}") from None
        config, uses = located(config, folder, names, context)
        stages.append(Stage(name, number, config, uses))
    return stages


def _ordered(stages: list[Stage], path: Path, keep_all: bool) -> list[Stage]:
    """The stages in dependency order (file order otherwise), the final merge last."""
    by_name = {stage.name: stage for stage in stages if stage.name is not None}
    order: list[Stage] = []
    done: set[str | None] = set()

    def visit(start: Stage) -> None:
        # Depth first without recursion: a chain of thousands of stages stays in bounds.
        trail: list[tuple[Stage, Iterator[str]]] = [(start, iter(start.uses))]
        on_trail = {start.name}
        while trail:
            stage, pending = trail[-1]
            used = next(pending, None)
            if used is None:
                trail.pop()
                on_trail.discard(stage.name)
                done.add(stage.name)
                order.append(stage)
            elif used in on_trail:
                names = [str(s.name) for s, _ in trail]
                cycle = [*names[names.index(used) :], used]
                if len(cycle) > 11:
                    cycle = [*cycle[:5], f"({len(cycle) - 10} more)", *cycle[-5:]]
                raise ConfigError(
                    f"{path}: the stages use each other in a cycle: {' -> '.join(cycle)}; "
                    "a stage can use only outputs that do not depend on it"
                )
            elif used not in done:
                trail.append((by_name[used], iter(by_name[used].uses)))
                on_trail.add(used)

    for stage in stages:
        if stage.name not in done:
            visit(stage)
    unnamed = [stage for stage in stages if stage.name is None]
    final = unnamed[0] if unnamed else stages[-1]
    for stage in stages:
        if final.name is not None and final.name in stage.uses:
            raise ConfigError(
                f"{stage_where(path, stage)} uses {final.name!r}, the final merge (the last document, "
                "as none goes without a name); the final merge is the document without a "
                "name, else the last one: put the final merge last or leave its name out"
            )
    final_name = f" {final.name!r}" if final.name is not None else ""
    needed: set[str | None] = {final.name}
    for stage in reversed(order):  # every stage comes after the stages it uses
        if stage.name in needed:
            needed.update(stage.uses)
    for stage in stages:
        if stage.name not in needed and not keep_all:
            raise ConfigError(
                f"{stage_where(path, stage)} is not used by the final merge{final_name}: "
                "its output would be thrown away; use it, remove it, or pass "
                "--intermediate-dir DIR (intermediate_dir=) to keep it"
            )
    return [*(stage for stage in order if stage is not final), final]


def read_stages(path: Path, *, keep_all: bool) -> list[Stage]:
    """The stages of the file at ``path`` in the order they run, the final merge last.

    ``keep_all`` allows stages the final merge does not use (their outputs
    are kept); without it they are refused.

    Raises
    ------
    ConfigError
        The file or a document is invalid (named in the message), or the
        stages are ambiguous: two without a name, a duplicate name, a
        reference that is neither a name nor a path (or both), a cycle.
    """
    return _ordered(_stages(path), path, keep_all)
