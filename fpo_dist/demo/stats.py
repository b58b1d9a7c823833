"""Confidence intervals for the demo's metrics over training seeds and held-out prompts (numpy only).

The data of one metric of one method: ``num[S, P]`` and ``den[S, P]`` — for training seed ``s`` and held-out prompt
``p``, the sum of the metric's per-unit values over the units (pairs, samples or tokens) that belong to prompt ``p``,
and their weight (count of pairs or samples; number of tokens for the per-token entropy).  Seed ``s``'s value of
the metric is the ratio ``Σ_p num[s, p] / Σ_p den[s, p]`` — exactly the single-seed number the demo reports —
and the point estimate is the mean of that over seeds (:func:`seed_values`, :func:`estimate`).

The interval (:class:`Bootstrap`): a two-way (crossed) percentile bootstrap.  Seeds and prompts are crossed (every
seed is evaluated on the same prompts), so each of ``B`` resamples draws ``S`` seeds with replacement and,
independently, ``P`` prompts with replacement; the same prompt draw serves every drawn seed (a prompt's pairs and
samples move together, and a prompt's difficulty stays shared across seeds, as it is in the data).  The metric is
recomputed on each resample (mean over the drawn seeds of each seed's ratio over the drawn prompts); the 95 %
interval is the 2.5th and 97.5th percentile of the ``B`` values.  A metric with one row (``S = 1``: e.g. the
reference, which has no training seed) is resampled over prompts only.

Paired differences (:meth:`Bootstrap.difference`): the same draws applied to both methods, seed ``s`` of one paired
with seed ``s`` of the other (in the demo they share the data order), and the percentile interval of the
difference of the recomputed metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Metric = tuple[np.ndarray, np.ndarray]  # (num[S, P], den[S, P])


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float

    def excludes(self, value: float = 0.0) -> bool:
        return not self.lo <= value <= self.hi

    def format(self, spec: str = ".3f") -> str:
        return f"{self.mean:{spec}} [{self.lo:{spec}}, {self.hi:{spec}}]"

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi}


def per_prompt(values: Sequence[float], prompts: Sequence[int], n_prompts: int,
               weights: Sequence[float] | None = None) -> Metric:
    """One seed's ``(num[1, P], den[1, P])`` from per-unit values and their prompt ids: ``num`` sums the values of
    each prompt's units, ``den`` their weights (1 per unit by default)."""
    values = np.asarray(values, dtype=np.float64)
    prompts = np.asarray(prompts, dtype=np.int64)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)
    if not values.shape == prompts.shape == weights.shape or values.ndim != 1:
        raise ValueError(f"values, prompts and weights must be 1-D of one length: {values.shape}, {prompts.shape}, "
                         f"{weights.shape}")
    if len(prompts) and (prompts.min() < 0 or prompts.max() >= n_prompts):
        raise ValueError(f"prompt ids must lie in [0, {n_prompts})")
    num = np.bincount(prompts, weights=values, minlength=n_prompts)[None, :]
    den = np.bincount(prompts, weights=weights, minlength=n_prompts)[None, :]
    return num, den


def stack_seeds(metrics: Sequence[Metric]) -> Metric:
    """Seeds' ``(num[1, P], den[1, P])`` stacked into ``(num[S, P], den[S, P])``."""
    return np.concatenate([m[0] for m in metrics]), np.concatenate([m[1] for m in metrics])


def seed_values(metric: Metric) -> np.ndarray:
    """Each seed's value of the metric: ``Σ_p num / Σ_p den`` ``[S]``."""
    num, den = _check(metric)
    return num.sum(1) / den.sum(1)


def estimate(metric: Metric) -> float:
    """The point estimate: the mean over seeds of each seed's value."""
    return float(seed_values(metric).mean())


def _check(metric: Metric) -> Metric:
    num, den = (np.asarray(x, dtype=np.float64) for x in metric)
    if num.ndim != 2 or num.shape != den.shape:
        raise ValueError(f"a metric is (num[S, P], den[S, P]); got shapes {num.shape} and {den.shape}")
    if (den.sum(1) <= 0).any():
        raise ValueError("every seed needs a positive total weight (den)")
    return num, den


class Bootstrap:
    """A fixed set of ``resamples`` draws of ``n_seeds`` seeds and ``n_prompts`` prompts (see the module docstring),
    shared by every metric and method it is applied to, so intervals of differences are paired."""

    def __init__(self, n_seeds: int, n_prompts: int, resamples: int = 2000, level: float = 0.95, seed: int = 0):
        if n_seeds < 1 or n_prompts < 1 or resamples < 1:
            raise ValueError("need at least one seed, one prompt and one resample")
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        rng = np.random.default_rng(seed)
        self.n_seeds, self.n_prompts, self.resamples, self.level = n_seeds, n_prompts, resamples, level
        self.seed_draws = rng.integers(0, n_seeds, size=(resamples, n_seeds))  # [B, S] drawn seed ids
        # [B, P]: how many times each prompt was drawn
        self.prompt_counts = rng.multinomial(n_prompts, np.full(n_prompts, 1 / n_prompts), size=resamples)

    def describe(self) -> str:
        return (f"{self.level:.0%} percentile intervals of a two-way bootstrap ({self.resamples} resamples; each "
                f"draws the {self.n_seeds} training seed(s) and, independently, the {self.n_prompts} held-out "
                "prompts with replacement, one prompt draw shared by all seeds and methods)")

    def replicates(self, metric: Metric) -> np.ndarray:
        """The metric recomputed on every resample ``[B]``."""
        num, den = _check(metric)
        if num.shape[1] != self.n_prompts or num.shape[0] not in (1, self.n_seeds):
            raise ValueError(f"metric of shape {num.shape} for a bootstrap over {self.n_seeds} seeds × "
                             f"{self.n_prompts} prompts (a single row is resampled over prompts only)")
        w = self.prompt_counts.T  # [P, B]
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = (num @ w) / (den @ w)  # [S, B]: each seed's value on each prompt draw
        if num.shape[0] == 1:
            reps = ratio[0]
        else:
            reps = np.take_along_axis(ratio.T, self.seed_draws, axis=1).mean(1)
        if not np.isfinite(reps).all():
            raise ValueError("a resample drew only prompts without weight (den = 0); the metric needs a weight on "
                             "every prompt")
        return reps

    def _interval(self, point: float, reps: np.ndarray) -> Interval:
        tail = (1 - self.level) / 2 * 100
        lo, hi = np.percentile(reps, [tail, 100 - tail])
        return Interval(point, float(lo), float(hi))

    def interval(self, metric: Metric) -> Interval:
        return self._interval(estimate(metric), self.replicates(metric))

    def difference(self, a: Metric, b: Metric) -> Interval:
        """``a − b``: the difference of the point estimates and the interval of the paired differences."""
        return self._interval(estimate(a) - estimate(b), self.replicates(a) - self.replicates(b))
