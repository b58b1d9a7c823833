"""Recompute cached rows with a model + SAE and compare (``cache verify --recompute``)."""

from __future__ import annotations

import numpy as np

from fpo_dist.cache.worker import reference_pass
from fpo_dist.consistency import CacheComparison, compare
from fpo_dist.models import pairs_from_batch


def recompute_rows(store, model, sae, layer: int, rows: list[int], pad_id: int, batch_size: int = 8,
                   layout: str = "padded") -> CacheComparison:
    """Run the reference pass on ``rows`` of ``store`` and compare with what the store holds."""
    batch = store.read_rows(rows)
    out = reference_pass(model, sae, layer, pairs_from_batch(batch), pad_id, batch_size, layout=layout)
    return compare(batch, np.array(out.logp_sum), np.array(out.n_tokens), out.pooled, sae.cfg.d_sae)
