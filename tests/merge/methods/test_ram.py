import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import modelfuse
from modelfuse.cli import main as cli
from modelfuse.errors import ConfigError
from modelfuse.merge import merge_state_dicts
from modelfuse.merge.methods.ram import ram, ram_counts, ramplus_tl

from ..conftest import random_state


def _reference(tensors, base, epsilon=1e-5, tensor_local=False, r=0.1, alpha=0.2):
    """mergekit's ram / ramplus_tl written out with numpy in float64: masks |tau| > epsilon,
    counts c; unique entries (c = 1) kept whole (times lambda_i for ramplus_tl, with
    rho_i = shared_i / max(unique_i, epsilon) over the whole tensor), shared entries
    (c > 1) divided by c; summed over the models and added to the base."""
    b = base.double().numpy()
    taus = np.stack([t.double().numpy() - b for t in tensors])
    masks = np.abs(taus) > epsilon
    counts = masks.sum(0)
    unique, shared = counts == 1, counts > 1
    lambdas = np.ones(len(tensors))
    if tensor_local:
        for i in range(len(tensors)):
            rho = (masks[i] & shared).sum() / max((masks[i] & unique).sum(), epsilon)
            lambdas[i] = 1 + r * np.clip(rho, 0, alpha)
    merged = np.zeros_like(b)
    for i in range(len(tensors)):
        kept = taus[i] * masks[i]
        merged += kept * unique * lambdas[i] + kept * shared / np.maximum(counts, 1)
    return torch.from_numpy(b + merged).float()


def _models(n, shape=(6, 7), seed=0, keep=0.5):
    """A base and n models that change a random part of its entries (the rest exactly
    equal to the base's, some by less than epsilon), so that unique and shared entries mix."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(n):
        change = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < keep)
        tiny = 1e-6 * (torch.rand(shape, generator=g) < 0.1)
        models.append(base + change + tiny)
    return base, models


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("epsilon", [1e-5, 0.0, 0.5])
def test_ram_matches_formula(n, epsilon):
    base, models = _models(n, seed=n)
    expected = _reference(models, base, epsilon)
    torch.testing.assert_close(ram(models, base, epsilon=epsilon), expected)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize(
    ("r", "alpha", "keep"), [(0.1, 0.2, 0.5), (2.0, 5.0, 0.3), (-0.5, 1.0, 0.8)]
)
def test_ramplus_tl_matches_formula(n, r, alpha, keep):
    base, models = _models(n, seed=10 + n, keep=keep)
    expected = _reference(models, base, tensor_local=True, r=r, alpha=alpha)
    torch.testing.assert_close(ramplus_tl(models, base, r=r, alpha=alpha), expected)
    assert n == 1 or not torch.allclose(
        ramplus_tl(models, base, r=r, alpha=alpha), ram(models, base)
    )


def test_hand_worked_example():
    """tau_a = [2, 4, 0, 0], tau_b = [0, 2, 1, 3]: entry 1 is shared (mean 3), the others
    unique. ram keeps them whole; ramplus_tl with r 0.5, alpha 1: a shares 1 of 2 changes
    (rho 1, lambda 1.5), b 1 of 3 (rho 0.5, lambda 1.25)."""
    base = torch.zeros(4)
    a, b = torch.tensor([2.0, 4.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 1.0, 3.0])
    assert torch.equal(ram([a, b], base), torch.tensor([2.0, 3.0, 1.0, 3.0]))
    assert torch.equal(
        ramplus_tl([a, b], base, r=0.5, alpha=1.0), torch.tensor([3.0, 3.0, 1.25, 3.75])
    )
    assert torch.equal(ram_counts([a, b], base), torch.tensor([[1, 1], [1, 2]]))
    # a model with no unique entry: rho = shared / epsilon, clamped at alpha
    assert torch.equal(ramplus_tl([a, a], base, r=0.5, alpha=1.0), torch.tensor([2.0, 4.0, 0, 0]))


def test_bfloat16_inputs_larger_than_a_chunk_are_not_modified():
    base, models = _models(3, shape=(700, 500), seed=5)
    base, models = base.to(torch.bfloat16), [m.to(torch.bfloat16) for m in models]
    copies = [t.clone() for t in [base, *models]]
    for tensor_local in (False, True):
        function = ramplus_tl if tensor_local else ram
        out = function(models, base)
        assert out.dtype == torch.float32
        expected = _reference([m.float() for m in models], base.float(), tensor_local=tensor_local)
        torch.testing.assert_close(out, expected)
    assert all(torch.equal(t, c) for t, c in zip([base, *models], copies))


def test_ramplus_tl_holds_its_counting_chunks_or_computes_them_again(monkeypatch):
    """A whole tensor's merge keeps the chunks its count computed when they fit
    (HOLD_BYTES), else it computes them again: the same bytes either way, over several
    chunks, and the inputs unchanged."""
    from modelfuse.merge.methods import ram as ram_module

    base, models = _models(3, shape=(700, 500), seed=8)
    copies = [t.clone() for t in [base, *models]]
    held = ramplus_tl(models, base, r=0.5, alpha=1.0)
    monkeypatch.setattr(ram_module, "HOLD_BYTES", 0)
    again = ramplus_tl(models, base, r=0.5, alpha=1.0)
    assert torch.equal(held, again)
    expected = _reference(models, base, tensor_local=True, r=0.5, alpha=1.0)
    torch.testing.assert_close(held, expected)
    assert all(torch.equal(t, c) for t, c in zip([base, *models], copies))


def test_one_dimensional_and_empty_tensors():
    base, models = _models(2, shape=(13,), seed=6)
    torch.testing.assert_close(
        ramplus_tl(models, base), _reference(models, base, tensor_local=True)
    )
    empty = torch.zeros(0, 3)
    assert ram([empty], empty).shape == (0, 3)
    assert ramplus_tl([empty, empty], empty).shape == (0, 3)


def test_needs_a_base_and_a_model():
    base, models = _models(2)
    with pytest.raises(ConfigError, match="ram needs a base model; set base_model"):
        ram(models, None)
    with pytest.raises(ConfigError, match="ramplus_tl: no models besides the base"):
        ramplus_tl([], base)
    with pytest.raises(ConfigError, match="shape"):
        ram([models[0][:3]], base)


def _state_dicts(dtype=torch.float32):
    shapes = {
        "w": (12, 5),
        "v": (30,),
        "model.layers.0.mlp.w": (4, 5),
        "model.layers.1.mlp.w": (4, 5),
    }
    g = torch.Generator().manual_seed(1)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    models = []
    for _ in range(3):
        models.append(
            {
                k: (
                    v.float()
                    + torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.4)
                ).to(dtype)
                for k, v in base.items()
            }
        )
    return base, models


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_state_dicts_whole_and_in_row_blocks_give_the_same_bytes(monkeypatch, method):
    import modelfuse.merge.execute as execute
    import modelfuse.merge.schedule as schedule

    base, models = _state_dicts()
    whole = (
        merge_state_dicts(method, models, base, r=0.5, alpha=1.0)
        if method == "ramplus_tl"
        else merge_state_dicts(method, models, base)
    )
    for name in base:
        expected = _reference(
            [m[name] for m in models],
            base[name],
            tensor_local=method == "ramplus_tl",
            r=0.5,
            alpha=1.0,
        )
        torch.testing.assert_close(whole[name], expected)
    monkeypatch.setattr(schedule, "BLOCK_ELEMENTS", 5)  # blocks of one row (of 5 entries for v)
    reductions, blocks = [], []
    reduce, call = execute._reduce, execute._call
    monkeypatch.setattr(execute, "_reduce", lambda *a: reductions.append(a[2]) or reduce(*a))
    monkeypatch.setattr(execute, "_call", lambda *a: blocks.append(a[3]) or call(*a))
    extra = {"r": 0.5, "alpha": 1.0} if method == "ramplus_tl" else {}
    for threads in (1, 2):
        blocks.clear()
        merged = merge_state_dicts(method, models, base, threads=threads, **extra)
        for name in base:
            assert torch.equal(merged[name], whole[name]), name
        assert sum(rows is not None for rows in blocks) == 12 + 6 + 4 + 4
    if method == "ramplus_tl":  # the counts of every block of rows, summed
        assert len(reductions) == 2 * (12 + 6 + 4 + 4)
    else:  # elementwise: no reduction
        assert reductions == []


def test_parameters_are_checked():
    base, models = _state_dicts()
    for method, key, value in [
        ("ram", "epsilon", -1e-5),
        ("ram", "epsilon", float("nan")),
        ("ramplus_tl", "alpha", -0.1),
        ("ramplus_tl", "r", float("inf")),
        ("ramplus_tl", "epsilon", "small"),
    ]:
        with pytest.raises(ConfigError, match=key) as caught:
            merge_state_dicts(method, models, base, **{key: value})
        assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="unknown parameter 'rr'"):
        merge_state_dicts("ramplus_tl", models, base, rr=0.1)
    with pytest.raises(ConfigError, match="needs a base model"):
        merge_state_dicts("ram", models)


def test_gradients_of_epsilon_r_and_alpha():
    base, models = _state_dicts()
    out = merge_state_dicts(
        "ramplus_tl", models, base, r=[0.0, 2.0], alpha=[1.0, 3.0], epsilon=[0.0, 0.5]
    )
    for name, t in [("model.layers.0.mlp.w", 0.0), ("model.layers.1.mlp.w", 1.0), ("w", 0.0)]:
        expected = _reference(
            [m[name] for m in models],
            base[name],
            epsilon=0.5 * t,
            tensor_local=True,
            r=2.0 * t,
            alpha=1.0 + 2.0 * t,
        )
        torch.testing.assert_close(out[name], expected)


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_mergekit_yaml_through_the_file_engine(tmp_path, method):
    """A mergekit configuration (base listed among the models, bfloat16, epsilon in
    scientific notation, int8_mask that mergekit ignores) merges every floating tensor by
    the formula, rounded once to bfloat16."""
    states = [random_state(i, torch.bfloat16) for i in range(3)]
    paths = []
    for i, state in enumerate(states):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(state, paths[-1])
    config = tmp_path / "ram.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": method,
                "base_model": str(paths[0]),
                "models": [{"model": str(p)} for p in paths],
                "dtype": "bfloat16",
            }
        )
        + "parameters:\n  epsilon: 1e-1\n  int8_mask: true\n"
    )
    before = [p.read_bytes() for p in paths]
    with pytest.warns(UserWarning, match="'int8_mask' is ignored"):
        result = modelfuse.merge(config, tmp_path / "out")
    merged = load_file(result.out / "model.safetensors")
    for name, tensor in states[0].items():
        if tensor.is_floating_point():
            expected = _reference(
                [s[name].float() for s in states[1:]],
                tensor.float(),
                epsilon=0.1,
                tensor_local=method == "ramplus_tl",
            )
            assert merged[name].dtype == torch.bfloat16
            # computed in float32, rounded once: within one bfloat16 step of the exact value
            torch.testing.assert_close(merged[name].float(), expected, rtol=2**-8, atol=1e-6)
        else:
            assert torch.equal(merged[name], tensor)
    assert [p.read_bytes() for p in paths] == before


def test_cli_refuses_a_bad_parameter_with_one_line(tmp_path, capsys):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(random_state(i), paths[-1])
    config = tmp_path / "bad.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ramplus_tl",
                "base_model": str(paths[0]),
                "models": [str(paths[1])],
                "parameters": {"alpha": -1},
            }
        )
    )
    before = [p.stat().st_mtime_ns for p in paths]
    assert cli(["merge", str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("modelfuse: error:"), err
    assert "alpha" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()
    assert [p.stat().st_mtime_ns for p in paths] == before
