"""Building a mixture of experts on disk: mergekit-moe's configuration in, a checkpoint out.

:func:`build_moe` checks everything first (:func:`modelfuse.moe.plan_moe`),
makes the router rows (:mod:`modelfuse.moe.gates`; for the ``hidden`` modes
the base model is the only model ever loaded, in bfloat16 on the CPU, as
mergekit runs it), then streams every output tensor from its checkpoint into
a :class:`~modelfuse.checkpoint.CheckpointWriter`: the base's tensors outside
the MLPs, each expert's MLP weights, and the routers. Memory stays bounded by
a few tensors (plus the base model while the routers are made). The folder is
moved into place only when complete; on any error nothing is written.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from modelfuse.checkpoint import Checkpoint, CheckpointWriter, open_checkpoint
from modelfuse.errors import CheckpointError, ConfigError
from modelfuse.memory import peak_rss_bytes
from modelfuse.merge.parameters import short
from modelfuse.moe.config import ExpertEntry, MoeConfig
from modelfuse.moe.gates import (
    cheap_embedding_vector,
    gate_vectors,
    hidden_state_vector,
    prepare_tokenizer,
    prompt_batches,
    random_gates,
)
from modelfuse.moe.plan import MoePlan, OutputTensor, plan_moe

__all__ = [
    "CONFIG_COPY",
    "MoeResult",
    "build_moe",
    "make_gates",
    "noise_and_scale",
    "output_config_json",
]

CONFIG_COPY = "mergekit_moe_config.yml"
"""The file in the output holding the configuration, with the model paths made absolute."""

DEGENERATE_CONDITION = 5.0
"""A layer's router rows with a larger condition number than this are nearly dependent."""


@dataclass(frozen=True)
class MoeResult:
    """What :func:`build_moe` wrote.

    Attributes
    ----------
    out : Path
        The model folder.
    architecture : str
        ``Mixtral`` or ``Qwen MoE``.
    experts, shared_experts, experts_per_token : int
    gate_mode : str
    tensors : int
        Tensors written.
    bytes : int
        Bytes of tensor data written.
    seconds : float
    peak_rss : int
        Peak resident memory of the process, in bytes.
    notes : list of str
        What was done beside the weights (files copied).
    """

    out: Path
    architecture: str
    experts: int
    shared_experts: int
    experts_per_token: int
    gate_mode: str
    tensors: int
    bytes: int
    seconds: float
    peak_rss: int
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: the mixture, the tensors, the time and the peak memory."""
        shared = f", {self.shared_experts} shared" if self.shared_experts else ""
        return (
            f"wrote a {self.architecture} mixture of {self.experts} experts "
            f"({self.experts_per_token} per token{shared}; {self.gate_mode} gates): "
            f"{self.tensors} tensors ({self.bytes / 1e9:.3f} GB) to {self.out} in "
            f"{self.seconds:.1f} s; peak memory {self.peak_rss / 1e6:.0f} MB"
        )


def noise_and_scale(
    tensor: torch.Tensor,
    expert: ExpertEntry,
    *,
    residual: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """An expert's MLP weight with its ``noise_scale`` and ``residual_scale`` applied.

    ``tensor + noise_scale * N(0, 1)`` (drawn from ``generator`` in the
    tensor's dtype), then times ``residual_scale`` for a ``down_proj``
    (``residual=True``), as mergekit 0.1.5 does. ``tensor`` is never modified.

    Examples
    --------
    >>> e = ExpertEntry(source_model="m", residual_scale=0.5)
    >>> g = torch.Generator().manual_seed(0)
    >>> noise_and_scale(torch.ones(2), e, residual=True, generator=g).tolist()
    [0.5, 0.5]
    """
    if expert.noise_scale is not None:
        noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        tensor = tensor + noise * expert.noise_scale
    if residual and expert.residual_scale is not None:
        tensor = tensor * expert.residual_scale
    return tensor


def _reason(exc: BaseException) -> str:
    """The first line of the innermost cause of ``exc``, at most 120 characters."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[Any]:
    """transformers imported, with its progress bars off (restored after)."""
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ConfigError(
            "modelfuse moe writes transformers configurations and runs the base model with "
            "transformers, which is not installed; install it (pip install 'modelfuse[hf]')"
        ) from None

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield transformers
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _tokenizer(transformers: Any, plan: MoePlan) -> Any:
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(plan.base))
    except Exception as exc:  # transformers' own checks of a stranger's files: any of them
        raise ConfigError(
            f"base_model: {plan.base} has no tokenizer transformers can load "
            f"({_reason(exc)}); "
            f"gate_mode {plan.gate_mode.name} tokenizes the prompts with the base's tokenizer: "
            "add its tokenizer files, or use gate_mode: random"
        ) from None
    return prepare_tokenizer(tokenizer)


def _embedding_rows(ckpt: Checkpoint) -> Callable[[torch.Tensor], torch.Tensor]:
    """``rows(ids)``: the base's input embedding rows of those ids, read row by row."""
    name = "model.embed_tokens.weight"
    vocabulary = ckpt.info(name).shape[0]

    def rows(ids: torch.Tensor) -> torch.Tensor:
        unique = torch.unique(ids)
        if int(unique.max()) >= vocabulary or int(unique.min()) < 0:
            raise ConfigError(
                f"base_model: the tokenizer gives token id {int(unique.max())} but the embedding "
                f"has {vocabulary} rows; expected the base model's own tokenizer"
            )
        table = torch.stack([ckpt.read_rows(name, int(i), int(i) + 1)[0] for i in unique])
        return table[torch.searchsorted(unique, ids)]

    return rows


def make_gates(
    plan: MoePlan,
    *,
    generator: torch.Generator,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Router rows of every layer, shape (layers, experts + shared experts, hidden).

    Random modes draw from ``generator``; ``cheap_embed`` reads the base's
    embedding rows of the prompt tokens; the ``hidden`` modes load the base
    model with transformers (bfloat16, CPU) and run the prompts through it.
    """
    mode = plan.gate_mode
    count = len(plan.gated)
    if mode.source == "random":
        return random_gates(
            plan.num_layers, count, plan.hidden_size, generator=generator, uniform=mode.uniform
        )
    sets: Sequence[tuple[str, Sequence[str], Sequence[str] | None]] = [
        (label, e.positive_prompts or [], e.negative_prompts) for label, e in plan.gated
    ]
    with _quiet_transformers() as transformers:
        tokenizer = _tokenizer(transformers, plan)
        if mode.source == "cheap_embed":
            with open_checkpoint(plan.base) as ckpt:
                rows = _embedding_rows(ckpt)
                return gate_vectors(
                    sets,
                    lambda prompts, what: cheap_embedding_vector(
                        rows, prompt_batches(tokenizer, prompts, what=what), plan.num_layers
                    ),
                    progress=progress,
                )
        try:
            return _hidden_gates(transformers, tokenizer, plan, sets, progress)
        finally:
            gc.collect()  # the base model is freed before the tensors are streamed


def _hidden_gates(
    transformers: Any,
    tokenizer: Any,
    plan: MoePlan,
    sets: Sequence[tuple[str, Sequence[str], Sequence[str] | None]],
    progress: Callable[[int, int], None] | None,
) -> torch.Tensor:
    mode = plan.gate_mode
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(plan.base), dtype=torch.bfloat16
        )
    except Exception as exc:  # transformers' own checks of a stranger's files: any of them
        raise CheckpointError(
            f"base_model: transformers cannot load {plan.base} "
            f"({_reason(exc)}); "
            f"gate_mode {mode.name} runs the prompts through it; check the model folder"
        ) from None
    return gate_vectors(
        sets,
        lambda prompts, what: hidden_state_vector(
            model, tokenizer, prompts, reduce=mode.reduce, what=what
        ),
        progress=progress,
    )


def _warn_about(gates: torch.Tensor, experts: int) -> None:
    """mergekit's two warnings: experts not a power of two, nearly dependent router rows."""
    if experts & (experts - 1):
        warnings.warn(
            f"the mixture has {experts} experts, not a power of two; llama.cpp cannot run it",
            UserWarning,
            stacklevel=3,
        )
    degenerate = [
        layer
        for layer in range(gates.shape[0])
        if float(torch.linalg.cond(gates[layer].float())) > DEGENERATE_CONDITION
    ]
    if degenerate:
        shown = ", ".join(str(i) for i in degenerate[:8]) + (" ..." if len(degenerate) > 8 else "")
        warnings.warn(
            f"the router rows of layers {shown} are nearly dependent (condition number above "
            f"{DEGENERATE_CONDITION:g}): the prompts may be too similar, and some experts will "
            "be used little",
            UserWarning,
            stacklevel=3,
        )


def output_config_json(plan: MoePlan) -> str:
    """The output's ``config.json``: the base's, made a Mixtral or Qwen2-MoE configuration."""
    with _quiet_transformers() as transformers:
        try:
            base_config = transformers.AutoConfig.from_pretrained(str(plan.base))
            out_config = plan.architecture.output_config(
                base_config,
                experts=len(plan.experts),
                experts_per_token=plan.config.experts_per_token,
                dtype=plan.dtype,
            )
        except Exception as exc:  # transformers' own checks of a stranger's files: any of them
            raise CheckpointError(
                f"base_model: transformers cannot read {plan.base / 'config.json'} "
                f"({_reason(exc)}); "
                f"expected the configuration of a {' or '.join(plan.architecture.input_types)} "
                "model; check the file"
            ) from None
        return str(out_config.to_json_string(use_diff=True))


def _resolved_yaml(plan: MoePlan) -> str:
    """The configuration with every model path absolute."""
    data = plan.config.model_dump(exclude_none=True)
    data["base_model"] = str(plan.base.absolute())
    for entries, paths in (("experts", plan.experts), ("shared_experts", plan.shared)):
        for entry, path in zip(data.get(entries) or [], paths):
            entry["source_model"] = str(path.absolute())
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _tensor(
    task: OutputTensor,
    plan: MoePlan,
    opened: dict[tuple[str, int], Checkpoint],
    gates: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    experts = len(plan.experts)
    if task.source == "zeros":
        return torch.zeros(task.shape, dtype=task.dtype)
    if task.source == "router":
        return gates[task.index, :experts].to(task.dtype).contiguous()
    if task.source == "shared_router":
        return gates[task.index, experts:].to(task.dtype).contiguous()
    tensor = opened[(task.source, task.index)].read(task.source_name)
    if task.source in ("expert", "shared"):
        entries = (
            plan.config.experts if task.source == "expert" else plan.config.shared_experts or []
        )
        tensor = noise_and_scale(
            tensor, entries[task.index], residual=task.residual, generator=generator
        )
    return tensor.to(task.dtype).contiguous()


def build_moe(
    config: str | Path | dict[str, Any] | MoeConfig,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    random_seed: int = 0,
    out_shard_size: int = 5_000_000_000,
    copy_tokenizer: bool = True,
    write_config: bool = True,
    allow_all_same: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> MoeResult:
    """Build a mixture-of-experts checkpoint from a mergekit-moe configuration.

    Parameters
    ----------
    config : path, dict or MoeConfig
        A mergekit-moe configuration (see :class:`modelfuse.moe.MoeConfig`).
    out : path
        The model folder to write (atomically; never over an input).
    overwrite : bool, default False
        Replace an existing ``out``, once the new one is complete.
    random_seed : int, default 0
        Seed of the random router rows and of the experts' ``noise_scale`` noise.
    out_shard_size : int, default 5_000_000_000
        Parameters per output shard (mergekit's ``--out-shard-size``).
    copy_tokenizer : bool, default True
        Copy the base model's tokenizer files into ``out``.
    write_config : bool, default True
        Write the configuration, model paths made absolute, as
        ``mergekit_moe_config.yml`` (mergekit's ``--write-model-card``).
    allow_all_same : bool, default False
        Allow every expert to be the same model.
    progress : callable, optional
        ``progress(steps, nbytes)`` after each expert's prompts and each
        tensor; :attr:`MoePlan.steps` steps in all.

    Returns
    -------
    MoeResult

    Raises
    ------
    ConfigError, CheckpointError, OutputError
        One line naming the key, file or tensor; nothing is written.

    Examples
    --------
    >>> import json, os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> d = tempfile.mkdtemp()
    >>> def model(name, seed):
    ...     g = torch.Generator().manual_seed(seed)
    ...     t = {"model.embed_tokens.weight": torch.randn(10, 4, generator=g),
    ...          "model.norm.weight": torch.ones(4),
    ...          "lm_head.weight": torch.randn(10, 4, generator=g),
    ...          "model.layers.0.input_layernorm.weight": torch.ones(4),
    ...          "model.layers.0.post_attention_layernorm.weight": torch.ones(4)}
    ...     for p in "qkvo":
    ...         t[f"model.layers.0.self_attn.{p}_proj.weight"] = torch.randn(4, 4, generator=g)
    ...     for p, shape in (("gate", (8, 4)), ("up", (8, 4)), ("down", (4, 8))):
    ...         t[f"model.layers.0.mlp.{p}_proj.weight"] = torch.randn(*shape, generator=g)
    ...     os.makedirs(os.path.join(d, name))
    ...     save_file(t, os.path.join(d, name, "model.safetensors"))
    ...     config = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 4,
    ...               "intermediate_size": 8, "num_attention_heads": 2, "vocab_size": 10}
    ...     with open(os.path.join(d, name, "config.json"), "w") as f:
    ...         json.dump(config, f)
    >>> for i, name in enumerate(["base", "a", "b"]):
    ...     model(name, i)
    >>> result = build_moe({"base_model": os.path.join(d, "base"), "gate_mode": "random",
    ...                     "experts": [{"source_model": os.path.join(d, "a")},
    ...                                 {"source_model": os.path.join(d, "b")}]},
    ...                    os.path.join(d, "moe"))
    >>> result.architecture, result.tensors
    ('Mixtral', 16)
    """
    started = time.perf_counter()
    if (
        isinstance(random_seed, bool)
        or not isinstance(random_seed, int)
        or not 0 <= random_seed < 2**64
    ):
        raise ConfigError(f"--random-seed: expected a whole number >= 0, got {short(random_seed)}")
    if (
        isinstance(out_shard_size, bool)
        or not isinstance(out_shard_size, int)
        or out_shard_size < 1
    ):
        raise ConfigError(
            "--out-shard-size: expected a positive number of parameters, "
            f"got {short(out_shard_size)}"
        )
    plan = plan_moe(config, out, overwrite=overwrite, allow_all_same=allow_all_same)
    model_config = output_config_json(plan)
    generator = torch.Generator().manual_seed(random_seed)
    with torch.no_grad():
        gates = make_gates(plan, generator=generator, progress=progress)
    _warn_about(gates, len(plan.experts))
    elements = sum(max(1, t.nbytes // t.dtype.itemsize) for t in plan.tensors)
    shard_bytes = max(1, out_shard_size * plan.total_bytes // max(1, elements))
    layout = [(t.name, t.shape, t.dtype) for t in plan.tensors]
    written = 0
    notes: list[str] = []
    with contextlib.ExitStack() as stack, torch.no_grad():
        opened: dict[tuple[str, int], Checkpoint] = {
            ("base", 0): stack.enter_context(open_checkpoint(plan.base))
        }
        for source, paths in (("expert", plan.experts), ("shared", plan.shared)):
            for i, path in enumerate(paths):
                opened[(source, i)] = stack.enter_context(open_checkpoint(path))
        writer = stack.enter_context(
            CheckpointWriter(out, layout, shard_size=shard_bytes, overwrite=overwrite)
        )
        for task in plan.tensors:
            writer.write(task.name, _tensor(task, plan, opened, gates, generator))
            written += task.nbytes
            if progress is not None:
                progress(1, task.nbytes)
        writer.add_file("config.json", model_config)
        if write_config:
            writer.add_file(CONFIG_COPY, _resolved_yaml(plan))
        copied = writer.copy_model_files(plan.base, tokenizer=copy_tokenizer)
        if copied:
            notes.append(f"copied {', '.join(copied)} from {plan.base}")
        notes = [*writer.notes, *notes]
        path = writer.commit()
    return MoeResult(
        out=Path(path),
        architecture=plan.architecture.title,
        experts=len(plan.experts),
        shared_experts=len(plan.shared),
        experts_per_token=plan.config.experts_per_token,
        gate_mode=plan.gate_mode.name,
        tensors=len(plan.tensors),
        bytes=written,
        seconds=time.perf_counter() - started,
        peak_rss=peak_rss_bytes(),
        notes=notes,
    )
