"""Cached reference values vs recomputed ones: the comparison behind ``cache verify --recompute`` (phase 1) and
the trainer's step-0 check (phase 2, where the "model" is the freshly initialised policy).

Tolerances (``TrainConfig.step0_*``, ``cache verify --atol-logp/--rtol-mse``) and where they come from, by the rule of
:func:`fpo_dist.testing.rounding_tolerance` (``8 · depth · eps · scale``): a recomputation with other batch shapes or
another CPU's kernels moves a token's log-prob ``z_y − logsumexp(z)`` by at most ``2·max|Δz|``, i.e. by
``2 · 8 · (blocks + 1) · eps · max|logit|``.  In fp32, for 18-26 blocks (Gemma 3 270M, Gemma 2 2B) and |logits| ≤ 30
(Gemma 2's final soft-cap; ≈ 25 measured on Gemma 3 270M) that is 0.9-1.5·10⁻³: the step-0 default 10⁻³ per token
(measured ≤ 2·10⁻⁶ per token, Gemma 3 270M packed vs padded, Intel Xeon with AMX).  ``verify --recompute`` (same
batches, possibly another machine: another CPU's kernels) uses the same defaults (10⁻³; 10⁻⁴ relative MSE).  bf16's eps (2⁻⁷) makes the bound
vacuous through a deep model, so its allowance (×30 in the trainer, 3·10⁻² in verify) is empirical and a bf16 run
needs a bf16 cache.  Pooled codes: rounding alone gives a relative MSE of order (10⁻⁵)²; the 10⁻⁴ default allows for
JumpReLU threshold flips (one feature of a ~250-feature vector moving by threshold / tokens: ~10⁻⁵)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CacheComparison:
    rows: list[int]
    max_abs_logp_avg: float  # max |avg log-prob (recomputed) − avg log-prob (cached)| over responses
    max_abs_logp_sum: float
    max_feature_mse: float  # max over responses of mean_i (c̄_recomputed − c̄_cached)² over all features
    max_rel_feature_mse: float  # the same divided by mean_i c̄_cached² (scale-free)
    n_tokens_equal: bool
    # offline TDPO: max over response positions of KL(cached top-M + tail ‖ the recomputed distribution, coarsened
    # alike); 0 when the cache's reference is the model, and never above the largest log-prob difference
    max_topm_kl: float | None = None

    def ok(self, atol_logp: float, rtol_mse: float) -> bool:
        """Log-probs within ``atol_logp`` (per-token average) and features within ``rtol_mse`` (relative)."""
        return (self.n_tokens_equal and self.max_abs_logp_avg <= atol_logp and self.max_rel_feature_mse <= rtol_mse
                and (self.max_topm_kl is None or self.max_topm_kl <= atol_logp))

    def describe(self) -> str:
        return (f"rows {self.rows}: max |Δ avg logp| = {self.max_abs_logp_avg:.3g}, max |Δ logp sum| = "
                f"{self.max_abs_logp_sum:.3g}, max feature MSE = {self.max_feature_mse:.3g} "
                f"(relative {self.max_rel_feature_mse:.3g}), token counts {'equal' if self.n_tokens_equal else 'DIFFER'}"
                + (f", max top-M KL = {self.max_topm_kl:.3g}" if self.max_topm_kl is not None else ""))


def compare(batch, logp_sum: np.ndarray, n_tokens: np.ndarray, pooled: list[tuple] | None, d_sae: int) -> CacheComparison:
    """``logp_sum``/``n_tokens``: [B, 2]; ``pooled``: per row ((idx_c, val_c), (idx_r, val_r)), or None to
    compare log-probs only."""
    n_equal = bool((np.asarray(n_tokens) == batch.n_tokens).all())
    denom = np.maximum(batch.n_tokens, 1)
    d_avg = np.abs(np.asarray(logp_sum) / denom - batch.logp_sum / denom)
    d_sum = np.abs(np.asarray(logp_sum) - batch.logp_sum)
    mse = rel = 0.0
    for b, ((ic, vc), (ir, vr)) in enumerate(pooled or []):
        for side, (idx, val), csr in ((0, (ic, vc), batch.chosen_codes), (1, (ir, vr), batch.rejected_codes)):
            ref_i, ref_v = csr.row(b)
            a, r = np.zeros(d_sae, np.float64), np.zeros(d_sae, np.float64)
            a[np.asarray(idx, np.int64)] = val
            r[np.asarray(ref_i, np.int64)] = ref_v
            err = float(((a - r) ** 2).mean())
            mse, rel = max(mse, err), max(rel, err / max(float((r**2).mean()), 1e-30))
    return CacheComparison([int(i) for i in batch.index], float(d_avg.max()), float(d_sum.max()), mse, rel, n_equal)
