"""The scikit-learn conventions of VotingEnsemble, SelectionEnsemble and StackingEnsemble."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_wine
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from modelfuse.ensemble.wrappers import SelectionEnsemble, StackingEnsemble, VotingEnsemble


@pytest.fixture(scope="module")
def data():
    X, y = load_wine(return_X_y=True)
    X_train, X_rest, y_train, y_rest = train_test_split(
        X, y, test_size=0.5, random_state=0, stratify=y
    )
    members = [
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X_train, y_train),
        GaussianNB().fit(X_train, y_train),
        DecisionTreeClassifier(max_depth=2, random_state=0).fit(X_train, y_train),
    ]
    return members, X_train, y_train, X_rest, y_rest


def _all(members):
    return [
        VotingEnsemble(members),
        VotingEnsemble(members, weights="learned"),
        SelectionEnsemble(members, n_rounds=10, random_state=0),
        StackingEnsemble(members, cv="prefit"),
    ]


def test_not_fitted_errors(data) -> None:
    members, *_, X, _ = data
    for ens in _all(members):
        with pytest.raises(NotFittedError):
            ens.predict_proba(X)
        with pytest.raises(NotFittedError):
            ens.predict(X)


def test_clone_and_get_params(data) -> None:
    members, _, _, X, y = data
    for ens in _all(members):
        params = ens.get_params()
        assert params["estimators"] is members or params["estimators"] == members
        twin = clone(ens)
        assert type(twin) is type(ens)
        assert not hasattr(twin, "classes_")
        # prefit members are kept (frozen), so the clone fits and predicts like the original
        assert all(a is b for a, b in zip(twin.estimators, members, strict=True))
        np.testing.assert_allclose(twin.fit(X, y).predict_proba(X), ens.fit(X, y).predict_proba(X))
        twin.set_params(estimators=members[:2])
        assert len(twin.get_params()["estimators"]) == 2


def test_voting_predicts_the_weighted_average(data) -> None:
    members, _, _, X, y = data
    ens = VotingEnsemble(members, weights=[1, 1, 2]).fit(X, y)
    expected = sum(w * m.predict_proba(X) for w, m in zip([0.25, 0.25, 0.5], members, strict=True))
    np.testing.assert_allclose(ens.predict_proba(X), expected)
    np.testing.assert_array_equal(ens.predict(X), expected.argmax(axis=1))


def test_callables_with_logits_are_members(data) -> None:
    members, _, _, X, y = data
    as_logits = [lambda X, m=m: np.log(np.clip(m.predict_proba(X), 1e-12, 1)) for m in members]
    a = VotingEnsemble(members).fit(X, y).predict_proba(X)
    b = VotingEnsemble(as_logits, member_kind="logits").fit(X, y).predict_proba(X)
    np.testing.assert_allclose(a, b, atol=1e-9)


def test_selection_is_not_worse_than_its_best_member_on_validation(data) -> None:
    members, _, _, X, y = data
    ens = SelectionEnsemble(members, n_rounds=15, random_state=0).fit(X, y)
    nll = lambda p: -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1)).mean()  # noqa: E731
    assert nll(ens.predict_proba(X)) <= min(nll(m.predict_proba(X)) for m in members) + 1e-12


def test_stacking_on_unfitted_members_with_labels_that_are_not_0_to_k(data) -> None:
    _, X_train, y_train, X, y = data
    names = np.array(["a", "b", "c"])
    ens = StackingEnsemble(
        [GaussianNB(), DecisionTreeClassifier(random_state=0)], cv=3, random_state=0
    ).fit(X_train, names[y_train])
    assert list(ens.classes_) == ["a", "b", "c"]
    assert (ens.predict(X) == names[y]).mean() > 0.8
