import numpy as np
import pytest
import torch
from torch import nn

from modelfuse.errors import ConfigError
from modelfuse.statistics import UnusedLayerWarning, gram_matrices


def test_gram_of_each_linear_layer_is_xtx_over_n():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(25, 4)
    grams = gram_matrices(model, [x[:10], x[10:20], x[20:]])
    X0 = x.double().numpy()
    hidden = np.maximum(
        X0 @ model[0].weight.detach().double().numpy().T + model[0].bias.detach().double().numpy(),
        0.0,
    )
    np.testing.assert_allclose(grams["0.weight"].numpy(), X0.T @ X0 / 25, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        grams["2.weight"].numpy(), hidden.T @ hidden / 25, rtol=1e-5, atol=1e-7
    )
    assert grams.kind == "gram" and grams.n_examples == 25


def test_extra_dimensions_count_every_position_as_a_row_and_n_examples_cuts():
    torch.manual_seed(1)
    layer = nn.Linear(3, 2)
    x = torch.randn(8, 5, 3)  # (batch, positions, features)
    grams = gram_matrices(
        layer, [(x[:4], torch.zeros(4, dtype=torch.long)), (x[4:], None)], n_examples=6
    )
    rows = x[:6].reshape(-1, 3).double().numpy()  # 6 examples x 5 positions = 30 rows
    np.testing.assert_allclose(grams["weight"].numpy(), rows.T @ rows / 30, rtol=1e-5, atol=1e-7)
    assert grams.n_examples == 6


def test_unused_layer_is_left_out_with_a_warning_and_model_is_restored():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    model = TwoHeads().train()
    with pytest.warns(UnusedLayerWarning, match="unused.weight"):
        grams = gram_matrices(model, [torch.randn(4, 3)])
    assert set(grams) == {"used.weight"}
    assert model.training and model.used.training
    assert not model.used._forward_hooks and not model.unused._forward_hooks


def test_hooks_are_removed_and_flags_restored_even_on_error():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)).train()
    model[1].eval()

    def batches():
        yield torch.randn(4, 3)
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        gram_matrices(model, batches())
    assert all(not m._forward_hooks for m in model.modules())
    assert model.training and model[0].training and not model[1].training


def test_model_without_linear_layers_is_refused():
    with pytest.raises(ConfigError, match="no nn.Linear"):
        gram_matrices(nn.Conv1d(1, 1, 1), [torch.randn(2, 1, 4)])
