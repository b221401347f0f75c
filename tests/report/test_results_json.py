"""results.json: every number of a comparison, strict JSON, non-finite numbers as null."""

import dataclasses
import json
import math

import numpy as np
import pytest

from modelfuse.evaluation import compare_predictions
from modelfuse.report import comparison_results, write_results_json


def _comparison(k=3, seed=0, **options):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    preds = {
        f"m{j}": np.eye(2)[np.where(rng.random(300) < 0.6 + 0.1 * j, y, 1 - y)]
        for j in range(k)
    }
    return compare_predictions(preds, y, n_resamples=200, **options), preds, y


def test_every_number_matches_the_comparison():
    c, preds, y = _comparison(test="mcnemar", random_state=4)
    r = comparison_results(c, files={"m0": "a.npy"})
    assert r["format"] == "modelfuse-comparison" and r["metric"] == "accuracy"
    assert r["n_samples"] == 300 and r["confidence_level"] == 0.95 and r["n_resamples"] == 200
    assert r["test"] == "mcnemar" and "Holm" in r["test_method"]
    assert r["candidates"][0]["file"] == "a.npy" and "file" not in r["candidates"][1]
    for row, (name, p) in zip(r["candidates"], preds.items()):
        assert row["name"] == name
        assert row["value"] == float(np.mean(p.argmax(1) == y))  # accuracy written out
    for row, cand in zip(r["candidates"][1:], c.candidates[1:]):
        assert row["difference"] == pytest.approx(row["value"] - r["candidates"][0]["value"])
        assert row["pvalue"] == cand.raw_pvalue and row["pvalue_adjusted"] == cand.test.pvalue
        assert row["pvalue_adjusted"] >= row["pvalue"]  # Holm never lowers a p-value
    assert r["friedman"]["df"] == 2 and set(r["friedman"]["mean_ranks"]) == {"m0", "m1", "m2"}
    assert r["notes"] == []


def test_non_finite_numbers_become_null_with_a_note(tmp_path):
    c, _, _ = _comparison(k=2)
    first = c.candidates[1]
    broken = dataclasses.replace(
        first, estimate=dataclasses.replace(first.estimate, ci=(float("nan"), float("inf")))
    )
    c = dataclasses.replace(c, candidates=(c.candidates[0], broken))
    path = write_results_json(c, tmp_path / "results.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    r = json.loads(text)
    assert r["candidates"][1]["interval"] == [None, None]
    assert len(r["notes"]) == 2 and "interval[0] is nan" in r["notes"][0]
    assert r["friedman"] is None


def test_written_file_is_strict_json(tmp_path):
    c, _, _ = _comparison()
    path = write_results_json(c, tmp_path / "results.json")

    def refuse(token):
        raise ValueError(token)

    r = json.loads(path.read_text(), parse_constant=refuse)
    numbers = [r["friedman"]["statistic"], *(x["value"] for x in r["candidates"])]
    assert all(math.isfinite(v) for v in numbers)
