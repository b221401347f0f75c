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
