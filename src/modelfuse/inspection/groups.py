"""Which part of a network a tensor belongs to: its group and its layer.

:data:`TENSOR_GROUPS` is the one registry: group name -> a regular expression
on the tensor name (case-insensitive), tried in order; the first match wins and
a name matching none is in ``"other"``. The layer is the first numeric part of
the name (``model.layers.7.mlp.up_proj.weight`` is layer 7), as the merge's
layer gradients count it.
"""

from __future__ import annotations

import re
from pathlib import Path

from modelfuse.merge.plan import LAYER_INDEX

__all__ = ["OTHER", "TENSOR_GROUPS", "short_label", "tensor_group", "tensor_layer"]

TENSOR_GROUPS: dict[str, re.Pattern[str]] = {
    "embeddings": re.compile(
        r"embed|(^|\.)(wte|wpe)\.|word_embeddings|position_embeddings|token_type_embeddings",
        re.IGNORECASE,
    ),
    "norms": re.compile(r"norm|(^|\.)ln_?\w*\.", re.IGNORECASE),
    "head": re.compile(
        r"lm_head|(^|\.)classifier\.|^(score|head|output|fc)\.(weight|bias)$", re.IGNORECASE
    ),
    "attention": re.compile(
        r"attn|attention|(^|\.)(q|k|v|o|qkv|query|key|value)(_proj)?\.", re.IGNORECASE
    ),
    "mlp": re.compile(
        r"mlp|ffn|feed_forward|(gate|up|down)_proj|(^|\.)fc\d\.|dense_h_to_4h|dense_4h_to_h"
        r"|intermediate|(^|\.)output\.dense\.|(^|\.)w[123]\.",
        re.IGNORECASE,
    ),
}
"""Group name -> pattern on the tensor name; tried in this order, the first match wins."""

OTHER = "other"


def tensor_group(name: str) -> str:
    """The group of tensor ``name``: a key of :data:`TENSOR_GROUPS`, else ``"other"``.

    Examples
    --------
    >>> [tensor_group(n) for n in ["model.embed_tokens.weight",
    ...     "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
    ...     "model.layers.0.input_layernorm.weight", "lm_head.weight", "rope.freqs"]]
    ['embeddings', 'attention', 'mlp', 'norms', 'head', 'other']
    """
    for group, pattern in TENSOR_GROUPS.items():
        if pattern.search(name):
            return group
    return OTHER


def tensor_layer(name: str) -> int | None:
    """The layer index of tensor ``name`` (its first numeric part), or None outside the layers.

    Examples
    --------
    >>> tensor_layer("model.layers.11.mlp.down_proj.weight"), tensor_layer("lm_head.weight")
    (11, None)
    """
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def short_label(label: str) -> str:
    """A model's name for tables and plots: the last part of its path, without a weight suffix.

    Examples
    --------
    >>> short_label("/models/math-ft/"), short_label("./a.safetensors")
    ('math-ft', 'a')
    """
    name = Path(label.rstrip("/")).name or label
    for suffix in _WEIGHT_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name
