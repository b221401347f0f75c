"""Distiller: agreement on digits, determinism, early stopping, caching, no side effects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelfuse.distill import Distiller, teacher_logits
from modelfuse.errors import CheckpointError, ConfigError, DataError


def _mlp(seed: int, hidden: int = 16, n_in: int = 64, dropout: float = 0.0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10)
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.ndim == 2 else 0))
    return net


def _bytes(module: nn.Module) -> bytes:
    return save({k: v.contiguous() for k, v in module.state_dict().items()})


@pytest.fixture(scope="module")
def digits() -> dict[str, object]:
    """load_digits split in two, and three small MLPs trained on the first part."""
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:1200], order[1200:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        members = []
        for seed in range(3):
            net, g = _mlp(seed, hidden=32), torch.Generator().manual_seed(seed)
            opt = torch.optim.Adam(net.parameters(), lr=1e-2)
            xt, yt = torch.from_numpy(X[train]), torch.from_numpy(y[train])
            for _ in range(6):
                for rows in torch.randperm(len(train), generator=g).split(64):
                    loss = nn.functional.cross_entropy(net(xt[rows]), yt[rows])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            members.append(net.eval())
    finally:
        torch.set_num_threads(threads)
    return {"X": X[train], "y": y[train], "X_test": X[test], "y_test": y[test], "members": members}


def _distiller(members, **options) -> Distiller:
    settings = {"max_epochs": 8, "lr": 1e-2, "n_threads": 1, "batch_size": 64}
    settings.update(options)
    return Distiller(_mlp(10), members, **settings)


def test_student_agrees_with_a_three_member_ensemble(digits) -> None:
    members = digits["members"]
    d = _distiller(members, validation_fraction=0.2).fit(digits["X"], digits["y"])
    ensemble = teacher_logits(members, digits["X_test"]).argmax(1).numpy()
    agreement = float(np.mean(d.predict(digits["X_test"]) == ensemble))
    assert agreement > 0.85  # chance is about 0.1
    assert float(np.mean(ensemble == digits["y_test"])) > 0.85
    assert d.val_agreement_ > 0.85 and d.train_agreement_ > 0.85
    assert len(d.history_["train_loss"]) == len(d.history_["val_loss"]) == d.n_epochs_
    assert d.best_epoch_ == int(np.argmin(d.history_["val_loss"])) + 1
    proba = d.predict_proba(digits["X_test"][:5])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)


def test_same_seed_same_bytes_other_seed_other_bytes(digits) -> None:
    X, y, members = digits["X"][:300], digits["y"][:300], digits["members"]
    student = _mlp(10, dropout=0.2)  # dropout draws random numbers too
    runs = [
        Distiller(student, members, max_epochs=3, n_threads=1, random_state=seed).fit(X, y)
        for seed in (5, 5, 6)
    ]
    first, again, other = (_bytes(r.student_) for r in runs)
    assert first == again
    assert first != other
    assert runs[0].history_ == runs[1].history_


def test_fit_leaves_global_rng_student_teacher_and_data_untouched(digits) -> None:
    X, y, members = digits["X"][:200].copy(), digits["y"][:200].copy(), digits["members"]
    student = _mlp(10, dropout=0.3).train()
    student[0].eval()
    student_before = _bytes(student)
    members_before = [_bytes(m) for m in members]
    X_before, y_before = X.copy(), y.copy()
    rng_before = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    d = Distiller(student, members, max_epochs=2, n_threads=1).fit(X, y)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert torch.get_num_threads() == threads
    assert _bytes(student) == student_before and _bytes(d.student_) != student_before
    assert student.training and not student[0].training  # flags as they were
    assert d.student_.training and not d.student_[0].training
    assert [_bytes(m) for m in members] == members_before
    assert all(not m.training for m in members)
    np.testing.assert_array_equal(X, X_before)
    np.testing.assert_array_equal(y, y_before)


def test_early_stopping_restores_the_best_epoch() -> None:
    """Training pulls the student one way, the validation teacher the other: epoch 1 is best.

    The student's logits are ``x @ W``; on the training rows the teacher says
    class 0, on the validation rows class 1, so every step after the first
    raises the validation loss. Training for ``best_epoch_`` epochs alone
    must give the very weights that were restored.
    """
    x = torch.ones(32, 1)
    t_train = torch.tensor([[4.0, -4.0]]).repeat(32, 1)
    t_val = torch.tensor([[-4.0, 4.0]]).repeat(8, 1)

    def student() -> nn.Module:
        net = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            net.weight.copy_(torch.tensor([[0.0], [0.3]]))
        return net

    options = {"lr": 0.05, "batch_size": 8, "n_threads": 1, "temperature": 1.0}
    fit = {"teacher_logits": t_train, "X_val": x[:8], "val_teacher_logits": t_val}
    d = Distiller(student(), max_epochs=20, patience=3, **options).fit(x, **fit)
    assert d.best_epoch_ == 1
    assert d.n_epochs_ == 4  # three epochs without improvement after the first
    losses = d.history_["val_loss"]
    assert all(a < b for a, b in zip(losses, losses[1:]))
    one_epoch = Distiller(student(), max_epochs=1, **options).fit(x, **fit)
    assert torch.equal(d.student_.weight, one_epoch.student_.weight)
    assert not torch.equal(d.student_.weight, student().weight)


def test_teacher_runs_once_on_fixed_data_and_every_epoch_on_a_loader() -> None:
    net = nn.Linear(3, 4)
    seen: list[int] = []

    def teacher(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.shape[0])
        return net(batch)

    X = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    Distiller(
        nn.Linear(3, 4),
        teacher,
        max_epochs=5,
        validation_fraction=0.2,
        eval_batch_size=16,
        n_threads=1,
    ).fit(X)
    assert sum(seen) == 50 and len(seen) == 4  # once, in batches of at most 16
    seen.clear()
    Distiller(nn.Linear(3, 4), teacher, max_epochs=3, n_threads=1).fit(X, X_val=X[:10])
    assert sum(seen) == 60  # training rows and validation rows, once each
    seen.clear()
    loader = DataLoader(TensorDataset(X), batch_size=20)
    Distiller(nn.Linear(3, 4), teacher, max_epochs=3, n_threads=1).fit(loader)
    assert sum(seen) == 150  # a DataLoader may augment: the teacher runs every epoch
    seen.clear()
    Distiller(nn.Linear(3, 4), teacher, max_epochs=3, n_threads=1, cache_teacher=True).fit(loader)
    assert sum(seen) == 50


def test_precomputed_teacher_logits_equal_running_the_teacher(digits) -> None:
    X, y, members = digits["X"][:200], digits["y"][:200], digits["members"]
    ran = _distiller(members, max_epochs=2).fit(X, y)
    given = Distiller(_mlp(10), max_epochs=2, lr=1e-2, n_threads=1, batch_size=64).fit(
        X, y, teacher_logits=teacher_logits(members, X)
    )
    assert _bytes(ran.student_) == _bytes(given.student_)


def test_soft_only_ignores_labels(digits) -> None:
    X, y, members = digits["X"][:200], digits["y"][:200], digits["members"]
    with_labels = _distiller(members, max_epochs=2, soft_only=True).fit(X, y)
    shuffled = _distiller(members, max_epochs=2, soft_only=True).fit(X, (y + 3) % 10)
    without = _distiller(members, max_epochs=2, soft_only=True).fit(X)
    assert _bytes(with_labels.student_) == _bytes(shuffled.student_) == _bytes(without.student_)
    hard = _distiller(members, max_epochs=2, soft_only=False).fit(X, (y + 3) % 10)
    assert _bytes(hard.student_) != _bytes(with_labels.student_)


def test_student_starts_from_the_given_state_dict() -> None:
    """A student starting at the teacher's own weights has zero loss and zero gradient: it stays.

    (Up to rounding: the gradient is about 1e-9, and plain SGD moves by lr times that.)
    """
    teacher = nn.Linear(3, 4)
    X = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    init = {k: v.clone() for k, v in teacher.state_dict().items()}
    fresh = nn.Linear(3, 4)
    d = Distiller(
        fresh, teacher, max_epochs=2, init_state_dict=init, optimizer="sgd", lr=1e-3, n_threads=1
    ).fit(X)
    for name, value in d.student_.state_dict().items():
        torch.testing.assert_close(value, init[name], rtol=0, atol=1e-6)
        assert (fresh.state_dict()[name] - init[name]).abs().max() > 1e-2
    assert d.train_agreement_ == 1.0
    with pytest.raises(CheckpointError, match="init_state_dict"):
        Distiller(nn.Linear(3, 4), teacher, init_state_dict={"weight": torch.zeros(4, 3)}).fit(X)


def test_dataloader_with_labels(digits) -> None:
    X, y, members = digits["X"][:256], digits["y"][:256], digits["members"]
    loader = DataLoader(TensorDataset(torch.from_numpy(X), torch.from_numpy(y)), batch_size=64)
    d = _distiller(members, max_epochs=12).fit(loader, X_val=digits["X_test"][:100])
    assert d.train_agreement_ is None and d.val_agreement_ > 0.7
    assert d.history_["train_loss"][-1] < d.history_["train_loss"][0] / 2
    assert d.n_classes_ == 10


def test_not_fitted() -> None:
    with pytest.raises(NotFittedError):
        Distiller(nn.Linear(2, 2), nn.Linear(2, 2)).predict(np.zeros((1, 2)))


def _fit_error(student: nn.Module, teacher, X, y=None, **options):
    settings = {"max_epochs": 1, "n_threads": 1}
    fit = {k: options.pop(k) for k in list(options) if k in ("X_val", "y_val", "teacher_logits")}
    settings.update(options)
    return Distiller(student, teacher, **settings).fit(X, y, **fit)


X4 = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)


@pytest.mark.parametrize(
    "args, options, error, words",
    [
        ((nn.Linear(4, 3), nn.Linear(4, 3), np.where(X4 > 2, np.nan, X4)), {}, DataError, "NaN"),
        ((nn.Linear(4, 3), nn.Linear(4, 3), X4, np.full(20, 3)), {}, DataError, r"\[0, 3\)"),
        ((nn.Linear(4, 3), nn.Linear(4, 3), X4, np.zeros(19)), {}, DataError, "19 labels"),
        ((nn.Linear(4, 5), nn.Linear(4, 3), X4), {}, DataError, "teacher's 3 classes"),
        ((nn.Linear(5, 3), nn.Linear(4, 3), X4), {}, DataError, "student: cannot run"),
        ((nn.Linear(4, 3), nn.Linear(5, 3), X4), {}, DataError, "teacher on X: cannot run"),
        ((nn.Linear(4, 3), None, X4), {}, ConfigError, "teacher: none given"),
        ((nn.Linear(4, 3), nn.Linear(4, 3), X4), {"temperature": 0}, ConfigError, "temperature"),
        ((nn.Linear(4, 3), nn.Linear(4, 3), X4), {"alpha": 2}, ConfigError, "alpha"),
        ((nn.Linear(4, 3), nn.Linear(4, 3), X4), {"max_epochs": 0}, ConfigError, "max_epochs"),
        ((nn.Linear(4, 3), nn.Linear(4, 3), X4), {"patience": 0}, ConfigError, "patience"),
        ((nn.Linear(4, 3), nn.Linear(4, 3), X4), {"lr": -1.0}, ConfigError, "lr"),
        (
            (nn.Linear(4, 3), nn.Linear(4, 3), X4),
            {"optimizer": "lbfgs"},
            ConfigError,
            "valid: adam, adamw, sgd",
        ),
        (
            (nn.Linear(4, 3), nn.Linear(4, 3), X4),
            {"validation_fraction": 1.0},
            ConfigError,
            "validation_fraction",
        ),
        (
            (nn.Linear(4, 3), nn.Linear(4, 3), X4),
            {"validation_fraction": 0.01},
            DataError,
            "at least one sample",
        ),
        (
            (nn.Linear(4, 3), nn.Linear(4, 3), X4),
            {"validation_fraction": 0.2, "X_val": X4},
            ConfigError,
            "not both",
        ),
        ((nn.Linear(4, 3), nn.Linear(4, 3), X4), {"X_val": X4[:, :3]}, DataError, "X_val"),
        (
            (nn.Linear(4, 3), None, X4),
            {"teacher_logits": np.zeros((19, 3))},
            DataError,
            "teacher_logits",
        ),
        (
            (nn.Linear(4, 3), None, X4),
            {"teacher_logits": np.full((20, 3), np.inf)},
            DataError,
            "NaN or infinite",
        ),
        (("not a module", nn.Linear(4, 3), X4), {}, ConfigError, "student"),
    ],
)
def test_bad_inputs(args, options, error, words) -> None:
    with pytest.raises(error, match=words):
        _fit_error(*args, **options)


def test_diverging_training_is_one_error() -> None:
    X = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32) * 1e3
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    with torch.no_grad():
        teacher.weight.copy_(torch.arange(12.0).reshape(3, 4) / 12)
        for p in (teacher.bias, student.weight, student.bias):
            p.zero_()
    with pytest.raises(DataError, match="lower lr"):
        Distiller(student, teacher, lr=1e38, optimizer="sgd", max_epochs=5, n_threads=1).fit(
            X, np.zeros(64, dtype=int)
        )


def test_integer_inputs_stay_integers_for_an_embedding() -> None:
    """Token ids reach the student and the teacher as int64, not as floats."""

    def bag(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Embedding(20, 6), nn.Flatten(), nn.Linear(18, 4))

    with torch.random.fork_rng(devices=[]):
        teacher, student = bag(0), bag(1)
    tokens = np.random.default_rng(0).integers(0, 20, size=(64, 3))
    d = Distiller(student, teacher, max_epochs=25, lr=0.1, n_threads=1).fit(tokens)
    assert d.history_["train_loss"][-1] < d.history_["train_loss"][0] / 10
    assert d.train_agreement_ > 0.7  # chance is about 0.25
    with pytest.raises(DataError, match="save them as floats"):
        Distiller(nn.Linear(3, 4), teacher, n_threads=1).fit(tokens)


def test_validation_fraction_must_be_a_fraction() -> None:
    with pytest.raises(ConfigError, match="validation_fraction"):
        Distiller(nn.Linear(4, 3), nn.Linear(4, 3), validation_fraction="0.2").fit(X4)
