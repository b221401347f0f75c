import numpy as np
import pytest
import torch
from torch import nn

from modelfuse.errors import ConfigError, DataError
from modelfuse.statistics import fisher_diagonal


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _softmax_regression(seed=0, d=5, c=4, n=40):
    torch.manual_seed(seed)
    model = nn.Linear(d, c)
    with torch.no_grad():
        model.weight.mul_(3.0)  # confident enough that p is far from uniform
    x = torch.randn(n, d)
    y = torch.randint(0, c, (n,))
    return model, x, y


def _batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def test_exact_fisher_of_softmax_regression_equals_closed_form():
    model, x, y = _softmax_regression()
    fisher = fisher_diagonal(model, _batches(x, y, 7), kind="exact")
    X = x.double().numpy()
    W = model.weight.detach().double().numpy()
    b = model.bias.detach().double().numpy()
    p = _softmax(X @ W.T + b)  # (n, C)
    n, C = p.shape
    # F_W[k, j] = mean_n sum_c p_c (1[c=k] - p_k)^2 x_j^2 ; F_b[k] the same without x_j^2
    F_W = np.zeros_like(W)
    F_b = np.zeros_like(b)
    for i in range(n):
        for k in range(C):
            s = sum(p[i, c] * ((1.0 if c == k else 0.0) - p[i, k]) ** 2 for c in range(C))
            F_W[k] += s * X[i] ** 2
            F_b[k] += s
    F_W /= n
    F_b /= n
    np.testing.assert_allclose(fisher["weight"].numpy(), F_W, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fisher["bias"].numpy(), F_b, rtol=1e-5, atol=1e-7)
    assert fisher.n_examples == n and fisher.kind == "fisher" and fisher.estimator == "exact"


def test_empirical_fisher_of_softmax_regression_equals_closed_form():
    model, x, y = _softmax_regression(seed=1)
    fisher = fisher_diagonal(model, _batches(x, y, 16), kind="empirical")
    X = x.double().numpy()
    p = _softmax(
        X @ model.weight.detach().double().numpy().T + model.bias.detach().double().numpy()
    )
    onehot = np.eye(p.shape[1])[y.numpy()]
    # F_W[k, j] = mean_n (1[y=k] - p_k)^2 x_j^2
    r2 = (onehot - p) ** 2
    np.testing.assert_allclose(fisher["weight"].numpy(), r2.T @ X**2 / len(X), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fisher["bias"].numpy(), r2.mean(0), rtol=1e-5, atol=1e-7)
    assert fisher.estimator == "empirical"


def test_n_examples_cuts_the_data_and_chunking_does_not_matter():
    model, x, y = _softmax_regression(seed=2, n=50)
    first20 = fisher_diagonal(model, [(x[:20], y[:20])])
    cut = fisher_diagonal(model, _batches(x, y, 8), n_examples=20, chunk_size=3)
    assert cut.n_examples == 20
    for name in first20:
        torch.testing.assert_close(cut[name], first20[name], rtol=1e-5, atol=1e-8)
    # inputs without labels work for the exact Fisher
    unlabeled = fisher_diagonal(model, [x[:20]], chunk_size=1)
    torch.testing.assert_close(unlabeled["weight"], first20["weight"], rtol=1e-5, atol=1e-8)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _loop_reference(model, x, y, kind):
    """Per-example autograd loop in evaluation mode: an independent reference."""
    model = _copy(model).eval()
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    out = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in zip(names, params)}
    for i in range(len(x)):
        logp = torch.log_softmax(model(x[i : i + 1]), -1)[0]
        classes = range(logp.shape[0]) if kind == "exact" else [int(y[i])]
        for c in classes:
            weight = float(logp[c].detach().exp()) if kind == "exact" else 1.0
            grads = torch.autograd.grad(logp[c], params, retain_graph=True)
            for n, g in zip(names, grads):
                out[n] += weight * g.double() ** 2
    return {n: v / len(x) for n, v in out.items()}


def _copy(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_mlp_matches_a_per_example_autograd_loop(kind):
    torch.manual_seed(3)
    model = _MLP()
    model.body[1].running_mean.normal_()
    model.body[1].running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    expected = _loop_reference(model, x, y, kind)
    fisher = fisher_diagonal(model, _batches(x, y, 10), kind=kind)
    assert set(fisher) == set(expected)
    for name in expected:
        torch.testing.assert_close(fisher[name].double(), expected[name], rtol=1e-4, atol=1e-8)


def test_model_is_left_as_found():
    torch.manual_seed(4)
    model = _MLP().train()
    model.head.eval()  # mixed flags must come back exactly
    model.body[0].bias.requires_grad_(False)
    model.head.weight.grad = torch.full_like(model.head.weight, 7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    fisher_diagonal(model, [(x, y)], kind="empirical")
    assert model.training and model.body.training and model.body[1].training
    assert not model.head.training
    assert model.body[0].bias.requires_grad is False and model.body[0].weight.requires_grad
    torch.testing.assert_close(model.head.weight.grad, torch.full_like(model.head.weight, 7.0))
    assert model.body[0].weight.grad is None
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])  # running statistics untouched too


def test_tied_parameters_appear_under_every_state_dict_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(4, 4, bias=False)
            self.decoder = nn.Linear(4, 4, bias=False)
            self.decoder.weight = self.encoder.weight

        def forward(self, x):
            return self.decoder(torch.tanh(self.encoder(x)))

    torch.manual_seed(5)
    model = Tied()
    fisher = fisher_diagonal(model, [torch.randn(9, 4)])
    assert set(fisher) == set(model.state_dict()) == {"encoder.weight", "decoder.weight"}
    torch.testing.assert_close(fisher["encoder.weight"], fisher["decoder.weight"])
    assert fisher["encoder.weight"].data_ptr() != fisher["decoder.weight"].data_ptr()


def test_mapping_inputs_and_logits_attribute_are_understood():
    class Output:
        def __init__(self, logits):
            self.logits = logits

    class KeywordModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, input_ids, attention_mask):
            h = (self.embed(input_ids) * attention_mask[..., None]).sum(1)
            return Output(self.head(h))

    torch.manual_seed(6)
    model = KeywordModel()
    ids = torch.randint(0, 10, (8, 5))
    mask = torch.ones(8, 5)
    mask[:, 3:] = 0
    y = torch.randint(0, 2, (8,))
    fisher = fisher_diagonal(
        model, [({"input_ids": ids, "attention_mask": mask}, y)], kind="empirical"
    )
    # token embeddings of masked positions and unused ids get no gradient
    used = torch.zeros(10, dtype=torch.bool)
    used[ids[:, :3].unique()] = True
    assert bool((fisher["embed.weight"][~used] == 0).all())
    assert bool((fisher["embed.weight"][used].sum(1) > 0).all())


def test_bad_input_is_reported():
    model, x, y = _softmax_regression()
    with pytest.raises(DataError, match="no labels"):
        fisher_diagonal(model, [x], kind="empirical")
    with pytest.raises(DataError, match=r"\[0, 3\]"):
        fisher_diagonal(model, [(x, y + 4)], kind="empirical")
    with pytest.raises(DataError, match="shape"):
        fisher_diagonal(model, [(x, y[:3])])
    with pytest.raises(ConfigError, match="exact, empirical"):
        fisher_diagonal(model, [(x, y)], kind="sampled")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="no examples"):
        fisher_diagonal(model, [])
    with pytest.raises(DataError, match=r"\(batch, classes\)"):
        three_d = nn.Sequential(nn.Linear(5, 4), nn.Unflatten(1, (2, 2)))
        fisher_diagonal(three_d, [x])


class _WeightUsedOutsideItsLayer(nn.Module):
    """head.weight also enters the output directly: the linear shortcut must not apply to it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)
        self.twice = nn.Linear(5, 5)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        h = self.twice(torch.tanh(self.twice(h)))  # one layer called twice per example
        return self.head(h) + 0.5 * (x[:, :3] * self.head.weight[:, :3].sum(1))


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_layers_breaking_the_shortcut_assumptions_fall_back_and_stay_exact(kind):
    torch.manual_seed(7)
    model = _WeightUsedOutsideItsLayer()
    x, y = torch.randn(15, 4), torch.randint(0, 3, (15,))
    expected = _loop_reference(model, x, y, kind)
    fisher = fisher_diagonal(model, _batches(x, y, 6), kind=kind)
    without = fisher_diagonal(model, _batches(x, y, 6), kind=kind, linear_shortcut=False)
    for name in expected:
        torch.testing.assert_close(fisher[name].double(), expected[name], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(without[name].double(), expected[name], rtol=1e-4, atol=1e-8)
    assert not any(m._forward_hooks for m in model.modules())


def test_a_layer_that_changes_behaviour_between_batches_leaves_the_shortcut():
    class Sometimes(nn.Module):
        """Runs `extra` twice when `twice` is set, once otherwise."""

        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)
            self.twice = False

        def forward(self, x):
            h = self.extra(x)
            if self.twice:
                h = self.extra(torch.tanh(h))
            return self.head(h)

    torch.manual_seed(8)
    model = Sometimes()
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))

    def batches():
        model.twice = False
        yield x[:6], y[:6]
        model.twice = True  # from the second batch on, `extra` runs twice per example
        yield x[6:], y[6:]

    fisher = fisher_diagonal(model, batches(), kind="empirical")
    # reference: one autograd call per example, in the mode its batch ran in
    expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for i in range(12):
        model.twice = i >= 6
        logp = torch.log_softmax(model(x[i : i + 1]), -1)[0, int(y[i])]
        grads = torch.autograd.grad(logp, list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads):
            expected[n] += g.double() ** 2 / 12
    for name in expected:
        torch.testing.assert_close(fisher[name].double(), expected[name], rtol=1e-4, atol=1e-9)


def test_hooks_removed_and_flags_restored_when_the_data_fails():
    model = _MLP().train()

    def batches():
        yield torch.randn(4, 6), torch.zeros(4, dtype=torch.long)
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        fisher_diagonal(model, batches())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(m.training for m in model.modules())


def test_tiny_llama_sequence_classifier_matches_the_loop():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    class Logits(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids).logits

    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=20,
        max_position_embeddings=16,
        num_labels=3,
        pad_token_id=0,
    )
    torch.manual_seed(9)
    model = Logits(LlamaForSequenceClassification(config).eval())
    model.inner.set_attn_implementation("eager")
    ids = torch.randint(1, 20, (6, 5))
    y = torch.randint(0, 3, (6,))
    expected = _loop_reference(model, ids, y, "exact")
    fisher = fisher_diagonal(model, [(ids[:4], y[:4]), (ids[4:], y[4:])])
    assert set(fisher) == set(expected)
    for name in expected:
        torch.testing.assert_close(fisher[name].double(), expected[name], rtol=1e-4, atol=1e-10)
