"""Training diagnostics read from the per-step records: when FPO's feature term swamps the preference margin.

FPO's logit is ``u_b = m_b − f_b`` with the margin term ``m_b = β[(avg logπθ(y_w) − avg logπref(y_w)) −
(avg logπθ(y_l) − avg logπref(y_l))]`` and the feature term ``f_b = α·β·(D_l,b − D_w,b)``
(:func:`fpo_dist.losses.fpo_loss` logs ``reward_margin_abs = mean_b |m_b|`` and ``feature_term_abs = mean_b |f_b|``).
When ``|f|`` stays far above ``|m|`` the loss is almost all feature term and the preference barely steers training
(``docs/method.md``, "The feature term's scale").  :func:`feature_term_warning` is the pure decision over a window
of optimizer steps; :class:`FeatureTermMonitor` keeps that window for a run and answers once.
"""

from __future__ import annotations

from collections import deque
from typing import Mapping, Sequence

RATIO = 10.0  # warn when the window's mean |feature term| exceeds this many times its mean |margin term|
FLOOR = 1e-6  # ... and is above this in absolute terms (policy = reference at step 1: both terms are ~0)
WINDOW = 20  # optimizer steps: the last 20 ...
MIN_WINDOW = 5  # ... or the whole run when it is shorter, but never fewer than 5 (a shorter run is never judged)


def window_size(total_steps: int) -> int:
    """Steps the decision looks at: ``min(WINDOW, total_steps)``, or 0 (never judged) under ``MIN_WINDOW``."""
    n = min(WINDOW, total_steps)
    return n if n >= MIN_WINDOW else 0


def feature_term_warning(
    feature_abs: Sequence[float], margin_abs: Sequence[float], alpha: float, beta: float,
    ratio: float = RATIO, floor: float = FLOOR,
) -> str | None:
    """The warning line when the window's mean ``|feature term|`` is above ``ratio ×`` its mean ``|margin term|``
    and above ``floor``; None otherwise (also for an empty window or a non-finite mean).

    ``feature_abs[i]``/``margin_abs[i]`` are step i's ``feature_term_abs``/``reward_margin_abs``.  No division
    decides anything: a margin term of exactly 0 with a feature term above ``floor`` warns (ratio shown as inf), and
    0 against 0 does not.  The line names both means, their ratio, α, β and what to do.
    """
    if len(feature_abs) != len(margin_abs):
        raise ValueError(f"feature_abs has {len(feature_abs)} steps but margin_abs {len(margin_abs)}")
    if not feature_abs:
        return None
    f = sum(feature_abs) / len(feature_abs)
    m = sum(margin_abs) / len(margin_abs)
    if not (f > floor and f > ratio * m):  # False for NaN as well
        return None
    shown = f"{f / m:.3g}" if m > 0 else "inf"
    return (f"warning: FPO's feature term dominates u: over the last {len(feature_abs)} optimizer steps the mean "
            f"|feature term| α·β·|D_l − D_w| is {f:.4g} and the mean |margin term| is {m:.4g} ({shown}× it, above "
            f"{ratio:g}×) at α {alpha:g}, β {beta:g}; the preference margin barely steers this run. Lower α "
            "(--loss.alpha), or see docs/method.md (\"The two terms of u\").")


class FeatureTermMonitor:
    """A run's window of ``(feature_term_abs, reward_margin_abs)`` per optimizer step; :meth:`update` returns the
    warning of :func:`feature_term_warning` the first time the full window triggers it, then None for the rest of the
    run.  Records without ``feature_term_abs`` (every loss but FPO) are ignored."""

    def __init__(self, total_steps: int, alpha: float | None, beta: float | None):
        self.size = window_size(total_steps)
        self.alpha, self.beta = alpha, beta
        self.steps: deque[tuple[float, float]] = deque(maxlen=max(self.size, 1))
        self.warned = False

    def update(self, record: Mapping[str, float]) -> str | None:
        if self.warned or not self.size or "feature_term_abs" not in record:
            return None
        self.steps.append((float(record["feature_term_abs"]), float(record["reward_margin_abs"])))
        if len(self.steps) < self.size:
            return None
        feature, margin = zip(*self.steps)
        message = feature_term_warning(feature, margin, float(self.alpha or 0.0), float(self.beta or 0.0))
        self.warned = message is not None
        return message
