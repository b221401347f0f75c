"""Extract a PEFT LoRA adapter from the difference of two checkpoints.

For every 2-D linear weight ``W`` (state-dict key ``MODULE.weight``) the task
vector ``delta = W_finetuned - W_base`` is factored by a truncated SVD,
``delta ~ B @ A`` with ``B = U_k sqrt(S_k)`` (out x k) and
``A = sqrt(S_k) V_k^T`` (k x in). By Eckart-Young this is the best rank-k
approximation in the Frobenius norm, with relative error
``sqrt(sum of the dropped s_i^2) / ||delta||``.

Embeddings (modules whose last name part holds ``embed``, or is ``wte``,
``wpe`` or ``shared``) are left out unless ``embeddings=True``; they are then
stored as PEFT's ``lora_embedding_A``/``lora_embedding_B``. Tensors that are
not 2-D (norms, biases, convolutions) are never stored: the adapter changes
linear layers only, and the result names every such tensor that differs
between the checkpoints (:attr:`LoraResult.skipped`) so the loss is visible.

The adapter folder holds ``adapter_model.safetensors`` with PEFT's key names
(``base_model.model.MODULE.lora_A.weight`` and ``...lora_B.weight``) and
``adapter_config.json`` (``peft_type: LORA``, ``r`` the largest rank,
``lora_alpha = r`` so the scaling is 1, ``target_modules``, and
``rank_pattern``/``alpha_pattern`` for modules of another rank).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelfuse.checkpoint import Checkpoint, open_checkpoint
from modelfuse.errors import CheckpointError, ConfigError, OutputError
from modelfuse.merge.output_paths import check_output_path

__all__ = ["LoraResult", "ModuleFit", "extract_lora", "low_rank_factors", "matching_tensors"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_EMBEDDING_NAMES = ("wte", "wpe", "shared")
# above this many rows and columns a fixed-rank fit uses a randomized SVD
_LOWRANK_SIDE = 4096


@dataclass(frozen=True)
class ModuleFit:
    """The low-rank fit of one module's task vector.

    Attributes
    ----------
    rank : int
        The rank kept.
    error : float
        Relative Frobenius error ``||delta - B @ A|| / ||delta||``, measured.
    shape : tuple of int
        The weight's shape (out, in).
    embedding : bool
        Whether the module is an embedding.
    """

    rank: int
    error: float
    shape: tuple[int, int]
    embedding: bool = False


@dataclass(frozen=True)
class LoraResult:
    """What :func:`extract_lora` wrote.

    Attributes
    ----------
    out : Path
        The adapter folder.
    modules : dict of str to ModuleFit
        Each adapted module, by module name.
    bytes : int
        Size of ``adapter_model.safetensors``.
    unchanged : list of str
        Candidate modules whose weights are equal in both checkpoints (left out).
    skipped : list of str
        Tensors that differ but are not adapted (not 2-D, or embeddings
        without ``embeddings=True``).
    seconds : float
        Wall time.
    """

    out: Path
    modules: dict[str, ModuleFit]
    bytes: int
    unchanged: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def max_error(self) -> float:
        """The largest relative error over the modules."""
        return max(fit.error for fit in self.modules.values())

    @property
    def mean_error(self) -> float:
        """The mean relative error over the modules."""
        return sum(fit.error for fit in self.modules.values()) / len(self.modules)

    def notes(self) -> list[str]:
        """What was left out, one sentence each."""
        notes = []
        if self.unchanged:
            notes.append(
                f"{len(self.unchanged)} linear weights are equal in both checkpoints and were "
                f"left out of the adapter (e.g. {_names(self.unchanged)})"
            )
        if self.skipped:
            notes.append(
                f"{len(self.skipped)} changed tensors cannot be stored as LoRA factors and were "
                f"not saved (e.g. {_names(self.skipped)}); the adapter does not reproduce them"
            )
        return notes

    def summary(self) -> str:
        ranks = sorted({fit.rank for fit in self.modules.values()})
        rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        return (
            f"wrote a LoRA adapter of {len(self.modules)} modules (rank {rank}) to {self.out} "
            f"({self.bytes / 1e6:.2f} MB); relative error max {self.max_error:.3g}, "
            f"mean {self.mean_error:.3g}, in {self.seconds:.1f} s"
        )


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _is_embedding(module: str) -> bool:
    last = module.rsplit(".", 1)[-1].lower()
    return "embed" in last or last in _EMBEDDING_NAMES


def _chosen_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """The rank kept for singular values ``s`` (descending), at most their numerical rank."""
    # singular values below numpy's matrix_rank tolerance are rounding noise: never kept
    tolerance = float(s[0]) * max(s.numel(), 1) * torch.finfo(torch.float32).eps * 4 if s.numel() else 0
    numerical = max(1, int((s > tolerance).sum()))
    limit = numerical if rank is None else min(rank, numerical)
    if energy is None:
        return limit
    squares = s.to(torch.float64) ** 2
    share = torch.cumsum(squares, 0) / squares.sum()
    # the smallest k whose first k squared singular values reach the threshold
    reached = int(torch.searchsorted(share, torch.tensor([energy], dtype=torch.float64)))
    return max(1, min(limit, reached + 1))


def low_rank_factors(
    delta: torch.Tensor, *, rank: int | None = None, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``B`` (out x k) and ``A`` (k x in) with ``B @ A`` the truncated SVD of ``delta``.

    Parameters
    ----------
    delta : Tensor
        A 2-D matrix (not modified).
    rank : int, optional
        The rank kept (at most ``min(delta.shape)``).
    energy : float, optional
        Keep the smallest rank whose squared singular values reach this
        fraction of their sum (capped by ``rank`` when both are given).

    Returns
    -------
    (B, A) : float32 tensors

    Examples
    --------
    >>> import torch
    >>> delta = torch.outer(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0, 1.0]))
    >>> b, a = low_rank_factors(delta, rank=1)
    >>> b.shape, a.shape, torch.allclose(b @ a, delta)
    (torch.Size([2, 1]), torch.Size([1, 3]), True)
    """
    if rank is None and energy is None:
        raise ConfigError("give a rank, an energy threshold or both; pass --rank 16 or --energy 0.9")
    matrix = delta.detach().to(torch.float32)
    side = min(matrix.shape)
    if energy is None and rank is not None and side >= _LOWRANK_SIDE and rank * 8 < side:
        u, s, v = torch.svd_lowrank(matrix, q=min(side, rank + 16), niter=4)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = _chosen_rank(s, rank, energy)
    root = s[:k].sqrt()
    b = (u[:, :k] * root).contiguous()
    a = (root[:, None] * vh[:k]).contiguous()
    return b, a


def _check_rank_energy(rank: int | None, energy: float | None) -> None:
    if rank is None and energy is None:
        raise ConfigError("give a rank, an energy threshold or both; pass --rank 16 or --energy 0.9")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"--rank: expected a whole number of at least 1, got {repr(rank)[:60]}")
    if energy is not None and not (isinstance(energy, float | int) and 0 < energy <= 1):
        raise ConfigError(
            f"--energy: expected a fraction in (0, 1], got {repr(energy)[:60]}; pass e.g. 0.9"
        )


def matching_tensors(base: Checkpoint, tuned: Checkpoint) -> list[str]:
    """The floating-point tensors of ``tuned``, after checking ``base`` has them in the same shape.

    Raises
    ------
    CheckpointError
        A tensor is missing from either checkpoint or has another shape.
    """
    names = [n for n in tuned.keys() if tuned.info(n).dtype.is_floating_point]
    floats = {n for n in base.keys() if base.info(n).dtype.is_floating_point}
    problems = []
    for n in names:
        if n not in base:
            problems.append(f"tensor {n[:80]} is in the fine-tuned checkpoint but not in the base")
        elif tuple(base.info(n).shape) != tuple(tuned.info(n).shape):
            problems.append(
                f"tensor {n[:80]} has shape {list(base.info(n).shape)} in the base but "
                f"{list(tuned.info(n).shape)} in the fine-tuned checkpoint"
            )
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


def _task_type(folder: Path | None) -> str | None:
    """``CAUSAL_LM`` when the model folder's config names a causal language model."""
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if isinstance(architectures, list) and any(
        isinstance(a, str) and a.endswith("ForCausalLM") for a in architectures
    ):
        return "CAUSAL_LM"
    return None


def _adapter_config(
    base: str, fits: dict[str, ModuleFit], task_type: str | None
) -> dict[str, object]:
    r = max(fit.rank for fit in fits.values())
    pattern = {name: fit.rank for name, fit in fits.items() if fit.rank != r}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(fits),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``staging`` folder to ``out``, replacing a previous ``out``."""
    os.chmod(staging, 0o777 & ~_umask())
    if os.path.lexists(out):
        if not overwrite:
            raise OutputError(f"{out}: appeared while the adapter was written; nothing was written")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def extract_lora(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    energy: float | None = None,
    embeddings: bool = False,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
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
    embeddings : bool, default False
        Also adapt embeddings (as ``lora_embedding_A``/``lora_embedding_B``).
    overwrite : bool, default False
        Replace an existing ``out`` (never one that is or holds an input).
    progress : callable, optional
        Called ``progress(1, nbytes)`` after each tensor.

    Returns
    -------
    LoraResult

    Raises
    ------
    ConfigError
        Neither ``rank`` nor ``energy``, or one of them out of range.
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
    from safetensors.torch import save_file

    started = time.perf_counter()
    _check_rank_energy(rank, energy)
    out = Path(out)
    check_output_path(
        out, [("base checkpoint", base), ("fine-tuned checkpoint", finetuned)],
        overwrite=overwrite, flag="--out",
    )
    tensors: dict[str, torch.Tensor] = {}
    fits: dict[str, ModuleFit] = {}
    unchanged: list[str] = []
    skipped: list[str] = []
    with open_checkpoint(base) as cb, open_checkpoint(finetuned) as ct, torch.no_grad():
        names = matching_tensors(cb, ct)
        task_type = _task_type(cb.folder)
        for name in names:
            tuned = ct.read(name)
            delta = tuned.to(torch.float32) - cb.read(name).to(torch.float32)
            module = name.removesuffix(".weight")
            if not bool(torch.isfinite(delta).all()):
                raise CheckpointError(
                    f"tensor {name[:80]}: the difference of the checkpoints holds NaN or inf "
                    f"(in {finetuned} or {base}); expected finite weights; check both files"
                )
            linear = delta.dim() == 2 and name.endswith(".weight")
            embedding = linear and _is_embedding(module)
            if not bool(torch.any(delta != 0)):
                if linear and (embeddings or not embedding):
                    unchanged.append(module)
            elif not linear or (embedding and not embeddings):
                skipped.append(name)
            else:
                # an embedding's weight is (vocab, dim); PEFT stores its update transposed
                matrix = delta.T if embedding else delta
                b, a = low_rank_factors(matrix, rank=rank, energy=energy)
                norm = torch.linalg.matrix_norm(matrix)
                error = float(torch.linalg.matrix_norm(matrix - b @ a) / norm)
                fits[module] = ModuleFit(int(a.shape[0]), error, tuple(delta.shape), embedding)
                store = tuned.dtype
                prefix = f"base_model.model.{module}"
                if embedding:
                    tensors[f"{prefix}.lora_embedding_A"] = a.to(store)
                    tensors[f"{prefix}.lora_embedding_B"] = b.to(store)
                else:
                    tensors[f"{prefix}.lora_A.weight"] = a.to(store)
                    tensors[f"{prefix}.lora_B.weight"] = b.to(store)
            if progress is not None:
                progress(1, tuned.numel() * tuned.element_size())
    if not fits:
        raise CheckpointError(
            f"{finetuned}: every linear weight equals the base's ({base}); the task vector is "
            "zero, so there is no adapter to extract; check that the two paths name a base "
            "and its fine-tune"
        )
    config = _adapter_config(os.fspath(base), fits, task_type)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.absolute().parent))
    try:
        save_file(tensors, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", "utf-8")
        size = (staging / ADAPTER_WEIGHTS).stat().st_size
        check_output_path(
            out, [("base checkpoint", base), ("fine-tuned checkpoint", finetuned)],
            overwrite=overwrite, flag="--out",
        )
        _publish(staging, out, overwrite)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write ({exc.strerror or exc}); nothing was written") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return LoraResult(
        out, fits, size, unchanged, skipped, time.perf_counter() - started
    )
