"""Where a mergekit 0.1.5 configuration and modelfuse must agree, against formulas written here.

- gradients give every tensor outside the numbered layers their first value
  (mergekit's planner reads those tensors at t = 0);
- a global parameter under one model's ``parameters`` is ignored whatever the
  order of the models (mergekit reads global parameters with no model), with
  one warning naming the key and the model;
- parameter names that mergekit accepts and ignores run with one warning;
  names no mergekit method reads stay errors;
- ``dtype: float64`` and ``out_dtype: float64`` are accepted;
- every method and option computes mergekit 0.1.5's formula (written out in
  ``_mergekit_formulas.py``) in float32 and bfloat16, and where modelfuse
  deliberately differs (TIES ``scope: global``, which of several equal
  magnitudes at a trim threshold survive) mergekit's result is one setting away
  or the difference stays within a stated bound.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import modelfuse
from modelfuse.errors import ConfigError
from modelfuse.merge import merge_state_dicts
from modelfuse.merge.parameters import IgnoredParameterWarning

from . import _mergekit_formulas as mf
from .conftest import random_state


def _write(folder: Path, name: str, state: dict[str, torch.Tensor]) -> str:
    path = folder / f"{name}.safetensors"
    save_file(state, path)
    return str(path)


def _inputs(folder: Path, n: int = 3) -> list[str]:
    """``n`` float32 models with Llama tensor names; the first serves as the base."""
    return [_write(folder, f"m{i}", random_state(i)) for i in range(n)]


def _merge(config: dict, out: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Merge; return the tensors and the messages of the IgnoredParameterWarnings raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        modelfuse.merge(config, out)
    messages = [str(w.message) for w in caught if issubclass(w.category, IgnoredParameterWarning)]
    return load_file(out / "model.safetensors"), messages


def _dyadic_inputs(folder: Path, n: int = 3) -> list[str]:
    """Like :func:`_inputs`, with entries in multiples of 1/4 below 4: every sum and product
    below is exact in float32, so the bytes cannot depend on the order of the models."""
    paths = []
    for i in range(n):
        state = {
            k: (torch.round(v * 4) / 4).clamp(-4, 4) if v.is_floating_point() else v
            for k, v in random_state(i).items()
        }
        paths.append(_write(folder, f"d{i}", state))
    return paths


def _float(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.float64) for k, v in state.items() if v.is_floating_point()}


# 1. Gradients outside the layers ---------------------------------------------------------


def test_gradient_outside_the_layers_is_read_at_t_0_through_the_file_engine(tmp_path):
    """linear, weights [1, 3] on a and [3, 1] on b over two layers: layer 0 (t = 0) and every
    tensor outside the layers take (1 a + 3 b) / 4, layer 1 (t = 1) takes (3 a + 1 b) / 4."""
    a, b = _inputs(tmp_path, 2)
    config = {
        "merge_method": "linear",
        "models": [
            {"model": a, "parameters": {"weight": [1.0, 3.0]}},
            {"model": b, "parameters": {"weight": [3.0, 1.0]}},
        ],
    }
    merged, _ = _merge(config, tmp_path / "out")
    sa, sb = _float(load_file(a)), _float(load_file(b))
    first = {k: (1 * sa[k] + 3 * sb[k]) / 4 for k in sa}
    last = {k: (3 * sa[k] + 1 * sb[k]) / 4 for k in sa}
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.mlp.weight"):
        np.testing.assert_allclose(merged[name].numpy(), first[name], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        merged["model.layers.1.mlp.weight"].numpy(), last["model.layers.1.mlp.weight"], rtol=1e-6
    )


def test_head_and_final_norm_of_a_llama_folder_get_the_first_value(llama_folders, tmp_path):
    """task_arithmetic on a Llama folder with a global lambda gradient [0.25, 2]."""
    base, tuned = llama_folders[0], llama_folders[1]
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(tuned)}],
        "parameters": {"lambda": [0.25, 2.0]},
    }
    merged, _ = _merge(config, tmp_path / "out")
    sb = _float(load_file(base / "model.safetensors"))
    st = _float(load_file(tuned / "model.safetensors"))
    for name, lam in [
        ("lm_head.weight", 0.25),
        ("model.norm.weight", 0.25),
        ("model.embed_tokens.weight", 0.25),
        ("model.layers.0.mlp.up_proj.weight", 0.25),
        ("model.layers.1.mlp.up_proj.weight", 2.0),
    ]:
        expected = sb[name] + lam * (st[name] - sb[name])
        np.testing.assert_allclose(merged[name].numpy(), expected, rtol=1e-5, atol=1e-6)


# 2. Global settings inside one model's parameters ----------------------------------------


@pytest.mark.parametrize(
    ("method", "key", "value", "top"),
    [
        ("task_arithmetic", "lambda", 3.0, {}),
        ("task_arithmetic", "normalize", True, {"lambda": 0.5}),
        ("ties", "normalize", False, {"density": 0.5}),
    ],
)
def test_a_models_global_setting_is_ignored_in_either_order(tmp_path, method, key, value, top):
    base, a, b = _dyadic_inputs(tmp_path)
    entries = [{"model": a, "parameters": {"weight": 0.75, key: value}}, {"model": b}]
    outputs, messages = [], []
    for number, models in enumerate([entries, entries[::-1]]):
        config = {"merge_method": method, "base_model": base, "models": models, "parameters": top}
        out = tmp_path / f"out{number}"
        _, found = _merge(config, out)
        outputs.append((out / "model.safetensors").read_bytes())
        messages.append(found)
    assert outputs[0] == outputs[1]
    for found in messages:
        assert len(found) == 1
        assert found[0].startswith(f"{a}: parameters: '{key}' is ignored: it is a global parameter")
        assert found[0].endswith("top-level (or a slice's) parameters; move it there")
    # The same bytes as a configuration that never set it.
    plain = [{"model": a, "parameters": {"weight": 0.75}}, {"model": b}]
    config = {"merge_method": method, "base_model": base, "models": plain, "parameters": top}
    _, found = _merge(config, tmp_path / "plain")
    assert found == []
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == outputs[0]


def test_the_ignored_lambda_against_the_formula(tmp_path):
    """lambda 3 under model a is ignored: theta = base + 1 * (0.7 tau_a + tau_b)."""
    base, a, b = _inputs(tmp_path)
    config = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": b}, {"model": a, "parameters": {"weight": 0.7, "lambda": 3.0}}],
    }
    merged, _ = _merge(config, tmp_path / "out")
    s0, sa, sb = (_float(load_file(p)) for p in (base, a, b))
    for name in s0:
        expected = s0[name] + 0.7 * (sa[name] - s0[name]) + (sb[name] - s0[name])
        np.testing.assert_allclose(merged[name].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_global_settings_of_a_slice_apply_and_of_a_source_are_ignored(tmp_path):
    """mergekit reads global parameters from a slice's parameters, never from a source's."""
    base, a = _inputs(tmp_path, 2)
    sources = [
        {"model": base, "layer_range": [0, 2]},
        {"model": a, "layer_range": [0, 2], "parameters": {"lambda": 5.0}},
    ]
    config = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "slices": [{"sources": sources, "parameters": {"lambda": 2.0}}],
    }
    merged, found = _merge(config, tmp_path / "out")
    assert len(found) == 1 and "'lambda' is ignored: it is a global parameter" in found[0]
    assert found[0].startswith(f"slices[0]: {a} layers 0-1: parameters:")
    s0, sa = _float(load_file(base)), _float(load_file(a))
    name = "model.layers.1.mlp.weight"
    expected = s0[name] + 2.0 * (sa[name] - s0[name])
    np.testing.assert_allclose(merged[name].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_state_dicts_ignore_a_models_global_setting_too():
    base = {"w": torch.zeros(3)}
    a, b = {"w": torch.ones(3)}, {"w": torch.full((3,), 2.0)}
    results = []
    for order in ([a, b], [b, a]):
        params = [{"lambda": 4.0} if sd is a else {} for sd in order]
        with pytest.warns(IgnoredParameterWarning, match="'lambda' is ignored"):
            results.append(
                merge_state_dicts("task_arithmetic", order, base, model_parameters=params)
            )
    assert torch.equal(results[0]["w"], results[1]["w"])
    torch.testing.assert_close(results[0]["w"], torch.full((3,), 3.0))  # lambda 1: 1 + 2


# 3. Parameters mergekit accepts and ignores ----------------------------------------------


def _model_stock_reference(base: np.ndarray, models: list[np.ndarray]) -> np.ndarray:
    """Model Stock per tensor: t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine."""
    taus = [(m - base).ravel() for m in models]
    cosines = [
        taus[i] @ taus[j] / max(np.linalg.norm(taus[i]) * np.linalg.norm(taus[j]), 1e-6)
        for i in range(len(taus))
        for j in range(i + 1, len(taus))
    ]
    cos, n = float(np.mean(cosines)), len(models)
    t = n * cos / (1 + (n - 1) * cos)
    return t * np.mean(models, axis=0) + (1 - t) * base


def _slerp_reference(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    cos = (a.ravel() @ b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b))
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def test_weight_on_model_stock_runs_with_one_warning(tmp_path):
    base, a, b = _inputs(tmp_path)
    config = {
        "merge_method": "model_stock",
        "base_model": base,
        "models": [
            {"model": a, "parameters": {"weight": 0.3}},
            {"model": b, "parameters": {"weight": 0.7}},
        ],
    }
    merged, found = _merge(config, tmp_path / "out")
    assert len(found) == 2
    for model, message in zip((a, b), found):
        assert message.startswith(f"{model}: parameters: 'weight' is ignored: merge method ")
        assert "'model_stock' has no such parameter, and mergekit 0.1.5 ignores it too" in message
    s0, sa, sb = (_float(load_file(p)) for p in (base, a, b))
    name = "model.layers.0.mlp.weight"
    expected = _model_stock_reference(s0[name], [sa[name], sb[name]])
    np.testing.assert_allclose(merged[name].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_weight_on_slerp_runs_with_one_warning(tmp_path):
    base, a = _inputs(tmp_path, 2)
    config = {
        "merge_method": "slerp",
        "base_model": base,
        "models": [{"model": base}, {"model": a, "parameters": {"weight": 0.5}}],
        "parameters": {"t": 0.3, "weight": 1.0},
    }
    merged, found = _merge(config, tmp_path / "out")
    assert len(found) == 2
    assert found[0].startswith("parameters: 'weight' is ignored: merge method 'slerp'")
    assert found[1].startswith(f"{a}: parameters: 'weight' is ignored: merge method 'slerp'")
    assert found[0].endswith("(parameters of 'slerp': t)")
    s0, sa = _float(load_file(base)), _float(load_file(a))
    name = "model.layers.1.mlp.weight"
    np.testing.assert_allclose(
        merged[name].numpy(), _slerp_reference(s0[name], sa[name], 0.3), rtol=1e-4, atol=1e-5
    )


def test_density_and_rescale_on_task_arithmetic_change_nothing(tmp_path):
    base, a, b = _inputs(tmp_path)
    config = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": a, "parameters": {"weight": 0.5, "density": 0.2}}, {"model": b}],
        "parameters": {"rescale": True, "density": 0.5},
    }
    merged, found = _merge(config, tmp_path / "out")
    assert [m.split(" is ignored")[0] for m in found] == [
        "parameters: 'rescale'",
        "parameters: 'density'",
        f"{a}: parameters: 'density'",
    ]
    s0, sa, sb = (_float(load_file(p)) for p in (base, a, b))
    for name in s0:
        expected = s0[name] + 0.5 * (sa[name] - s0[name]) + (sb[name] - s0[name])
        np.testing.assert_allclose(merged[name].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_residual_weight_of_a_slice_runs_with_one_warning(tmp_path):
    a = _inputs(tmp_path, 1)[0]
    config = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}], "residual_weight": 0.5}],
    }
    merged, found = _merge(config, tmp_path / "out")
    assert found == [
        "slices[0]: residual_weight is ignored: mergekit 0.1.5 accepts it and uses it nowhere; "
        "remove it"
    ]
    source = load_file(a)
    assert all(torch.equal(merged[name], source[name]) for name in source)


@pytest.mark.parametrize(
    ("method", "key"),
    [
        ("task_arithmetic", "densty"),  # a misspelling: mergekit would drop it without a word
        ("linear", "colour"),
        ("fisher", "density"),  # a modelfuse method: no mergekit configuration to accept
    ],
)
def test_names_mergekit_would_not_know_stay_errors(tmp_path, method, key):
    base, a = _inputs(tmp_path, 2)
    config = {
        "merge_method": method,
        "base_model": base,
        "models": [{"model": a, "parameters": {key: 0.5}}],
    }
    with pytest.raises(ConfigError, match=f"unknown parameter '{key}' for merge method '{method}'"):
        modelfuse.merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["dtype", "out_dtype"])
def test_float64_is_accepted(tmp_path, key):
    """Written in float64; the arithmetic is float32, so the values are the float32 merge's."""
    a, b = _inputs(tmp_path, 2)
    config = {"merge_method": "linear", "models": [a, b]}
    wide, _ = _merge({**config, key: "float64"}, tmp_path / "wide")
    narrow, _ = _merge(config, tmp_path / "narrow")
    sa, sb = _float(load_file(a)), _float(load_file(b))
    for name in sa:
        assert wide[name].dtype == torch.float64
        assert torch.equal(wide[name], narrow[name].to(torch.float64))
        np.testing.assert_allclose(wide[name].numpy(), (sa[name] + sb[name]) / 2, rtol=1e-6)
    assert torch.equal(wide["position_ids"], narrow["position_ids"])  # integers are copied


def test_float64_in_memory():
    out = merge_state_dicts(
        "linear", [{"w": torch.ones(2)}, {"w": torch.zeros(2)}], dtype="float64"
    )
    assert out["w"].dtype == torch.float64
    assert torch.equal(out["w"], torch.full((2,), 0.5, dtype=torch.float64))


# 5. Every method and option against mergekit 0.1.5's formula ----------------------------
#
# Tiny state dicts with Llama names over three layers (so gradients read positions 0, 0.5
# and 1, and every tensor outside the layers reads t = 0), merged with merge_state_dicts and
# compared with the formula of tests/merge/_mergekit_formulas.py computed in float64 from the
# same (float32 or bfloat16) inputs. Tolerances: float32 1e-6 relative plus 1e-6 absolute
# (values are of order 1; a few float32 operations); bfloat16 one bfloat16 rounding step of
# the exact value (modelfuse computes in float32 and rounds once) plus 1e-6 absolute.

N_LAYERS = 3
DTYPES = [torch.float32, torch.bfloat16]


def _llama_state(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (8, 4)}
    for i in range(N_LAYERS):
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = (4, 4)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (6, 4)
    shapes["model.norm.weight"] = (4,)
    shapes["lm_head.weight"] = (8, 4)
    return {k: torch.randn(*s, generator=g).to(dtype) for k, s in shapes.items()}


def _f64(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.to(torch.float64).numpy() for k, v in state.items()}


def _assert_parity(merged, expected: dict[str, np.ndarray], dtype: torch.dtype) -> None:
    assert set(merged) == set(expected)
    for name, want in expected.items():
        assert merged[name].dtype == dtype, name
        got = merged[name].to(torch.float64).numpy()
        if dtype == torch.float32:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)
        else:
            bound = mf.bfloat16_step(want) + 1e-6
            worst = float(np.max(np.abs(got - want) - bound))
            assert worst <= 0, (name, worst)


def _models(dtype, n=3):
    """(base, models) as torch state dicts."""
    return _llama_state(100, dtype), [_llama_state(101 + i, dtype) for i in range(n)]


def _expected(names, fn):
    return {name: fn(name) for name in names}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_weights_gradients_and_filters(dtype, normalize):
    _, models = _models(dtype)
    settings = [
        {"weight": 1.0},
        {"weight": [0.5, 2.0]},
        {"weight": [{"filter": "self_attn", "value": 0.25}, {"value": [3.0, 1.0, 2.0]}]},
    ]
    merged = merge_state_dicts("linear", models, model_parameters=settings, normalize=normalize)
    xs = [_f64(m) for m in models]
    expected = _expected(
        xs[0],
        lambda k: mf.linear(
            [x[k] for x in xs], [mf.resolve(s["weight"], k, N_LAYERS) for s in settings], normalize
        ),
    )
    _assert_parity(merged, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_task_arithmetic_lambda_and_normalize(dtype, normalize):
    base, models = _models(dtype, 2)
    settings = [{"weight": 0.7}, {"weight": [{"filter": "mlp", "value": -0.4}, {"value": 1.2}]}]
    lam = [0.5, 1.5]
    merged = merge_state_dicts(
        "task_arithmetic", models, base, model_parameters=settings, lambda_=lam, normalize=normalize
    )
    b, xs = _f64(base), [_f64(m) for m in models]
    expected = _expected(
        b,
        lambda k: mf.task_arithmetic_family(
            b[k],
            [x[k] for x in xs],
            [mf.resolve(s["weight"], k, N_LAYERS) for s in settings],
            lam=mf.resolve(lam, k, N_LAYERS),
            normalize=normalize,
            consensus=False,
        ),
    )
    _assert_parity(merged, expected, dtype)


def _family_case(method, dtype, settings, globals_, *, consensus, trim, n=3):
    """Merge with modelfuse and with the formula; ``trim(tau, setting, name)`` sparsifies."""
    base, models = _models(dtype, n)
    merged = merge_state_dicts(method, models, base, model_parameters=settings, **globals_)
    b, xs = _f64(base), [_f64(m) for m in models]
    lam = globals_.get("lambda_", 1.0)

    def one(k):
        return mf.task_arithmetic_family(
            b[k],
            [x[k] for x in xs],
            [mf.resolve(s.get("weight", 1.0), k, N_LAYERS) for s in settings],
            lam=mf.resolve(lam, k, N_LAYERS),
            normalize=globals_["normalize"],
            consensus=consensus,
            sparsify=None if trim is None else (lambda tau, i: trim(tau, settings[i], k)),
        )

    return merged, _expected(b, one)


TIES_CASES = [
    # (per-model settings, global parameters)
    ([{"weight": 1.0, "density": 0.5}] * 3, {"normalize": True}),
    (
        [
            {"weight": 1.0, "density": 0.5},
            {"weight": [0.3, 1.5], "density": [0.2, 0.9]},
            {"weight": -0.6, "density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]},
        ],
        {"normalize": False, "lambda_": [0.8, 1.6]},
    ),
    ([{"weight": 0.5, "density": 0.4}] * 3, {"normalize": True, "int8_mask": True, "lambda_": 2}),
    (
        [{"weight": 1.0, "density": 0.3}, {"weight": 2.0, "density": 0.6}],
        {"normalize": True, "rescale": True},
    ),
    ([{"weight": 1.0, "density": 0.01}] * 2, {"normalize": False, "rescale": True}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("settings", "globals_"), TIES_CASES)
def test_ties(dtype, settings, globals_):
    rescale = globals_.get("rescale", False)
    merged, expected = _family_case(
        "ties",
        dtype,
        settings,
        globals_,
        consensus=True,
        trim=lambda tau, s, k: mf.magnitude(tau, mf.resolve(s["density"], k, N_LAYERS), rescale),
        n=len(settings),
    )
    _assert_parity(merged, expected, dtype)


BREADCRUMBS_CASES = [
    ([{"weight": 1.0, "density": 0.5, "gamma": 0.1}] * 2, {"normalize": False}),
    (
        [{"weight": 0.7, "density": [0.4, 0.8], "gamma": 0.05}, {"weight": 1.3, "density": 0.6}],
        {"normalize": True, "rescale": True, "lambda_": 1.5},
    ),
    ([{"weight": 1.0, "density": 0.9, "gamma": 0.2}] * 2, {"normalize": False}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize(("settings", "globals_"), BREADCRUMBS_CASES)
def test_breadcrumbs(dtype, method, settings, globals_):
    rescale = globals_.get("rescale", False)

    def trim(tau, s, k):
        density = mf.resolve(s["density"], k, N_LAYERS)
        return mf.magnitude_outliers(tau, density, s.get("gamma", 0.01), rescale)

    merged, expected = _family_case(
        method, dtype, settings, globals_, consensus=method.endswith("ties"), trim=trim, n=2
    )
    _assert_parity(merged, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("normalize", [True, False])
def test_dare_at_density_1_is_deterministic(dtype, method, normalize):
    """At density 1 mergekit's Bernoulli drop returns the task vector (rescale does nothing)."""
    settings = [{"weight": 0.6, "density": 1.0}, {"weight": [1.4, 0.2], "density": 1.0}]
    merged, expected = _family_case(
        method,
        dtype,
        settings,
        {"normalize": normalize, "lambda_": 1.3},
        consensus=method == "dare_ties",
        trim=None,
        n=2,
    )
    _assert_parity(merged, expected, dtype)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_rescale_rule_given_modelfuses_masks(method):
    """The masks are random; given modelfuse's (read from a run without rescale, same seed),
    the default rescale is mergekit's: kept * |tau|_1 / |kept|_1 per tensor and model."""
    base, models = _models(torch.float32, 2)
    settings = [{"weight": 0.8, "density": 0.5}, {"weight": 1.1, "density": 0.3}]
    common = {"model_parameters": settings, "random_seed": 7, "normalize": False}
    b, xs = _f64(base), [_f64(m) for m in models]
    # Model i's mask depends on its position among the models: read both from one run each,
    # with the other model's task vector zero (a copy of the base).
    masks = []
    for i in range(2):
        inputs = [model if j == i else base for j, model in enumerate(models)]
        alone = merge_state_dicts(method, inputs, base, rescale=False, **common)
        masks.append({k: _f64(alone)[k] != b[k] for k in b})
    merged = merge_state_dicts(method, models, base, **common)
    expected = _expected(
        b,
        lambda k: mf.task_arithmetic_family(
            b[k],
            [x[k] for x in xs],
            [s["weight"] for s in settings],
            normalize=False,
            consensus=method == "dare_ties",
            sparsify=lambda tau, i: mf.l1_rescale(tau, tau * masks[i][k]),
        ),
    )
    assert any(m[k].mean() < 0.8 for m in masks for k in b)  # the drop really dropped
    _assert_parity(merged, expected, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "t",
    [0.3, [0.0, 0.3, 1.0], [{"filter": "self_attn", "value": 0.25}, {"value": [0.2, 0.8]}]],
)
def test_slerp_t_gradients_and_filters(dtype, t):
    base, models = _models(dtype, 1)
    merged = merge_state_dicts("slerp", models, base, t=t)
    b, x = _f64(base), _f64(models[0])
    expected = _expected(b, lambda k: mf.slerp(b[k], x[k], mf.resolve(t, k, N_LAYERS)))
    _assert_parity(merged, expected, dtype)
    if isinstance(t, list) and not isinstance(t[0], dict) and t[0] == 0.0:
        # Outside the layers t = 0: the base itself, bit for bit.
        for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            assert torch.equal(merged[k], base[k])


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_stock(dtype):
    base, models = _models(dtype, 3)
    merged = merge_state_dicts("model_stock", models, base)
    b, xs = _f64(base), [_f64(m) for m in models]
    expected = _expected(b, lambda k: mf.model_stock(b[k], [x[k] for x in xs]))
    _assert_parity(merged, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize_weights", [True, False])
def test_multislerp(dtype, with_base, normalize_weights):
    base, models = _models(dtype, 3)
    weights = [1.0, 2.0, 0.5] if normalize_weights else [0.2, 0.5, 0.3]
    merged = merge_state_dicts(
        "multislerp",
        models,
        base if with_base else None,
        weights=weights,
        normalize_weights=normalize_weights,
    )
    b, xs = _f64(base), [_f64(m) for m in models]
    expected = _expected(
        b,
        lambda k: mf.multislerp(
            [x[k] for x in xs], weights, b[k] if with_base else None, normalize_weights
        ),
    )
    _assert_parity(merged, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_arcee_fusion(dtype):
    """Exact quantiles (every tensor below 1M entries); masks compared where no importance is
    within float32 rounding of the threshold (the random inputs have none)."""
    base, models = _models(dtype, 1)
    merged = merge_state_dicts("arcee_fusion", models, base)
    b, x = _f64(base), _f64(models[0])
    _assert_parity(merged, _expected(b, lambda k: mf.arcee_fusion(b[k], x[k])), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("ram", {}),
        ("ram", {"epsilon": [{"filter": "mlp", "value": 0.5}, {"value": [0.0, 1.0]}]}),
        ("ramplus_tl", {}),
        ("ramplus_tl", {"r": [0.5, 2.0], "alpha": 1.0, "epsilon": 0.3}),
    ],
)
def test_ram(dtype, method, settings):
    """Models that change about half of the base's entries (the rest equal to it), so that
    unique, shared and unchanged entries mix."""
    base, models = _models(dtype, 3)
    g = torch.Generator().manual_seed(5)
    models = [
        {k: torch.where(torch.rand(v.shape, generator=g) < 0.5, v, base[k]) for k, v in m.items()}
        for m in models
    ]
    merged = merge_state_dicts(method, models, base, **settings)
    b, xs = _f64(base), [_f64(m) for m in models]

    def one(k):
        values = {key: mf.resolve(value, k, N_LAYERS) for key, value in settings.items()}
        return mf.ram(b[k], [x[k] for x in xs], tensor_local=method == "ramplus_tl", **values)

    _assert_parity(merged, _expected(b, one), dtype)


def test_passthrough_slices_take_layers_renumbered(tmp_path):
    """Layers 0-1 of a then 1-2 of b: out layers 0, 1 are a's 0, 1 and 2, 3 are b's 1, 2;
    the tensors before the layers come from the first slice, after them from the last
    (mergekit's planner reads pre-weights from slices[0] and post-weights from slices[-1])."""
    sa, sb = _llama_state(1, torch.float32), _llama_state(2, torch.float32)
    a, b = _write(tmp_path, "a", sa), _write(tmp_path, "b", sb)
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}]},
            {"sources": [{"model": b, "layer_range": [1, 3]}]},
        ],
    }
    merged, _ = _merge(config, tmp_path / "out")
    q = "model.layers.{}.self_attn.q_proj.weight"
    u = "model.layers.{}.mlp.up_proj.weight"
    for out, (source, i) in enumerate([(sa, 0), (sa, 1), (sb, 1), (sb, 2)]):
        assert torch.equal(merged[q.format(out)], source[q.format(i)])
        assert torch.equal(merged[u.format(out)], source[u.format(i)])
    assert q.format(4) not in merged
    assert torch.equal(merged["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(merged["model.norm.weight"], sb["model.norm.weight"])
    assert torch.equal(merged["lm_head.weight"], sb["lm_head.weight"])


# 6. Where modelfuse deliberately differs: one setting away, or within a bound ------------


def test_ties_scope_tensor_is_mergekit_and_global_is_the_papers():
    """``scope: tensor`` (the default) is mergekit's per-tensor trim; ``scope: global`` trims
    each model over the whole model at once, the k-th largest of all its magnitudes."""
    base, models = _models(torch.float32, 2)
    settings = [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.3}]
    b, xs = _f64(base), [_f64(m) for m in models]

    def reference(trims):
        return _expected(
            b,
            lambda k: mf.task_arithmetic_family(
                b[k],
                [x[k] for x in xs],
                [s["weight"] for s in settings],
                normalize=True,
                consensus=True,
                sparsify=lambda tau, i: trims[i][k],
            ),
        )

    per_tensor = [{k: mf.magnitude(x[k] - b[k], 0.3, False) for k in b} for x in xs]
    whole_model = []
    for x in xs:
        taus = {k: x[k] - b[k] for k in b}
        flat = np.concatenate([t.reshape(-1) for t in taus.values()])
        threshold = np.sort(np.abs(flat))[::-1][max(1, int(0.3 * flat.size)) - 1]
        whole_model.append({k: np.where(np.abs(t) >= threshold, t, 0.0) for k, t in taus.items()})

    tensor = merge_state_dicts("ties", models, base, model_parameters=settings, scope="tensor")
    default = merge_state_dicts("ties", models, base, model_parameters=settings)
    global_ = merge_state_dicts("ties", models, base, model_parameters=settings, scope="global")
    _assert_parity(tensor, reference(per_tensor), torch.float32)
    _assert_parity(default, reference(per_tensor), torch.float32)
    _assert_parity(global_, reference(whole_model), torch.float32)
    assert any(not torch.equal(tensor[k], global_[k]) for k in b)


def _tied_task_vector(seed: int, shape=(64, 64)) -> np.ndarray:
    """Magnitudes 1, 2, 3 or 4 with random signs: most entries tie with many others."""
    rng = np.random.default_rng(seed)
    magnitude = rng.choice([1.0, 2.0, 3.0, 4.0], size=shape, p=[0.4, 0.3, 0.2, 0.1])
    return magnitude * rng.choice([-1.0, 1.0], size=shape)


def _torch_order(descending: bool):
    """The order mergekit 0.1.5 takes: torch.argsort of the float32 magnitudes (not stable)."""

    def order(magnitudes):
        values = torch.from_numpy(magnitudes.astype(np.float32))
        return torch.argsort(values, descending=descending).numpy()

    return order


def _reversed_ties(descending: bool):
    """Among equal magnitudes the higher position first. Descending, this is the opposite of
    modelfuse's TIES rule; ascending, it is modelfuse's breadcrumbs rule at both cuts."""

    def order(magnitudes):
        positions = np.arange(magnitudes.size)
        return np.lexsort((-positions, -magnitudes if descending else magnitudes))

    return order


NAME = "model.layers.0.mlp.up_proj.weight"


def _tie_case(method, weight=0.5, lam=2.0, **parameters):
    """The tied task vector merged alone by modelfuse (base zero, normalize false)."""
    tau = _tied_task_vector(0)
    base = {NAME: torch.zeros(tau.shape)}
    model = {NAME: torch.from_numpy(tau).float()}
    merged = merge_state_dicts(
        method, [model], base, weights=[weight], lambda_=lam, normalize=False, **parameters
    )
    return tau, merged[NAME].numpy().astype(np.float64)


@pytest.mark.parametrize("order_name", ["torch", "reversed"])
def test_ties_tie_breaking_differs_by_at_most_the_tie_bound(order_name):
    """One model, density 0.3 of 4096 entries of magnitudes 1..4: the threshold magnitude has
    hundreds of equal entries and only some are kept. modelfuse keeps them in flat-index
    order (its result is the formula with a stable sort, exactly); mergekit keeps the ones its
    sort puts first. The outputs differ on at most 2 min(q, e - q) entries (e entries equal to
    the threshold, q of them kept), each by lambda * |weight| * the threshold."""
    order = {"torch": _torch_order(True), "reversed": _reversed_ties(True)}[order_name]
    tau, got = _tie_case("ties", density=0.3)
    modelfuse_rule = 2.0 * 0.5 * mf.magnitude(tau, 0.3, False)
    mergekit = 2.0 * 0.5 * mf.magnitude(tau, 0.3, False, order)
    np.testing.assert_array_equal(got, modelfuse_rule)
    magnitudes = np.abs(tau)
    threshold = np.sort(magnitudes.reshape(-1))[::-1][int(0.3 * tau.size) - 1]
    equal, above = magnitudes == threshold, magnitudes > threshold
    e, q = int(equal.sum()), int(0.3 * tau.size) - int(above.sum())
    assert 0 < q < e  # the threshold really splits a group of ties
    bound = mf.tie_bound(magnitudes, modelfuse_rule != 0)
    assert bound == 2 * min(q, e - q)
    differ = got != mergekit
    assert differ.sum() <= bound
    assert np.all(equal[differ])  # only entries at the threshold
    assert np.all(np.abs(got - mergekit)[differ] == 2.0 * 0.5 * threshold)
    if order_name == "reversed":
        assert differ.sum() == bound  # the bound is reached


def _modelfuse_outliers(tau: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """modelfuse's breadcrumbs rule: by decreasing magnitude, the lower position first among
    equals, skip the first int(gamma n) and keep the next int(density n)."""
    flat = tau.reshape(-1)
    n = flat.size
    target = int(density * n)
    top = min(int(gamma * n), n - target)
    positions = mf.descending(np.abs(flat))[top : top + target]
    out = np.zeros_like(flat)
    out[positions] = flat[positions]
    return out.reshape(tau.shape)


@pytest.mark.parametrize("order_name", ["torch", "stable", "reversed"])
def test_breadcrumbs_tie_breaking_differs_by_at_most_the_tie_bound(order_name):
    """Breadcrumbs cuts at two magnitudes (below the int(gamma n) largest and above the
    bottom). mergekit sorts ascending and keeps positions n_bot to n_bot + target: with a
    stable sort that keeps the higher positions among ties at the lower cut and the lower
    ones at the upper cut; modelfuse keeps the lower positions at the lower cut and the
    higher ones at the upper cut (it drops the first of the ties among the largest). So
    even a stable sort reaches the bound, the sum over both cuts of 2 min(q, e - q)."""
    order = {"torch": _torch_order(False), "stable": None, "reversed": _reversed_ties(False)}[
        order_name
    ]
    tau, got = _tie_case("breadcrumbs", density=0.5, gamma=0.1)
    modelfuse_rule = 2.0 * 0.5 * _modelfuse_outliers(tau, 0.5, 0.1)
    mergekit = 2.0 * 0.5 * mf.magnitude_outliers(tau, 0.5, 0.1, False, order)
    np.testing.assert_array_equal(got, modelfuse_rule)
    magnitudes = np.abs(tau)
    bound = mf.tie_bound(magnitudes, modelfuse_rule != 0)
    assert bound > 0
    differ = got != mergekit
    assert differ.sum() <= bound
    assert np.all(np.abs(got - mergekit)[differ] == 2.0 * 0.5 * magnitudes[differ])
    if order_name == "stable":
        assert differ.sum() == bound
    if order_name == "reversed":
        assert differ.sum() == 0


def test_ties_with_two_models_differs_only_where_a_selection_does():
    """With several models a different tie choice can also flip the elected sign, so an entry
    may change by more than one model's share; the entries that change are still only those
    where some model's selection changed: at most the sum of the models' bounds."""
    taus = [_tied_task_vector(1), _tied_task_vector(2)]
    base = {NAME: torch.zeros(taus[0].shape)}
    models = [{NAME: torch.from_numpy(t).float()} for t in taus]
    merged = merge_state_dicts("ties", models, base, weights=[1.0, 0.7], density=0.3)
    got = merged[NAME].numpy().astype(np.float64)
    order = _reversed_ties(True)

    def formula(o):
        return mf.task_arithmetic_family(
            np.zeros(taus[0].shape),
            taus,
            [1.0, 0.7],
            normalize=True,
            consensus=True,
            sparsify=lambda tau, i: mf.magnitude(tau, 0.3, False, o),
        )

    np.testing.assert_allclose(got, formula(None), rtol=1e-6)
    mergekit = formula(order)
    selections = [mf.magnitude(t, 0.3, False) != mf.magnitude(t, 0.3, False, order) for t in taus]
    differ = np.abs(got - mergekit) > 1e-5
    assert differ.any()
    assert np.all((selections[0] | selections[1])[differ])
    bounds = [mf.tie_bound(np.abs(t), mf.magnitude(t, 0.3, False) != 0) for t in taus]
    assert differ.sum() <= sum(bounds)


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_linear"])
def test_normalize_with_weights_summing_to_zero_divides_by_one(method):
    """mergekit replaces a weight sum below 1e-8 in magnitude by 1."""
    settings = [{"weight": 1.0}, {"weight": -1.0}]
    merged, expected = _family_case(
        method, torch.float32, settings, {"normalize": True}, consensus=False, trim=None, n=2
    )
    _assert_parity(merged, expected, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_stock_with_two_models(dtype):
    base, models = _models(dtype, 2)
    merged = merge_state_dicts("model_stock", models, base)
    b, xs = _f64(base), [_f64(m) for m in models]
    _assert_parity(merged, _expected(b, lambda k: mf.model_stock(b[k], [x[k] for x in xs])), dtype)


def test_slerp_from_a_zero_tensor_is_linear_here_and_not_in_mergekit():
    """A documented difference: mergekit's zero-norm guard makes cos = 0 and interpolates with
    sin((1 - t) pi / 2), sin(t pi / 2); modelfuse interpolates linearly."""
    base, models = _models(torch.float32, 1)
    base = {**base, "model.norm.weight": torch.zeros(4)}
    t = 0.3
    merged = merge_state_dicts("slerp", models, base, t=[t, t])
    b = models[0]["model.norm.weight"].numpy().astype(np.float64)
    got = merged["model.norm.weight"].numpy()
    np.testing.assert_allclose(got, t * b, rtol=1e-6)
    mergekit = mf.slerp(np.zeros(4), b, t)
    np.testing.assert_allclose(mergekit, np.sin(t * np.pi / 2) * b, rtol=1e-12)
    assert not np.allclose(got, mergekit, rtol=1e-3)
