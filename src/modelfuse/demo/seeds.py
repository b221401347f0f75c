"""The soup scenario over several seeds: each method's accuracy and its difference to the
reference, as mean and spread across seeds, and how often each split found it better or worse.

Every seed draws its own split, zoo (hyperparameters of the fine-tunes
included) and resamples, so the individual fine-tunes of two seeds are
different models: they are summarised as "the reference" (the best
fine-tune by validation accuracy of each seed), not by name. Calibrated
candidates (temperature scaling of whichever merge or ensemble was best on
validation) are left out, as they are a different model per seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from modelfuse.demo.evaluate import MetricRow, verdict

__all__ = ["SeedResult", "SeedSummary", "seed_sentences", "seed_table", "summarize_seeds"]

REFERENCE = "reference (best fine-tune by validation accuracy)"
"""The row of the cross-seed table that stands for each seed's reference."""


@dataclass(frozen=True)
class SeedResult:
    """The soup scenario's comparison on one seed.

    Attributes
    ----------
    seed : int
    reference : str
        The row name of the seed's reference.
    rows : dict
        ``"test"`` and ``"shift"`` to the rows of that split.
    renamed : dict
        Every candidate's name to its row's name (identical models share a row).
    """

    seed: int
    reference: str
    rows: Mapping[str, Sequence[MetricRow]]
    renamed: Mapping[str, str]


@dataclass(frozen=True)
class SeedSummary:
    """One method across seeds on one split.

    Attributes
    ----------
    method : str
    split : {"test", "shift"}
    accuracies : tuple of float
        Its accuracy on each seed, in seed order.
    differences : tuple of float
        Accuracy minus the seed's reference's (0 for the reference row).
    better, worse : int
        Seeds on which it is significantly better / worse than the reference
        (Holm-adjusted paired bootstrap, alpha 0.05).
    same_as_reference : int
        Seeds on which it has the reference's predictions (the same model).
    """

    method: str
    split: str
    accuracies: tuple[float, ...]
    differences: tuple[float, ...]
    better: int
    worse: int
    same_as_reference: int

    @property
    def mean(self) -> float:
        """Mean accuracy across seeds."""
        return float(np.mean(self.accuracies))

    @property
    def spread(self) -> float:
        """Sample standard deviation of the accuracy across seeds (0 for one seed)."""
        return float(np.std(self.accuracies, ddof=1)) if len(self.accuracies) > 1 else 0.0

    @property
    def mean_difference(self) -> float:
        """Mean difference to the reference across seeds."""
        return float(np.mean(self.differences))


def summarize_seeds(results: Sequence[SeedResult], methods: Sequence[str]) -> list[SeedSummary]:
    """Per method (the reference first) and split: accuracies, differences and verdict counts.

    ``methods`` are candidate names present on every seed (e.g. ``"uniform
    soup"``); a method that shares a row with the reference on a seed counts
    its difference as 0 there.

    Examples
    --------
    >>> ref = MetricRow("ft-1", "individual", 1, "", {"accuracy": (0.9, (0.8, 1.0))}, {})
    >>> soup = MetricRow("soup", "merge", 1, "", {"accuracy": (0.95, (0.9, 1.0))},
    ...                  {"accuracy": (0.05, (0.01, 0.09), 0.01)})
    >>> r = SeedResult(0, "ft-1", {"test": [ref, soup], "shift": [ref, soup]},
    ...                {"ft-1": "ft-1", "soup": "soup"})
    >>> s = summarize_seeds([r], ["soup"])
    >>> s[2].method, s[2].accuracies, s[2].better
    ('soup', (0.95,), 1)
    """
    out = []
    for method in (REFERENCE, *methods):
        for split in ("test", "shift"):
            accs, diffs, better, worse, same = [], [], 0, 0, 0
            for result in results:
                rows = {r.name: r for r in result.rows[split]}
                ref = rows[result.reference]
                name = result.reference if method == REFERENCE else result.renamed[method]
                row = rows[name]
                accs.append(row.metrics["accuracy"][0])
                diffs.append(row.metrics["accuracy"][0] - ref.metrics["accuracy"][0])
                if name == result.reference:
                    same += method != REFERENCE
                    continue
                said = verdict(row)
                better += said == "better"
                worse += said == "worse"
            out.append(SeedSummary(method, split, tuple(accs), tuple(diffs), better, worse, same))
    return out


def seed_table(
    summaries: Sequence[SeedSummary], split: str
) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers, rows and alignments of the cross-seed table of one split."""
    headers = [
        "method",
        "mean accuracy",
        "SD across seeds",
        "mean difference to the reference",
        "smallest, largest difference",
        "seeds better",
        "seeds worse",
        "seeds equal to the reference",
    ]
    body = []
    for s in summaries:
        if s.split != split:
            continue
        reference = s.method == REFERENCE
        body.append(
            [
                s.method,
                f"{s.mean:.4f}",
                f"{s.spread:.4f}",
                "" if reference else f"{s.mean_difference:+.4f}",
                "" if reference else f"{min(s.differences):+.4f}, {max(s.differences):+.4f}",
                "" if reference else str(s.better),
                "" if reference else str(s.worse),
                "" if reference else str(s.same_as_reference),
            ]
        )
    return headers, body, ["left"] + ["right"] * (len(headers) - 1)


_SPLITS = {"test": "the test split", "shift": "the shifted test split"}


def seed_sentences(summaries: Sequence[SeedSummary], n_seeds: int) -> list[str]:
    """Sentences computed from the cross-seed summaries: per split, the methods significantly
    better than the reference on every seed, on some, and those worse on some.

    Examples
    --------
    >>> s = SeedSummary("soup", "test", (0.95, 0.96), (0.01, 0.02), 2, 0, 0)
    >>> seed_sentences([s], 2)[0]  # doctest: +NORMALIZE_WHITESPACE
    'On the test split, across 2 seeds: significantly better than the reference on every seed: soup (mean difference +0.0150). Better on some seeds only: none. Worse on at least one seed: none.'
    """
    out = []
    for split, label in _SPLITS.items():
        rows = [s for s in summaries if s.split == split and s.method != REFERENCE]
        if not rows:
            continue

        def listed(items: list[SeedSummary], count: str = "") -> str:
            if not items:
                return "none"
            return ", ".join(
                f"{s.method} ("
                + (f"{getattr(s, count)} of {n_seeds} seeds, " if count else "")
                + f"mean difference {s.mean_difference:+.4f})"
                for s in items
            )

        always = [s for s in rows if s.better == n_seeds]
        some = [s for s in rows if 0 < s.better < n_seeds]
        worse = [s for s in rows if s.worse > 0]
        out.append(
            f"On {label}, across {n_seeds} seeds: significantly better than the reference on "
            f"every seed: {listed(always)}. Better on some seeds only: {listed(some, 'better')}. "
            f"Worse on at least one seed: {listed(worse, 'worse')}."
        )
    return out
