"""The statistics of a study: per-arm summaries and paired comparisons against the reference arm.

Every interval is a two-sided 95% Student-t interval; the p-values are scipy's: the paired t-test
(``scipy.stats.ttest_rel``) and the Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, its default
``method='auto'``: exact for small samples without ties or zero differences). Runs are paired by seed.
"""

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
WILCOXON_MIN_N = 6
"""The fewest pairs for which the exact two-sided Wilcoxon p-value can be below 0.05 (its minimum is 2 / 2^n)."""


@dataclasses.dataclass(frozen=True)
class Summary:
    """``n`` values: their mean, sample standard deviation (ddof 1) and 95% t interval of the mean
    (NaN where ``n < 2``)."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


@dataclasses.dataclass(frozen=True)
class Paired:
    """An arm against the reference over the ``n`` seeds both have: the differences ``arm - reference``,
    their mean and 95% t interval, the paired t-test and Wilcoxon signed-rank p-values (two-sided;
    NaN where undefined) and ``note``, what limits them (empty when nothing does)."""

    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    t_test_p: float
    wilcoxon_p: float
    note: str


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """The 95% Student-t interval of the mean of ``values`` (NaN, NaN where there are fewer than 2)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def summarize(values: Sequence[float]) -> Summary:
    """:class:`Summary` of ``values`` (``n >= 1``)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        raise ValueError("summarize: no values")
    std = float(x.std(ddof=1)) if len(x) > 1 else math.nan
    return Summary(len(x), float(x.mean()), std, *t_interval(x))


def paired(values: Sequence[float], reference: Sequence[float]) -> Paired:
    """:class:`Paired` comparison of ``values`` with ``reference``, element ``i`` of each from the same seed."""
    x, y = np.asarray(values, dtype=float), np.asarray(reference, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise ValueError(f"paired: expected two equally long non-empty vectors, got {x.shape} and {y.shape}")
    diffs = x - y
    n = len(diffs)
    notes = []
    t_p = w_p = math.nan
    if n < 2:
        notes.append("n=1: no CI or test")
    elif np.all(diffs == diffs[0]):
        notes.append("Δ constant: no t-test")
    else:
        t_p = float(stats.ttest_rel(x, y).pvalue)
    if np.all(diffs == 0):
        notes.append("Δ all 0: no Wilcoxon")
    elif n >= 2:
        w_p = float(stats.wilcoxon(x, y).pvalue)
    if 2 <= n < WILCOXON_MIN_N and not np.isnan(w_p):
        notes.append(f"n={n} < {WILCOXON_MIN_N}: Wilcoxon p >= {2 / 2**n:.3g}, never < 0.05")
    return Paired(n, float(diffs.mean()), *t_interval(diffs), t_p, w_p, "; ".join(notes))
