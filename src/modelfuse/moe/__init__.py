"""Mixtures of experts built from dense models, from mergekit-moe's configuration.

:func:`build_moe` reads a ``mergekit-moe`` configuration (``base_model``,
``experts`` with their prompts, ``gate_mode``, ``dtype``,
``experts_per_token``, ``shared_experts``, ``architecture``) as mergekit
0.1.5 reads it and writes a Mixtral checkpoint (or a Qwen2-MoE one with a
shared expert) that transformers loads: the base model's tensors outside the
MLPs, each expert's MLP weights, and router weights made from the prompts
(:data:`GATE_MODES`). :func:`plan_moe` checks everything without reading a
tensor.
"""

from __future__ import annotations

from modelfuse.moe.architectures import ARCHITECTURES, OutputArchitecture
from modelfuse.moe.build import CONFIG_COPY, MoeResult, build_moe, make_gates, noise_and_scale
from modelfuse.moe.config import ExpertEntry, MoeConfig, load_moe_config
from modelfuse.moe.gates import (
    GATE_MODES,
    GateMode,
    cheap_embedding_vector,
    hidden_state_vector,
    normalized,
    random_gates,
)
from modelfuse.moe.plan import MoePlan, OutputTensor, plan_moe

__all__ = [
    "ARCHITECTURES",
    "CONFIG_COPY",
    "GATE_MODES",
    "ExpertEntry",
    "GateMode",
    "MoeConfig",
    "MoePlan",
    "MoeResult",
    "OutputArchitecture",
    "OutputTensor",
    "build_moe",
    "cheap_embedding_vector",
    "hidden_state_vector",
    "load_moe_config",
    "make_gates",
    "noise_and_scale",
    "normalized",
    "plan_moe",
    "random_gates",
]
