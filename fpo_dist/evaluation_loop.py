"""Evaluation during training: the run's loss and metrics on every pair of a held-out cache, split across ranks.

The contract:

- **Which cache.** A held-out cache is built by the cache job with the training cache's config and another
  ``data.split`` (or other local files).  :func:`provenance_differences` names every field where it differs from
  the training cache in what determines the numbers (model, tokenizer, SAE, hook, tokenization); the trainer
  refuses such a cache.  Only the data's identity (source, split, revision, content hash, row counts, schema,
  columns, bad-row policy) may differ.
- **Which pairs.** Every ok row of the eval cache, each exactly once per evaluation: rank ``r`` of ``W`` takes the
  sorted ok rows ``r, r + W, r + 2W, …`` (:func:`rank_rows`), in batches of ``batch_size`` pairs.  Under ZeRO-3 a
  forward is collective, so every rank runs the same number of forwards (:func:`rank_batches`): a rank out of
  rows repeats its first row with weight 0.
- **What is computed.** The training forward and loss (:class:`fpo_dist.forward.LossContext`) under
  ``torch.no_grad`` with the policy in eval mode; nothing consumes random numbers, so training is unchanged.
  Every loss metric is a mean over the pairs of a batch, so the per-batch values weighted by the batch's pair
  count, summed over batches and ranks and divided by the number of pairs, are the means over all held-out
  pairs — what one process computing the loss over all pairs at once gives (up to padding-free float noise).
- **What is logged.** ``eval/<metric>`` for the loss and every metric, plus ``eval/n_pairs`` and
  ``eval/time_s``; :class:`EvalSummary` keeps the best (lowest ``eval/loss``) and the last record for
  ``run_info.json``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

PREFIX = "eval/"
# provenance fields that may differ between a training cache and its held-out cache: the data's identity only
DATA_IDENTITY = ("source", "split", "revision", "content_sha256", "n_rows", "max_rows", "schema", "columns",
                 "on_bad_row")


def provenance_differences(train: dict, held_out: dict) -> list[str]:
    """Fields where a held-out cache was built differently from the training cache (empty = comparable).  The
    top-M reference distributions (``ref_topm``) only matter to the offline TDPO losses, which the trainer checks
    on their own (:func:`topm_difference`)."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if where == "data." and key in DATA_IDENTITY or where == "" and key in ("batch_size", "ref_topm"):
                    continue  # the data's identity; the cache job's batch size changes only padding
                walk(a.get(key), b.get(key), f"{where}{key}.")
        elif a != b:
            diffs.append(f"{where[:-1]}: training cache {a!r}, eval cache {b!r}")

    walk(train, held_out, "")
    return diffs


def topm_difference(train_topm: int, eval_topm: int, eval_cache: str) -> str | None:
    """For a loss on the cache's top-M reference distributions: why the held-out cache cannot be evaluated with it
    (it holds none, or another M than the training cache), else None."""
    if eval_topm == train_topm:
        return None
    held = f"the top-{eval_topm}" if eval_topm else "no top-M reference distributions"
    return (f"the eval cache {eval_cache} holds {held}, the training cache the top-{train_topm}: rebuild it with "
            f"--ref_topm {train_topm}")


def rank_rows(ok_rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's share of the held-out rows: positions ``rank, rank + world, …`` of the sorted ok rows."""
    return np.sort(np.asarray(ok_rows, dtype=np.int64))[rank::world]


def rank_batches(ok_rows: np.ndarray, rank: int, world: int, batch_size: int) -> list[tuple[np.ndarray, bool]]:
    """``(rows, counts)`` per forward of this rank; every rank gets the same number of forwards
    (``ceil(ceil(n / world) / batch_size)``); a rank without rows left gets a repeated row that does not count."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    ok_rows = np.sort(np.asarray(ok_rows, dtype=np.int64))
    if not len(ok_rows):
        raise ValueError("the eval cache has no ok rows")
    mine = ok_rows[rank::world]
    n_batches = math.ceil(math.ceil(len(ok_rows) / world) / batch_size)
    out = []
    for i in range(n_batches):
        rows = mine[i * batch_size:(i + 1) * batch_size]
        out.append((rows, True) if len(rows) else (ok_rows[:1], False))
    return out


def evaluate(policy, loss, store, dist, pad_id: int, batch_size: int, layout: str = "padded") -> dict[str, float]:
    """The ``eval/``-prefixed means over every ok row of ``store`` (collective: call on every rank)."""
    t0 = time.perf_counter()
    sums, n_pairs = local_sums(policy, loss, store, dist.rank, dist.world, dist.device, pad_id, batch_size, layout)
    keys = sorted(sums)
    totals = dist.sum([sums[k] for k in keys] + [float(n_pairs)])
    record = means(dict(zip(keys, totals[:-1])), totals[-1])
    record[PREFIX + "time_s"] = time.perf_counter() - t0
    return record


def local_sums(policy, loss, store, rank: int, world: int, device, pad_id: int,
               batch_size: int, layout: str = "padded") -> tuple[dict[str, float], int]:
    """This rank's pair-weighted sums of the loss and every metric, and its number of counted pairs."""
    from fpo_dist.loader import make_micro_batch

    sums: dict[str, float] = {}
    n_pairs = 0
    was_training = (policy.module if hasattr(policy, "module") else policy).training
    policy.train(False)
    try:
        for rows, counts in rank_batches(store.ok_rows(), rank, world, batch_size):
            mb = make_micro_batch(store.read_rows(rows, ref_topm=loss.spec.needs_ref_topm), pad_id, layout, epoch=0, step_in_epoch=0, micro_step=0,
                                  sample_offset=0, is_step_end=True).to(device)
            with torch.no_grad():
                value, metrics = loss(policy, mb)
            n = len(rows) if counts else 0  # every rank runs >= 1 forward, so every rank knows every metric name
            n_pairs += n
            for key, v in {"loss": value, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + (float(v) * n if n else 0.0)
    finally:
        policy.train(was_training)
    return sums, n_pairs


def means(sums: dict[str, float], n_pairs: float) -> dict[str, float]:
    """``eval/<key>``: the summed pair-weighted values over all ranks divided by the number of pairs."""
    record = {PREFIX + k: v / n_pairs for k, v in sums.items()}
    record[PREFIX + "n_pairs"] = int(n_pairs)
    return record


@dataclass
class EvalSummary:
    """Best (lowest ``eval/loss``) and last evaluation of a run, for ``run_info.json``."""

    cache: str
    every: int
    best: dict | None = None
    last: dict | None = None
    history: list = field(default_factory=list)

    def add(self, record: dict) -> None:
        self.last = record
        self.history.append(record["step"])
        loss = record.get(PREFIX + "loss")
        if loss is not None and math.isfinite(loss) and (self.best is None or loss < self.best[PREFIX + "loss"]):
            self.best = record

    def to_dict(self) -> dict:
        return {"cache": self.cache, "every": self.every, "metric": PREFIX + "loss (lower is better)",
                "steps": self.history, "best": self.best, "last": self.last}
