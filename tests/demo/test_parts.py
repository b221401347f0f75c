"""The demo's parts against hand-worked references: tasks, augmentation, choosing, verdicts."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest
import torch

from modelfuse.demo.choice import choose_by_nested_cv
from modelfuse.demo.data import apply_task, load_splits, task_seed
from modelfuse.demo.evaluate import (
    MetricRow,
    accuracy_of,
    log_probabilities,
    model_entry,
    verdict,
    vote_entry,
)
from modelfuse.demo.report import headlines
from modelfuse.demo.zoo import (
    augment_batch,
    make_mlp,
    predict_logits,
    read_checkpoint,
    write_checkpoint,
)
from modelfuse.errors import ConfigError


def test_splits_are_stratified_disjoint_and_fixed_by_the_seed():
    a, b, c = load_splits(0), load_splits(0), load_splits(1)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)
    assert (len(a.y_train), len(a.y_val), len(a.y_test)) == (897, 360, 540)
    rows = {tuple(r) for r in np.concatenate([a.x_train, a.x_val, a.x_test])}
    assert len(rows) >= 1797 - 5  # load_digits has a handful of duplicate images
    for y in (a.y_train, a.y_val, a.y_test):  # stratified: every class near 10%
        assert np.bincount(y, minlength=10).min() >= 0.08 * len(y)
    assert a.x_train.min() >= 0 and a.x_train.max() <= 1
    assert len(a.pretrain) == int(0.4 * 897) and len(set(a.pretrain)) == len(a.pretrain)


def test_tasks_transform_images_as_described():
    rng = np.random.default_rng(0)
    x = rng.random((3, 64)).astype(np.float32)
    before = x.copy()
    image = x[1].reshape(8, 8)
    rotated = apply_task("rotated", x, 0)[1].reshape(8, 8)
    # a 90-degree counter-clockwise turn: the first row becomes the first column, reversed
    np.testing.assert_array_equal(rotated[:, 0], image[0, ::-1])
    np.testing.assert_array_equal(apply_task("inverted", x, 0), 1 - x)
    np.testing.assert_array_equal(apply_task("original", x, 0), x)
    noisy = apply_task("noisy", x, 5)
    np.testing.assert_array_equal(noisy, apply_task("noisy", x, 5))
    assert not np.array_equal(noisy, apply_task("noisy", x, 6))
    assert noisy.min() >= 0 and noisy.max() <= 1
    np.testing.assert_array_equal(x, before)  # the input is never modified
    with pytest.raises(ConfigError, match="unknown task 'mirrored'.*original, rotated"):
        apply_task("mirrored", x, 0)
    assert len({task_seed(0, j, s) for j in range(4) for s in ("train", "val", "test")}) == 12


def test_shift_augmentation_moves_each_image_by_at_most_one_pixel():
    x = torch.zeros(200, 64)
    x[:, 3 * 8 + 4] = 1.0  # one lit pixel at (3, 4), away from the border
    out = augment_batch(x, "shift", torch.Generator().manual_seed(0))
    assert torch.equal(out.sum(1), torch.ones(200))
    lit = out.argmax(1)
    rows, cols = lit // 8, lit % 8
    assert set(rows.tolist()) == {2, 3, 4} and set(cols.tolist()) == {3, 4, 5}
    assert torch.equal(x.sum(1), torch.ones(200))  # input untouched
    noisy = augment_batch(x, "noise", torch.Generator().manual_seed(0))
    assert 0.05 < float((noisy - x).std()) < 0.1  # sigma 0.1, clipped at 0
    assert torch.equal(augment_batch(x, "none", torch.Generator()), x)


def test_checkpoints_round_trip_in_hugging_face_layout(tmp_path):
    torch.manual_seed(0)
    model = make_mlp(8)
    sd = model.state_dict()
    folder = write_checkpoint(tmp_path / "m", sd, {"model_type": "demo"})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    back = read_checkpoint(folder)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    x = np.random.default_rng(0).random((5, 64)).astype(np.float32)
    expected = model(torch.as_tensor(x)).detach().double().numpy()
    np.testing.assert_allclose(predict_logits(make_mlp(8), back, x), expected, rtol=1e-6)


def test_nested_choice_picks_the_setting_best_on_validation():
    y = np.array([0, 1] * 50)
    rng = np.random.default_rng(0)
    correct = np.stack([rng.random(100) < p for p in (0.6, 0.9, 0.7)])
    result = choose_by_nested_cv(
        [{"lambda": 0.5}, {"lambda": 1.0}, {"lambda": 2.0}],
        correct,
        y,
        outer_splits=4,
        inner_splits=3,
        seed=0,
    )
    assert result.chosen == {"lambda": 1.0} and result.index == 1
    # equal folds of a stratified split: the mean over folds is the overall accuracy
    np.testing.assert_allclose(result.cv_scores, correct.mean(axis=1), atol=0.02)
    assert [p["lambda"] for p in result.nested.best_params] == [1.0] * 4
    assert len(result.nested.outer_scores) == 4


def test_verdicts_and_headlines_follow_the_numbers():
    ref = MetricRow("ref", "individual", 1, "", {"accuracy": (0.9, (0.88, 0.92))}, {})
    up = MetricRow(
        "up",
        "merge",
        1,
        "",
        {"accuracy": (0.95, (0.9, 0.97))},
        {"accuracy": (0.05, (0.02, 0.08), 0.01)},
    )
    same = MetricRow(
        "same",
        "merge",
        1,
        "",
        {"accuracy": (0.91, (0.9, 0.93))},
        {"accuracy": (0.01, (-0.01, 0.03), 0.4)},
    )
    down = MetricRow(
        "down",
        "ensemble",
        3,
        "",
        {"accuracy": (0.8, (0.77, 0.83))},
        {"accuracy": (-0.1, (-0.13, -0.07), 0.001)},
    )
    assert [verdict(r) for r in (ref, up, same, down)] == [
        "reference",
        "better",
        "no significant difference",
        "worse",
    ]
    lines = headlines([ref, up, same, down], "ref", "Test")
    assert (
        "Significantly better than ref in test accuracy (Holm-adjusted p <= 0.05): up (+0.0500)."
        in lines
    )
    assert (
        "Significantly worse than ref in test accuracy (Holm-adjusted p <= 0.05): down (-0.1000)."
        in lines
    )
    assert "Not significantly different from the reference in test accuracy: same." in lines
    assert lines[-1].startswith("Highest test accuracy: up (0.9500, 1 network per prediction)")
    assert lines[-1].endswith(
        "its edge over ref (+0.0500) is significant (Holm-adjusted p = 0.0100 <= 0.05)."
    )


def test_log_probabilities_match_torch():
    z = np.random.default_rng(0).normal(size=(4, 10)) * 30
    expected = torch.log_softmax(torch.as_tensor(z), dim=1).numpy()
    np.testing.assert_allclose(log_probabilities(z), expected, atol=1e-12)


def test_entries_hold_the_networks_log_softmax_and_the_weighted_vote():
    torch.manual_seed(0)
    nets = [make_mlp(8), make_mlp(8)]
    rng = np.random.default_rng(0)
    x_val, x_test = (rng.random((n, 64)).astype(np.float32) for n in (6, 5))
    members = [
        model_entry(f"m{i}", "individual", 1, "", make_mlp(8), net.state_dict(), x_val, x_test)
        for i, net in enumerate(nets)
    ]
    for net, entry in zip(nets, members):
        expected = torch.log_softmax(net(torch.as_tensor(x_test)).double(), dim=1).detach().numpy()
        np.testing.assert_allclose(entry.test, expected, atol=1e-6)
    weights = np.array([3.0, 1.0])
    vote = vote_entry("vote", members, 2, "", weights=weights)
    mean = (3 * np.exp(members[0].val) + np.exp(members[1].val)) / 4
    np.testing.assert_allclose(vote.val, np.log(mean), atol=1e-12)
    assert (vote.family, vote.cost) == ("ensemble", 2)
    y = np.array([0, 1, 2, 3, 4, 5])
    assert accuracy_of(vote.val, y) == sum(int(np.argmax(mean[i]) == y[i]) for i in range(6)) / 6


@pytest.mark.parametrize(
    "module",
    ["choice", "data", "evaluate", "report", "run", "seeds", "settings", "zoo"],
)
def test_docstring_examples_run(module):
    mod = importlib.import_module(f"modelfuse.demo.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
