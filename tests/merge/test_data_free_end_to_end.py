"""Every data-free method end to end: tiny Llama folders -> modelfuse.merge -> transformers.

Each merged checkpoint is checked tensor by tensor against the method's function
applied to the loaded inputs (the functions themselves are checked against
written-out formulas in the per-method test files), then re-loaded with
transformers and run forward.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import modelfuse
from modelfuse.merge.execute import tensor_generator
from modelfuse.merge.methods.breadcrumbs import breadcrumbs, breadcrumbs_ties
from modelfuse.merge.methods.dare import dare_linear, dare_ties
from modelfuse.merge.methods.model_stock import model_stock
from modelfuse.merge.methods.multislerp import multislerp
from modelfuse.merge.methods.slerp import slerp
from modelfuse.merge.methods.task_arithmetic import task_arithmetic
from modelfuse.merge.methods.ties import ties

CASES = {
    "task_arithmetic": ({"lambda": 0.7}, lambda ts, b, n: task_arithmetic(ts, b, lambda_=0.7)),
    "ties": ({"density": 0.4}, lambda ts, b, n: ties(ts, b, density=0.4)),
    "dare_linear": (
        {"density": 0.6, "random_seed": 3},
        lambda ts, b, n: dare_linear(ts, b, density=0.6, generator=tensor_generator(3, n)),
    ),
    "dare_ties": (
        {"density": 0.6, "random_seed": 3},
        lambda ts, b, n: dare_ties(ts, b, density=0.6, generator=tensor_generator(3, n)),
    ),
    "breadcrumbs": (
        {"density": 0.5, "gamma": 0.1},
        lambda ts, b, n: breadcrumbs(ts, b, density=0.5, gamma=0.1),
    ),
    "breadcrumbs_ties": (
        {"density": 0.5, "gamma": 0.1},
        lambda ts, b, n: breadcrumbs_ties(ts, b, density=0.5, gamma=0.1),
    ),
    "slerp": ({"t": 0.3}, lambda ts, b, n: slerp(ts[:1], b, t=0.3)),
    "multislerp": ({}, lambda ts, b, n: multislerp(ts, b)),
    "model_stock": ({}, lambda ts, b, n: model_stock(ts, b)),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_merge_llama_folders_and_run_forward(method, llama_folders, tmp_path):
    from transformers import LlamaForCausalLM

    parameters, function = CASES[method]
    base, *others = llama_folders
    models = others[:1] if method == "slerp" else others
    config = {
        "merge_method": method,
        "base_model": str(base),
        # mergekit lists the base among the models too; it is not merged twice.
        "models": [{"model": str(base)}] + [{"model": str(m)} for m in models],
        "parameters": parameters,
        "dtype": "float32",
    }
    out = tmp_path / "merged"
    modelfuse.merge(config, out, threads=2)
    merged_state = {}
    for shard in sorted(out.glob("*.safetensors")):
        merged_state.update(load_file(shard))
    base_state = load_file(base / "model.safetensors")
    model_states = [load_file(m / "model.safetensors") for m in models]
    for name, tensor in base_state.items():
        expected = function([sd[name] for sd in model_states], tensor, name)
        torch.testing.assert_close(merged_state[name], expected)

    merged = LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        logits = merged(ids).logits
    assert logits.shape == (1, 5, 64) and bool(torch.isfinite(logits).all())
