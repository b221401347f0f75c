import copy

import numpy as np
import pytest
import scipy.optimize
import torch
from sklearn.datasets import load_digits
from torch import nn

from modelfuse.alignment import (
    PermutationSpec,
    apply_permutation,
    matching_objective,
    sequential_permutation_spec,
    weight_matching,
)
from modelfuse.errors import CheckpointError, ConfigError


def outputs(model, state_dict, x):
    clone = copy.deepcopy(model)
    clone.load_state_dict(state_dict)
    clone.eval()
    with torch.no_grad():
        return clone(x)


def mlp(seed, sizes=(10, 16, 12, 4)):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(sizes[0], sizes[1]),
        nn.ReLU(),
        nn.Linear(sizes[1], sizes[2]),
        nn.ReLU(),
        nn.Linear(sizes[2], sizes[3]),
    )


def cnn(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model


def normed_mlp(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(10, 16), nn.LayerNorm(16), nn.PReLU(16), nn.Dropout(0.1), nn.Linear(16, 4)
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.PReLU)):
                for p in m.parameters():
                    p.normal_()
    return model


def test_spec_of_an_mlp_is_the_hand_written_one():
    spec = sequential_permutation_spec(mlp(0))
    assert dict(spec.axes) == {
        "0.weight": ("P_0", None),
        "0.bias": ("P_0",),
        "2.weight": ("P_2", "P_0"),
        "2.bias": ("P_2",),
        "4.weight": (None, "P_2"),
        "4.bias": (None,),
    }
    assert spec.apply_only == frozenset()


def test_spec_of_a_cnn_covers_batchnorm_statistics():
    spec = sequential_permutation_spec(cnn(0), prefix="net.")
    assert spec.axes["net.0.weight"] == ("P_net.0", None, None, None)
    assert spec.axes["net.1.running_var"] == ("P_net.0",)
    assert spec.axes["net.3.0.weight"] == ("P_net.3.0", "P_net.0", None, None)
    assert spec.axes["net.3.1.running_mean"] == ("P_net.3.0",)
    assert spec.axes["net.6.weight"] == (None, "P_net.3.0")
    assert "net.1.num_batches_tracked" not in spec.axes
    assert spec.apply_only == {
        "net.1.running_mean",
        "net.1.running_var",
        "net.3.1.running_mean",
        "net.3.1.running_var",
    }


def test_permutation_is_applied_as_written_and_keeps_the_function():
    model = mlp(1)
    spec = sequential_permutation_spec(model)
    a = model.state_dict()
    p0, p2 = torch.randperm(16), torch.randperm(12)
    b = apply_permutation(spec, {"P_0": p0, "P_2": p2}, a)
    assert torch.equal(b["0.weight"], a["0.weight"][p0])
    assert torch.equal(b["0.bias"], a["0.bias"][p0])
    assert torch.equal(b["2.weight"], a["2.weight"][p2][:, p0])
    assert torch.equal(b["4.weight"], a["4.weight"][:, p2])
    assert torch.equal(b["4.bias"], a["4.bias"])
    x = torch.randn(7, 10)
    torch.testing.assert_close(outputs(model, b, x), outputs(model, a, x))


@pytest.mark.parametrize(
    "make, x_shape", [(mlp, (7, 10)), (normed_mlp, (7, 10)), (cnn, (4, 3, 9, 9))]
)
def test_weight_matching_recovers_a_known_permutation_exactly(make, x_shape):
    model = make(2)
    spec = sequential_permutation_spec(model)
    a = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(5)
    sizes = spec.sizes(a)
    true = {p: torch.randperm(n, generator=generator) for p, n in sizes.items()}
    b = apply_permutation(spec, true, a)
    x = torch.randn(*x_shape)
    torch.testing.assert_close(outputs(model, b, x), outputs(model, a, x))  # same function

    found = weight_matching(spec, a, b, seed=3)
    for p in sizes:  # b[i] = a[true[i]], so aligning b back needs the inverse permutation
        assert torch.equal(found[p], torch.argsort(true[p]))
    aligned = apply_permutation(spec, found, b)
    for k in a:
        assert torch.equal(aligned[k], a[k])
    # matching a model with itself finds the identity
    identity = weight_matching(spec, a, a)
    assert all(torch.equal(identity[p], torch.arange(n)) for p, n in sizes.items())


def test_one_hidden_layer_matches_a_direct_linear_assignment():
    torch.manual_seed(3)
    a = nn.Sequential(nn.Linear(8, 20), nn.Tanh(), nn.Linear(20, 3))
    b = copy.deepcopy(a)
    for p in b.parameters():
        nn.init.normal_(p)
    spec = sequential_permutation_spec(a)
    sa, sb = a.state_dict(), b.state_dict()
    cost = (
        sa["0.weight"].double() @ sb["0.weight"].double().T
        + torch.outer(sa["0.bias"].double(), sb["0.bias"].double())
        + sa["2.weight"].double().T @ sb["2.weight"].double()
    )
    _, expected = scipy.optimize.linear_sum_assignment(cost.numpy(), maximize=True)
    found = weight_matching(spec, sa, sb)
    np.testing.assert_array_equal(found["P_0"].numpy(), expected)
    assert matching_objective(spec, sa, apply_permutation(spec, found, sb)) > matching_objective(
        spec, sa, sb
    )


def test_aligned_models_from_different_inits_merge_better_than_unaligned():
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trained = []
        for seed in (10, 11):
            model = mlp(seed, (64, 64, 64, 10))
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            for _ in range(150):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[:1200]), y[:1200]).backward()
                optimizer.step()
            trained.append(model)
    finally:
        torch.set_num_threads(threads)
    spec = sequential_permutation_spec(trained[0])
    a, b = trained[0].state_dict(), trained[1].state_dict()
    aligned = apply_permutation(spec, weight_matching(spec, a, b), b)
    xt, yt = x[1200:], y[1200:]

    def midpoint_accuracy(other):
        mid = {k: (a[k] + other[k]) / 2 for k in a}
        return float((outputs(trained[0], mid, xt).argmax(1) == yt).float().mean())

    naive, rebasin = midpoint_accuracy(b), midpoint_accuracy(aligned)
    assert rebasin > naive + 0.05
    assert matching_objective(spec, a, aligned) > matching_objective(spec, a, b)


def test_bad_models_specs_and_permutations_raise():
    with pytest.raises(ConfigError, match="does not know LSTM"):
        sequential_permutation_spec(nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 4)))
    with pytest.raises(ConfigError, match="Flatten"):
        sequential_permutation_spec(
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
        )
    with pytest.raises(ConfigError, match="grouped"):
        sequential_permutation_spec(nn.Sequential(nn.Conv2d(2, 4, 1, groups=2), nn.Conv2d(4, 1, 1)))
    model = mlp(0)
    spec = sequential_permutation_spec(model)
    a = model.state_dict()
    with pytest.raises(ConfigError, match=r"perms\['P_0'\]: expected a permutation of 0..15"):
        apply_permutation(
            spec, {"P_0": torch.zeros(16, dtype=torch.long), "P_2": torch.arange(12)}, a
        )
    with pytest.raises(ConfigError, match="no permutation given"):
        apply_permutation(spec, {"P_0": torch.arange(16)}, a)
    with pytest.raises(CheckpointError, match="missing"):
        weight_matching(spec, a, {k: v for k, v in a.items() if k != "2.bias"})
    with pytest.raises(CheckpointError, match="has size 16"):
        weight_matching(PermutationSpec({"0.weight": ("P", None), "2.weight": ("P", None)}), a, a)
