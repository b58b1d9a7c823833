"""Recompute cached rows with a model + SAE and compare (``cache verify --recompute``)."""

from __future__ import annotations

import numpy as np

from fpo_dist.cache.worker import reference_pass
from fpo_dist.consistency import CacheComparison, compare
from fpo_dist.lm_head import unwrap
from fpo_dist.models import pairs_from_batch


def recompute_rows(store, model, sae, layer: int, rows: list[int], pad_id: int, batch_size: int = 8,
                   layout: str = "padded") -> CacheComparison:
    """Run the reference pass on ``rows`` of ``store`` and compare with what the store holds (with the store's top-M
    reference distributions, when it has them: their largest KL against the recomputed ones)."""
    topm = bool(store.options["ref_topm"])
    batch = store.read_rows(rows, ref_topm=topm)
    out = reference_pass(model, sae, layer, pairs_from_batch(batch), pad_id, batch_size, layout=layout)
    cmp = compare(batch, np.array(out.logp_sum), np.array(out.n_tokens), out.pooled, sae.cfg.d_sae)
    if topm:
        from fpo_dist.loader import cached_topm
        from fpo_dist.models import build_batch
        from fpo_dist.scoring import max_topm_kl

        device = next(unwrap(model).parameters()).device
        cmp.max_topm_kl = max_topm_kl(model, build_batch(pairs_from_batch(batch), pad_id, layout).to(device),
                                      cached_topm(batch).to(device))
    return cmp
