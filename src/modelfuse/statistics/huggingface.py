"""Hugging Face sequence classifiers: loading one from a folder and batching text for it.

transformers is an optional dependency, imported only when these functions run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from modelfuse.errors import CheckpointError, DataError

__all__ = ["label_ids", "length_grouped_batches", "load_sequence_classifier"]


def load_sequence_classifier(folder: str | os.PathLike[str]) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local Hugging Face model folder.

    The model is loaded with eager attention (plain matrix products, which
    ``torch.func.vmap`` batches without fall-backs) and put in evaluation mode.
    A tokenizer without a padding token gets its end-of-sequence token as one.

    Raises
    ------
    CheckpointError
        transformers is not installed, or the folder is missing or not a
        sequence-classification model with a tokenizer.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: no such model folder; give a Hugging Face folder with config.json"
        )
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError:
        raise CheckpointError(
            "transformers is not installed; install it (pip install transformers) to compute "
            "statistics of Hugging Face models, or use --factory"
        ) from None
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(folder), attn_implementation="eager"
        )
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{folder}: cannot load a sequence-classification model ({exc}); give a folder "
            "saved with save_pretrained"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{folder}: cannot load its tokenizer ({exc}); save the tokenizer in the model folder"
        ) from None
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def label_ids(labels: Sequence[str], config: Any, *, source: str) -> list[int]:
    """Class indices of labels written as integers or as the model's label names.

    Raises
    ------
    DataError
        A label is neither an index below ``num_labels`` nor a name in
        ``config.label2id``.

    Examples
    --------
    >>> class Config:
    ...     num_labels = 2
    ...     label2id = {"negative": 0, "positive": 1}
    >>> label_ids(["1", "negative", "positive"], Config(), source="data.csv")
    [1, 0, 1]
    """
    n_classes = int(getattr(config, "num_labels", 0))
    names = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    out = []
    for number, label in enumerate(labels, start=1):
        if label in names:
            out.append(names[label])
            continue
        try:
            value = int(label)
        except ValueError:
            value = -1
        if not 0 <= value < n_classes:
            known = ", ".join(sorted(names)) or "none"
            raise DataError(
                f"{source}: row {number} has label {label!r}; expected a class index in "
                f"[0, {n_classes - 1}] or one of the model's label names ({known})"
            )
        out.append(value)
    return out


def length_grouped_batches(
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int] | None,
    *,
    batch_size: int,
    max_length: int,
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor] | dict[str, torch.Tensor]]:
    """Batches of tokenised texts of one length each, so that nothing is padded.

    Texts are tokenised (truncated to ``max_length`` tokens) and grouped by
    length; each batch holds texts of equal length and no attention mask, so
    the model sees exactly what it sees one text at a time (padding changes
    neither the Fisher nor the Gram matrices) and per-example ``vmap`` runs
    have no data-dependent masking. Order does not matter: statistics are means.

    Yields
    ------
    ``(inputs, labels)`` pairs, or inputs when ``labels`` is None; inputs are
    ``{"input_ids": ..., ["token_type_ids": ...]}``.
    """
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
    groups: dict[int, list[int]] = {}
    for index, ids in enumerate(encoded["input_ids"]):
        if len(ids) == 0:
            raise DataError(f"text {index + 1} has no tokens; remove empty texts")
        groups.setdefault(len(ids), []).append(index)
    for length in sorted(groups):
        members = groups[length]
        for start in range(0, len(members), batch_size):
            chosen = members[start : start + batch_size]
            inputs = {k: torch.tensor([encoded[k][i] for i in chosen]) for k in keys}
            if labels is None:
                yield inputs
            else:
                yield inputs, torch.tensor([labels[i] for i in chosen], dtype=torch.long)
