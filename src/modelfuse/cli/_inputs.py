"""How every command names its input files: ``NAME=FILE`` or plain ``FILE``.

``--predictions`` (and any option taking several files) accepts both forms,
repeated (``-p a.npy -p b.npy``) or space-separated after one flag
(``-p a.npy b.npy``). A plain file is named after its file name without the
suffix (``FILE.npz:KEY`` after ``KEY``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from typer.core import TyperCommand

from modelfuse.errors import ConfigError

__all__ = ["InputsInOrder", "file_name", "named_files"]


def file_name(path: str) -> str:
    """The name a plain input file goes by: its stem, or ``KEY`` of ``FILE.npz:KEY``.

    Examples
    --------
    >>> file_name("runs/soup.npy"), file_name("preds.npz:ties")
    ('soup', 'ties')
    """
    if ".npz:" in path:
        return path.rsplit(".npz:", 1)[1]
    return Path(path).stem


def named_files(items: Iterable[str], *, option: str = "--predictions") -> dict[str, str]:
    """Parse ``NAME=FILE`` or ``FILE`` items into an ordered ``{name: file}`` mapping.

    Raises
    ------
    ConfigError
        An item is empty or ``NAME=`` without a file, or two items share a name.

    Examples
    --------
    >>> named_files(["soup=a.npy", "b.npy", "c.npz:ties"])
    {'soup': 'a.npy', 'b': 'b.npy', 'ties': 'c.npz:ties'}
    """
    named: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = "", item
        name, path = name.strip(), path.strip()
        if not path or (sep and not name):
            raise ConfigError(
                f"{option} {item[:80]!r}: expected NAME=FILE or FILE, "
                f"e.g. {option} fused=fused_probs.npy"
            )
        name = name or file_name(path)
        if name in named:
            raise ConfigError(
                f"{option}: the name {name[:80]!r} is given twice ({named[name][:80]} and "
                f"{path[:80]}); give every input its own name, as NAME=FILE"
            )
        named[name] = path
    return named


class InputsInOrder(TyperCommand):
    """A command whose ``--predictions`` and trailing ``MORE`` files keep the command line's order.

    Click collects the values of a repeated option and the positional
    arguments apart, so ``-p a b -p c`` would reach the command as
    ``[a, c]`` and ``[b]``. This command reads the arguments once more and
    hands the command one list, ``predictions``, in the order given (and an
    empty ``more``); the order matters for ``--weights`` and for applying a
    saved ensemble by position.
    """

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        raw = list(args)
        rest = super().parse_args(ctx, args)
        given = list(ctx.params.get("predictions") or [])
        more = list(ctx.params.get("more") or [])
        if more:
            takes_value = {
                name
                for param in self.params
                if param.param_type_name == "option" and not getattr(param, "is_flag", False)
                for name in param.opts
            }
            ordered = _command_line_order(raw, given, more, takes_value)
            if ordered is not None:
                ctx.params["predictions"], ctx.params["more"] = ordered, []
        return rest


def _command_line_order(
    raw: list[str], given: list[str], more: list[str], takes_value: set[str]
) -> list[str] | None:
    """``given`` (values of -p) and ``more`` (positionals) merged in the order of ``raw``.

    None when the arguments cannot be matched up (then click's order is kept).
    """
    ordered: list[str] = []
    n_given = n_more = i = 0
    while i < len(raw):
        token = raw[i]
        if token == "--":
            ordered.extend(more[n_more:])
            n_more = len(more)
            break
        if token in ("-p", "--predictions") or token.startswith("--predictions="):
            if n_given >= len(given):
                return None
            ordered.append(given[n_given])
            n_given += 1
            i += 1 if "=" in token else 2
            continue
        if token.startswith("-p") and not token.startswith("--"):  # -pFILE
            if n_given >= len(given):
                return None
            ordered.append(given[n_given])
            n_given += 1
        elif token in takes_value:
            i += 1  # skip the option's value
        elif not token.startswith("-") or token == "-":
            if n_more >= len(more):
                return None
            ordered.append(more[n_more])
            n_more += 1
        i += 1
    if n_given != len(given) or n_more != len(more):
        return None
    return ordered
