"""Extract a PEFT LoRA adapter from the difference of two checkpoints.

For every 2-D linear weight ``W`` (state-dict key ``MODULE.weight``) the task
vector ``delta = W_finetuned - W_base`` is factored by a truncated SVD,
``delta ~ B @ A`` (:func:`~modelfuse.lora.low_rank_factors`). What cannot be
factored is stored as mergekit's ``mergekit-extract-lora`` stores it:

- embeddings (modules whose last name part holds ``embed``, or is ``wte``,
  ``wpe`` or ``shared``) whole, as PEFT ``modules_to_save`` (``embeddings=
  "full"``, the default), as ``lora_embedding_A``/``lora_embedding_B``
  (``"lora"``) or not at all (``"skip"``);
- a vocabulary the fine-tune grew (every tensor whose first dimension differs
  by the same rows): those modules whole, with the fine-tune's tokenizer;
- changed biases of the adapted linear layers as ``lora_B.bias`` (PEFT's
  ``lora_bias``) when every adapted layer has a bias, else their modules whole;
- other changed tensors (norms, biases of other layers, convolutions) as
  their modules whole, or not at all with ``skip_undecomposable=True``.

The adapter folder holds ``adapter_model.safetensors`` with PEFT's key names
and ``adapter_config.json``; it is written through the checkpoint writer, so
an interrupted run leaves nothing and a killed one is cleaned up by the next.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch

from modelfuse.checkpoint import Checkpoint, CheckpointWriter, open_checkpoint
from modelfuse.checkpoint.adapted import conv1d_modules
from modelfuse.checkpoint.writer import is_tokenizer_file
from modelfuse.errors import CheckpointError, ConfigError
from modelfuse.lora.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraResult,
    ModuleFit,
    adapter_config,
    task_type,
)
from modelfuse.lora.factors import check_rank_energy, low_rank_factors
from modelfuse.merge.output_paths import check_output_path

__all__ = ["EmbeddingMode", "extract_lora", "matching_tensors"]

EmbeddingMode = Literal["full", "lora", "skip"]
_EMBEDDING_MODES = ("full", "lora", "skip")
_EMBEDDING_NAMES = ("wte", "wpe", "shared")
_PREFIX = "base_model.model."


def _is_embedding(module: str) -> bool:
    last = module.rsplit(".", 1)[-1].lower()
    return "embed" in last or last in _EMBEDDING_NAMES


def _split(name: str) -> tuple[str, str | None]:
    """``("fc", "weight")`` for ``fc.weight``; ``(name, None)`` for a tensor of no module."""
    module, _, kind = name.rpartition(".")
    return (module, kind) if module and kind in ("weight", "bias") else (name, None)


def _shapes(ckpt: Checkpoint, name: str) -> tuple[int, ...]:
    return tuple(ckpt.info(name).shape)


def matching_tensors(base: Checkpoint, tuned: Checkpoint) -> list[str]:
    """The floating-point tensors of ``tuned``, after checking ``base`` has them in the same shape.

    A grown vocabulary is accepted: 2-D tensors whose first dimension is
    ``N`` rows in the base and ``M`` in the fine-tune, the same pair for all
    of them, with every other dimension equal.

    Raises
    ------
    CheckpointError
        A tensor is missing from either checkpoint or has another shape.
    """
    names = [n for n in tuned.keys() if tuned.info(n).dtype.is_floating_point]
    floats = {n for n in base.keys() if base.info(n).dtype.is_floating_point}
    problems = []
    resized: dict[tuple[int, int], list[str]] = {}
    for n in names:
        if n not in base:
            problems.append(f"tensor {n[:80]} is in the fine-tuned checkpoint but not in the base")
            continue
        a, b = _shapes(base, n), _shapes(tuned, n)
        if a == b:
            continue
        if len(a) == len(b) == 2 and a[1] == b[1]:
            resized.setdefault((a[0], b[0]), []).append(n)
        else:
            problems.append(
                f"tensor {n[:80]} has shape {list(a)} in the base but {list(b)} in the "
                "fine-tuned checkpoint"
            )
    if len(resized) > 1:  # two different row changes cannot both be the vocabulary
        for (rows_a, rows_b), group in resized.items():
            problems += [
                f"tensor {n[:80]} has {rows_a} rows in the base but {rows_b} in the fine-tuned "
                "checkpoint" for n in group
            ]
    problems += [
        f"tensor {n[:80]} is in the base but not in the fine-tuned checkpoint"
        for n in sorted(floats - set(names))
    ]
    if problems:
        raise CheckpointError(
            f"{tuned.path}: does not fit the base {base.path} ({len(problems)} problems: "
            + "; ".join(problems[:3])
            + "); expected a fine-tune of the same architecture; check the two paths"
        )
    return names


def _finite(delta: torch.Tensor, name: str, base: object, finetuned: object) -> None:
    if not bool(torch.isfinite(delta).all()):
        raise CheckpointError(
            f"tensor {name[:80]}: the difference of the checkpoints holds NaN or inf "
            f"(in {finetuned} or {base}); expected finite weights; check both files"
        )


def extract_lora(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    energy: float | None = None,
    embeddings: EmbeddingMode = "full",
    skip_undecomposable: bool = False,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    sv_epsilon: float = 0.0,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    save_modules: Sequence[str] = (),
) -> LoraResult:
    """Write the LoRA adapter that best turns ``base`` into ``finetuned`` at a given rank.

    Parameters
    ----------
    base, finetuned : path
        Checkpoints (file or model folder) of one architecture, read lazily.
    out : path
        The adapter folder to write (atomically; never an input).
    rank : int, optional
        The rank of every module (capped by the module's smaller side).
    energy : float, optional
        Per module, the smallest rank keeping this fraction of the squared
        singular values of the task vector (capped by ``rank`` if given).
    embeddings : {"full", "lora", "skip"}, default "full"
        Changed embeddings stored whole (PEFT ``modules_to_save``, as
        mergekit does), as low-rank ``lora_embedding_A``/``B``, or left out.
        A grown vocabulary is always stored whole.
    skip_undecomposable : bool, default False
        Leave out changed tensors that are not linear weights (norms, other
        biases) instead of storing their modules whole.
    overwrite : bool, default False
        Replace an existing ``out`` (never one that is or holds an input).
    progress : callable, optional
        Called ``progress(1, nbytes)`` after each tensor.
    sv_epsilon : float, default 0
        Per module, keep only singular values above this (at least one).
    include, exclude : sequence of str
        Regular expressions searched in module names, as mergekit-extract-lora's
        ``--include-regex`` and ``--exclude-regex``: a module that ``exclude``
        matches is left out, and with ``include`` so is a module none of them
        match (embeddings stored whole excepted, as in mergekit).
    save_modules : sequence of str
        Modules stored whole (PEFT ``modules_to_save``), named in full or by
        their last part (``lm_head``), changed or not.

    Returns
    -------
    LoraResult

    Raises
    ------
    ConfigError
        Neither ``rank`` nor ``energy``, one of them out of range, or an
        unknown ``embeddings`` mode.
    CheckpointError
        The checkpoints differ in tensor names or shapes, a difference holds
        NaN or inf, or no linear weight differs (nothing to extract).
    OutputError
        ``out`` exists without ``overwrite``, or is or holds an input.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> d = tempfile.mkdtemp()
    >>> w = torch.zeros(4, 3)
    >>> save_file({"fc.weight": w}, os.path.join(d, "base.safetensors"))
    >>> update = torch.outer(torch.ones(4), torch.tensor([1.0, 2.0, 3.0]))
    >>> save_file({"fc.weight": w + update}, os.path.join(d, "tuned.safetensors"))
    >>> result = extract_lora(os.path.join(d, "base.safetensors"),
    ...                       os.path.join(d, "tuned.safetensors"), os.path.join(d, "lora"), rank=4)
    >>> result.modules["fc"].rank, result.max_error < 1e-6
    (1, True)
    >>> sorted(os.listdir(os.path.join(d, "lora")))
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    started = time.perf_counter()
    check_rank_energy(rank, energy)
    if embeddings not in _EMBEDDING_MODES:
        raise ConfigError(
            f"--embeddings: expected one of {', '.join(_EMBEDDING_MODES)}, got "
            f"{repr(embeddings)[:60]}"
        )
    if not (isinstance(sv_epsilon, float | int) and math.isfinite(sv_epsilon) and sv_epsilon >= 0):
        raise ConfigError(
            f"--sv-epsilon: expected a number of at least 0, got {repr(sv_epsilon)[:60]}"
        )
    included = _patterns(include, "--include-regex")
    excluded = _patterns(exclude, "--exclude-regex")
    out = Path(out)
    inputs = [("base checkpoint", base), ("fine-tuned checkpoint", finetuned)]
    check_output_path(out, inputs, overwrite=overwrite, flag="--out")
    factors: dict[str, torch.Tensor] = {}
    fits: dict[str, ModuleFit] = {}
    biases: dict[str, tuple[str, torch.Tensor]] = {}
    has_bias: set[str] = set()
    unchanged: list[str] = []
    skipped: list[str] = []
    loose: list[str] = []  # changed, not factorable: whole module or skipped
    full: set[str] = set()
    filtered = 0  # changed linear weights the module filters leave out
    vocabulary: tuple[int, int] | None = None
    with open_checkpoint(base) as cb, open_checkpoint(finetuned) as ct, torch.no_grad():
        names = matching_tensors(cb, ct)
        task = task_type(cb.folder)
        conv1d = conv1d_modules(cb.folder)  # GPT-2's weights are stored (in, out)
        for name in names:
            module, kind = _split(name)
            if kind == "bias":
                has_bias.add(module)
            tuned = ct.read(name)
            if _shapes(cb, name) != tuple(tuned.shape):
                _finite(tuned.float(), name, base, finetuned)
                vocabulary = (_shapes(cb, name)[0], int(tuned.shape[0]))
                if kind is None:
                    raise CheckpointError(
                        f"tensor {name[:80]}: its vocabulary rows grew ({vocabulary[0]} to "
                        f"{vocabulary[1]}) but it belongs to no module (no .weight or .bias), so "
                        "PEFT cannot store it; expected a model whose embeddings are modules"
                    )
                full.add(module)
            else:
                delta = tuned.to(torch.float32) - cb.read(name).to(torch.float32)
                _finite(delta, name, base, finetuned)
                linear = delta.dim() == 2 and kind == "weight"
                embedding = linear and _is_embedding(module)
                changed = bool(torch.any(delta != 0))
                whole_embedding = embedding and embeddings == "full"
                if module in save_modules or module.rsplit(".", 1)[-1] in save_modules:
                    full.add(module)  # asked for at full rank, changed or not
                elif any(p.search(module) for p in excluded) or (
                    included and not whole_embedding and not any(p.search(module) for p in included)
                ):
                    if changed:
                        skipped.append(name)
                        filtered += linear and not embedding
                elif not changed:
                    if linear and not (embedding and embeddings != "lora"):
                        unchanged.append(module)
                elif embedding and embeddings == "full":
                    full.add(module)
                elif embedding and embeddings == "skip":
                    skipped.append(name)
                elif linear:
                    # an embedding's weight is (vocab, dim) and a Conv1D's (in, out): PEFT
                    # stores their updates transposed
                    transposed = embedding or module.rsplit(".", 1)[-1] in conv1d
                    matrix = delta.T if transposed else delta
                    b, a = low_rank_factors(matrix, rank=rank, energy=energy, sv_epsilon=sv_epsilon)
                    error = float(
                        torch.linalg.matrix_norm(matrix - b @ a) / torch.linalg.matrix_norm(matrix)
                    )
                    fits[module] = ModuleFit(int(a.shape[0]), error, tuple(delta.shape), embedding)
                    head = f"{_PREFIX}{module}"
                    pair = ("lora_embedding_A", "lora_embedding_B") if embedding else (
                        "lora_A.weight", "lora_B.weight"
                    )
                    factors[f"{head}.{pair[0]}"] = a.to(tuned.dtype)
                    factors[f"{head}.{pair[1]}"] = b.to(tuned.dtype)
                elif kind == "bias":
                    biases[module] = (name, delta.to(tuned.dtype))
                else:
                    loose.append(name)
            if progress is not None:
                progress(1, tuned.numel() * tuned.element_size())
        lora_bias = _place_biases(fits, biases, has_bias, factors, loose)
        for name in loose:
            module, kind = _split(name)
            if kind is None or skip_undecomposable:
                skipped.append(name)
            else:
                full.add(module)
        for module in full & set(fits):  # a module stored whole needs no factors
            _drop_factors(factors, module)
            del fits[module]
        if not fits and filtered:
            raise ConfigError(
                f"--include-regex/--exclude-regex leave out all {filtered} changed linear weights; "
                "nothing is left to factor: loosen the patterns"
            )
        if not fits:
            raise CheckpointError(
                f"{finetuned}: every linear weight equals the base's ({base}); the task vector is "
                "zero on every linear layer, so there is no adapter to extract; check that the "
                "two paths name a base and its fine-tune"
            )
        whole = [n for n in names if _split(n)[0] in full and _split(n)[1] is not None]
        plan = [(n, tuple(t.shape), t.dtype) for n, t in factors.items()]
        plan += [(_PREFIX + n, _shapes(ct, n), ct.info(n).dtype) for n in whole]
        config = adapter_config(
            os.fspath(base), fits, sorted(full), task, lora_bias=lora_bias,
            fan_in_fan_out=any(m.rsplit(".", 1)[-1] in conv1d for m in fits),
        )
        with CheckpointWriter(
            out, plan, overwrite=overwrite, file_name=ADAPTER_WEIGHTS
        ) as writer:
            for name, tensor in factors.items():
                writer.write(name, tensor)
            for name in whole:
                writer.write(_PREFIX + name, ct.read(name))
            writer.add_file(ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
            if vocabulary is not None and ct.folder is not None:
                for path in sorted(ct.folder.iterdir()):
                    if path.is_file() and is_tokenizer_file(path.name):
                        writer.add_file(path.name, path)
            check_output_path(out, inputs, overwrite=overwrite, flag="--out")
            writer.commit()
            removed = list(writer.notes)
    size = (out / ADAPTER_WEIGHTS).stat().st_size
    requested = sorted(m for m in full if m in save_modules or m.rsplit(".", 1)[-1] in save_modules)
    return LoraResult(
        out, fits, size, unchanged, skipped, sorted(full), vocabulary, lora_bias,
        time.perf_counter() - started, removed, requested,
    )


def _patterns(expressions: Sequence[str], flag: str) -> list[re.Pattern[str]]:
    compiled = []
    for expression in expressions:
        try:
            compiled.append(re.compile(expression))
        except re.error as exc:
            raise ConfigError(
                f"{flag}: {expression[:60]!r} is not a regular expression ({exc}); fix the pattern"
            ) from None
    return compiled


def _drop_factors(factors: dict[str, torch.Tensor], module: str) -> None:
    for part in ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A",
                 "lora_embedding_B"):
        factors.pop(f"{_PREFIX}{module}.{part}", None)


def _place_biases(
    fits: dict[str, ModuleFit],
    biases: dict[str, tuple[str, torch.Tensor]],
    has_bias: set[str],
    factors: dict[str, torch.Tensor],
    loose: list[str],
) -> bool:
    """Store changed biases of adapted layers as ``lora_B.bias``; return PEFT's ``lora_bias``.

    PEFT's ``lora_bias`` gives every adapted layer a bias update, which it
    cannot merge into a layer without a bias, nor give an embedding: it is
    used only when every adapted layer is a linear layer with a bias. Else
    (and for biases of layers that are not adapted) the bias is left to the
    caller as a tensor to store with its whole module.
    """
    adapted = [m for m in biases if m in fits]
    usable = bool(adapted) and all(
        not fit.embedding and m in has_bias for m, fit in fits.items()
    )
    for module, (name, delta) in biases.items():
        if usable and module in fits:
            factors[f"{_PREFIX}{module}.lora_B.bias"] = delta
        else:
            loose.append(name)
    if usable:  # a zero update for adapted layers whose bias did not change
        for module in fits:
            key = f"{_PREFIX}{module}.lora_B.bias"
            if key not in factors:
                out_features = fits[module].shape[0]
                factors[key] = torch.zeros(
                    out_features, dtype=factors[f"{_PREFIX}{module}.lora_B.weight"].dtype
                )
    return usable
