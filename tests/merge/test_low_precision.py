"""Methods that take inputs in their stored dtype give what float32 inputs give."""

from __future__ import annotations

import pytest
import torch

from modelfuse.merge import METHODS, merge_state_dicts

SETTINGS = {
    "linear": {},
    "task_arithmetic": {"lambda": 0.7},
    "passthrough": {},
    "ties": {"density": 0.5},
    "dare_linear": {"density": 0.5, "random_seed": 3},
    "dare_ties": {"density": 0.5, "random_seed": 3},
    "breadcrumbs": {"density": 0.6, "gamma": 0.1},
    "breadcrumbs_ties": {"density": 0.6, "gamma": 0.1},
    "della": {"density": 0.5, "random_seed": 3},
    "della_linear": {"density": 0.5, "random_seed": 3},
    "sce": {"select_topk": 0.5},
    "fisher": {},
    "gradient_matching": {},
    "karcher": {},
    "model_stock": {},
    "multislerp": {},
    "nearswap": {"t": 0.3},
    "nuslerp": {"weight": [0.3, 0.7]},
    "slerp": {"t": 0.3},
    "arcee_fusion": {},
    "ram": {},
    "ramplus_tl": {"r": 0.5, "alpha": 1.0},
}


def test_every_flagged_method_is_covered():
    flagged = {name for name, method in METHODS.items() if method.low_precision_inputs}
    assert flagged == set(SETTINGS)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_bfloat16_inputs_equal_their_float32_values(name):
    method = METHODS[name]
    g = torch.Generator().manual_seed(0)
    n = 1 if method.max_models == 1 or name == "slerp" else min(3, method.max_models or 3)

    def state():
        return {"a.weight": torch.randn(7, 5, generator=g), "a.bias": torch.randn(7, generator=g)}

    low = [{k: v.to(torch.bfloat16) for k, v in state().items()} for _ in range(n)]
    base = {k: v.to(torch.bfloat16) for k, v in state().items()} if method.uses_base else None
    wide = [{k: v.float() for k, v in sd.items()} for sd in low]
    wide_base = None if base is None else {k: v.float() for k, v in base.items()}
    extra = {}
    if method.statistics:
        extra["fishers"] = [{k: torch.rand(v.shape, generator=g) for k, v in sd.items()} for sd in wide]
    got = merge_state_dicts(name, low, base, out_dtype="float32", **extra, **SETTINGS[name])
    expected = merge_state_dicts(name, wide, wide_base, **extra, **SETTINGS[name])
    for key in expected:
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
