import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.merge.methods.task_vectors import generalized_task_arithmetic, sparsify


def test_sparsify_does_not_modify_its_input_and_returns_new_tensors():
    delta = torch.tensor([0.1, -3.0, 2.0, 0.5])
    copy = delta.clone()
    for method in ("magnitude", "random", "magnitude_outliers"):
        out = sparsify(delta, method=method, density=0.5, gamma=0.25, rescale=True)
        assert out.data_ptr() != delta.data_ptr()
    assert torch.equal(delta, copy)


@pytest.mark.parametrize(
    "norm,fn",
    [
        ("l1", lambda t: t.abs().sum()),
        ("l2", lambda t: t.norm()),
        ("linf", lambda t: t.abs().max()),
    ],
)
def test_norm_rescales_restore_the_norm(norm, fn):
    delta = torch.tensor([0.1, -3.0, 2.0, 0.5, 4.0, -0.2])
    out = sparsify(
        delta,
        method="magnitude_outliers",
        density=0.5,
        gamma=0.2,
        rescale=True,
        rescale_method=norm,
    )
    torch.testing.assert_close(fn(out), fn(delta))


def test_inputs_are_not_modified_by_the_merge():
    base, a = torch.zeros(5), torch.arange(5.0)
    before = (base.clone(), a.clone())
    generalized_task_arithmetic(
        [a],
        base,
        sparsification="magnitude",
        density=0.4,
        consensus_method="sum",
        normalize=True,
        lambda_=2.0,
    )
    assert torch.equal(base, before[0]) and torch.equal(a, before[1])


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="base"):
        generalized_task_arithmetic([torch.ones(2)], None)
    with pytest.raises(ConfigError, match="2 weights for 1 models"):
        generalized_task_arithmetic([torch.ones(2)], torch.zeros(2), weight=[1, 2])
    with pytest.raises(ConfigError, match="valid: sum, count"):
        generalized_task_arithmetic([torch.ones(2)], torch.zeros(2), consensus_method="vote")
