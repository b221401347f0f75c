"""Speed of calibration metrics, soft voting and Caruana selection (issue 5's targets).

Targets on this machine:
- ECE over 1,000,000 x 10 float32 probabilities: under 5 s;
- soft voting over 10 models x 1,000,000 x 10 float32: under 5 s;
- Caruana selection, 25 rounds over 50 models x 100,000 x 10: under 30 s.

Ratios compare with straightforward implementations measured in the same run:
ECE against a loop over bins with boolean masks (as in Guo et al.'s reference
code), and a Caruana round against one that recomputes the average of the
chosen members for every candidate.

    .venv/bin/python bench/ensemble_speed.py
    .venv/bin/python bench/ensemble_speed.py --samples 200000   # a quicker run
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from modelfuse.calibration.metrics import (
    adaptive_calibration_error,
    brier_score,
    expected_calibration_error,
    negative_log_likelihood,
)
from modelfuse.calibration.softmax import softmax
from modelfuse.ensemble.selection import caruana_selection
from modelfuse.ensemble.voting import soft_vote


def _timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _ece_loop(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    conf = probs.max(axis=1)
    hit = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.mean() * abs(hit[mask].mean() - conf[mask].mean())
    return float(ece)


def _naive_caruana_round(probs: np.ndarray, labels: np.ndarray, chosen: list[int]) -> int:
    losses = []
    n = labels.size
    for m in range(probs.shape[0]):
        average = probs[chosen + [m]].mean(axis=0)
        losses.append(-np.log(np.maximum(average[np.arange(n), labels], 1e-12)).mean())
    return int(np.argmin(losses))


def _library(rng, n_models: int, n_samples: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, n_classes, size=n_samples)
    logits = rng.standard_normal((n_models, n_samples, n_classes), dtype=np.float32)
    skill = rng.uniform(0.5, 2.5, size=(n_models, 1)).astype(np.float32)
    logits[:, np.arange(n_samples), labels] += skill
    return logits, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=10, help="models for soft voting")
    parser.add_argument("--samples", type=int, default=1_000_000, help="samples for ECE/voting")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--caruana-models", type=int, default=50)
    parser.add_argument("--caruana-samples", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    print(f"== metrics: {args.samples:,} x {args.classes} float32 probabilities")
    logits, labels = _library(rng, args.models, args.samples, args.classes)
    probs = softmax(logits[0])
    t_ece, _ = _timed(lambda: expected_calibration_error(probs, labels), args.repeat)
    t_loop, _ = _timed(lambda: _ece_loop(probs, labels), 1)
    print(f"ECE (15 uniform bins)       {t_ece:7.3f} s   target < 5 s   "
          f"loop over bins {t_loop:.3f} s ({t_loop / t_ece:.1f}x)")  # fmt: skip
    for name, fn in [
        ("ACE (15 equal-mass bins)", lambda: adaptive_calibration_error(probs, labels)),
        ("classwise ECE", lambda: expected_calibration_error(probs, labels, classwise=True)),
        ("Brier", lambda: brier_score(probs, labels)),
        ("NLL", lambda: negative_log_likelihood(probs, labels)),
    ]:
        t, _ = _timed(fn, args.repeat)
        print(f"{name:<27} {t:7.3f} s")

    print(f"== soft voting: {args.models} models x {args.samples:,} x {args.classes} float32")
    all_probs = softmax(logits)
    t_p, _ = _timed(lambda: soft_vote(all_probs, kind="probabilities"), args.repeat)
    print(f"probabilities               {t_p:7.3f} s   target < 5 s")
    t_l, _ = _timed(lambda: soft_vote(logits, kind="logits"), args.repeat)
    print(f"logits (softmax per member) {t_l:7.3f} s   target < 5 s")

    m, n, k = args.caruana_models, args.caruana_samples, args.classes
    print(f"== Caruana selection: {args.rounds} rounds over {m} models x {n:,} x {k}")
    c_logits, c_labels = _library(rng, m, n, k)
    c_probs = softmax(c_logits)
    for metric in ("nll", "brier", "accuracy"):
        t, result = _timed(
            lambda metric=metric: caruana_selection(
                c_probs, c_labels, kind="probabilities", n_rounds=args.rounds, metric=metric,
                random_state=0,
            ),
            1,
        )  # fmt: skip
        print(f"metric={metric:<9}             {t:7.3f} s   target < 30 s   "
              f"kept {result.best_iteration} additions")  # fmt: skip
        if metric == "nll":
            t_nll = t
    t_naive, _ = _timed(lambda: _naive_caruana_round(c_probs, c_labels, [0, 1, 2]), 1)
    per_round = t_nll / args.rounds
    print(f"one naive round (recompute the average per candidate) {t_naive:.3f} s; "
          f"running sums {per_round:.3f} s per round ({t_naive / per_round:.1f}x)")


if __name__ == "__main__":
    main()
