import copy

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.mixture import GaussianMixture
from torch import nn

from modelfuse.errors import ConfigError, DataError
from modelfuse.search import DaWinClassifier, dawin_lambdas


def logits_by_loading(model, state_dict, x):
    clone_ = copy.deepcopy(model)
    clone_.load_state_dict(state_dict)
    clone_.eval()
    with torch.no_grad():
        return clone_(x)


def lambda_formula(z_zs, z_ft, temperature):
    h_zs = scipy.stats.entropy(scipy.special.softmax(z_zs / temperature, axis=1), axis=1)
    h_ft = scipy.stats.entropy(scipy.special.softmax(z_ft / temperature, axis=1), axis=1)
    return np.exp(-h_ft) / (np.exp(-h_zs) + np.exp(-h_ft))


def interpolate(zs, ft, lam):
    return {k: (1 - lam) * zs[k] + lam * ft[k] if zs[k].is_floating_point() else zs[k] for k in zs}


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_lambda_equals_the_formula(digits, temperature):
    x = digits.x_val[:100]
    zs, ft = digits.base, digits.fine_tuned[0]
    clf = DaWinClassifier(digits.model, zs, ft, temperature=temperature).fit()
    z_zs = logits_by_loading(digits.model, zs, x).double().numpy()
    z_ft = logits_by_loading(digits.model, ft, x).double().numpy()
    expected = lambda_formula(z_zs, z_ft, temperature)
    np.testing.assert_allclose(clf.lambdas(x).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(
        dawin_lambdas(torch.from_numpy(z_zs), torch.from_numpy(z_ft), temperature).numpy(),
        expected,
        rtol=1e-12,
    )
    assert 0.0 < expected.min() and expected.max() < 1.0 and expected.std() > 0.01


def test_each_sample_is_predicted_by_its_own_interpolated_model(digits):
    x = digits.x_val[:40]
    zs, ft = digits.base, digits.fine_tuned[2]
    clf = DaWinClassifier(digits.model, zs, ft, batch_size=16).fit()
    lam = clf.lambdas(x)
    logits = clf.decision_function(x)
    for i in (0, 17, 39):
        expected = logits_by_loading(digits.model, interpolate(zs, ft, float(lam[i])), x[i : i + 1])
        torch.testing.assert_close(logits[i : i + 1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clf.predict_proba(x), torch.softmax(logits, dim=1))
    assert torch.equal(clf.predict(x), logits.argmax(dim=1))


def test_batchnorm_running_statistics_are_interpolated_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    zs = {k: v.clone() for k, v in model.state_dict().items()}
    zs["1.running_mean"] = torch.randn(6)
    ft = {k: v + torch.randn_like(v) if v.is_floating_point() else v + 7 for k, v in zs.items()}
    ft["1.running_var"] = torch.rand(6) + 0.5
    x = torch.randn(9, 5)
    clf = DaWinClassifier(model, zs, ft, batch_size=4).fit()
    lam = clf.lambdas(x)
    logits = clf.decision_function(x)
    for i in range(9):
        expected = logits_by_loading(model, interpolate(zs, ft, float(lam[i])), x[i : i + 1])
        torch.testing.assert_close(logits[i : i + 1], expected, atol=1e-5, rtol=1e-5)


def test_clustered_path_merges_once_per_mixture_component(digits):
    x_fit, x = digits.x_train[:300], digits.x_val[:60]
    zs, ft = digits.base, digits.fine_tuned[1]
    clf = DaWinClassifier(digits.model, zs, ft, mode="cluster", n_clusters=3, random_state=4)
    clf.fit(x_fit)
    z = [logits_by_loading(digits.model, sd, x_fit).double().numpy() for sd in (zs, ft)]
    reference = GaussianMixture(3, random_state=4).fit(lambda_formula(*z, 1.0).reshape(-1, 1))
    np.testing.assert_allclose(clf.cluster_lambdas_, reference.means_.ravel(), rtol=1e-4)
    z = [logits_by_loading(digits.model, sd, x).double().numpy() for sd in (zs, ft)]
    routes = reference.predict(lambda_formula(*z, 1.0).reshape(-1, 1))
    np.testing.assert_array_equal(clf.clusters(x), routes)
    logits = clf.decision_function(x)
    for c in np.unique(routes):
        idx = torch.from_numpy(np.flatnonzero(routes == c))
        merged = interpolate(zs, ft, float(reference.means_.ravel()[c]))
        expected = logits_by_loading(digits.model, merged, x[idx])
        torch.testing.assert_close(logits[idx], expected, atol=1e-4, rtol=1e-4)


def test_scikit_learn_conventions_and_errors(digits):
    clf = DaWinClassifier(digits.model, digits.base, digits.fine_tuned[0], temperature=2.0)
    assert clone(clf).get_params()["temperature"] == 2.0
    with pytest.raises(NotFittedError):
        clf.predict(digits.x_val[:3])
    with pytest.raises(ConfigError, match="mode: expected one of sample, cluster"):
        clf.set_params(mode="global").fit()
    with pytest.raises(DataError, match="mode='cluster'"):
        clf.set_params(mode="cluster").fit()
    with pytest.raises(ConfigError, match="temperature"):
        dawin_lambdas(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0)
