"""The reference cache on disk: a Zarr (format v3) store.  The only package that imports zarr.

The full format is specified in ``docs/cache-format.md``; in one paragraph:

Every source row ``i`` keeps a slot in fixed per-row arrays (``status``, ``uid``, ``lengths``, ``logp_sum``,
``n_tokens``, ``nnz`` and, with per-token codes, ``tok_nnz``), chunked by ``plan.chunk_rows``.  Rows are cut
into shards of ``plan.rows_per_shard`` rows (a multiple of ``chunk_rows``), so each shard owns whole chunks of
the per-row arrays and its own group ``shards/{k:06d}`` of flat (ragged) arrays: token ids, pooled SAE
non-zeros and the optional per-token extras.  Zarr has no locking, so the write protocol is:

* the driver creates the store (:func:`create_store`) and is the only writer of root attributes and of
  ``shard_state`` / ``shard_checksum`` (:meth:`CacheStore.commit_shard`, :meth:`CacheStore.finalize`);
* exactly one worker at a time writes shard ``k`` (:meth:`CacheStore.write_shard`): its chunks of the per-row
  arrays and its own shard group.  Rewriting an uncommitted shard is idempotent; a committed shard is never
  rewritten.

Readers (the trainer's loader, ``verify``) use :meth:`CacheStore.read_rows`, which reads only the slices the
requested rows need, one slice per run of contiguous rows; :meth:`CacheStore.read_token_extras` reads the
per-token extras alone.  The first read from a shard checks the whole shard against its committed checksum and
uses those same bytes; every later read of it is checked against the digests of the chunks that passed (verify on
read).  Whatever makes a store unreadable raises a :class:`StoreError` naming the file and what to do
(:func:`~fpo_dist.store.schema.reading` is the one place that maps zarr's and the filesystem's errors); a transient
I/O error is retried (:class:`RetryPolicy`), then raised as :class:`StoreIOError`, never called corruption.

The package, by concern (import everything from ``fpo_dist.store``; the modules are an implementation detail):

* :mod:`~fpo_dist.store.schema` — format constants, array tables, :class:`Plan`, errors, provenance checks,
  the canonical shard checksum;
* :mod:`~fpo_dist.store.writer` — :class:`ShardResult`, a shard built and validated in memory;
* :mod:`~fpo_dist.store.cache_store` — :func:`create_store`, :func:`open_store`, :class:`CacheStore`: the write
  protocol and the reports;
* :mod:`~fpo_dist.store.reader` — reading rows: :class:`RowBatch`, :class:`Csr`, :class:`TokenExtras`, :class:`TopM`;
* :mod:`~fpo_dist.store.verify` — ``CacheStore.verify``;
* :mod:`~fpo_dist.store.lease` — :func:`acquire_lease`: one writing cache job per store.
"""

from __future__ import annotations

from fpo_dist.store.cache_store import CacheStore, create_store, open_store
from fpo_dist.store.lease import WriterLease, acquire_lease
from fpo_dist.store.reader import Csr, RowBatch, TokenExtras, TopM
from fpo_dist.store.schema import (
    COMPRESSOR,
    DEFAULT_RAGGED_CHUNK,
    DEFAULT_RETRY,
    FORMAT_NAME,
    FORMAT_VERSION,
    OPTIONS,
    STATUS_BAD_BASE,
    STATUS_NOT_WRITTEN,
    STATUS_OK,
    Plan,
    RetryPolicy,
    RowsNotAvailableError,
    ShardCommittedError,
    ShardCorruptError,
    StoreError,
    StoreFormatError,
    StoreIOError,
    StoreLockedError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreUnreadableError,
)
from fpo_dist.store.writer import ShardResult

__all__ = [
    "COMPRESSOR",
    "DEFAULT_RAGGED_CHUNK",
    "DEFAULT_RETRY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "OPTIONS",
    "STATUS_BAD_BASE",
    "STATUS_NOT_WRITTEN",
    "STATUS_OK",
    "CacheStore",
    "Csr",
    "Plan",
    "RetryPolicy",
    "RowBatch",
    "RowsNotAvailableError",
    "ShardCommittedError",
    "ShardCorruptError",
    "ShardResult",
    "StoreError",
    "StoreFormatError",
    "StoreIOError",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreNotFoundError",
    "StoreUnreadableError",
    "TokenExtras",
    "TopM",
    "WriterLease",
    "acquire_lease",
    "create_store",
    "open_store",
]
