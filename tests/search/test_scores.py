import copy

import numpy as np
import pytest
import sklearn.metrics
import torch

from modelfuse.errors import CheckpointError, DataError
from modelfuse.search import accuracy_score, nll_score


def _probs_by_loading(digits, state_dict, x):
    clone = copy.deepcopy(digits.model)
    clone.load_state_dict(state_dict)
    clone.eval()
    with torch.no_grad():
        return torch.softmax(clone(x), dim=1).numpy()


def test_scores_equal_sklearn_metrics_over_uneven_batches(digits):
    x, y = digits.x_val, digits.y_val
    batches = [(x[:150], y[:150]), (x[150:170], y[150:170]), (x[170:], y[170:])]
    sd = digits.fine_tuned[1]
    probs = _probs_by_loading(digits, sd, x)
    expected_acc = sklearn.metrics.accuracy_score(y.numpy(), probs.argmax(1))
    expected_nll = sklearn.metrics.log_loss(y.numpy(), probs, labels=np.arange(10))
    assert accuracy_score(digits.model, batches)(sd) == pytest.approx(expected_acc, abs=1e-12)
    assert nll_score(digits.model, batches)(sd) == pytest.approx(-expected_nll, rel=1e-5)


def test_scoring_leaves_the_model_and_the_weights_alone(digits):
    model = copy.deepcopy(digits.model).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {k: v.clone() for k, v in digits.fine_tuned[0].items()}
    accuracy_score(model, [(digits.x_val, digits.y_val)])(sd)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
        assert torch.equal(sd[k], digits.fine_tuned[0][k])


def test_scores_reject_bad_input(digits):
    score = accuracy_score(digits.model, [(digits.x_val, digits.y_val)])
    with pytest.raises(CheckpointError, match="missing"):
        score({"0.weight": digits.base["0.weight"]})
    with pytest.raises(DataError, match="labels must be integer"):
        accuracy_score(digits.model, [(digits.x_val, digits.y_val.float())])
    with pytest.raises(DataError, match="no batches"):
        nll_score(digits.model, [])
