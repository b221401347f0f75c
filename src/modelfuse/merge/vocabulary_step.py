"""The vocabulary step of a merge: ``tokenizer_source``, ``tokenizer`` and ``chat_template``.

Run once the inputs are open and before the plan is built: it reads the
models' tokenizers, builds the output vocabulary, and hands the planner each
model's checkpoint seen through it (:mod:`modelfuse.vocabulary.sources`), so
that the embedding and output head are rearranged into the output vocabulary
block by block as the engine merges them. It also prepares the tokenizer
files written into the output (with the chat template), found before any
tensor is merged, so that a bad tokenizer stops the merge before it starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfuse.errors import CheckpointError, ConfigError, ModelfuseError
from modelfuse.merge.config import MergeConfig
from modelfuse.merge.merge_method import MergeMethod
from modelfuse.merge.parameters import short
from modelfuse.vocabulary import (
    has_tokenizer,
    load_tokenizer,
    prepare_vocabulary,
    resolve_chat_template,
    tokenizer_files,
    tokenizer_settings,
)

__all__ = ["VocabularyStep", "check_vocabulary_keys", "open_vocabulary", "vocabulary_step"]


@dataclass
class VocabularyStep:
    """What the vocabulary step decided.

    Attributes
    ----------
    sources : dict of int to source
        ``id(checkpoint)`` -> the checkpoint to plan with instead (aligned).
    files : dict of str to bytes
        Tokenizer files to write into the output instead of the base's.
    vocab_size : int or None
        The output's ``vocab_size`` when a vocabulary was built.
    built : bool
        Whether a vocabulary was built (its files are written even without
        ``copy_tokenizer``, as mergekit does).
    notes : list of str
    """

    sources: dict[int, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    vocab_size: int | None = None
    built: bool = False
    notes: list[str] = field(default_factory=list)

    def source(self, checkpoint: Any) -> Any:
        """The checkpoint to plan with in place of ``checkpoint``."""
        return self.sources.get(id(checkpoint), checkpoint)

    def write(self, writer: Any, copy_tokenizer: bool, notes: list[str]) -> bool:
        """Add the tokenizer files to ``writer``; whether they replace the copied ones.

        A built vocabulary's tokenizer is written even with ``copy_tokenizer``
        off (mergekit does the same); the base's tokenizer with a chat
        template only when tokenizers are copied.
        """
        if not self.files:
            return False
        if not (self.built or copy_tokenizer):
            notes.append("chat_template: not written: --no-copy-tokenizer writes no tokenizer")
            return False
        for name, data in self.files.items():
            writer.add_file(name, data)
        notes.append(f"wrote the tokenizer: {', '.join(self.files)}")
        return True


def check_vocabulary_keys(config: MergeConfig, method: MergeMethod | None) -> list[str]:
    """Problems with the vocabulary keys found without opening any model."""
    problems = []
    try:
        settings = tokenizer_settings(config.tokenizer_source, config.tokenizer)
    except ConfigError as exc:
        problems.append(str(exc))
        settings = None
    if config.chat_template is not None and config.chat_template != "auto":
        try:
            resolve_chat_template(config.chat_template)
        except ConfigError as exc:
            problems.append(str(exc))
    if settings is not None and method is not None and method.statistics:
        key = "tokenizer_source" if config.tokenizer_source is not None else "tokenizer"
        problems.append(
            f"{key}: merge method {method.name!r} reads per-model statistics indexed by each "
            "model's own token rows, which a vocabulary merge rearranges; merge models that "
            f"share a tokenizer, or use a data-free method with {key}"
        )
    return problems


def vocabulary_step(
    config: MergeConfig,
    inputs: Sequence[tuple[str, str, Any]],
    *,
    base: str | None,
    embedding_models: list[str] | None = None,
    head_models: list[str] | None = None,
    files_from: Path | None,
    locate: Callable[[str], str | None],
) -> VocabularyStep:
    """Build the output vocabulary (or only the chat template) for an opened merge.

    Parameters
    ----------
    config : MergeConfig
    inputs : sequence of (label, key, checkpoint)
        Every model once (the base included): its reference as written, its
        configuration key (for messages) and its opened checkpoint.
    base : str, optional
        The base model's label.
    embedding_models, head_models : list of str, optional
        The labels merged into the embedding and the head (slices); default all.
    files_from : Path, optional
        The folder whose files go with the output (the base's, else the first model's).
    locate : callable
        A model reference as written in the configuration -> its label (None: not in the merge).
    """
    step = VocabularyStep()
    settings = tokenizer_settings(config.tokenizer_source, config.tokenizer)
    template_value = config.chat_template
    sources = {label: checkpoint for label, _, checkpoint in inputs}
    keys = {label: key for label, key, _ in inputs}
    tokenizer = None
    model_templates: list[str | None] = []
    if settings is not None:
        merged = prepare_vocabulary(
            settings,
            sources,
            base=base,
            embedding_models=embedding_models,
            head_models=head_models,
            locate=locate,
            keys=keys,
            source_key="tokenizer_source"
            if config.tokenizer_source is not None
            else "tokenizer.source",
        )
        step.sources = {
            id(sources[label]): wrapped
            for label, wrapped in merged.sources.items()
            if wrapped is not sources[label]
        }
        step.vocab_size = merged.size
        step.built = True
        step.notes += merged.notes
        tokenizer = merged.vocabulary.tokenizer
    elif template_value is not None:
        if files_from is None or not has_tokenizer(files_from):
            where = (
                f"{short(str(files_from))} has no tokenizer files"
                if files_from
                else ("the base (or first) model is a weights file, not a model folder")
            )
            raise CheckpointError(
                f"chat_template: {where}; the template is written into the tokenizer of the "
                "base (else the first) model: copy its tokenizer files into its folder"
            )
        tokenizer = load_tokenizer(files_from, where="chat_template")
    if template_value is None:
        if step.built:
            step.files = tokenizer_files(tokenizer)
        return step
    if template_value == "auto":
        for _, key, checkpoint in inputs:
            folder = getattr(checkpoint, "folder", None)
            if folder is not None and has_tokenizer(folder):
                model_templates.append(_template(load_tokenizer(folder, where=key)))
    template = resolve_chat_template(template_value, model_templates)
    if template is None:
        step.notes.append("chat_template: auto: no input model has a chat template; none is set")
    step.files = tokenizer_files(tokenizer, template)
    if template is not None:
        step.notes.append(
            f"chat_template: {_describe(template_value)} written into tokenizer_config.json"
        )
    return step


def _template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) else None


def _describe(value: str) -> str:
    return value if len(value) < 40 and "{" not in value else "the given template"


def open_vocabulary(
    config: MergeConfig,
    get: Callable[..., Any],
    located: Mapping[str, str],
    folder: Path,
    base_checkpoint: Any,
    entries: Sequence[tuple[Any, Any, Any]],
    find: Callable[[str, Path], str],
) -> VocabularyStep | None:
    """The vocabulary step of an opened merge; None without the vocabulary keys.

    ``get(reference, key)`` opens (or returns the opened) checkpoint of a
    reference, ``located`` maps each opened reference to its path,
    ``entries`` are the ``models:`` entries with their checkpoints, and
    ``find(reference, folder)`` locates a reference as the engine does.
    """
    if (
        config.tokenizer_source is None
        and config.tokenizer is None
        and config.chat_template is None
    ):
        return None
    inputs: list[tuple[str, str, Any]] = []
    seen: dict[int, str] = {}

    def add(reference: str, key: str, checkpoint: Any) -> str | None:
        if checkpoint is None:
            return None
        if id(checkpoint) not in seen:
            seen[id(checkpoint)] = reference
            inputs.append((reference, key, checkpoint))
        return seen[id(checkpoint)]

    base = None
    embedding_models = head_models = None
    if config.base_model is not None:
        base = add(config.base_model, "base_model", base_checkpoint)
    if config.slices is not None:
        groups = []
        for number, piece in enumerate(config.slices):
            group = []
            for i, src in enumerate(piece.sources):
                key = f"slices[{number}].sources[{i}].model"
                group.append(add(src.model, key, get(src.model, key)))
            if piece.base_model is not None:
                key = f"slices[{number}].base_model"
                group.append(add(piece.base_model, key, get(piece.base_model, key)))
            elif base is not None:
                group.append(base)
            groups.append([g for g in dict.fromkeys(group) if g is not None])
        embedding_models, head_models = groups[0], groups[-1]
        first = base_checkpoint if base_checkpoint is not None else inputs[0][2]
    else:
        for i, (entry, checkpoint, _) in enumerate(entries):
            add(entry.model, f"models[{i}].model", checkpoint)
        first = base_checkpoint if base_checkpoint is not None else entries[0][1]
    places: dict[str, str] = {}
    for label, _, _ in inputs:
        places.setdefault(os.path.realpath(located.get(label, label)), label)

    def locate(reference: str) -> str | None:
        if reference in seen.values():
            return reference
        try:
            return places.get(os.path.realpath(find(reference, folder)))
        except (ModelfuseError, OSError):
            return None

    return vocabulary_step(
        config,
        inputs,
        base=base,
        embedding_models=embedding_models,
        head_models=head_models,
        files_from=getattr(first, "folder", None),
        locate=locate,
    )
