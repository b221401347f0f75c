"""Checkpoints seen through the output vocabulary, for the streaming merge engine.

:func:`prepare_vocabulary` reads every model's tokenizer, builds the output
vocabulary and wraps each model's checkpoint in an :class:`AlignedSource`:
the same tensors, except that the token-indexed ones (embedding, output head,
their biases) have one row per output token, rearranged as
:mod:`modelfuse.vocabulary.rows` decides. The engine then plans and merges
them as any tensors, block of rows by block of rows: an aligned block reads
only the rows it needs from each checkpoint, so memory stays bounded by a few
blocks, whatever the vocabulary.

Token-indexed tensors are found by the names the common architectures give
them (:data:`EMBEDDING_NAMES`, :data:`HEAD_NAMES`).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelfuse.errors import CheckpointError, ConfigError
from modelfuse.vocabulary.build import (
    Vocabulary,
    VocabularyWarning,
    build_vocabulary,
    load_tokenizer,
)
from modelfuse.vocabulary.rows import RowPlan, align_rows, gather_rows, padding_row, plan_rows
from modelfuse.vocabulary.settings import TokenizerSettings

__all__ = [
    "EMBEDDING_NAMES",
    "HEAD_NAMES",
    "AlignedSource",
    "VocabularyMerge",
    "prepare_vocabulary",
    "vocabulary_tensors",
]

EMBEDDING_NAMES = (
    "model.embed_tokens.weight",  # Llama, Mistral, Qwen, Gemma, Phi-3, ...
    "embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "transformer.wte.weight",  # GPT-2, GPT-J, Falcon-style
    "transformer.word_embeddings.weight",
    "gpt_neox.embed_in.weight",
    "embeddings.word_embeddings.weight",  # BERT-like
    "bert.embeddings.word_embeddings.weight",
    "roberta.embeddings.word_embeddings.weight",
    "model.embeddings.tok_embeddings.weight",  # ModernBERT
)
"""Names of token embeddings (one row per token), looked for in this order."""

HEAD_NAMES = (
    "lm_head.weight",
    "lm_head.bias",
    "embed_out.weight",
    "lm_head.decoder.weight",
    "cls.predictions.decoder.weight",
    "cls.predictions.decoder.bias",
    "cls.predictions.bias",
    "decoder.weight",
    "decoder.bias",
)
"""Names of output heads and their biases (one row or entry per token)."""

_TIED_HEADS = ("lm_head.weight", "embed_out.weight")
"""Heads a model with tied embeddings may leave out (its embedding is its head)."""


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "..."


def vocabulary_tensors(names: Sequence[str] | Any) -> tuple[str | None, list[str]]:
    """``(embedding, heads)``: the token-indexed tensors among ``names`` (known names only).

    Examples
    --------
    >>> vocabulary_tensors(["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"])
    ('model.embed_tokens.weight', ['lm_head.weight'])
    """
    present = set(names)
    embedding = next((n for n in EMBEDDING_NAMES if n in present), None)
    heads = [n for n in HEAD_NAMES if n in present]
    return embedding, heads


class _Alignment:
    """What every aligned source shares: the plans, the original sources, the padding rows."""

    def __init__(
        self,
        sources: Mapping[str, Any],
        plans: Mapping[str, RowPlan],
        inputs: Mapping[tuple[str, str], str],
    ) -> None:
        self.sources = dict(sources)
        self.plans = dict(plans)
        self.inputs = dict(inputs)  # (model, output name) -> the model's tensor of it
        self._padding: dict[tuple[str, str], torch.Tensor] = {}
        self._lock = threading.Lock()

    def reader(self, name: str) -> Callable[[str, np.ndarray], torch.Tensor]:
        def read(model: str, rows: np.ndarray) -> torch.Tensor:
            source, input_name = self.sources[model], self.inputs[(model, name)]
            return gather_rows(lambda a, b: source.read_rows(input_name, a, b), rows)

        return read

    def rows(self, model: str, name: str, start: int, stop: int) -> torch.Tensor:
        plan = self.plans[name]
        info = self.sources[model].info(self.inputs[(model, name)])
        tail, dtype = tuple(info.shape[1:]), info.dtype
        read = self.reader(name)
        padding = None
        if stop > plan.tokens:
            with self._lock:
                padding = self._padding.get((model, name))
                if padding is None:
                    padding = padding_row(plan, model, read, tail=tail, dtype=dtype)
                    self._padding[(model, name)] = padding
        return align_rows(plan, model, read, start, stop, tail=tail, dtype=dtype, padding=padding)


class AlignedSource:
    """A model's checkpoint whose token-indexed tensors have one row per output token.

    Everything else (other tensors, ``folder``, ``path``, ``close``) is the
    wrapped checkpoint's. Reading is safe from several threads.
    """

    def __init__(self, source: Any, label: str, alignment: _Alignment) -> None:
        self.source = source
        self.label = label
        self._alignment = alignment
        self._aligned = {name for (model, name) in alignment.inputs if model == label}

    def __getattr__(self, name: str) -> Any:
        if name == "source":  # not set yet: never look it up through itself
            raise AttributeError(name)
        return getattr(self.source, name)

    def keys(self) -> list[str]:
        names = list(self.source.keys())
        return names + [n for n in sorted(self._aligned) if n not in names]

    def __contains__(self, name: object) -> bool:
        return name in self._aligned or name in self.source

    def __iter__(self) -> Any:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def info(self, name: str) -> Any:
        if name not in self._aligned:
            return self.source.info(name)
        info = self.source.info(self._alignment.inputs[(self.label, name)])
        shape = (self._alignment.plans[name].size, *info.shape[1:])
        numel = 1
        for size in shape:
            numel *= size
        return replace(info, name=name, shape=shape, nbytes=numel * info.dtype.itemsize)

    def read(self, name: str) -> torch.Tensor:
        if name not in self._aligned:
            return self.source.read(name)
        return self._alignment.rows(self.label, name, 0, self._alignment.plans[name].size)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name not in self._aligned:
            return self.source.read_rows(name, start, stop)
        size = self._alignment.plans[name].size
        if not 0 <= start <= stop <= size:
            raise ValueError(f"tensor {name!r}: rows {start}:{stop} are outside its {size} rows")
        return self._alignment.rows(self.label, name, start, stop)

    def close(self) -> None:
        self.source.close()

    def __repr__(self) -> str:
        return f"AlignedSource({self.source!r})"


@dataclass
class VocabularyMerge:
    """A vocabulary merge, ready for the engine.

    Attributes
    ----------
    vocabulary : Vocabulary
        The output tokenizer and every model's row map.
    sources : dict of str to source
        Each model's checkpoint, aligned when its rows need rearranging
        (the original checkpoint when they are its rows as they are).
    tensors : list of str
        The token-indexed tensors of the output.
    size : int
        Their rows (``vocab_size`` of the output's config.json).
    notes : list of str
        What was decided, one line each.
    """

    vocabulary: Vocabulary
    sources: dict[str, Any]
    tensors: list[str]
    size: int
    notes: list[str] = field(default_factory=list)


def prepare_vocabulary(
    settings: TokenizerSettings,
    sources: Mapping[str, Any],
    *,
    base: str | None = None,
    reference: str | None = None,
    embedding_models: Sequence[str] | None = None,
    head_models: Sequence[str] | None = None,
    locate: Callable[[str], str | None] | None = None,
    keys: Mapping[str, str] | None = None,
    source_key: str = "tokenizer.source",
) -> VocabularyMerge:
    """Build the output vocabulary and align every model's checkpoint to it.

    Parameters
    ----------
    settings : TokenizerSettings
        The configuration's ``tokenizer`` (or ``tokenizer_source``).
    sources : mapping of str to checkpoint
        Every model by label, the base among them; each must come from a
        model folder holding tokenizer files.
    base : str, optional
        The base model's label: the union starts from its tokenizer and its
        rows fill tokens it has (default: the first model, whose rows fill none).
    reference : str, optional
        The model whose tensor names the output has (default: ``base``, else the first).
    embedding_models, head_models : sequence of str, optional
        The models merged into the embedding, and into the output head (and
        its bias); default: every model. They differ with mergekit's
        ``slices:`` (the first slice's models and the last slice's).
    locate : callable, optional
        Maps a model as written in the settings to its label (None: not in the merge).
    keys : mapping of str to str, optional
        Each label's configuration key, for messages (default: the label).
    source_key : str
        The key that gave the source, for messages (``tokenizer_source`` or
        ``tokenizer.source``).

    Raises
    ------
    ConfigError
        The tokenizer source or a token's source is not a model of the merge.
    CheckpointError
        A model is not a folder with tokenizer files, or has no token
        embedding of a known name (the message lists the names looked for),
        or its token-indexed tensors disagree on the number of rows.
    """
    labels = list(sources)
    if not labels:
        raise ConfigError("a vocabulary merge needs at least one model")
    find = locate if locate is not None else (lambda ref: ref if ref in sources else None)
    where = dict(keys or {})
    key = lambda label: where.get(label, label)  # noqa: E731
    tokenizer_base = base if base is not None else labels[0]
    reference = reference or tokenizer_base
    embedding, heads = vocabulary_tensors(sources[reference].keys())
    if embedding is None:
        raise CheckpointError(
            f"{key(reference)}: no token embedding found; a vocabulary merge (tokenizer_source, "
            f"tokenizer) looked for {', '.join(EMBEDDING_NAMES)}: merge this architecture "
            "without tokenizer_source"
        )
    names = [embedding, *heads]
    inputs: dict[tuple[str, str], str] = {}
    rows: dict[str, int] = {}
    problems: list[str] = []
    for label, source in sources.items():
        if embedding not in source:
            problems.append(
                f"{key(label)}: no tensor {embedding} (the reference model's embedding)"
            )
            continue
        rows[label] = int(source.info(embedding).shape[0])
        for name in names:
            own = name
            if name not in source and name in _TIED_HEADS:
                own = embedding  # tied embeddings: the embedding is the head
            if own not in source:
                continue  # the planner reports the missing tensor
            shape = tuple(source.info(own).shape)
            if not shape or shape[0] != rows[label]:
                problems.append(
                    f"{key(label)}: tensor {own} has shape {list(shape)}, but the embedding has "
                    f"{rows[label]} rows; expected one row per token"
                )
                continue
            inputs[(label, name)] = own
    if problems:
        raise CheckpointError("; ".join(problems[:10]))
    tokenizers = {}
    for label, source in sources.items():
        folder = getattr(source, "folder", None)
        if folder is None:
            raise CheckpointError(
                f"{key(label)}: {_short(str(getattr(source, 'path', label)))} is a weights file, "
                "not a model folder; a vocabulary merge reads each model's tokenizer files: "
                "give the model folder"
            )
        tokenizers[label] = load_tokenizer(Path(folder), where=key(label))
    source_label: str
    if settings.kind == "model":
        found = find(settings.source)
        if found is None or found not in sources:
            listed = ", ".join(_short(m, 50) for m in labels[:5])
            raise ConfigError(
                f"{source_key}: {_short(settings.source)} is not a model of the merge; give "
                f"union, base or one of the models ({listed})"
            )
        source_label = found
    else:
        source_label = settings.kind
    vocabulary = build_vocabulary(
        tokenizers,
        rows,
        source=source_label,
        base=tokenizer_base,
        add_tokens=list(settings.tokens or {}),
    )
    everyone = list(labels)
    plans: dict[str, RowPlan] = {}
    by_group: dict[tuple[str, ...], RowPlan] = {}
    for name in names:
        chosen = embedding_models if name == embedding else head_models
        group = tuple(everyone if chosen is None else chosen)
        if group not in by_group:
            by_group[group] = plan_rows(
                vocabulary,
                group,
                base=base,
                tokens=settings.tokens,
                pad_to_multiple_of=settings.pad_to_multiple_of,
                locate=find,
            )
        plans[name] = by_group[group]
    size = plans[embedding].size
    alignment = _Alignment(sources, plans, inputs)
    aligned: dict[str, Any] = {}
    for label, source in sources.items():
        same = all(
            inputs.get((label, n)) == n
            and (label not in plans[n].models or plans[n].is_identity(label, rows[label]))
            for n in names
            if (label, n) in inputs
        )
        aligned[label] = source if same else AlignedSource(source, label, alignment)
    notes = [_summary(vocabulary, plans[embedding], settings, size)]
    if plans[embedding].missing:
        shown = ", ".join(_short(t, 30) for t in plans[embedding].missing[:5])
        more = len(plans[embedding].missing) - 5
        warnings.warn(
            f"tokenizer: {len(plans[embedding].missing)} tokens of the output vocabulary are in "
            f"no model ({shown}{f' and {more} more' if more > 0 else ''}); their rows are zeros "
            "unless tokenizer.tokens names a source",
            VocabularyWarning,
            stacklevel=2,
        )
    present = [n for n in names if any((m, n) in inputs for m in labels)]
    return VocabularyMerge(vocabulary, aligned, present, size, notes)


def _summary(vocabulary: Vocabulary, plan: RowPlan, settings: TokenizerSettings, size: int) -> str:
    rules = plan.rules
    decided = ", ".join(
        f"{count} {what}"
        for what, count in (
            ("from the base", rules.get("base", 0)),
            ("from the one model that has them", rules.get("donor", 0)),
            ("averaged", rules.get("mean", 0)),
            ("named in tokenizer.tokens", rules.get("named", 0) + rules.get("forced", 0)),
            ("zero", rules.get("zero", 0)),
        )
        if count
    )
    padding = f", padded to {size} rows" if size > plan.tokens else ""
    return (
        f"tokenizer: {settings.source} vocabulary of {len(vocabulary.tokens)} tokens "
        f"({len(vocabulary.added)} added){padding}; rows of tokens some model lacks: "
        f"{decided or 'none'}"
    )
