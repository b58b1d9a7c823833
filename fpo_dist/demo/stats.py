"""Intervals over a handful of training seeds, paired differences and the family-wise correction (stdlib + numpy).

The data: for every method (or study arm) and metric, one value per training seed — the metric on the held-out
prompts as a single run reports it.  Everything below is a function of those per-seed values only.

- A method's interval (:func:`t_interval`): the Student-t interval of the mean of its ``S`` per-seed values,
  ``mean ± t_{1−(1−level)/2, S−1} · sd / √S`` (``sd`` with ``ddof = 1``).  Exact for normal per-seed values at any
  ``S ≥ 2``, which a percentile bootstrap over 5 seeds is not (it undercovers: ``tests/test_stats.py``).  ``S = 1``
  (the reference model, or a single seed) has **no interval**: the value is given alone.
- A paired difference ``a − b`` (:func:`paired_difference`): seed ``i`` of ``a`` paired with seed ``i`` of ``b`` (in
  the demo and the study they share the data order); the t-interval of the ``S`` per-seed differences, the two-sided
  paired t-test's p (``H0``: mean difference 0; ``t = mean / (sd / √S)``, ``S − 1`` degrees of freedom) and, as a
  check that does not assume normality, the exact two-sided sign test's p (zero differences dropped).
- The family (:func:`statistics`): every difference a report prints, all metrics × all pairs, is one family; the
  t-test p-values are Holm–Bonferroni adjusted over it (:func:`holm`) and a difference is *separated* only when its
  adjusted p is below ``alpha`` (0.05).  The family-wise error rate is then at most ``alpha`` whatever the
  dependence between the tests.

What the intervals are conditional on: the fixed held-out prompt set, the fixed generation-sampling seeds and the
fixed data, reference and cache.  They cover the variation from training seed to training seed (the data order),
not that of drawing another set of held-out prompts: a method's mean could move further on other prompts.

The t distribution is computed here in closed form (Abramowitz & Stegun 26.7.3–4; the degrees of freedom are
integers) so that the library needs no scipy; the tests check it against scipy where scipy is installed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

LEVEL = 0.95
ALPHA = 0.05


# --------------------------------------------------------------------------------------------- the t distribution


def t_two_sided_p(t: float, df: int) -> float:
    """``P(|T| ≥ |t|)`` for Student's ``T`` with ``df`` (integer ≥ 1) degrees of freedom.

    With ``θ = atan(|t| / √df)`` and ``A = P(|T| < |t|)``: for odd ``df``,
    ``A = (2/π)[θ + sin θ (cos θ + (2/3) cos³θ + … + (2·4⋯(df−3))/(1·3⋯(df−2)) cos^{df−2}θ)]`` (``A = 2θ/π`` for
    ``df = 1``); for even ``df``, ``A = sin θ [1 + (1/2) cos²θ + … + (1·3⋯(df−3))/(2·4⋯(df−2)) cos^{df−2}θ]``."""
    if int(df) != df or df < 1:
        raise ValueError(f"df must be a positive integer, got {df}")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 0:
        term = total = 1.0
        for j in range(2, df, 2):
            term *= (j - 1) / j * c * c
            total += term
        inside = s * total
    else:
        total = 0.0
        if df > 1:
            term = total = c
            for j in range(3, df - 1, 2):
                term *= (j - 1) / j * c * c
                total += term
        inside = 2 / math.pi * (theta + s * total)
    return min(1.0, max(0.0, 1.0 - inside))


@lru_cache(maxsize=256)
def t_quantile(level: float, df: int) -> float:
    """The ``t`` with ``P(|T| ≤ t) = level`` (the two-sided critical value, e.g. 2.776 for 95 % at ``df = 4``)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    target = 1 - level
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > target:
        lo, hi = hi, 2 * hi
    for _ in range(200):  # bisection: t_two_sided_p falls monotonically in t
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > target else (lo, mid)
        if hi - lo <= 1e-13 * hi:
            break
    return (lo + hi) / 2


# --------------------------------------------------------------------------------------------- one sample


@dataclass(frozen=True)
class Interval:
    """A mean and its interval; ``lo = hi = None`` when there is none (one value)."""

    mean: float
    lo: float | None
    hi: float | None
    n: int

    def excludes(self, value: float = 0.0) -> bool:
        return self.lo is not None and not self.lo <= value <= self.hi

    def as_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n}


def _values(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0 or not np.isfinite(x).all():
        raise ValueError(f"need a 1-D sequence of finite per-seed values, got {values!r}")
    return x


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """``mean ± t_{level, n−1} · sd / √n`` of the per-seed ``values``; no interval for one value."""
    x = _values(values)
    mean = float(x.mean())
    if len(x) == 1:
        return Interval(mean, None, None, 1)
    half = t_quantile(level, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Interval(mean, mean - half, mean + half, len(x))


def t_test_p(values: Sequence[float]) -> float:
    """Two-sided one-sample t-test of mean 0.  Zero spread: p = 1 if every value is 0, else 0 (the limit)."""
    x = _values(values)
    if len(x) < 2:
        raise ValueError("a t-test needs at least 2 values")
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return t_two_sided_p(mean / (sd / math.sqrt(len(x))), len(x) - 1)


def sign_test_p(values: Sequence[float]) -> float:
    """Exact two-sided sign test of median 0: ``min(1, 2 · P(Bin(n, ½) ≤ min(#pos, #neg)))`` over the ``n`` non-zero
    values (p = 1 when all are 0).  Five differences of one sign: 2/32 = 0.0625, the smallest p 5 seeds can give."""
    x = _values(values)
    pos, neg = int((x > 0).sum()), int((x < 0).sum())
    n = pos + neg
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(pos, neg) + 1)) / 2 ** n)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order: sorted ascending ``p_(1) ≤ … ≤ p_(m)``, the adjusted
    ``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) · p_(j))``.  Rejecting where ``p̃ < α`` holds the family-wise error
    rate at ``α``."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or ((p < 0) | (p > 1)).any() or np.isnan(p).any():
        raise ValueError(f"p-values must be a 1-D sequence in [0, 1], got {p_values!r}")
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


@dataclass(frozen=True)
class Difference:
    """``a − b`` over paired seeds: the interval of the per-seed differences, the t-test's and sign test's p."""

    interval: Interval
    p: float
    p_sign: float


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Difference:
    """Seed ``i`` of ``a`` minus seed ``i`` of ``b`` (both with the same seeds, in the same order)."""
    a, b = _values(a), _values(b)
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired differences need the same number (≥ 2) of seeds on both sides: {len(a)}, {len(b)}")
    d = a - b
    return Difference(t_interval(d, level), t_test_p(d), sign_test_p(d))


# --------------------------------------------------------------------------------------------- a report's family


def describe(seeds: int, family: int, level: float = LEVEL, alpha: float = ALPHA) -> str:
    """The method, as the reports print it and the JSON records it."""
    return (f"{level:.0%} Student-t intervals over the {seeds} training seeds (mean ± t(df {seeds - 1})·sd/√{seeds} "
            "of the per-seed values; none for a single value, e.g. the reference); a difference pairs seed i of one "
            "method with seed i of the other: the t-interval of the per-seed differences, the two-sided paired "
            f"t-test's p, Holm-adjusted over the family of all {family} differences reported here, and the exact sign "
            f"test's p; separated: Holm-adjusted p < {alpha:g}. Conditional on the fixed held-out prompts and "
            "sampling seeds: they cover seed-to-seed variation, not that of drawing other prompts")


def statistics(per_seed: Mapping[str, Mapping[str, Sequence[float]]], pairs: Sequence[tuple[str, str]],
               metrics: Sequence[str], level: float = LEVEL, alpha: float = ALPHA) -> dict:
    """A report's statistics from ``per_seed[method][metric]`` (values in seed order).

    ``intervals[method][metric]``: :func:`t_interval`.  ``differences["a − b"][metric]`` for each ``(a, b)`` in
    ``pairs`` and each of ``metrics`` both sides have: mean, lo, hi, n, ``p`` (paired t-test), ``p_sign``, ``p_holm``
    (Holm over all of them: the family) and ``separated`` (``p_holm < alpha``)."""
    out = {"method": "", "interval": "student-t over seeds; paired t-test, Holm-adjusted", "level": level,
           "alpha": alpha, "seeds": max(len(v) for ms in per_seed.values() for v in ms.values()),
           "intervals": {}, "per_seed": {}, "differences": {}}
    for name, ms in per_seed.items():
        out["per_seed"][name] = {k: [float(x) for x in v] for k, v in ms.items()}
        out["intervals"][name] = {k: t_interval(v, level).as_dict() for k, v in ms.items()}
    cells = []
    for a, b in pairs:
        row = out["differences"].setdefault(f"{a} − {b}", {})
        for k in metrics:
            if k in per_seed[a] and k in per_seed[b]:
                d = paired_difference(per_seed[a][k], per_seed[b][k], level)
                row[k] = {**d.interval.as_dict(), "p": d.p, "p_sign": d.p_sign}
                cells.append(row[k])
    for cell, p_holm in zip(cells, holm([c["p"] for c in cells])):
        cell.update(p_holm=p_holm, separated=bool(p_holm < alpha))
    out["family"] = len(cells)
    out["method"] = describe(out["seeds"], len(cells), level, alpha)
    return out
