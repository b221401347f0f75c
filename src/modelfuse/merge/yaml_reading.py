"""Reading a configuration's YAML safely: bounded nesting, integers and alias expansion,
and numbers in every YAML form (``5e-1`` too) read as numbers."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from modelfuse.errors import ConfigError

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "read_config_source",
    "read_config_text",
    "read_yaml",
    "read_yaml_documents",
]


MAX_CONFIG_BYTES = 16 * 1024 * 1024
"""Largest configuration file read."""


MAX_DEPTH = 64
"""Deepest nesting of lists and mappings a configuration file may have."""


MAX_INT_DIGITS = 30
"""Longest integer (in digits) a configuration file may hold."""


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with bounded work on crafted files.

    Nesting deeper than :data:`MAX_DEPTH` and integers longer than
    :data:`MAX_INT_DIGITS` digits are refused while composing; numbers in
    scientific notation without a dot (``5e-1``) are read as floats, as
    YAML 1.2 and mergekit's users expect.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, f"nesting deeper than {MAX_DEPTH} levels", event.start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: Any) -> int:
        digits = sum(ch.isdigit() for ch in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {digits} digits is too large", node.start_mark
            )
        return int(super().construct_yaml_int(node))


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)
_BoundedLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _expanded_size(root: yaml.Node, budget: int) -> int:
    """Nodes of the document once every alias is expanded, refused beyond ``budget``.

    A node reached through several aliases counts once per path, which is
    what a consumer of the loaded document walks (a billion-laughs file
    expands a few KB into millions of nodes). An alias inside its own anchor
    (a cycle), and aliases nesting the expanded document deeper than
    :data:`MAX_DEPTH`, are refused too. The work is linear in the file's nodes.
    """
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            active.discard(key)
            children = _children(node)
            total = 1 + sum(sizes[id(c)] for c in children)
            sizes[key] = min(total, budget + 1)
            depths[key] = 1 + max((depths[id(c)] for c in children), default=0)
            if depths[key] > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"aliases nest the document deeper than {MAX_DEPTH} levels",
                    node.start_mark,
                )
            continue
        if key in sizes:
            continue
        if key in active:
            raise yaml.composer.ComposerError(
                None, None, "an alias refers to the collection that holds it", node.start_mark
            )
        active.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    total = sizes[id(root)]
    if total > budget:
        raise yaml.composer.ComposerError(
            None,
            None,
            f"aliases expand the document beyond {budget} nodes (a file of this size holds "
            "far fewer); write the values out instead of repeating anchors",
            root.start_mark,
        )
    return total


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def read_yaml(text: str) -> Any:
    """Parse one YAML document safely, with the work bounded by the text's size.

    Raises
    ------
    yaml.YAMLError
        Not YAML, nested deeper than :data:`MAX_DEPTH`, an integer longer than
        :data:`MAX_INT_DIGITS` digits, or aliases expanding beyond
        ``max(10000, 4 * len(text))`` nodes.

    Examples
    --------
    >>> read_yaml("weight: 5e-1\\nlayers: &r [0, 2]\\nagain: *r")
    {'weight': 0.5, 'layers': [0, 2], 'again': [0, 2]}
    """
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, max(10_000, 4 * len(text)))
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml_documents(text: str) -> list[Any]:
    """Parse every document of a YAML stream (``---`` separated), bounded as one file.

    Each document is read as :func:`read_yaml` reads one (depth and integer
    limits); aliases may expand all documents together to at most
    ``max(10000, 4 * len(text))`` nodes, the budget of one file.

    Raises
    ------
    yaml.YAMLError
        As :func:`read_yaml`, for any document.

    Examples
    --------
    >>> read_yaml_documents("name: a\\nweight: 5e-1\\n---\\n---\\nmodels: [a]\\n")
    [{'name': 'a', 'weight': 0.5}, None, {'models': ['a']}]
    """
    budget = max(10_000, 4 * len(text))
    loader = _BoundedLoader(text)
    documents: list[Any] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            budget -= _expanded_size(node, budget)
            documents.append(loader.construct_document(node))
    finally:
        loader.dispose()
    return documents


def read_config_source(
    source: str | os.PathLike[str] | Mapping[str, Any] | None,
    *,
    several_documents: str = "",
) -> tuple[Any, str, Path]:
    """The parsed YAML of a configuration file (or ``source`` itself when it is not a path),
    how to name it in messages, and the folder its relative paths start from.

    Parameters
    ----------
    source : path or parsed data
        A configuration file, or an already-parsed configuration (returned as is).
    several_documents : str
        What to say when the file holds several YAML documents (after the
        line where the second starts); without it they are invalid YAML.

    Raises
    ------
    ConfigError
        A file :func:`read_config_text` refuses, or one that is not valid
        YAML (naming the line).
    """
    if not isinstance(source, (str, os.PathLike)):
        return source, "configuration", Path.cwd()
    path = Path(source)
    text = read_config_text(path)
    try:
        data = read_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = str(getattr(exc, "problem", None) or exc)[:200]
        if several_documents and problem == "but found another document":
            raise ConfigError(
                f"{path}: a second YAML document starts{at}: {several_documents}"
            ) from None
        raise ConfigError(f"{path}: not valid YAML{at} ({problem})") from None
    return data, str(path), path.resolve().parent


def read_config_text(path: Path) -> str:
    """The text of the configuration file ``path``, refusing a folder, a missing or
    oversized file, and a file that is not UTF-8 text, naming the path."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the path of a YAML configuration file")
    if not path.is_file():
        raise ConfigError(f"{path}: no such configuration file; give the path of a YAML file")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: a {size}-byte file; a configuration is at most {MAX_CONFIG_BYTES} bytes"
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; expected a YAML configuration") from None
