"""Checking a mixture of experts before any work: the configuration, the models, the output.

:func:`plan_moe` finds every reason to refuse a configuration (as mergekit
0.1.5's checks do, plus the tensor names and shapes of every input) from
``config.json`` files and checkpoint headers alone, and lists the output
tensors and where each one comes from.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from modelfuse.checkpoint import Checkpoint, open_checkpoint
from modelfuse.checkpoint.writer import is_tokenizer_file
from modelfuse.errors import CheckpointError, ConfigError
from modelfuse.merge.output_paths import check_output_path, expand_user
from modelfuse.merge.parameters import short
from modelfuse.moe.architectures import MLP_PROJECTIONS, OutputArchitecture, select_architecture
from modelfuse.moe.config import ExpertEntry, MoeConfig, load_moe_config, resolve_moe_dtype
from modelfuse.moe.gates import GateMode, get_gate_mode

__all__ = ["MoePlan", "OutputTensor", "plan_moe"]

ALLOW_ALL_SAME_FLAG = "--i-understand-this-is-not-useful-without-training"
_MAX_CONFIG_JSON = 4 * 1024 * 1024
_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.")

Source = Literal["base", "expert", "shared", "zeros", "router", "shared_router"]


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output and where it comes from.

    Attributes
    ----------
    name : str
        Its name in the output.
    shape : tuple of int
    dtype : torch.dtype
        The dtype written.
    source : {"base", "expert", "shared", "zeros", "router", "shared_router"}
        A base tensor, an expert's (or the shared expert's) MLP weight, zeros
        (Qwen2-MoE's attention biases when the base has none), or a router row block.
    index : int
        The expert (for ``expert``) or the layer (for routers).
    source_name : str
        The tensor's name in its input (empty for zeros and routers).
    residual : bool
        Whether it is a ``down_proj`` (scaled by ``residual_scale``).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: Source
    index: int = 0
    source_name: str = ""
    residual: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes of its data."""
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class MoePlan:
    """A checked mixture of experts: what :func:`modelfuse.moe.build_moe` will write.

    Attributes
    ----------
    config : MoeConfig
    config_file : Path or None
        The YAML file read, if any.
    base : Path
        The base model folder.
    experts, shared : list of Path
        The expert and shared expert model folders.
    architecture : OutputArchitecture
    gate_mode : GateMode
    base_config : dict
        The base's ``config.json``.
    num_layers, hidden_size : int
    dtype : torch.dtype or None
        The configuration's (or the base's) dtype; None keeps each tensor's.
    tensors : list of OutputTensor
        Every output tensor, in the order they are written.
    """

    config: MoeConfig
    config_file: Path | None
    base: Path
    experts: list[Path]
    shared: list[Path]
    architecture: OutputArchitecture
    gate_mode: GateMode
    base_config: dict[str, Any]
    num_layers: int
    hidden_size: int
    dtype: torch.dtype | None
    tensors: list[OutputTensor]

    @property
    def gated(self) -> list[tuple[str, ExpertEntry]]:
        """The experts (then the shared expert) that get a router row, labelled for messages."""
        rows = [(f"experts[{i}]", e) for i, e in enumerate(self.config.experts)]
        return rows + [
            (f"shared_experts[{i}]", e) for i, e in enumerate(self.config.shared_experts or [])
        ]

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data to write."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def steps(self) -> int:
        """Progress steps: one per expert whose prompts are run, one per output tensor."""
        return (len(self.gated) if self.gate_mode.needs_prompts else 0) + len(self.tensors)


def _locate(reference: str, folder: Path, key: str) -> Path:
    """A model path as given (from the working directory), else beside the configuration."""
    path = expand_user(reference, key=key)
    try:
        if path.is_absolute() or path.exists():
            return path
        beside = folder / path
        if beside.exists():
            return beside
        if "+" in reference:
            _refuse_adapted(reference, folder, key)
        return path
    except OSError as exc:
        raise CheckpointError(
            f"{key}: {short(reference)}: cannot be looked up ({exc.strerror or exc}); "
            "give the path of a model folder"
        ) from None


def _refuse_adapted(reference: str, folder: Path, key: str) -> None:
    """Refuse mergekit's MODEL+LORA (both parts found, as a merge reads it) with what to do
    instead; any other reference goes on to the usual checks."""
    from modelfuse.merge.open_inputs import adapter_reference

    try:
        adapted = adapter_reference(reference, reference, folder, key)
    except CheckpointError:
        return
    if adapted is not None:
        raise CheckpointError(
            f"{key}: {short(reference)} is a model with a LoRA adapter (MODEL+LORA); modelfuse "
            "moe reads model folders: write the adapted model first (modelfuse merge with "
            f"merge_method: linear and models: [{short(reference)[1:-1]}]) and name its folder"
        )


def _model_config(path: Path, key: str) -> dict[str, Any]:
    """A model folder's ``config.json``, with one-line refusals."""
    if not path.exists():
        raise CheckpointError(
            f"{key}: {short(str(path), 200)}: no such model folder; expected a local Hugging "
            "Face model folder (modelfuse does not download models); check the path"
        )
    file = path / "config.json"
    if not path.is_dir() or not file.is_file():
        raise CheckpointError(
            f"{key}: {short(str(path), 200)} is not a model folder with a config.json; a "
            "mixture of experts needs each model's configuration; pass the model's folder"
        )
    try:
        if file.stat().st_size > _MAX_CONFIG_JSON:
            raise CheckpointError(
                f"{file}: a config.json larger than 4 MB; expected a model configuration"
            )
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(
            f"{file}: not a readable JSON configuration ({short(str(exc), 80)})"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise CheckpointError(
            f"{file}: has no model_type; expected a transformers model configuration"
        )
    return data


def _positive_int(config: dict[str, Any], key: str, file: Path) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{file}: {key} is {short(value)}; expected a positive whole number")
    return value


def _check_experts(cfg: MoeConfig, mode: GateMode, allow_all_same: bool) -> None:
    """mergekit 0.1.5's checks of the expert list (its is_bad_config), one line each."""
    if cfg.experts_per_token < 1:
        raise ConfigError(f"experts_per_token: expected at least 1, got {cfg.experts_per_token}")
    if len(cfg.experts) < cfg.experts_per_token:
        raise ConfigError(
            f"experts_per_token: {cfg.experts_per_token} experts per token but only "
            f"{len(cfg.experts)} experts; list at least as many experts, or lower experts_per_token"
        )
    if mode.needs_prompts:
        for i, expert in enumerate(cfg.experts):
            if not expert.positive_prompts:
                raise ConfigError(
                    f"experts[{i}]: no positive_prompts; gate_mode {mode.name} makes the router "
                    "from them: give at least one prompt that should go to this expert, or use "
                    "gate_mode: random"
                )
        first = (cfg.experts[0].positive_prompts, cfg.experts[0].negative_prompts or [])
        if len(cfg.experts) > 1 and all(
            (e.positive_prompts, e.negative_prompts or []) == first for e in cfg.experts[1:]
        ):
            raise ConfigError(
                "experts: every expert has the same positive and negative prompts, so the router "
                "cannot tell them apart; give each expert prompts of what should go to it"
            )
    if (
        not allow_all_same
        and len(cfg.experts) > 1
        and all(e.source_model == cfg.experts[0].source_model for e in cfg.experts[1:])
    ):
        raise ConfigError(
            f"experts: every expert is {short(cfg.experts[0].source_model)}, which gives a larger "
            "model with the same output; list different models, or pass "
            f"{ALLOW_ALL_SAME_FLAG} to build it for further training"
        )
    shared = cfg.shared_experts or []
    if len({bool(e.positive_prompts) for e in shared}) > 1:
        raise ConfigError(
            "shared_experts: give prompts for every shared expert or for none, not a mix"
        )


def _mlp_shapes(ckpt: Checkpoint, layers: int, key: str) -> dict[str, tuple[int, ...]]:
    """Every layer's MLP weight shapes; refuses missing weights and MLP biases."""
    shapes = {}
    for name in ckpt.keys():
        match = _MLP.match(name)
        if match and not name.endswith(".weight"):
            raise CheckpointError(
                f"{key}: tensor {short(name, 100)} is an MLP bias, which an expert of a mixture "
                "cannot hold; expected Llama, Mistral or Qwen2 MLPs without biases"
            )
    for layer in range(layers):
        for projection in MLP_PROJECTIONS:
            name = f"model.layers.{layer}.mlp.{projection}.weight"
            if name not in ckpt:
                raise CheckpointError(
                    f"{key}: {ckpt.path} has no tensor {name}; expected a Llama, Mistral or "
                    f"Qwen2 model of {layers} layers"
                )
            info = ckpt.info(name)
            if not info.dtype.is_floating_point:
                raise CheckpointError(
                    f"{key}: tensor {name} is {info.dtype}; expected floating point"
                )
            shapes[name] = tuple(info.shape)
    return shapes


def _check_sizes(ckpt: Checkpoint, file: Path, layers: int, hidden: int) -> None:
    """The config's layer count and hidden size against the weights (they bound all the work)."""
    if layers > len(ckpt):
        raise CheckpointError(
            f"{file}: num_hidden_layers is {layers} but {ckpt.path} holds {len(ckpt)} tensors; "
            "expected the configuration of these weights"
        )
    name = "model.embed_tokens.weight"
    if name in ckpt and tuple(ckpt.info(name).shape[1:]) != (hidden,):
        raise CheckpointError(
            f"{file}: hidden_size is {hidden} but {name} has shape "
            f"{list(ckpt.info(name).shape)}; expected the configuration of these weights"
        )


def _base_tensors(
    ckpt: Checkpoint, arch: OutputArchitecture, layers: int, tied: bool, dtype: torch.dtype | None
) -> list[OutputTensor]:
    """The base's tensors outside the MLPs, checked against what the layout holds."""
    kept, misfits = [], []
    for name in ckpt.keys():
        if _MLP.match(name) or name.endswith("rotary_emb.inv_freq"):
            continue
        if not arch.keeps(name):
            misfits.append(name)
            continue
        info = ckpt.info(name)
        kept.append(
            OutputTensor(name, tuple(info.shape), dtype or info.dtype, "base", source_name=name)
        )
    if misfits:
        shown = ", ".join(short(n, 80) for n in misfits[:3])
        raise CheckpointError(
            f"base_model: {len(misfits)} tensors have no place in a {arch.title} checkpoint "
            f"({shown}); expected a Llama or Mistral model (Qwen2 for architecture: qwen)"
        )
    names = {t.name for t in kept}
    required = ["model.embed_tokens.weight", "model.norm.weight"] + (
        [] if tied else ["lm_head.weight"]
    )
    required += [
        f"model.layers.{i}.{part}"
        for i in range(layers)
        for part in arch.layer_tensors()
        if not part.endswith(".bias")
    ]
    missing = [n for n in required if n not in names]
    if missing:
        raise CheckpointError(
            f"base_model: {ckpt.path} has no tensor {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f"; expected a Llama or Mistral model of {layers} layers"
        )
    if arch.qkv_bias:  # Qwen2-MoE's attention has q/k/v biases: zeros when the base has none
        for i in range(layers):
            for p in "qkv":
                bias = f"model.layers.{i}.self_attn.{p}_proj.bias"
                if bias not in names:
                    rows = ckpt.info(f"model.layers.{i}.self_attn.{p}_proj.weight").shape[0]
                    kept.append(OutputTensor(bias, (rows,), dtype or torch.float32, "zeros"))
    return kept


def plan_moe(
    config: str | Path | dict[str, Any] | MoeConfig,
    out: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
    allow_all_same: bool = False,
) -> MoePlan:
    """Check a mixture-of-experts configuration, its models and its output; read no tensor.

    Parameters
    ----------
    config : path, dict or MoeConfig
        A mergekit-moe configuration.
    out : path, optional
        The output folder, refused if it exists (without ``overwrite``) or is
        or holds an input.
    overwrite : bool, default False
    allow_all_same : bool, default False
        Allow every expert to be the same model (mergekit's
        ``--i-understand-this-is-not-useful-without-training``).

    Returns
    -------
    MoePlan

    Raises
    ------
    ConfigError, CheckpointError, OutputError
        The first problem found, in one line naming the key, file or tensor.

    Examples
    --------
    >>> plan_moe({"base_model": "b", "experts": [{"source_model": "x", "positive_prompts": ["a"]}]})
    Traceback (most recent call last):
    ...
    modelfuse.errors.ConfigError: experts_per_token: 2 experts per token but only 1 experts; \
list at least as many experts, or lower experts_per_token
    """
    cfg, folder = load_moe_config(config)
    config_file = Path(config) if isinstance(config, (str, Path)) else None
    mode = get_gate_mode(cfg.gate_mode)
    _check_experts(cfg, mode, allow_all_same)
    dtype = resolve_moe_dtype(cfg.dtype)
    base = _locate(cfg.base_model, folder, "base_model")
    experts = [
        _locate(e.source_model, folder, f"experts[{i}].source_model")
        for i, e in enumerate(cfg.experts)
    ]
    shared = [
        _locate(e.source_model, folder, f"shared_experts[{i}].source_model")
        for i, e in enumerate(cfg.shared_experts or [])
    ]
    if out is not None:
        inputs = [("base model", base)] + [("expert model", p) for p in experts + shared]
        if config_file is not None:
            inputs += [("configuration file", config_file)]
        check_output_path(out, inputs, overwrite=overwrite, flag="OUT")
    labelled = (
        [("base_model", base)]
        + [(f"experts[{i}].source_model", p) for i, p in enumerate(experts)]
        + [(f"shared_experts[{i}].source_model", p) for i, p in enumerate(shared)]
    )
    configs = {key: _model_config(path, key) for key, path in labelled}
    base_config = configs["base_model"]
    arch = select_architecture(
        cfg, {key: c["model_type"] for key, c in configs.items()}, needs_prompts=mode.needs_prompts
    )
    if mode.needs_prompts and not any(is_tokenizer_file(p.name) for p in base.iterdir()):
        raise ConfigError(
            f"base_model: {short(str(base), 200)} has no tokenizer files (tokenizer.json, "
            f"tokenizer_config.json, ...); gate_mode {mode.name} tokenizes the prompts with the "
            "base model's tokenizer: add its files, or use gate_mode: random"
        )
    base_file = base / "config.json"
    layers = _positive_int(base_config, "num_hidden_layers", base_file)
    hidden = _positive_int(base_config, "hidden_size", base_file)
    if dtype is None:
        named = base_config.get("torch_dtype") or base_config.get("dtype")
        dtype = (
            resolve_moe_dtype(named)
            if isinstance(named, str)
            and named.removeprefix("torch.") in ("bfloat16", "float16", "float32", "float64")
            else None
        )
    for key, path in labelled[1:]:
        other = configs[key]
        for name, expected in (("num_hidden_layers", layers), ("hidden_size", hidden)):
            if other.get(name) != expected:
                raise CheckpointError(
                    f"{key}: {path / 'config.json'} has {name} {short(other.get(name))} but the "
                    f"base model has {expected}; expected experts of the base's architecture"
                )
    tied = bool(base_config.get("tie_word_embeddings", False))
    with open_checkpoint(base) as ckpt:
        _check_sizes(ckpt, base_file, layers, hidden)
        tensors = _base_tensors(ckpt, arch, layers, tied, dtype)
        shapes = _mlp_shapes(ckpt, layers, "base_model")
    sources: list[tuple[Source, int, Path, ExpertEntry, str]] = [
        ("expert", i, p, e, f"experts[{i}]") for i, (p, e) in enumerate(zip(experts, cfg.experts))
    ] + [
        ("shared", i, p, e, f"shared_experts[{i}]")
        for i, (p, e) in enumerate(zip(shared, cfg.shared_experts or []))
    ]
    infos: dict[tuple[str, int], dict[str, torch.dtype]] = {}
    for source, index, path, _, key in sources:
        with open_checkpoint(path) as ckpt:
            found = _mlp_shapes(ckpt, layers, f"{key}.source_model")
            for name, shape in found.items():
                if shape != shapes[name]:
                    raise CheckpointError(
                        f"{key}.source_model: tensor {name} has shape {list(shape)} but "
                        f"{list(shapes[name])} in the base model; expected experts of the "
                        "base's architecture (same hidden and intermediate sizes)"
                    )
            infos[(source, index)] = {name: ckpt.info(name).dtype for name in found}
    for layer in range(layers):
        for source, index, _, _, _ in sources:
            for projection in MLP_PROJECTIONS:
                name = f"model.layers.{layer}.mlp.{projection}.weight"
                target = (
                    arch.expert(layer, index, projection)
                    if source == "expert"
                    else arch.shared_expert(layer, projection)
                )
                tensors.append(
                    OutputTensor(
                        target,
                        shapes[name],
                        dtype or infos[(source, index)][name],
                        source,
                        index,
                        name,
                        projection == "down_proj",
                    )
                )
    # the routers: written in the dtype, else in that of the rows (bfloat16 from the base
    # model's hidden states, as mergekit runs it; float32 otherwise)
    gate_dtype = dtype or (torch.bfloat16 if mode.source == "hidden" else torch.float32)
    for layer in range(layers):
        tensors.append(
            OutputTensor(arch.router(layer), (len(experts), hidden), gate_dtype, "router", layer)
        )
        if shared:
            tensors.append(
                OutputTensor(
                    arch.shared_router(layer),
                    (len(shared), hidden),
                    gate_dtype,
                    "shared_router",
                    layer,
                )
            )
    return MoePlan(
        cfg,
        config_file,
        base,
        experts,
        shared,
        arch,
        mode,
        base_config,
        layers,
        hidden,
        dtype,
        tensors,
    )
