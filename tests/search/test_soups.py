import pytest
import torch

from modelfuse.search import accuracy_score, greedy_soup, uniform_soup


def _mean(state_dicts, indices):
    return {k: sum(state_dicts[i][k] for i in indices) / len(indices) for k in state_dicts[0]}


def test_uniform_soup_is_the_plain_average(digits):
    soup = uniform_soup(digits.fine_tuned)
    expected = _mean(digits.fine_tuned, range(4))
    for k in expected:
        torch.testing.assert_close(soup[k], expected[k])


def test_uniform_soup_copies_integer_buffers_from_the_first_model():
    a = {"w": torch.tensor([1.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0]), "n": torch.tensor(7)}
    soup = uniform_soup([a, b])
    assert soup["w"].item() == 2.0 and soup["n"].item() == 3


def test_greedy_soup_is_never_worse_than_the_best_single_model(digits):
    score = accuracy_score(digits.model, [(digits.x_val, digits.y_val)])
    before = [{k: v.clone() for k, v in sd.items()} for sd in digits.fine_tuned]
    result = greedy_soup(digits.fine_tuned, score)
    alone = [score(sd) for sd in digits.fine_tuned]
    assert result.score >= max(alone)
    assert result.score == score(result.state_dict)
    # the soup is the plain average of the chosen ingredients
    expected = _mean(digits.fine_tuned, result.parameters["ingredients"])
    for k in expected:
        torch.testing.assert_close(result.state_dict[k], expected[k])
    assert result.parameters["ingredients"][0] == max(range(4), key=lambda i: (alone[i], -i))
    assert [c.score for c in result.trace[:4]] == alone
    assert len(result.trace) == 4 + 3
    for sd, copy in zip(digits.fine_tuned, before):
        for k in sd:
            assert torch.equal(sd[k], copy[k])


def test_greedy_soup_hand_worked_example():
    # alone: 1 -> -1, 3 -> -1, 10 -> -8, 2.5 -> -0.5; order 3, 0, 1, 2
    sds = [{"w": torch.tensor([v])} for v in (1.0, 3.0, 10.0, 2.5)]
    result = greedy_soup(sds, lambda sd: -abs(float(sd["w"]) - 2.0))
    # [2.5] -> +1: 1.75 (-0.25, kept) -> +3: 6.5/3 (-1/6, kept) -> +10: 4.125 (rejected)
    assert result.parameters["order"] == (3, 0, 1, 2)
    assert result.parameters["ingredients"] == (3, 0, 1)
    assert float(result.state_dict["w"]) == pytest.approx(6.5 / 3)
    assert result.score == pytest.approx(-(6.5 / 3 - 2.0))
    assert [c.parameters.get("accepted") for c in result.trace[4:]] == [True, True, False]


def test_strict_rejects_ties_and_non_strict_accepts_them():
    sds = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 6.0)]
    flat = greedy_soup(sds, lambda sd: 0.0)
    assert flat.parameters["ingredients"] == (0,)
    assert float(flat.state_dict["w"]) == 1.0
    loose = greedy_soup(sds, lambda sd: 0.0, strict=False)
    assert loose.parameters["ingredients"] == (0, 1, 2)
    assert float(loose.state_dict["w"]) == pytest.approx(3.0)


def test_greedy_soup_scores_and_returns_the_models_dtype():
    sds = [{"w": torch.tensor([v], dtype=torch.float64)} for v in (1.0, 3.0)]
    seen = []

    def score(sd):
        seen.append(sd["w"].dtype)
        return -abs(float(sd["w"]) - 2.0)

    result = greedy_soup(sds, score)
    assert seen == [torch.float64] * 3
    assert result.state_dict["w"].dtype == torch.float64
    assert float(result.state_dict["w"]) == 2.0


def test_mismatched_models_are_reported():
    from modelfuse.errors import CheckpointError

    a = {"w": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"state_dicts\[1\] does not match.*missing \[b\]"):
        uniform_soup([a, {"w": torch.zeros(2)}])
    with pytest.raises(CheckpointError, match=r"shape mismatches \[w \[2\] vs \[3\]\]"):
        greedy_soup([a, {"w": torch.zeros(3), "b": torch.zeros(1)}], lambda sd: 0.0)
