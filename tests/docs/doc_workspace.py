"""The files the documentation's examples name, built from fixed seeds into a folder.

Every code block of README.md and docs/*.md runs in such a folder: tiny
Llama-format safetensors models named as the docs name them (``./llama-base``,
``./clean``, ``models/llama-a``, ...) and prediction arrays (``a.npy``,
``val_y.npy``, ``soup.npy``, ...). All arrays describe the same 300 samples
of 3 classes, so any labels file fits any predictions file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

__all__ = ["MODELS", "N_CLASSES", "N_SAMPLES", "build_workspace", "tiny_llama"]

N_SAMPLES = 300
N_CLASSES = 3
HIDDEN = 8
LAYERS = 2
VOCAB = 16

MODELS = {
    # folder: seed of its weights
    "llama-base": 0,
    "llama-math": 1,
    "llama-code": 2,
    "clean": 3,
    "robust": 4,
    "models/llama-a": 5,
}

# name: (accuracy, kind) of a predictions file; logits carry a per-row offset so
# that no row is a probability distribution.
PREDICTIONS = {
    "a": (0.62, "logits"),
    "b": (0.66, "logits"),
    "c": (0.70, "logits"),
    "a_test": (0.60, "logits"),
    "b_test": (0.65, "logits"),
    "c_test": (0.71, "logits"),
    "val": (0.72, "logits"),
    "val_logits": (0.72, "logits"),
    "test": (0.70, "logits"),
    "test_logits": (0.70, "logits"),
    "p": (0.75, "probabilities"),
    "base": (0.70, "probabilities"),
    "soup": (0.77, "probabilities"),
    "ties": (0.90, "probabilities"),
    "best": (0.74, "probabilities"),
    **{f"val_logits_{i}": (0.60 + 0.03 * i, "logits") for i in range(5)},
    **{f"test_logits_{i}": (0.60 + 0.03 * i, "logits") for i in range(5)},
}
LABELS = ("y", "val_y", "val_labels", "test_labels")


def tiny_llama(seed: int) -> dict[str, torch.Tensor]:
    """A two-layer Llama-shaped state dict of float32 tensors (hidden size 8)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    tensors = {"model.embed_tokens.weight": t(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        layer = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{layer}.self_attn.{proj}.weight"] = t(HIDDEN, HIDDEN)
        tensors[f"{layer}.mlp.gate_proj.weight"] = t(2 * HIDDEN, HIDDEN)
        tensors[f"{layer}.mlp.up_proj.weight"] = t(2 * HIDDEN, HIDDEN)
        tensors[f"{layer}.mlp.down_proj.weight"] = t(HIDDEN, 2 * HIDDEN)
        tensors[f"{layer}.input_layernorm.weight"] = 1 + t(HIDDEN)
        tensors[f"{layer}.post_attention_layernorm.weight"] = 1 + t(HIDDEN)
    tensors["model.norm.weight"] = 1 + t(HIDDEN)
    tensors["lm_head.weight"] = t(VOCAB, HIDDEN)
    return tensors


CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "torch_dtype": "float32",
}


def _predictions(labels: np.ndarray, accuracy: float, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    right = rng.random(len(labels)) < accuracy
    wrong = (labels + rng.integers(1, N_CLASSES, len(labels))) % N_CLASSES
    predicted = np.where(right, labels, wrong)
    logits = 2.0 * np.eye(N_CLASSES)[predicted] + rng.normal(0.0, 0.7, (len(labels), N_CLASSES))
    if kind == "logits":
        return logits + rng.normal(0.0, 1.0, (len(labels), 1))
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def build_workspace(folder: str | Path) -> Path:
    """Write every model and array the docs name into ``folder`` (created if missing)."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for name, seed in MODELS.items():
        model = root / name
        model.mkdir(parents=True)
        save_file(tiny_llama(seed), str(model / "model.safetensors"), metadata={"format": "pt"})
        (model / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    labels = np.random.default_rng(2026).integers(0, N_CLASSES, N_SAMPLES)
    for name in LABELS:
        np.save(root / f"{name}.npy", labels)
    for i, (name, (accuracy, kind)) in enumerate(PREDICTIONS.items()):
        np.save(root / f"{name}.npy", _predictions(labels, accuracy, kind, seed=100 + i))
    return root
