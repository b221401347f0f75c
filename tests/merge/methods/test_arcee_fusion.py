import zlib

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import modelfuse
from modelfuse.cli import main as cli
from modelfuse.errors import ConfigError
from modelfuse.merge import merge_state_dicts
from modelfuse.merge.methods.arcee_fusion import arcee_fusion, fusion_threshold

from ..conftest import random_state


def _importance(x, b):
    """|x - b| times the KL divergence of softmax(x) + 1e-8 from softmax(b) + 1e-8 per row
    (softmax over the last dimension), numpy float64."""
    x, b = np.asarray(x, np.float64), np.asarray(b, np.float64)
    rows = (-1, x.shape[-1]) if x.ndim else (1, 1)
    mx, mb = x.reshape(rows), b.reshape(rows)

    def softmax(m):
        e = np.exp(m - m.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(mx) + 1e-8, softmax(mb) + 1e-8
    kl = (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    return (np.abs(mx - mb) * kl).reshape(x.shape)


def _fence(values):
    """median + 1.5 (q3 - q1), each quantile q the entry int(q (n - 1)) of the sorted values."""
    s = np.sort(np.asarray(values).reshape(-1))
    n = s.size
    q1, median, q3 = s[int(0.25 * (n - 1))], s[int(0.5 * (n - 1))], s[int(0.75 * (n - 1))]
    return median + 1.5 * (q3 - q1)


def _reference(x, b, threshold=None):
    """mergekit's arcee_fusion written out: b + (x - b) * (importance >= threshold), with
    the exact quantiles unless a threshold is given."""
    importance = _importance(x, b)
    if threshold is None:
        threshold = _fence(importance)
    x64, b64 = np.asarray(x, np.float64), np.asarray(b, np.float64)
    return b64 + (x64 - b64) * (importance >= threshold), importance, threshold


def _pair(shape=(9, 16), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    other = base + 0.3 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.7)
    return base.to(dtype), other.to(dtype)


def _check(out, x, b, threshold=None):
    expected, importance, t = _reference(x.float().numpy(), b.float().numpy(), threshold)
    # an importance within float32 rounding of the threshold may fall on either side of it
    # (modelfuse computes it in float32, this reference in float64): there the result is the
    # base's or the other model's value; everywhere else it is the formula's
    near = np.isclose(importance, t, rtol=1e-5, atol=0) & (importance != 0)
    assert near.sum() <= max(2, 1e-4 * near.size)
    got = out.numpy()
    np.testing.assert_allclose(got[~near], expected[~near], rtol=1e-6, atol=1e-7)
    either = np.isclose(got, x.float().numpy(), rtol=1e-6) | np.isclose(
        got, b.float().numpy(), rtol=1e-6
    )
    assert either[near].all()
    return expected, importance, t


@pytest.mark.parametrize("shape", [(9, 16), (3, 4, 10), (40,), (1, 50), (50, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_formula(shape, seed):
    b, x = _pair(shape, seed)
    out = arcee_fusion([x], b)
    expected, importance, t = _check(out, x, b)
    if shape == (50, 1):  # one entry per row: softmax 1, KL 0, every change taken
        assert torch.equal(out, x)
    else:
        assert not (importance >= t).all()  # an outlier fence keeps a minority


def test_hand_worked_example():
    """Row 0 changes by 0.1 and 2 (KL 0.454), row 1 by 0.1 (KL 0.001): importances 0 (five
    entries), 1e-4, 0.045 and 0.91; q1 = median = 0 and q3 = 1e-4 give the threshold
    1.5e-4, so the changes of row 0 are taken and that of row 1 is not."""
    base = torch.zeros(2, 4)
    other = torch.tensor([[0.0, 0.1, 0.0, 2.0], [0.0, 0.0, 0.0, 0.1]])
    threshold = fusion_threshold([other], base)
    assert float(threshold.value) == pytest.approx(1.5 * 0.1 * 0.0010, rel=0.05)
    assert torch.equal(arcee_fusion([other], base), torch.tensor([[0, 0.1, 0, 2.0], [0, 0, 0, 0]]))
    # the same model: every importance 0, threshold 0, every entry "taken" (unchanged)
    assert torch.equal(arcee_fusion([base], base), base)


def test_one_dimensional_zero_dimensional_and_empty_tensors():
    b, x = _pair((30,), 3)
    _check(arcee_fusion([x], b), x, b)
    scalar = arcee_fusion([torch.tensor(2.0)], torch.tensor(1.0))
    assert scalar.shape == () and float(scalar) == 2.0  # KL 0: importance 0 >= threshold 0
    assert arcee_fusion([torch.zeros(4, 0)], torch.zeros(4, 0)).shape == (4, 0)


def test_bfloat16_inputs_larger_than_a_chunk_are_not_modified():
    b, x = _pair((600, 700), 4, torch.bfloat16)
    copies = b.clone(), x.clone()
    out = arcee_fusion([x], b)
    assert out.dtype == torch.float32
    _check(out, x, b)
    assert torch.equal(b, copies[0]) and torch.equal(x, copies[1])


def _generator(seed, name):
    """The merge's per-tensor generator, as documented: seeded by seed * 1000003 plus the
    CRC-32 of the tensor's name, modulo 2**63 - 1."""
    return torch.Generator().manual_seed(
        (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)
    )


def test_above_a_million_entries_the_quantiles_are_of_a_seeded_sample():
    """1001 x 1000 entries: the threshold is the fence of the importance at 1,000,000
    positions drawn with replacement from the tensor's seeded generator."""
    b, x = _pair((1001, 1000), 5)
    importance = _importance(x.numpy(), b.numpy())
    positions = torch.randint(x.numel(), (1_000_000,), generator=_generator(7, "w")).numpy()
    sampled = _fence(importance.reshape(-1)[positions])
    exact = _fence(importance)
    threshold = fusion_threshold([x], b, random_seed=7, name="w")
    assert float(threshold.value) == pytest.approx(sampled, rel=1e-5)
    assert float(threshold.value) != pytest.approx(exact, rel=1e-7)
    assert float(threshold.value) == pytest.approx(exact, rel=0.01)  # a close estimate
    out = arcee_fusion([x], b, random_seed=7, name="w")
    _check(out, x, b, float(threshold.value))
    # another seed or name draws other positions; the same ones give the same bytes
    assert torch.equal(out, arcee_fusion([x], b, random_seed=7, name="w"))
    other = fusion_threshold([x], b, random_seed=8, name="w").value
    assert float(other) != float(threshold.value)


def test_needs_a_base_and_exactly_one_other_model():
    b, x = _pair()
    with pytest.raises(ConfigError, match="arcee_fusion needs a base model; set base_model"):
        arcee_fusion([x], None)
    with pytest.raises(ConfigError, match="exactly one other model; got 2"):
        arcee_fusion([x, x], b)
    with pytest.raises(ConfigError, match="shape"):
        arcee_fusion([x[:3]], b)


def _state_dicts(dtype=torch.float32):
    shapes = {"w": (12, 5), "v": (30,), "model.layers.0.mlp.w": (4, 5), "s": (3, 2, 5)}
    base, other = {}, {}
    for i, (name, shape) in enumerate(shapes.items()):
        base[name], other[name] = _pair(shape, 10 + i, dtype)
    return base, other


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dicts_whole_and_in_row_blocks_give_the_same_bytes(monkeypatch, dtype):
    import modelfuse.merge.execute as execute
    import modelfuse.merge.schedule as schedule

    base, other = _state_dicts(dtype)
    whole = merge_state_dicts("arcee_fusion", [other], base)
    for name in base:
        assert whole[name].dtype == dtype
        expected, _, _ = _reference(other[name].float().numpy(), base[name].float().numpy())
        if dtype == torch.float32:
            np.testing.assert_allclose(whole[name].numpy(), expected, rtol=1e-6, atol=1e-7)
        else:  # one rounding to bfloat16
            np.testing.assert_allclose(whole[name].float().numpy(), expected, rtol=2**-8)
    monkeypatch.setattr(schedule, "BLOCK_ELEMENTS", 5)  # blocks of one row (5 entries of v)
    reductions, blocks = [], []
    reduce, call = execute._reduce, execute._call
    monkeypatch.setattr(execute, "_reduce", lambda *a: reductions.append(a[2]) or reduce(*a))
    monkeypatch.setattr(execute, "_call", lambda *a: blocks.append(a[3]) or call(*a))
    for threads in (1, 2):
        blocks.clear()
        merged = merge_state_dicts("arcee_fusion", [other], base, threads=threads)
        for name in base:
            assert torch.equal(merged[name], whole[name]), name
        assert sum(rows is not None for rows in blocks) == 12 + 6 + 4 + 3
    # one reduction of each whole tensor per run (the quantiles need every entry)
    assert reductions == [None] * 8


def test_the_base_listed_among_the_models_is_used_once():
    base, other = _state_dicts()
    listed = merge_state_dicts("arcee_fusion", [other], base)
    with pytest.raises(ConfigError, match="takes at most 1 models besides the base, got 2"):
        merge_state_dicts("arcee_fusion", [other, other], base)
    assert set(listed) == set(base)


def test_parameters_are_checked():
    base, other = _state_dicts()
    for key, value in [("random_seed", "x"), ("random_seed", 0.5)]:
        with pytest.raises(ConfigError, match=key) as caught:
            merge_state_dicts("arcee_fusion", [other], base, **{key: value})
        assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="unknown parameter 'threshold'"):
        merge_state_dicts("arcee_fusion", [other], base, threshold=0.5)
    with pytest.raises(ConfigError, match="needs a base model"):
        merge_state_dicts("arcee_fusion", [other])


def _files(tmp_path, n, dtype=torch.float32):
    states = [random_state(0, dtype)]
    for i in range(1, n):
        states.append(
            {
                k: (v.float() + 0.3 * random_state(10 + i)[k]).to(dtype)
                if v.is_floating_point()
                else v
                for k, v in states[0].items()
            }
        )
    paths = []
    for i, state in enumerate(states):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(state, paths[-1])
    return states, paths


def test_mergekit_yaml_through_the_file_engine(tmp_path):
    """A mergekit arcee_fusion configuration as published (the base listed among the
    models, normalize / int8_mask / rescale that mergekit ignores): one warning per ignored
    key, every floating tensor by the formula."""
    states, paths = _files(tmp_path, 2)
    config = tmp_path / "fusion.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "arcee_fusion",
                "base_model": str(paths[0]),
                "models": [{"model": str(p)} for p in paths],
                "parameters": {"normalize": True, "int8_mask": True, "rescale": False},
                "dtype": "float32",
            }
        )
    )
    before = [p.read_bytes() for p in paths]
    with pytest.warns(UserWarning) as caught:
        result = modelfuse.merge(config, tmp_path / "out")
    ignored = [str(w.message) for w in caught if "is ignored" in str(w.message)]
    assert len(ignored) == 3
    merged = load_file(result.out / "model.safetensors")
    for name, tensor in states[0].items():
        if tensor.is_floating_point():
            expected, _, _ = _reference(states[1][name].numpy(), tensor.numpy())
            np.testing.assert_allclose(merged[name].numpy(), expected, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(merged[name], tensor)
    assert [p.read_bytes() for p in paths] == before


def test_cli_refuses_three_models_with_one_line(tmp_path, capsys):
    """mergekit refuses more than two inputs (the base counted) for arcee_fusion; so does
    modelfuse, in one line, writing nothing."""
    _, paths = _files(tmp_path, 3)
    config = tmp_path / "three.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "arcee_fusion",
                "base_model": str(paths[0]),
                "models": [str(p) for p in paths],
            }
        )
    )
    before = [p.stat().st_mtime_ns for p in paths]
    assert cli(["merge", str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("modelfuse: error:"), err
    assert "arcee_fusion" in err[0] and "at most 1 models besides the base" in err[0]
    assert not (tmp_path / "out").exists()
    assert [p.stat().st_mtime_ns for p in paths] == before


@pytest.mark.parametrize("case", ["normal", "ties", "signed zeros and nans", "one value", "tiny"])
def test_order_statistics_are_those_of_a_sort(case):
    from modelfuse.merge.methods.arcee_fusion import order_statistics

    rng = np.random.default_rng(3)
    values = {
        "normal": rng.standard_normal(100_000),
        "ties": rng.integers(-3, 4, 50_000) * 0.25,
        "signed zeros and nans": np.array([0.0, -0.0, np.nan, -np.nan, 1.0, -np.inf, np.inf] * 300),
        "one value": np.full(1000, 7.5),
        "tiny": rng.standard_normal(1) * 1e-40,
    }[case].astype(np.float32)
    ranks = sorted({0, values.size // 4, values.size // 2, 3 * (values.size - 1) // 4, values.size - 1})
    expected = np.sort(values)[ranks]
    got = np.array(order_statistics(values, ranks), dtype=np.float32)
    np.testing.assert_array_equal(got, expected)
