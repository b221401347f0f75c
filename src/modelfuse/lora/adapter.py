"""What an extracted adapter holds: per-module fits, the result, PEFT's adapter_config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LoraResult", "ModuleFit", "adapter_config"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


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


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


@dataclass(frozen=True)
class LoraResult:
    """What :func:`~modelfuse.lora.extract_lora` wrote.

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
        Tensors that differ but are not stored (embeddings with
        ``embeddings="skip"``; with ``skip_undecomposable``, tensors that are
        not a linear weight; tensors that belong to no module).
    full : list of str
        Modules stored whole, as PEFT's ``modules_to_save``.
    vocabulary : tuple of int, optional
        ``(base rows, fine-tuned rows)`` when the fine-tune has another
        vocabulary size; the base must then be resized before loading.
    lora_bias : bool
        Whether bias updates are stored as ``lora_B.bias`` (PEFT's ``lora_bias``).
    seconds : float
        Wall time.
    removed : list of str
        Temporary folders of killed earlier runs to the same ``out`` that
        were removed, one sentence each.
    requested : list of str
        The modules of ``full`` stored whole because they were asked for
        (``save_modules``), changed or not.
    """

    out: Path
    modules: dict[str, ModuleFit]
    bytes: int
    unchanged: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    full: list[str] = field(default_factory=list)
    vocabulary: tuple[int, int] | None = None
    lora_bias: bool = False
    seconds: float = 0.0
    removed: list[str] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        """The largest relative error over the low-rank modules (0 if there are none)."""
        return max((fit.error for fit in self.modules.values()), default=0.0)

    @property
    def mean_error(self) -> float:
        """The mean relative error over the low-rank modules (0 if there are none)."""
        if not self.modules:
            return 0.0
        return sum(fit.error for fit in self.modules.values()) / len(self.modules)

    def notes(self) -> list[str]:
        """What was left out or needs a step before loading, one sentence each."""
        notes = list(self.removed)
        if self.vocabulary is not None:
            before, after = self.vocabulary
            notes.append(
                f"the fine-tune has {after} tokens and the base {before}: its embedding rows are "
                f"stored whole and its tokenizer is copied into {self.out}; call "
                f"base_model.resize_token_embeddings({after}) before PeftModel.from_pretrained"
            )
        needed = [m for m in self.full if m not in self.requested]
        if needed:
            notes.append(
                f"{len(needed)} changed modules cannot be factored and are stored whole as "
                f"PEFT modules_to_save: {_names(needed)}"
            )
        if self.requested:
            notes.append(
                f"{len(self.requested)} modules are stored whole as asked (--save-module), as "
                f"PEFT modules_to_save: {_names(self.requested)}"
            )
        if self.unchanged:
            notes.append(
                f"{len(self.unchanged)} linear weights are equal in both checkpoints and were "
                f"left out of the adapter (e.g. {_names(self.unchanged)})"
            )
        if self.skipped:
            notes.append(
                f"{len(self.skipped)} changed tensors were not stored (e.g. "
                f"{_names(self.skipped)}); the adapter does not reproduce them"
            )
        return notes

    def summary(self) -> str:
        if self.modules:
            ranks = sorted({fit.rank for fit in self.modules.values()})
            rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
            fitted = (
                f"{len(self.modules)} low-rank modules (rank {rank}; relative error max "
                f"{self.max_error:.3g}, mean {self.mean_error:.3g})"
            )
        else:
            fitted = "no low-rank modules"
        whole = f" and {len(self.full)} whole modules" if self.full else ""
        return (
            f"wrote a LoRA adapter of {fitted}{whole} to {self.out} "
            f"({self.bytes / 1e6:.2f} MB) in {self.seconds:.1f} s"
        )


def task_type(folder: Path | None) -> str | None:
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


def adapter_config(
    base: str,
    fits: dict[str, ModuleFit],
    full: list[str],
    task: str | None,
    *,
    lora_bias: bool,
    fan_in_fan_out: bool = False,
) -> dict[str, object]:
    """PEFT's ``adapter_config.json`` for these fits: ``lora_alpha = r`` so the scaling is 1;
    ``fan_in_fan_out`` for modules whose weights are stored ``(in, out)`` (GPT-2's Conv1D)."""
    r = max((fit.rank for fit in fits.values()), default=1)
    pattern = {name: fit.rank for name, fit in fits.items() if fit.rank != r}
    return {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(fits),
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": lora_bias,
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": sorted(full) or None,
    }
