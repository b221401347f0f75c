"""The model references of a multi-stage file: located beside the file, or a stage's name.

:func:`located` finds every model a stage names (the merged models, the base,
slices' sources, the vocabulary settings' models) from the working directory
or beside the file, keeps a stage's name (or ``NAME+LORA``) as it is, and
says which stages the stage uses; :func:`bind` replaces the stages' names by
their output folders once they are written. The rules are in
:mod:`modelfuse.merge.multistage`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from modelfuse.errors import ConfigError, ModelfuseError
from modelfuse.merge.config import MergeConfig
from modelfuse.merge.open_inputs import locate
from modelfuse.merge.output_paths import expand_user
from modelfuse.merge.parameters import short
from modelfuse.vocabulary.settings import with_model_references

__all__ = ["bind", "listed", "located"]


def listed(names: Sequence[str]) -> str:
    """At most ten names, then how many more."""
    if not names:
        return "none"
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    return ", ".join(names[:10]) + more


def _found(reference: str, folder: Path, key: str) -> str | None:
    """Where the engine finds ``reference`` (:func:`locate`: from the working directory,
    else beside the configuration file); None when it is neither."""
    try:
        location = locate(reference, folder, key)
        if not os.path.lexists(expand_user(location, key=key)):
            return None
        # Found as given: keep the reference as written (``./a`` must not become a name ``a``).
        return reference if location == str(expand_user(reference, key=key)) else location
    except (ModelfuseError, OSError):
        return None


def located(config: MergeConfig, folder: Path, names: Sequence[str], where: str) -> tuple[
    MergeConfig, tuple[str, ...]
]:
    """``config`` with its paths located beside the file when needed, and the names it uses."""
    uses: dict[str, None] = {}

    def model(reference: str | None, key: str) -> str | None:
        if reference is None:
            return None
        path = _found(reference, folder, key)
        if reference in names:
            if path is not None:
                raise ConfigError(
                    f"{where}: {key}: {short(reference)} is both a stage's name and an existing "
                    f"path ({short(path, 200)}); a reference equal to a name is the stage: "
                    f"rename the stage, or write the path another way (./{reference})"
                )
            uses[reference] = None
            return reference
        if path is None:
            with_adapter = adapted(reference, key)
            if with_adapter is not None:
                return with_adapter
            raise ConfigError(
                f"{where}: {key}: {short(reference)} is neither a stage's name (names: "
                f"{listed(names)}) nor an existing path; fix the name or the path"
            )
        return path

    def adapted(reference: str, key: str) -> str | None:
        # mergekit's MODEL+LORA: the model a stage's name or a path, the adapter a path
        head, _, tail = reference.partition("+")
        adapter = _found(tail, folder, key) if head and tail and "+" not in tail else None
        if adapter is None:
            return None
        if head in names:
            uses[head] = None
            return f"{head}+{adapter}"
        found = _found(head, folder, key)
        return f"{found}+{adapter}" if found is not None else None

    def other(reference: str | None, key: str) -> str | None:
        if reference is None:
            return None
        return _found(reference, folder, key) or reference

    base = model(config.base_model, "base_model")
    models = None
    if config.models is not None:
        models = [
            entry.model_copy(
                update={
                    "model": model(entry.model, f"models[{i}].model"),
                    "statistics": other(entry.statistics, f"models[{i}].statistics"),
                }
            )
            for i, entry in enumerate(config.models)
        ]
    slices = None
    if config.slices is not None:
        slices = [
            piece.model_copy(
                update={
                    "base_model": model(piece.base_model, f"slices[{n}].base_model"),
                    "sources": [
                        source.model_copy(
                            update={"model": model(source.model, f"slices[{n}].sources[{i}].model")}
                        )
                        for i, source in enumerate(piece.sources)
                    ],
                }
            )
            for n, piece in enumerate(config.slices)
        ]
    patches = None
    if config.patches is not None:
        patches = [
            entry.model_copy(update={"patch": other(entry.patch, f"patches[{i}].patch")})
            for i, entry in enumerate(config.patches)
        ]
    # the vocabulary's sources name models of the merge: stages, or paths beside the file
    tokenizer_source, tokenizer = with_model_references(
        config.tokenizer_source,
        config.tokenizer,
        lambda reference, key: reference if reference in names else _found(reference, folder, key)
        or reference,
    )
    result = config.model_copy(
        update={
            "base_model": base,
            "base_statistics": other(config.base_statistics, "base_statistics"),
            "models": models,
            "slices": slices,
            "patches": patches,
            "tokenizer_source": tokenizer_source,
            "tokenizer": tokenizer,
        }
    )
    return result, tuple(uses)


def bind(config: MergeConfig, outputs: Mapping[str, str]) -> MergeConfig:
    """``config`` with every reference to a stage replaced by the stage's output folder."""

    def swap(reference: str | None) -> str | None:
        if reference is None or reference in outputs:
            return None if reference is None else outputs[reference]
        head, plus, tail = reference.partition("+")  # STAGE+LORA: the stage's output
        return f"{outputs[head]}+{tail}" if plus and head in outputs else reference

    update: dict[str, Any] = {"base_model": swap(config.base_model)}
    if config.models is not None:
        update["models"] = [e.model_copy(update={"model": swap(e.model)}) for e in config.models]
    if config.slices is not None:
        update["slices"] = [
            piece.model_copy(
                update={
                    "base_model": swap(piece.base_model),
                    "sources": [
                        s.model_copy(update={"model": swap(s.model)}) for s in piece.sources
                    ],
                }
            )
            for piece in config.slices
        ]
    update["tokenizer_source"], update["tokenizer"] = with_model_references(
        config.tokenizer_source,
        config.tokenizer,
        lambda reference, _: outputs.get(reference, reference),
    )
    return config.model_copy(update=update)
