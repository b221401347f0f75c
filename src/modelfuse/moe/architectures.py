"""The checkpoint layouts a mixture of experts is written in: Mixtral and Qwen2-MoE.

An :class:`OutputArchitecture` says which input models it takes, which
tensors of the base it keeps, how the experts' MLP tensors and the routers
are named, and how the output's ``config.json`` is made from the base's.
:data:`ARCHITECTURES` holds the two modelfuse writes; mergekit 0.1.5 also
writes DeepSeek MoE and Qwen3 MoE (:data:`MERGEKIT_ARCHITECTURES`), which
are refused with one line.

Tensor names are those of the checkpoints the original models ship with and
``save_pretrained`` writes (``block_sparse_moe.experts.E.w1`` for Mixtral,
``mlp.experts.E.gate_proj`` for Qwen2-MoE), which transformers 4 and 5,
vLLM and llama.cpp's converter read. mergekit 0.1.5 writes Mixtral's experts
fused in transformers 5's in-memory layout (``mlp.experts.gate_up_proj``);
the numbers are the same.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from modelfuse.errors import ConfigError
from modelfuse.merge.parameters import short

if TYPE_CHECKING:
    from modelfuse.moe.config import MoeConfig

__all__ = [
    "ARCHITECTURES",
    "MERGEKIT_ARCHITECTURES",
    "MLP_PROJECTIONS",
    "OutputArchitecture",
    "get_architecture",
    "select_architecture",
]

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
"""The MLP weights of a Llama, Mistral or Qwen2 layer, each expert's share of the output."""

_ATTENTION = tuple(f"self_attn.{p}_proj.weight" for p in "qkvo")
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
_BIASES = tuple(f"self_attn.{p}_proj.bias" for p in "qkv")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class OutputArchitecture:
    """One output layout of a mixture of experts.

    Attributes
    ----------
    name : str
        Its name in ``architecture:`` (mergekit matches a prefix of ``title``).
    title : str
        mergekit 0.1.5's name for it (``Mixtral``, ``Qwen MoE``).
    class_name : str
        The transformers class written in ``config.json``.
    input_types : tuple of str
        ``model_type`` values of the inputs it takes (all inputs share one).
    shared_experts : int
        Shared experts it needs (0 for Mixtral, 1 for Qwen2-MoE).
    qkv_bias : bool
        Whether its attention has q/k/v biases (zeros when the base has none).

    Examples
    --------
    >>> mixtral = ARCHITECTURES["mixtral"]
    >>> mixtral.expert(0, 3, "down_proj")
    'model.layers.0.block_sparse_moe.experts.3.w2.weight'
    >>> mixtral.router(0)
    'model.layers.0.block_sparse_moe.gate.weight'
    >>> ARCHITECTURES["qwen"].expert(1, 0, "up_proj")
    'model.layers.1.mlp.experts.0.up_proj.weight'
    """

    name: str
    title: str
    class_name: str
    input_types: tuple[str, ...]
    shared_experts: int
    qkv_bias: bool

    def layer_tensors(self) -> tuple[str, ...]:
        """Per-layer tensors (after ``model.layers.N.``) it takes from the base."""
        return _ATTENTION + _NORMS + (_BIASES if self.qkv_bias else ())

    def keeps(self, name: str) -> bool:
        """Whether a non-MLP tensor of the base has a place in this layout."""
        match = _LAYER.match(name)
        if match is None:
            return name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
        return match.group(2) in self.layer_tensors()

    def router(self, layer: int) -> str:
        """The router weight (experts x hidden) of a layer."""
        block = "block_sparse_moe" if self.name == "mixtral" else "mlp"
        return f"model.layers.{layer}.{block}.gate.weight"

    def expert(self, layer: int, expert: int, projection: str) -> str:
        """Expert ``expert``'s copy of MLP weight ``projection`` of a layer."""
        if self.name == "mixtral":
            w = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[projection]
            return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"
        return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"

    def shared_expert(self, layer: int, projection: str) -> str:
        """The shared expert's MLP weight ``projection`` of a layer (Qwen2-MoE)."""
        return f"model.layers.{layer}.mlp.shared_expert.{projection}.weight"

    def shared_router(self, layer: int) -> str:
        """The shared expert's gate (1 x hidden) of a layer (Qwen2-MoE)."""
        return f"model.layers.{layer}.mlp.shared_expert_gate.weight"

    def unsupported(
        self, config: MoeConfig, model_types: Mapping[str, str], needs_prompts: bool
    ) -> str | None:
        """Why this layout cannot hold the configuration, or None when it can.

        ``model_types`` maps each input's key (``base_model``,
        ``experts[0].source_model``, ...) to its ``model_type``.
        """
        shared = config.shared_experts or []
        if self.shared_experts == 0 and shared:
            return f"{self.title} has no shared experts"
        if self.shared_experts and len(shared) != self.shared_experts:
            return f"{self.title} needs exactly {self.shared_experts} shared expert"
        if self.shared_experts and needs_prompts and not shared[0].positive_prompts:
            return f"{self.title} needs positive_prompts for the shared expert"
        types = list(model_types.values())
        if len(set(types)) != 1:
            odd = next(key for key, kind in model_types.items() if kind != types[0])
            return (
                f"{self.title} needs one model_type for all models: base_model is "
                f"{short(types[0], 30)}, {odd} is {short(model_types[odd], 30)}"
            )
        if types[0] not in self.input_types:
            return (
                f"{self.title} takes {' or '.join(self.input_types)} models, not {short(types[0])}"
            )
        return None

    def output_config(
        self,
        base_config: Any,
        *,
        experts: int,
        experts_per_token: int,
        dtype: torch.dtype | None,
    ) -> Any:
        """The output's transformers config, made from the base's as mergekit 0.1.5 makes it."""
        import transformers

        if self.name == "mixtral":
            if not isinstance(base_config, transformers.MistralConfig):
                mistral = transformers.MistralConfig(**base_config.to_dict())
                mistral.sliding_window = None
                mistral.max_position_embeddings = base_config.max_position_embeddings
                base_config = mistral
            out = transformers.MixtralConfig(**base_config.to_dict())
            out.num_local_experts = experts
        else:
            out = transformers.Qwen2MoeConfig(**base_config.to_dict())
            out.num_experts = experts
            out.decoder_sparse_step = 1
            out.norm_topk_prob = True
            out.use_sliding_window = False
            out.shared_expert_intermediate_size = out.intermediate_size
            out.moe_intermediate_size = out.intermediate_size
        out.architectures = [self.class_name]
        out.num_experts_per_tok = experts_per_token
        out.sliding_window = None
        if dtype is not None:
            out.dtype = dtype
        return out


ARCHITECTURES: dict[str, OutputArchitecture] = {
    "mixtral": OutputArchitecture(
        "mixtral", "Mixtral", "MixtralForCausalLM", ("llama", "mistral"), 0, False
    ),
    "qwen": OutputArchitecture(
        "qwen", "Qwen MoE", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"), 1, True
    ),
}
"""The output layouts modelfuse writes, by ``architecture:`` name."""

MERGEKIT_ARCHITECTURES = ("Mixtral", "DeepSeek MoE", "Qwen MoE", "Qwen3 MoE")
"""mergekit 0.1.5's output architectures, in the order it tries them."""


def get_architecture(name: str) -> OutputArchitecture:
    """The layout named ``name`` (``mixtral`` or ``qwen``); an unknown name lists the valid ones.

    Examples
    --------
    >>> get_architecture("qwen").class_name
    'Qwen2MoeForCausalLM'
    """
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ConfigError(
            f"architecture: unknown {short(name)}; valid: {', '.join(ARCHITECTURES)}"
        ) from None


def _deepseek_fits(config: MoeConfig, model_types: list[str]) -> bool:
    """Whether mergekit 0.1.5's DeepSeek MoE takes the configuration (its supports_config)."""
    shared = config.shared_experts or []
    return (
        len(shared) <= 1
        and not (shared and (shared[0].positive_prompts or shared[0].negative_prompts))
        and len(set(model_types)) == 1
        and model_types[0] in ("llama", "mistral")
    )


def select_architecture(
    config: MoeConfig, model_types: Mapping[str, str], *, needs_prompts: bool
) -> OutputArchitecture:
    """The layout mergekit 0.1.5 would choose for ``config``, or a one-line refusal.

    ``architecture:`` keeps the layouts whose mergekit name starts with it
    (case-insensitive); of those that can hold the configuration, Mixtral is
    preferred, else the first in mergekit's order.

    Parameters
    ----------
    config : MoeConfig
    model_types : mapping of str to str
        ``model_type`` of the base, the experts and the shared experts, by
        their key (``base_model``, ``experts[0].source_model``, ...).
    needs_prompts : bool
        Whether the gate mode makes the routers from prompts.

    Raises
    ------
    ConfigError
        No layout fits, or mergekit would write one modelfuse does not
        (DeepSeek MoE, Qwen3 MoE).

    Examples
    --------
    >>> from modelfuse.moe import load_moe_config
    >>> cfg, _ = load_moe_config({"base_model": "b", "experts": [{"source_model": "x"}],
    ...                           "shared_experts": [{"source_model": "y"}], "architecture": "q"})
    >>> types = {"base_model": "llama", "experts[0]": "llama", "shared_experts[0]": "llama"}
    >>> select_architecture(cfg, types, needs_prompts=False).title
    'Qwen MoE'
    """
    wanted = (config.architecture or "").lower()
    titles = [t for t in MERGEKIT_ARCHITECTURES if t.lower().startswith(wanted)]
    if not titles:
        raise ConfigError(
            f"architecture: {short(config.architecture)} names no output architecture; "
            f"valid: {', '.join(ARCHITECTURES)}"
        )
    by_title = {a.title: a for a in ARCHITECTURES.values()}
    reasons: list[str] = []
    fitting: list[str] = []
    for title in titles:
        if title in by_title:
            reason = by_title[title].unsupported(config, model_types, needs_prompts)
            if reason is None:
                fitting.append(title)
            else:
                reasons.append(reason)
        elif title == "DeepSeek MoE" and _deepseek_fits(config, list(model_types.values())):
            fitting.append(title)
        elif (
            title == "Qwen3 MoE"
            and not config.shared_experts
            and set(model_types.values()) == {"qwen3"}
        ):
            fitting.append(title)
    if "Mixtral" in fitting:
        return by_title["Mixtral"]
    if fitting and fitting[0] in by_title:
        return by_title[fitting[0]]
    if fitting and config.architecture:
        raise ConfigError(
            f"architecture: {short(config.architecture)} selects mergekit's {fitting[0]}, which "
            f"modelfuse moe does not write; valid: {', '.join(ARCHITECTURES)}"
        )
    if fitting:
        return _refuse_mergekit_only(fitting[0])
    raise ConfigError(
        "no output architecture fits: "
        + "; ".join(reasons or ["none named"])
        + "; modelfuse moe writes a Mixtral of Llama or Mistral models, or a Qwen2-MoE "
        "with one shared expert"
    )


def _refuse_mergekit_only(title: str) -> OutputArchitecture:
    if title == "DeepSeek MoE":
        raise ConfigError(
            "mergekit 0.1.5 writes this configuration as a DeepSeek MoE (a shared expert "
            "without prompts), which modelfuse moe does not write; for a Qwen2-MoE set "
            "architecture: qwen (and give the shared expert positive_prompts unless gate_mode "
            "is random)"
        )
    raise ConfigError(
        f"mergekit 0.1.5 writes this configuration as a {title}, which modelfuse moe does not "
        f"write; it writes {', '.join(ARCHITECTURES)} (Mixtral or Qwen2-MoE)"
    )
