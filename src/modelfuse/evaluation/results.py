"""Result objects of the evaluation functions: small frozen dataclasses.

Modelled on the result objects of :mod:`scipy.stats`: every result carries a
``statistic``, a ``pvalue`` (``None`` for a plain estimate), a ``ci`` (a
``(low, high)`` tuple or ``None``), the ``method`` that produced it and what
was ``compared``; ``str(result)`` is one line for logs and terminals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "EstimateResult",
    "FiveByTwoResult",
    "FriedmanResult",
    "IntervalResult",
    "McNemarResult",
    "NestedCVResult",
    "TestResult",
]


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}"


def _fmt_p(pvalue: float | None) -> str:
    if pvalue is None:
        return "n/a"
    return "<1e-300" if pvalue < 1e-300 else f"{pvalue:.3g}"


def _fmt_ci(ci: tuple[float, float] | None, level: float | None) -> str:
    if ci is None:
        return ""
    head = f"{level:.0%} CI " if level is not None else "CI "
    return f", {head}[{_fmt(ci[0])}, {_fmt(ci[1])}]"


@dataclass(frozen=True)
class TestResult:
    """The outcome of a hypothesis test.

    Attributes
    ----------
    statistic : float
        The test statistic (its distribution under the null is named by ``method`` and ``df``).
    pvalue : float
        The p-value of the test.
    method : str
        The test, e.g. ``"McNemar (exact)"``.
    compared : tuple of str
        What was compared, e.g. ``("model_a", "model_b")``.
    df : float or tuple of float, optional
        Degrees of freedom of the null distribution, when it has any.
    ci : tuple of float, optional
        A confidence interval of the effect, when the test provides one.
    p_floor : float, optional
        For resampling tests, the smallest p-value the resamples can give
        (``2 / (n_resamples + 1)`` two-sided, ``2 / 2^n`` for an exact
        enumeration of ``n`` sign flips).
    """

    __test__ = False  # not a pytest test class despite the name

    statistic: float
    pvalue: float
    method: str
    compared: tuple[str, ...] = ()
    df: float | tuple[float, ...] | None = None
    ci: tuple[float, float] | None = None
    p_floor: float | None = None

    def __str__(self) -> str:
        df = "" if self.df is None else f", df={self.df}"
        return (
            f"{self.method} [{' vs '.join(self.compared)}]: statistic={_fmt(self.statistic)}"
            f"{df}, p={_fmt_p(self.pvalue)}{_fmt_ci(self.ci, None)}"
        )


@dataclass(frozen=True)
class McNemarResult(TestResult):
    """McNemar's test with its discordant counts.

    Attributes
    ----------
    b : int
        Samples that the first model gets right and the second wrong.
    c : int
        Samples that the first model gets wrong and the second right.
    """

    b: int = 0
    c: int = 0

    def __str__(self) -> str:
        return f"{TestResult.__str__(self)} (b={self.b}, c={self.c})"


@dataclass(frozen=True)
class FiveByTwoResult:
    """Both 5x2cv tests on the same (5, 2) array of score differences.

    Attributes
    ----------
    t : TestResult
        Dietterich's 5x2cv paired t-test (5 df).
    f : TestResult
        Alpaydin's combined 5x2cv F-test (10 and 5 df).
    differences : numpy.ndarray
        The (5, 2) score differences the tests used.
    """

    t: TestResult
    f: TestResult
    differences: np.ndarray = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        self.differences.setflags(write=False)  # frozen means frozen, arrays included

    def __str__(self) -> str:
        return f"{self.t}; {self.f}"


@dataclass(frozen=True)
class IntervalResult:
    """A point estimate with a bootstrap confidence interval.

    Attributes
    ----------
    statistic : float
        The estimate on the full sample (a metric, or a difference of two metrics).
    ci : tuple of float
        The ``(low, high)`` confidence interval.
    method : str
        How the interval was made, e.g. ``"bootstrap BCa"``.
    compared : tuple of str
        The metric and what it was measured on, e.g. ``("accuracy", "a - b")``.
    confidence_level : float
        The nominal coverage of ``ci``.
    n_resamples : int
        The number of bootstrap resamples.
    pvalue : float, optional
        For a difference, the two-sided bootstrap p-value of "no difference":
        the inversion of the interval (the smallest ``alpha`` at which the
        ``1 - alpha`` interval of the same method excludes 0), so
        ``pvalue <= 1 - confidence_level`` exactly when ``ci`` excludes 0.
    bootstrap_distribution : numpy.ndarray
        The resampled statistics.
    method_used : {"bca", "percentile"}
        The interval method actually used (BCa falls back to percentile where unstable).
    fallback : str, optional
        Why BCa was asked for but not used.
    bias_correction, acceleration : float
        BCa's ``z0`` and ``a`` (both 0 for the percentile interval).
    p_floor : float, optional
        The smallest p-value the resamples can give, ``2 / (n_resamples + 1)``.
    n_groups : int, optional
        With ``groups=``, the number of groups resampled whole (a cluster bootstrap).
    """

    statistic: float
    ci: tuple[float, float]
    method: str
    compared: tuple[str, ...] = ()
    confidence_level: float = 0.95
    n_resamples: int = 0
    pvalue: float | None = None
    bootstrap_distribution: np.ndarray = field(
        default_factory=lambda: np.empty(0), repr=False, compare=False
    )
    method_used: str = "percentile"
    fallback: str | None = None
    bias_correction: float = 0.0
    acceleration: float = 0.0
    p_floor: float | None = None
    n_groups: int | None = None

    def __post_init__(self) -> None:
        self.bootstrap_distribution.setflags(write=False)

    def __str__(self) -> str:
        p = "" if self.pvalue is None else f", p={_fmt_p(self.pvalue)}"
        return (
            f"{self.method} [{' '.join(self.compared)}]: {_fmt(self.statistic)}"
            f"{_fmt_ci(self.ci, self.confidence_level)}{p}"
        )


@dataclass(frozen=True)
class EstimateResult:
    """An error estimate of an estimator (.632, .632+, out-of-bag bootstrap).

    Attributes
    ----------
    statistic : float
        The estimated error rate.
    method : str
        ``".632"``, ``".632+"`` or ``"oob"``.
    compared : tuple of str
        The estimator's name.
    train_error : float
        The resubstitution error (fit and score on all the data).
    oob_error : float
        The leave-one-out bootstrap error Err^(1).
    no_information_error : float
        gamma, the error when predictions and labels are independent.
    relative_overfitting : float
        R, clipped to [0, 1].
    weight : float
        The weight of the out-of-bag error: 0.632 for ``".632"``,
        ``0.632 / (1 - 0.368 R)`` for ``".632+"``, 1 for ``"oob"``.
    """

    statistic: float
    method: str
    compared: tuple[str, ...]
    train_error: float
    oob_error: float
    no_information_error: float
    relative_overfitting: float
    weight: float
    pvalue: None = None
    ci: None = None

    def __str__(self) -> str:
        return (
            f"bootstrap {self.method} error [{' '.join(self.compared)}]: {_fmt(self.statistic)} "
            f"(train {_fmt(self.train_error)}, out-of-bag {_fmt(self.oob_error)}, "
            f"R={_fmt(self.relative_overfitting)})"
        )


@dataclass(frozen=True)
class FriedmanResult:
    """Friedman's test with the mean ranks and Nemenyi's critical difference.

    Attributes
    ----------
    statistic : float
        Friedman's chi-square statistic (tie-corrected).
    pvalue : float
        Its p-value (chi-square, ``k - 1`` df).
    method : str
        ``"Friedman"``.
    compared : tuple of str
        The candidates' names.
    mean_ranks : tuple of float
        Mean rank of each candidate over the blocks (1 = best).
    critical_difference : float
        Nemenyi's critical difference of mean ranks at ``alpha``.
    alpha : float
        The significance level of the critical difference.
    n_blocks : int
        The number of blocks (data sets, folds).
    df : int
        ``k - 1``.
    """

    statistic: float
    pvalue: float
    method: str
    compared: tuple[str, ...]
    mean_ranks: tuple[float, ...]
    critical_difference: float
    alpha: float
    n_blocks: int
    df: int
    ci: None = None

    def __str__(self) -> str:
        ranks = ", ".join(f"{n}={r:.2f}" for n, r in zip(self.compared, self.mean_ranks))
        return (
            f"{self.method} [{len(self.compared)} candidates, {self.n_blocks} blocks]: "
            f"chi2={_fmt(self.statistic)}, df={self.df}, p={_fmt_p(self.pvalue)}; "
            f"mean ranks {ranks}; Nemenyi CD={_fmt(self.critical_difference)} "
            f"at alpha={self.alpha}"
        )


@dataclass(frozen=True)
class NestedCVResult:
    """Outer-fold scores of nested cross-validation and the choices made inside.

    Attributes
    ----------
    statistic : float
        Mean outer-fold score: the honest estimate of the whole selection procedure.
    outer_scores : tuple of float
        One score per outer fold, each on a fold never seen by its selection.
    best_params : tuple of dict
        The parameters the inner loop chose for each outer fold.
    inner_scores : tuple of tuple of float
        For each outer fold, the mean inner-validation score of each candidate.
    method : str
        E.g. ``"nested CV (5 outer x 3 inner)"``.
    ci : tuple of float or None
        A t interval over the outer-fold scores (an approximation: folds share
        training data).
    """

    statistic: float
    outer_scores: tuple[float, ...]
    best_params: tuple[dict, ...]
    inner_scores: tuple[tuple[float, ...], ...]
    method: str
    ci: tuple[float, float] | None = None
    pvalue: None = None
    compared: tuple[str, ...] = ()

    def __str__(self) -> str:
        return (
            f"{self.method}: mean outer score {_fmt(self.statistic)}{_fmt_ci(self.ci, None)} "
            f"over {len(self.outer_scores)} folds"
        )
