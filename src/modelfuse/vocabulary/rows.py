"""Which row every model gives each output token, as mergekit 0.1.5 decides it.

Before the merge method runs, every model's embedding (and output head) is
rearranged into the output vocabulary, one row per output token:

- a model that has the token gives its own row;
- a model that lacks it gets the token's *fill row*, the same for every
  model that lacks it:

  1. the row ``tokenizer.tokens`` names for the token (a model's row of the
     token, another token's row of a model, or zeros);
  2. otherwise, when exactly one model has the token, that model's row;
  3. when no model has it, zeros (and a warning);
  4. when the base model has it, the base model's row;
  5. otherwise the mean of the rows of the models that have it;

- ``force: true`` gives every model the fill row, even those that have the token;
- with ``pad_to_multiple_of``, the rows past the last token are each model's
  mean row over its token rows.

The merge method then combines these rows as it combines any tensor, so a
token every model has is merged like the rest of the weights, and a token
only one model has keeps that model's row under any method that returns
its input when every input is equal (linear, TIES, SLERP, ...).

The models a rule may draw on are the models merged into the tensor (the
base included), as in mergekit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from modelfuse.errors import ConfigError
from modelfuse.vocabulary.build import Vocabulary
from modelfuse.vocabulary.settings import ModelTokenSource, TokenSetting, ZeroSource

__all__ = [
    "ReadRows",
    "RowPlan",
    "align_rows",
    "align_tensors",
    "gather_rows",
    "padding_row",
    "plan_rows",
]

ReadRows = Callable[[str, np.ndarray], torch.Tensor]
"""``read(model, rows)``: those rows (an int64 array, any order) of a model's tensor."""

MAX_GAP = 16
"""Rows apart that :func:`gather_rows` still reads in one piece."""


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "..."


@dataclass(frozen=True)
class RowPlan:
    """Every model's row for every output token.

    Attributes
    ----------
    models : tuple of str
        The models merged into the tensor (the base included), in order.
    own : numpy.ndarray
        ``(len(models), tokens)`` int64: the model's own row for each output
        token, -1 where it takes the token's fill row.
    fill_start, fill_model, fill_row : numpy.ndarray
        The fill rows, compressed: the fill row of token ``t`` is the mean of
        rows ``fill_row[k]`` of models ``models[fill_model[k]]`` for ``k`` in
        ``fill_start[t]:fill_start[t + 1]`` (zeros when that range is empty).
    tokens : int
        Output rows that hold tokens.
    size : int
        Output rows, padding included.
    missing : tuple of str
        Tokens no model has that get zeros by default (mergekit warns about them).
    rules : dict of str to int
        How many tokens each rule decided (``own``, ``named``, ``donor``,
        ``base``, ``mean``, ``zero``, ``forced``).
    """

    models: tuple[str, ...]
    own: np.ndarray
    fill_start: np.ndarray
    fill_model: np.ndarray
    fill_row: np.ndarray
    tokens: int
    size: int
    missing: tuple[str, ...] = ()
    rules: dict[str, int] = field(default_factory=dict)

    def fill(self, token_id: int) -> list[tuple[str, int]]:
        """The ``(model, row)`` pairs whose mean is the fill row of one token (empty: zeros)."""
        a, b = self.fill_start[token_id], self.fill_start[token_id + 1]
        return [(self.models[m], int(r)) for m, r in zip(self.fill_model[a:b], self.fill_row[a:b])]

    def is_identity(self, model: str, rows: int) -> bool:
        """Whether ``model``'s tensor of ``rows`` rows is its aligned tensor as it is."""
        own = self.own[self.models.index(model)]
        return self.size == self.tokens == rows and bool(
            np.array_equal(own, np.arange(rows, dtype=np.int64))
        )


def _where(token: str) -> str:
    return f"tokenizer.tokens.{_short(token, 40)}.source"


def plan_rows(
    vocabulary: Vocabulary,
    models: Sequence[str],
    *,
    base: str | None = None,
    tokens: Mapping[str, TokenSetting] | None = None,
    pad_to_multiple_of: int | None = None,
    locate: Callable[[str], str | None] | None = None,
) -> RowPlan:
    """Decide every model's row for every output token (see the module's docstring).

    Parameters
    ----------
    vocabulary : Vocabulary
        From :func:`~modelfuse.vocabulary.build_vocabulary`.
    models : sequence of str
        The models merged into the tensor, the base included (labels of ``vocabulary``).
    base : str, optional
        The base model's label; its row fills tokens it has (rule 4) when it
        is among ``models``.
    tokens : mapping of str to TokenSetting, optional
        ``tokenizer.tokens``: the fill rows chosen for some tokens.
    pad_to_multiple_of : int, optional
        Pad the rows to a multiple of this.
    locate : callable, optional
        Maps a model as written in ``tokens`` to its label (None: not a model
        of the merge). Default: the label itself.

    Raises
    ------
    ConfigError
        A ``tokens`` entry names a model not merged into the tensor, a token
        or row that model lacks, or gives no source where one is needed.

    Examples
    --------
    Two models; ``b`` lacks output token 2, ``a`` lacks token 3:

    >>> import numpy as np
    >>> from modelfuse.vocabulary.build import Vocabulary
    >>> v = Vocabulary(None, {"<unk>": 0, "x": 1, "y": 2, "z": 3}, 4,
    ...                {"a": np.array([0, 1, 2, -1]), "b": np.array([0, 1, -1, 2])},
    ...                {}, {"a": 3, "b": 3})
    >>> plan = plan_rows(v, ["a", "b"])
    >>> plan.own.tolist()
    [[0, 1, 2, -1], [0, 1, -1, 2]]
    >>> plan.fill(2), plan.fill(3)
    ([('a', 2)], [('b', 2)])
    """
    models = tuple(dict.fromkeys(models))
    unknown = [m for m in models if m not in vocabulary.rows]
    if unknown:
        raise ConfigError(f"models {unknown[:5]} have no vocabulary map; build it with them")
    settings = dict(tokens or {})
    find = locate if locate is not None else (lambda ref: ref if ref in vocabulary.rows else None)
    index = {m: i for i, m in enumerate(models)}
    n, size = len(models), vocabulary.size
    present = np.stack([vocabulary.rows[m] for m in models]) if models else np.empty((0, size))
    have = present >= 0
    counts = have.sum(axis=0)
    own = present.copy()
    base_index = index.get(base) if base is not None else None
    by_id = {i: t for t, i in vocabulary.tokens.items()}
    starts = np.zeros(size + 1, dtype=np.int64)
    fill_model: list[int] = []
    fill_row: list[int] = []
    rules = {"own": 0, "named": 0, "donor": 0, "base": 0, "mean": 0, "zero": 0, "forced": 0}
    missing: list[str] = []

    def model_of(reference: str, token: str) -> int:
        label = find(reference)
        if label is None or label not in index:
            merged = ", ".join(_short(m, 40) for m in models[:6])
            raise ConfigError(
                f"{_where(token)}: {_short(reference)} is not a model merged into the "
                f"embedding ({merged}); name one of them"
            )
        return index[label]

    def named(token: str, token_id: int, setting: TokenSetting) -> list[tuple[int, int]]:
        source = setting.source
        if isinstance(source, ZeroSource):
            return []
        if isinstance(source, ModelTokenSource):
            m = model_of(source.model, token)
            label = models[m]
            if source.token is not None:
                row = vocabulary.vocabularies[label].get(source.token)
                if row is None:
                    raise ConfigError(
                        f"{_where(token)}: model {_short(label, 40)} has no token "
                        f"{_short(source.token)}; name a token of its tokenizer"
                    )
                return [(m, row)]
            limit = vocabulary.model_rows[label]
            if source.token_id is None or source.token_id >= limit:
                raise ConfigError(
                    f"{_where(token)}: token_id {source.token_id} is not a row of model "
                    f"{_short(label, 40)}, which has {limit} rows; give 0 <= token_id < {limit}"
                )
            return [(m, source.token_id)]
        if isinstance(source, str):
            m = model_of(source, token)
            row = int(present[m, token_id]) if token_id < size else -1
            if row < 0:
                raise ConfigError(
                    f"{_where(token)}: model {_short(models[m], 40)} does not have the token; "
                    "name a model that has it, or use {kind: model_token, model: ..., token: ...} "
                    "or {kind: zero}"
                )
            return [(m, row)]
        raise ConfigError(
            f"{_where(token)}: no source, and "
            + ("force is set" if setting.force else "some models lack the token")
            + "; give a model's path, {kind: model_token, model: ..., token: ...} or {kind: zero}"
        )

    for token_id in range(size):
        token = by_id.get(token_id)
        setting = settings.get(token) if token is not None else None
        forced = setting is not None and setting.force
        starts[token_id + 1] = starts[token_id]
        if setting is not None and token is not None:
            pairs = named(token, token_id, setting)  # checked even when every model has it
            if not forced and counts[token_id] == n:
                rules["own"] += 1
                continue
            rules["forced" if forced else "named"] += 1
            if forced:
                own[:, token_id] = -1
        elif counts[token_id] == n:
            rules["own"] += 1
            continue
        elif counts[token_id] == 1:
            m = int(np.flatnonzero(have[:, token_id])[0])
            pairs = [(m, int(present[m, token_id]))]
            rules["donor"] += 1
        elif counts[token_id] == 0:
            pairs = []
            rules["zero"] += 1
            if token is not None:
                missing.append(token)
        elif base_index is not None and have[base_index, token_id]:
            pairs = [(base_index, int(present[base_index, token_id]))]
            rules["base"] += 1
        else:
            pairs = [(m, int(present[m, token_id])) for m in np.flatnonzero(have[:, token_id])]
            rules["mean"] += 1
        fill_model.extend(m for m, _ in pairs)
        fill_row.extend(r for _, r in pairs)
        starts[token_id + 1] += len(pairs)
    padded = size
    if pad_to_multiple_of and size % pad_to_multiple_of:
        padded = (size // pad_to_multiple_of + 1) * pad_to_multiple_of
    return RowPlan(
        models,
        own,
        starts,
        np.asarray(fill_model, dtype=np.int64),
        np.asarray(fill_row, dtype=np.int64),
        size,
        padded,
        tuple(missing),
        rules,
    )


def gather_rows(read_block: Callable[[int, int], torch.Tensor], rows: np.ndarray) -> torch.Tensor:
    """Rows of a tensor in the order given, read in as few contiguous pieces as is sensible.

    ``read_block(start, stop)`` returns rows ``start:stop``. Rows at most
    :data:`MAX_GAP` apart are read together, so a block of consecutive rows
    costs one read and scattered rows cost one read each; at most the rows
    asked for plus the gaps are held.

    Examples
    --------
    >>> import torch, numpy as np
    >>> t = torch.arange(10.0)[:, None]
    >>> gather_rows(lambda a, b: t[a:b], np.array([7, 2, 3])).flatten().tolist()
    [7.0, 2.0, 3.0]
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return read_block(0, 0)
    unique, inverse = np.unique(rows, return_inverse=True)
    breaks = np.flatnonzero(np.diff(unique) > MAX_GAP) + 1
    pieces = []
    for run in np.split(unique, breaks):
        first, last = int(run[0]), int(run[-1])
        block = read_block(first, last + 1)
        pieces.append(
            block[torch.from_numpy(run - first)] if len(run) < last + 1 - first else block
        )
    gathered = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    if len(unique) == len(rows) and bool(np.all(inverse == np.arange(len(rows)))):
        return gathered
    return gathered[torch.from_numpy(inverse.reshape(-1))]


def _fill_rows(
    plan: RowPlan, read: ReadRows, token_ids: np.ndarray, tail: tuple[int, ...]
) -> torch.Tensor:
    """The float32 fill rows of ``token_ids`` (each the mean of its sources, or zeros)."""
    out = torch.zeros((len(token_ids), *tail), dtype=torch.float32)
    if len(token_ids) == 0:
        return out
    starts, stops = plan.fill_start[token_ids], plan.fill_start[token_ids + 1]
    lengths = stops - starts
    if lengths.sum() == 0:
        return out
    entries = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)])
    target = np.repeat(np.arange(len(token_ids)), lengths)
    sources = plan.fill_model[entries]
    for m in np.unique(sources):
        chosen = sources == m
        rows = read(plan.models[int(m)], plan.fill_row[entries[chosen]])
        out.index_add_(0, torch.from_numpy(target[chosen]), rows.to(torch.float32))
    divisor = torch.from_numpy(np.maximum(lengths, 1).astype(np.float32))
    return out / divisor.reshape(-1, *([1] * len(tail)))


def align_rows(
    plan: RowPlan,
    model: str,
    read: ReadRows,
    start: int,
    stop: int,
    *,
    tail: tuple[int, ...],
    dtype: torch.dtype,
    padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows ``start:stop`` of ``model``'s tensor rearranged into the output vocabulary.

    Parameters
    ----------
    plan : RowPlan
    model : str
        One of ``plan.models``.
    read : callable
        ``read(model, rows)``: rows of any model of the plan (see :data:`ReadRows`).
    start, stop : int
        Output rows, ``0 <= start <= stop <= plan.size``.
    tail : tuple of int
        The tensor's shape past its first dimension.
    dtype : torch.dtype
        The dtype of the rows returned (fill rows are computed in float32).
    padding : torch.Tensor, optional
        The model's padding row (:func:`padding_row`); needed when the rows
        reach past ``plan.tokens``.
    """
    if not 0 <= start <= stop <= plan.size:
        raise ValueError(f"rows {start}:{stop} are not within the {plan.size} output rows")
    i = plan.models.index(model)
    out = torch.empty((stop - start, *tail), dtype=dtype)
    last = min(stop, plan.tokens)
    if start < last:
        own = plan.own[i, start:last]
        mine = own >= 0
        if mine.any():
            out[torch.from_numpy(np.flatnonzero(mine))] = read(model, own[mine]).to(dtype)
        if not mine.all():
            lacking = np.flatnonzero(~mine)
            fill = _fill_rows(plan, read, lacking + start, tail)
            out[torch.from_numpy(lacking)] = fill.to(dtype)
    if stop > max(start, plan.tokens):
        if padding is None:
            raise ValueError("rows past the tokens need the model's padding row")
        out[max(start, plan.tokens) - start :] = padding.to(dtype)
    return out


def padding_row(
    plan: RowPlan,
    model: str,
    read: ReadRows,
    *,
    tail: tuple[int, ...],
    dtype: torch.dtype,
    block: int = 4096,
) -> torch.Tensor:
    """The model's mean aligned row over the token rows, which fills the padding rows.

    Computed in float32 over blocks of ``block`` rows (bounded memory) and
    returned in ``dtype``.
    """
    total = torch.zeros(tail, dtype=torch.float32)
    for a in range(0, plan.tokens, block):
        b = min(a + block, plan.tokens)
        rows = align_rows(plan, model, read, a, b, tail=tail, dtype=torch.float32)
        total += rows.sum(dim=0)
    return (total / max(plan.tokens, 1)).to(dtype)


def align_tensors(plan: RowPlan, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every model's whole tensor rearranged into the output vocabulary (in memory).

    ``tensors`` holds one tensor per model of ``plan`` (rows first); the
    inputs are not modified.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from modelfuse.vocabulary.build import Vocabulary
    >>> v = Vocabulary(None, {"p": 0, "q": 1, "r": 2}, 3,
    ...                {"a": np.array([0, 1, -1]), "b": np.array([1, -1, 0])}, {}, {"a": 2, "b": 2})
    >>> plan = plan_rows(v, ["a", "b"])
    >>> out = align_tensors(plan, {"a": torch.tensor([[1.0], [2.0]]),
    ...                            "b": torch.tensor([[30.0], [10.0]])})
    >>> out["a"].flatten().tolist(), out["b"].flatten().tolist()
    ([1.0, 2.0, 30.0], [10.0, 2.0, 30.0])
    """
    missing = [m for m in plan.models if m not in tensors]
    if missing:
        raise ValueError(f"no tensor for models {missing[:5]}")

    def read(model: str, rows: np.ndarray) -> torch.Tensor:
        return tensors[model][torch.from_numpy(np.asarray(rows, dtype=np.int64))]

    result = {}
    for model in plan.models:
        tensor = tensors[model]
        tail, dtype = tuple(tensor.shape[1:]), tensor.dtype
        padding = None
        if plan.size > plan.tokens:
            padding = padding_row(plan, model, read, tail=tail, dtype=dtype)
        result[model] = align_rows(
            plan, model, read, 0, plan.size, tail=tail, dtype=dtype, padding=padding
        )
    return result
