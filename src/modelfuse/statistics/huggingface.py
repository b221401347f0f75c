"""Hugging Face sequence classifiers: loading one from a folder and batching text for it.

transformers is an optional dependency, imported only when these functions run.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelfuse.errors import CheckpointError, DataError

__all__ = [
    "backbone_name",
    "label_ids",
    "length_grouped_batches",
    "load_sequence_classifier",
    "position_limit",
]


_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""Files that hold a tokenizer's vocabulary; a folder with none of them has no tokenizer."""


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' load reports and progress bars off (errors still raise); restored after."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_sequence_classifier(folder: str | os.PathLike[str], *, seed: int = 0) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local Hugging Face model folder, offline.

    Nothing is downloaded (``local_files_only=True``). The model is loaded as
    ``AutoModelForSequenceClassification`` with eager attention (plain matrix
    products, which ``torch.func.vmap`` batches without fall-backs) and put in
    evaluation mode. A folder saved as a backbone only (a ``BertModel`` such as
    all-MiniLM-L6-v2) gets a new classification head drawn with ``seed`` (the
    caller's random state is untouched), with a warning saying so. A
    tokenizer without a padding token gets its end-of-sequence token as one.

    Parameters
    ----------
    folder : path
        A folder written by ``save_pretrained`` (``config.json``, the weights,
        and the tokenizer's files).
    seed : int, default 0
        Seeds the classification head when the folder has none.

    Returns
    -------
    (model, tokenizer)

    Raises
    ------
    CheckpointError
        transformers is not installed; the folder is missing; it is not a
        sequence-classification model; it has no tokenizer files; or its
        tokenizer has more tokens than the model's embedding rows.

    Warns
    -----
    UserWarning
        The classification head was not in the folder and was initialised.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: no such model folder; give a Hugging Face folder written by "
            "save_pretrained"
        )
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder}: no config.json there; give a Hugging Face model folder written by "
            "save_pretrained"
        )
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise CheckpointError(
            f"{folder}: no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)}); "
            "save the tokenizer into the model folder with tokenizer.save_pretrained"
        )
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError:
        raise CheckpointError(
            "transformers is not installed; install it (pip install transformers) to compute "
            "statistics of Hugging Face models, or use --factory"
        ) from None
    with _quiet_transformers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(folder),
                attn_implementation="eager",
                local_files_only=True,
                output_loading_info=True,
            )
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise CheckpointError(
                f"{folder}: cannot load a sequence-classification model ({reason}); give a "
                "folder saved with save_pretrained from a model that has a "
                "ForSequenceClassification class"
            ) from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise CheckpointError(
                f"{folder}: cannot load its tokenizer ({reason}); save the tokenizer in the "
                "model folder"
            ) from None
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise CheckpointError(
            f"{folder}: its tokenizer has {len(tokenizer)} tokens but the model has {rows} "
            "embedding rows; save the tokenizer the model was trained with"
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        warnings.warn(
            f"{folder}: {len(missing)} tensors not in the checkpoint ({shown}) were "
            f"initialised at random (seed {seed}); statistics of a head that was never "
            "trained describe that random head",
            stacklevel=2,
        )
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def position_limit(model: Any, tokenizer: Any) -> int | None:
    """The most tokens a text may have for this model: its positions, or its tokenizer's limit.

    None when neither says (a model without learned positions and a
    tokenizer without ``model_max_length``).

    Examples
    --------
    >>> class Config:
    ...     max_position_embeddings = 512
    >>> class Model:
    ...     config = Config()
    >>> class Tokenizer:
    ...     model_max_length = 10**30  # transformers' "no limit"
    >>> position_limit(Model(), Tokenizer())
    512
    """
    limits = []
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    stated = getattr(tokenizer, "model_max_length", None)
    if isinstance(stated, int) and 0 < stated < 10**9:
        limits.append(stated)
    return min(limits) if limits else None


def backbone_name(model: Any) -> str | None:
    """The name of a Hugging Face model's backbone submodule, None for another model.

    For a ``BertForSequenceClassification`` this is ``"bert"``: the encoder
    whose tensors (``bert.encoder...``) a merge of fine-tunes combines, apart
    from the task head (``classifier``). A model that is its own backbone (a
    ``BertModel``) or is no Hugging Face model gives None: all of it.

    Examples
    --------
    >>> from torch import nn
    >>> backbone_name(nn.Linear(2, 2)) is None
    True
    """
    prefix = getattr(model, "base_model_prefix", None)
    if not isinstance(prefix, str) or not prefix or not isinstance(model, nn.Module):
        return None
    child = getattr(model, prefix, None)
    if not isinstance(child, nn.Module) or child is model:
        return None
    return prefix


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
