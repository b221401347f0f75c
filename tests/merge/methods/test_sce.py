import numpy as np
import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.merge import merge_state_dicts
from modelfuse.merge.methods.sce import SceParameters, sce, sce_selection


def _ref(base, tensors, select_topk=1.0):
    """mergekit 0.1.5's sce written out in numpy (float64): variance selection over the
    models (population variance; k = int(select_topk * nonzero variances), largest first,
    equal variances by position), mean-square weights normalised over the models (1/N
    when their sum is below 1e-6), sign election by sum (ties to +), disjoint weighted
    mean divided by at least 1e-6."""
    b = base.double().numpy()
    taus = np.stack([t.double().numpy() - b for t in tensors])
    if select_topk < 1:
        var = taus.var(axis=0).reshape(-1)
        k = int(np.count_nonzero(var) * select_topk) if select_topk > 0 else 0
        mask = np.zeros(var.size)
        mask[np.argsort(-var, kind="stable")[:k]] = 1.0
        taus = taus * mask.reshape(b.shape)
    squares = (taus**2).reshape(len(tensors), -1).mean(axis=1)
    if abs(squares.sum()) < 1e-6:
        weights = np.full(len(tensors), 1.0 / len(tensors))
    else:
        weights = squares / squares.sum()
    elected = np.where(taus.sum(axis=0) >= 0, 1.0, -1.0)
    agree = (np.sign(taus) == elected).astype(np.float64)
    w = weights.reshape((-1,) + (1,) * b.ndim)
    merged = (taus * agree * w).sum(axis=0) / np.maximum((agree * w).sum(axis=0), 1e-6)
    return torch.from_numpy(b + merged).float()


def _models(n, shape=(20, 30), seed=0, scales=None):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    scales = scales or [1.0] * n
    return base, [base + s * torch.randn(shape, generator=g) for s in scales]


@pytest.mark.parametrize("shape", [(20, 30), (50,)])
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
def test_sce_matches_formula(shape, select_topk):
    base, tensors = _models(3, shape, scales=[0.5, 1.0, 2.0])
    out = sce(tensors, base, select_topk=select_topk)
    torch.testing.assert_close(out, _ref(base, tensors, select_topk))


def test_the_weights_follow_each_task_vectors_mean_square():
    """One entry where both agree: the weighted mean there is (w_a a + w_b b) / (w_a + w_b)
    with w proportional to each task vector's mean square over the tensor."""
    base = torch.zeros(4)
    a = torch.tensor([1.0, 1.0, 1.0, 1.0])  # mean square 1
    b = torch.tensor([3.0, 3.0, 3.0, -3.0])  # mean square 9
    out = sce([a, b], base)
    # entries 0-2: (0.1 * 1 + 0.9 * 3) / 1 = 2.8; entry 3: sum -2 elects -, only b: -3
    torch.testing.assert_close(out, torch.tensor([2.8, 2.8, 2.8, -3.0]))


def test_selection_breaks_equal_variances_by_position():
    taus = [torch.tensor([1.0, 2.0, 1.0, 0.0, 2.0]), torch.tensor([-1.0, -2.0, -1.0, 0.0, -2.0])]
    # variances 1, 4, 1, 0, 4: 4 nonzero; 0.75 keeps 3: both 4s and the first 1
    torch.testing.assert_close(sce_selection(taus, 0.75), torch.tensor([1.0, 1, 0, 0, 1]))
    torch.testing.assert_close(sce_selection(taus, 0.25), torch.tensor([0.0, 1, 0, 0, 0]))
    assert sce_selection(taus, 1.0) is None


def test_equal_models_give_the_base_and_zero_selection_gives_the_base():
    base, tensors = _models(2)
    torch.testing.assert_close(sce([base.clone(), base.clone()], base), base)
    torch.testing.assert_close(sce(tensors, base, select_topk=0.0), base)
    one = sce(tensors[:1], base)  # one model: its tensor (all its signs elected)
    torch.testing.assert_close(one, tensors[0])


def test_inputs_are_not_modified_and_low_precision_inputs_work():
    base, tensors = _models(2)
    copies = [t.clone() for t in tensors]
    sce(tensors, base, select_topk=0.3)
    for t, c in zip(tensors, copies):
        assert torch.equal(t, c)
    half = [t.to(torch.bfloat16) for t in tensors]
    out = sce(half, base.to(torch.bfloat16), select_topk=0.3)
    expected = _ref(base.to(torch.bfloat16).float(), [t.float() for t in half], 0.3)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("torch_threads", [1, 2])
@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_held_task_vectors_and_variances_give_the_bytes_of_computing_them_again(
    monkeypatch, select_topk, torch_threads
):
    """A whole tensor keeps its chunks' task vectors and variances from the reduction for
    the merge when they fit; computed again in every pass (on one thread in buffers reused
    from chunk to chunk, on two in new tensors), the bytes are the same, and the inputs
    are left unchanged either way (several chunks)."""
    from modelfuse.merge.methods import sce as sce_module

    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        _held_and_computed_again(monkeypatch, select_topk, sce_module)
    finally:
        torch.set_num_threads(threads)


def _held_and_computed_again(monkeypatch, select_topk, sce_module):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(900, 700, generator=g).to(torch.bfloat16)
    tensors = [
        (base.float() + 0.01 * torch.randn(900, 700, generator=g)).to(torch.bfloat16)
        for _ in range(3)
    ]
    copies = [t.clone() for t in tensors]
    held = sce(tensors, base, select_topk=select_topk)
    monkeypatch.setattr(sce_module, "HELD_TASK_VECTORS", 0)
    monkeypatch.setattr(sce_module, "KEPT_VARIANCES", 0)
    again = sce(tensors, base, select_topk=select_topk)
    assert torch.equal(held, again)
    assert all(torch.equal(t, c) for t, c in zip(tensors, copies))
    expected = _ref(base.float(), [t.float() for t in tensors], select_topk)
    torch.testing.assert_close(held, expected)


def test_select_topk_out_of_range_is_refused():
    base, tensors = _models(1)
    with pytest.raises(ConfigError, match="select_topk"):
        merge_state_dicts("sce", [{"w": tensors[0]}], {"w": base}, select_topk=1.5)
    assert SceParameters().select_topk == 1.0


def test_a_mergekit_sce_file_merges_to_the_formula(tmp_path):
    from safetensors.torch import load_file, save_file

    import modelfuse

    g = torch.Generator().manual_seed(9)
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.weight", "model.norm.weight"]
    shapes = [(10, 4), (4, 4), (4,)]
    states = [{n: torch.randn(s, generator=g) for n, s in zip(names, shapes)} for _ in range(3)]
    for i, state in enumerate(states):
        save_file(state, tmp_path / f"m{i}.safetensors")
    config = tmp_path / "sce.yaml"
    config.write_text(
        "merge_method: sce\n"
        f"base_model: {tmp_path / 'm0.safetensors'}\n"
        "models:\n"
        f"  - model: {tmp_path / 'm1.safetensors'}\n"
        f"  - model: {tmp_path / 'm2.safetensors'}\n"
        "parameters: {select_topk: 0.5}\n"
        "dtype: float32\n"
    )
    modelfuse.merge(config, tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    for name in names:
        expected = _ref(states[0][name], [s[name] for s in states[1:]], 0.5)
        torch.testing.assert_close(merged[name], expected)


@pytest.mark.parametrize("select_topk", [0.3, 1.0])
def test_row_blocks_give_the_whole_tensors_bytes(monkeypatch, select_topk):
    """The engine reduces each large tensor (its selection and weights, found chunk by
    chunk) and merges blocks of rows alone: bitwise the whole tensor's result, from one
    thread or two, and the formula written out. Many equal variances, so that the
    selection's cutoff among them falls inside a block."""
    import modelfuse.merge.execute as execute
    import modelfuse.merge.methods.sparsification as sparsification
    import modelfuse.merge.schedule as schedule

    monkeypatch.setattr(sparsification, "_CHUNK", 16)  # chunk bounds inside the blocks
    g = torch.Generator().manual_seed(8)
    # integers and four models: task vectors and variances are exact in float32
    base = {
        "w": torch.randint(-9, 9, (12, 5), generator=g).float(),
        "b": torch.randint(-9, 9, (30,), generator=g).float(),
    }
    models = [
        {k: v + torch.randint(-2, 3, v.shape, generator=g).float() for k, v in base.items()}
        for _ in "abcd"
    ]
    whole = merge_state_dicts("sce", models, base, select_topk=select_topk)
    for name in base:
        expected = _ref(base[name], [m[name] for m in models], select_topk)
        torch.testing.assert_close(whole[name], expected)
    monkeypatch.setattr(schedule, "BLOCK_ELEMENTS", 5)  # blocks of one row (of 5 entries of b)
    reductions, blocks = [], []
    reduce, call = execute._reduce, execute._call
    monkeypatch.setattr(execute, "_reduce", lambda *a: reductions.append(a[1].name) or reduce(*a))
    monkeypatch.setattr(execute, "_call", lambda *a: blocks.append(a[3]) or call(*a))
    for threads in (1, 2):
        merged = merge_state_dicts("sce", models, base, threads=threads, select_topk=select_topk)
        for name in whole:
            assert torch.equal(merged[name], whole[name])
    assert sum(rows is not None for rows in blocks) == 2 * (12 + 6)
    assert sorted(reductions) == ["b", "b", "w", "w"]


def test_the_reduction_holds_the_selection_and_weights_of_the_whole_tensor():
    """sce_reduction's selection keeps exactly the k entries of largest variance (equal
    ones by position) and its weights are the masked mean squares, normalised."""
    from modelfuse.merge.methods.sce import sce_reduction

    base = torch.zeros(6)
    a = torch.tensor([2.0, 1.0, 1.0, 0.0, 3.0, 1.0])
    b = torch.tensor([0.0, -1.0, 3.0, 0.0, 3.0, -1.0])
    # variances 1, 1, 1, 0, 0, 1: nonzero 4, k = int(4 * 0.5) = 2: entries 0 and 1
    reduced = sce_reduction([a, b], base, select_topk=0.5)
    assert (reduced.selection.value, reduced.selection.cutoff) == (1.0, 2)
    squares = [(4.0 + 1.0) / 6, (0.0 + 1.0) / 6]
    assert reduced.weights == pytest.approx([s / sum(squares) for s in squares], rel=1e-15)
    out = sce([a, b], base, select_topk=0.5, reduced=reduced)
    torch.testing.assert_close(out, _ref(base, [a, b], 0.5))
