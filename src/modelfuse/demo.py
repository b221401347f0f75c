"""``modelfuse demo``: a small, real merge of generated checkpoints.

It writes three small Llama-layout checkpoints (a base and two "fine-tunes"),
merges them with linear averaging and with task arithmetic through the same
path as ``modelfuse merge``, checks every merged tensor against the formula,
and prints what it did.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

__all__ = ["run_demo"]

_SHAPES = {
    "model.embed_tokens.weight": (256, 64),
    "model.layers.0.self_attn.q_proj.weight": (64, 64),
    "model.layers.0.mlp.up_proj.weight": (128, 64),
    "model.layers.1.self_attn.q_proj.weight": (64, 64),
    "model.layers.1.mlp.up_proj.weight": (128, 64),
    "model.norm.weight": (64,),
    "lm_head.weight": (256, 64),
}


def _write_models(folder: Path, seed: int) -> list[Path]:
    from modelfuse.checkpoint import CheckpointWriter

    paths = []
    g = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(shape, generator=g) * 0.02 for name, shape in _SHAPES.items()}
    for i, label in enumerate(["base", "finetune-a", "finetune-b"]):
        state = {k: v + (torch.randn(v.shape, generator=g) * 0.005 if i else 0) for k, v in base.items()}
        path = folder / label
        layout = [(k, tuple(v.shape), torch.bfloat16) for k, v in state.items()]
        with CheckpointWriter(path, layout, overwrite=True) as writer:
            for k, v in state.items():
                writer.write(k, v.to(torch.bfloat16))
            writer.add_file("config.json", json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
            writer.commit()
        paths.append(path)
    return paths


def run_demo(out: str | Path = "modelfuse-demo", *, seed: int = 0, echo=print) -> dict[str, float]:
    """Generate checkpoints, merge them two ways, verify, and report.

    Returns
    -------
    dict
        The largest absolute difference to the formula for each merge.
    """
    import modelfuse
    from modelfuse.checkpoint import open_checkpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    echo(f"1. writing three small checkpoints (base and two fine-tunes) into {out / 'models'}")
    base, a, b = _write_models(out / "models", seed)
    configs = {
        "soup": {
            "merge_method": "linear",
            "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                       {"model": str(b), "parameters": {"weight": 0.5}}],
            "dtype": "bfloat16",
        },
        "task-arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                       {"model": str(b), "parameters": {"weight": [0.0, 1.0]}}],
            "parameters": {"lambda": 0.8},
            "dtype": "bfloat16",
        },
    }
    errors = {}
    for step, (name, config) in enumerate(configs.items(), start=2):
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        result = modelfuse.merge(path, out / name, overwrite=True, threads=1)
        echo(f"{step}. {config['merge_method']} per {path}: {result.summary()}")
        with (
            open_checkpoint(result.out) as merged,
            open_checkpoint(base) as cb,
            open_checkpoint(a) as ca,
            open_checkpoint(b) as cbb,
        ):
            worst = 0.0
            for tensor in merged.keys():
                x0, x1, x2 = (c.read(tensor).float() for c in (cb, ca, cbb))
                if name == "soup":
                    expected = (x1 + x2) / 2
                else:
                    t = {"model.embed_tokens.weight": 0.0}.get(tensor, 1.0)
                    if ".layers.0." in tensor:
                        t = 0.0
                    expected = x0 + 0.8 * ((x1 - x0) + t * (x2 - x0))
                diff = (merged.read(tensor).float() - expected.to(torch.bfloat16).float()).abs().max()
                worst = max(worst, float(diff))
        errors[name] = worst
        echo(f"   checked every tensor against the formula: largest difference {worst:.2e}")
    echo(f"done: configurations, inputs and merged models are in {out}")
    return errors
