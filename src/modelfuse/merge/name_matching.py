"""Matching tensor names across checkpoints saved with and without a task head.

A fine-tune saved as ``BertForSequenceClassification`` stores its backbone
under ``bert.`` and adds ``classifier.*``; its base, saved as ``BertModel``,
has neither. Asked to (``allow_prefix``), the merge finds the prefix that
makes a model's names the reference's (:func:`find_prefix`) and reads the
model through :class:`RenamedSource`, which shows its tensors under the
reference's names. What is left over in a model is its head, kept or dropped
as the configuration's ``heads`` says; :func:`with_merged_backbone` then puts
a merged backbone back into each task's own model.

Buffers (:func:`is_buffer`: integer tensors such as ``position_ids``, and
caches such as rotary ``inv_freq``) are not trained: one that some inputs
store and others do not is carried over from the base (else the first model
that has it) instead of being an error.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "BUFFER_NAMES",
    "NameMap",
    "RenamedSource",
    "find_prefix",
    "is_buffer",
    "with_merged_backbone",
]

BUFFER_NAMES = re.compile(
    r"(?:^|\.)(?:position_ids|token_type_ids|inv_freq|cos_cached|sin_cached|masked_bias"
    r"|num_batches_tracked)$"
)
"""Names of buffers that transformers and torch modules store beside the weights (some
versions save them, others do not)."""

_MAX_DEPTH = 3
"""Prefixes of up to this many name components are tried (``base_model.model.``)."""

_CANDIDATES = 8
"""The most frequent prefixes of each depth that are tried (bounds the work on any file)."""


def is_buffer(name: str, dtype: torch.dtype) -> bool:
    """Whether a tensor is a buffer rather than a trained weight: any non-floating-point
    tensor, or a float one named like a known buffer (:data:`BUFFER_NAMES`).

    Examples
    --------
    >>> is_buffer("embeddings.position_ids", torch.int64)
    True
    >>> is_buffer("layers.0.self_attn.rotary_emb.inv_freq", torch.float32)
    True
    >>> is_buffer("classifier.weight", torch.float32)
    False
    """
    return not (dtype.is_floating_point or dtype.is_complex) or bool(BUFFER_NAMES.search(name))


@dataclass(frozen=True)
class NameMap:
    """How a model's tensor names relate to the reference's.

    Attributes
    ----------
    add : str
        The model's names are ``add + name`` (it wraps the backbone, e.g. ``"bert."``).
    strip : str
        The reference's names are ``strip + name`` (the reference wraps it).
    """

    add: str = ""
    strip: str = ""

    def __bool__(self) -> bool:
        return bool(self.add or self.strip)

    def to_reference(self, name: str) -> str | None:
        """The reference's name of the model's tensor ``name``, or None (not in the backbone)."""
        if self.add:
            return name[len(self.add) :] if name.startswith(self.add) else None
        return self.strip + name

    def describe(self) -> str:
        if self.add:
            return f"its names are the reference's with {self.add!r} in front"
        if self.strip:
            return f"its names are the reference's without {self.strip!r} in front"
        return "its names are the reference's"


def _prefixes(names: Iterable[str]) -> list[str]:
    """The most frequent leading components (``a.``, ``a.b.``, ...) of the names."""
    counts: collections.Counter[str] = collections.Counter()
    for name in names:
        parts = name.split(".")
        for depth in range(1, min(_MAX_DEPTH, len(parts) - 1) + 1):
            counts[".".join(parts[:depth]) + "."] += 1
    by_depth: dict[int, list[str]] = collections.defaultdict(list)
    for prefix, _ in counts.most_common():
        depth = prefix.count(".")
        if len(by_depth[depth]) < _CANDIDATES:
            by_depth[depth].append(prefix)
    return [p for depth in sorted(by_depth) for p in by_depth[depth]]


def find_prefix(reference: Sequence[str], model: Sequence[str]) -> NameMap:
    """The prefix under which most of ``model``'s names are the ``reference``'s.

    Tries the model's names with a leading prefix removed (a classifier around
    the reference's backbone) and the reference's names with one removed (the
    reference wraps it), prefixes of up to three components; the map that
    matches the most names wins, and no prefix when none matches more names
    than the names as they are.

    Examples
    --------
    >>> base = ["embeddings.word_embeddings.weight", "encoder.layer.0.output.dense.weight"]
    >>> tuned = ["bert." + n for n in base] + ["classifier.weight", "classifier.bias"]
    >>> find_prefix(base, tuned)
    NameMap(add='bert.', strip='')
    >>> find_prefix(tuned, base)
    NameMap(add='', strip='bert.')
    >>> find_prefix(base, base)
    NameMap(add='', strip='')
    """
    ours, theirs = set(reference), set(model)
    best, matched = NameMap(), len(ours & theirs)
    for prefix in _prefixes(model):
        count = sum(1 for n in theirs if n.startswith(prefix) and n[len(prefix) :] in ours)
        if count > matched:
            best, matched = NameMap(add=prefix), count
    for prefix in _prefixes(reference):
        count = sum(1 for n in ours if n.startswith(prefix) and n[len(prefix) :] in theirs)
        if count > matched:
            best, matched = NameMap(strip=prefix), count
    return best


class RenamedSource:
    """A checkpoint seen under the reference's tensor names (see :class:`NameMap`).

    Tensors outside the backbone (a head) keep their own names, so that the
    plan sees them and keeps, drops or refuses them as configured. Everything
    else (``path``, ``folder``, ``close``) is the checkpoint's.
    """

    def __init__(self, source: Any, names: NameMap) -> None:
        self._source = source
        self.name_map = names
        self._names: dict[str, str] = {}
        leftover = []
        for name in source.keys():
            renamed = names.to_reference(name)
            if renamed is None:
                leftover.append(name)
            else:
                self._names[renamed] = name
        for name in leftover:  # a head; under its own name unless that is taken
            self._names.setdefault(name, name)

    def original(self, name: str) -> str:
        """The model's own name of the tensor shown as ``name``."""
        return self._names[name]

    def keys(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def info(self, name: str) -> Any:
        return self._source.info(self._names[name])

    def read(self, name: str) -> torch.Tensor:
        return self._source.read(self._names[name])  # type: ignore[no-any-return]

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._source.read_rows(self._names[name], start, stop)  # type: ignore[no-any-return]

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._source, attribute)


def with_merged_backbone(
    own: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A task's own model with its backbone replaced by the merged one.

    Every tensor of ``own`` (e.g. a ``BertForSequenceClassification`` state
    dict) whose name is, up to a prefix (:func:`find_prefix`), a tensor of
    ``merged`` (e.g. the merged ``BertModel`` backbone) is taken from
    ``merged``; the rest (the task's head, its buffers) stays its own. The
    result loads with ``model.load_state_dict(...)``. Neither input is modified.

    Raises
    ------
    ValueError
        A replaced tensor's shape differs from the task's own.

    Examples
    --------
    >>> own = {"bert.w": torch.zeros(2), "classifier.weight": torch.ones(3)}
    >>> merged = {"w": torch.full((2,), 5.0)}
    >>> with_merged_backbone(own, merged)
    {'bert.w': tensor([5., 5.]), 'classifier.weight': tensor([1., 1., 1.])}
    """
    names = find_prefix(list(merged), list(own))
    result = {}
    for name, tensor in own.items():
        renamed = names.to_reference(name)
        if renamed is not None and renamed in merged:
            replacement = merged[renamed]
            if tuple(replacement.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"tensor {name}: the merged {renamed} has shape {list(replacement.shape)}, "
                    f"the task's own {list(tensor.shape)}; the merge is not of this backbone"
                )
            result[name] = replacement.to(tensor.dtype)
        else:
            result[name] = tensor
    return result
