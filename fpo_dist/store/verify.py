"""Checking a store against what its workers wrote: :meth:`CacheStore.verify`.

``verify`` reads the whole store and returns a list of problems (empty = healthy), each naming the shard and, where
it can, the array and rows involved.  It reports uncommitted shards, a missing or unreadable shard group or array,
missing chunk files (zarr would silently read fill values), chunks that fail to decode, chunks whose content differs
from the worker's per-chunk digest (the shard attribute ``chunk_digests``), a flat array whose length disagrees with
its per-row counts, a shard whose recomputed checksum differs from the committed one, and a store whose shards are
all committed but that has not been finalized (``docs/cache-format.md``, "Reading").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync as _sync  # the one zarr internal used

from fpo_dist.data import BadRow
from fpo_dist.store.reader import _gather, _ShardIndex
from fpo_dist.store.schema import (
    _RAGGED_ARRAYS,
    Plan,
    ShardCorruptError,
    StoreIOError,
    StoreUnreadableError,
    _digest,
    _shard_checksum,
    reading,
)


class _StoreVerifier:
    """The checking part of :class:`CacheStore` (a mixin: ``CacheStore`` provides the attributes below)."""

    plan: Plan
    _root: zarr.Group
    _row_names: list[str]
    _flat_names: list[str]
    _array: Callable[[str], zarr.Array]
    _shard_path: Callable[[int], str]
    _shard_group: Callable[[int], zarr.Group]
    _shard_state: Callable[[], np.ndarray]
    attrs: dict[str, Any]
    path: str

    def _check_shard(self, k: int, rows: dict[str, np.ndarray], group: zarr.Group) -> dict[str, np.ndarray]:
        """Verify on read: shard ``k`` (its per-row arrays ``rows``, already read, and every flat array of
        ``group``, read here in full) must hash to its committed checksum, else :class:`ShardCorruptError` names
        the arrays and rows that differ (from :meth:`_verify_shard`) and points at ``verify``.  Returns the flat
        arrays it read and checked (by name), so that the caller uses exactly the bytes that passed.

        Missing chunk files read as fill values, so they fail the checksum too.  An I/O error (after the store's
        retries) is a :class:`StoreIOError`, not corruption."""
        start, stop = self.plan.shard_range(k)
        committed = bytes(self._array("shard_checksum")[k])
        error: Exception | None = None
        try:
            bad_rows = [BadRow(*b) for b in group.attrs["bad_rows"]]
            handles = [group[name] for name in self._flat_names]
            flat = dict(zip(self._flat_names, _sync(_gather([a.async_array.getitem(slice(None)) for a in handles]))))
            if _shard_checksum(start, stop, bad_rows, {**rows, **flat}) == committed:
                return flat
        except StoreIOError:
            raise
        except Exception as e:  # noqa: BLE001 — undecodable chunks, missing arrays: diagnosed below
            error = e
        problems = self._verify_shard(k, committed, set(_sync(_list_keys(self._root.store))))
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        problems = [p.removeprefix(f"shard {k} (rows {start}..{stop - 1}): ") for p in problems]
        if not problems and error is not None:
            raise StoreUnreadableError(
                self.path, f"reading shard {k} failed ({type(error).__name__}: {error}), yet a full check of it "
                "finds nothing wrong", f"run again; if it recurs, run `python -m fpo_dist.cache verify {self.path}`"
            ) from error
        found = (f": {' | '.join(problems[:3])}{more}" if problems else
                 ", yet a second full read of it matches (its bytes changed in transit or while it was read)")
        raise ShardCorruptError(
            f"cache store {self.path}: shard {k} (rows {start}..{stop - 1}) does not match its committed checksum, "
            f"so none of its rows were used{found}. Run `python -m fpo_dist.cache verify "
            f"{self.path}` for the full report, then copy the store again from a good source or rebuild it"
        ) from error

    def verify(self) -> list[str]:
        """Check every shard against its committed checksum; return a list of problems (empty = healthy).

        Detects uncommitted shards, missing chunk files (zarr would silently read fill values), chunks that
        fail to decode and chunks whose content differs from what the worker wrote (named by array and rows).
        Reads the whole store.
        """
        problems: list[str] = []
        state = self._shard_state()
        committed_sums = self._array("shard_checksum")[:]
        keys = set(_sync(_list_keys(self._root.store)))
        for k in range(self.plan.n_shards):
            start, stop = self.plan.shard_range(k)
            if state[k] != 1:
                problems.append(f"shard {k} (rows {start}..{stop - 1}): not committed")
                continue
            problems += self._verify_shard(k, bytes(committed_sums[k]), keys)
        if not problems and not self.attrs.get("complete"):
            problems.append("store: every shard is committed but the store is not finalized")
        return problems

    def _verify_shard(self, k: int, committed: bytes, keys: set[str]) -> list[str]:
        start, stop = self.plan.shard_range(k)
        where = f"shard {k} (rows {start}..{stop - 1})"
        try:
            group = self._shard_group(k)
            attrs = dict(group.attrs)
            digests = attrs["chunk_digests"]
            bad_rows = [BadRow(*b) for b in attrs["bad_rows"]]
        except StoreUnreadableError as e:
            return [f"{where}: {e.detail}"]
        except StoreIOError:  # the storage failed, not the shard: no verdict on it
            raise
        except Exception as e:  # noqa: BLE001 — any failure here means the shard group is unusable
            return [f"{where}: shard group {self._shard_path(k)} unreadable: {e!r}"]
        problems: list[str] = []
        if attrs.get("checksum") != committed.hex():
            problems.append(f"{where}: shard attrs record checksum {attrs.get('checksum')}, "
                            f"committed checksum is {committed.hex()}")
        arrays = self._verify_row_arrays(where, start, stop, digests, keys, problems)
        offsets = _ShardIndex(start, {n: a for n, a in arrays.items() if a is not None}).offsets
        arrays.update(self._verify_flat_arrays(where, k, group, offsets, digests, keys, problems))
        if all(a is not None for a in arrays.values()):
            recomputed = _shard_checksum(start, stop, bad_rows, arrays)
            if recomputed != committed:
                problems.append(f"{where}: checksum mismatch: committed {committed.hex()}, "
                                f"recomputed {recomputed.hex()}")
        return problems

    def _verify_row_arrays(self, where: str, start: int, stop: int, digests: dict, keys: set[str],
                           problems: list[str]) -> dict[str, np.ndarray | None]:
        """Per-row arrays: this shard's region, chunks of chunk_rows rows."""
        arrays: dict[str, np.ndarray | None] = {}
        for name in self._row_names:
            arr = self._array(name)
            chunks = [(a, min(a + self.plan.chunk_rows, stop)) for a in range(start, stop, self.plan.chunk_rows)]
            arrays[name] = _verify_array(where, name, arr, chunks, digests.get(name, []), keys,
                                         lambda a, b: f"rows {a}..{b - 1}", problems)
        return arrays

    def _verify_flat_arrays(self, where: str, k: int, group: zarr.Group, offsets: dict[str, np.ndarray],
                            digests: dict, keys: set[str], problems: list[str]) -> dict[str, np.ndarray | None]:
        """Flat arrays: chunks of ragged_chunk elements; name the rows whose segments fall in a bad chunk."""
        start = self.plan.shard_range(k)[0]
        arrays: dict[str, np.ndarray | None] = {}
        for name in self._flat_names:
            try:
                with reading(self.path, f"{self._shard_path(k)}/{name}"):
                    arr = group[name]
            except StoreUnreadableError as e:
                problems.append(f"{where}: {e.detail}")
                arrays[name] = None
                continue
            n = arr.shape[0]
            chunks = [(a, min(a + self.plan.ragged_chunk, n)) for a in range(0, n, self.plan.ragged_chunk)]
            off = offsets.get(_RAGGED_ARRAYS[name][1])

            def rows_of(a: int, b: int, off=off) -> str:
                if off is None:
                    return f"elements {a}..{b - 1}"
                lo = int(np.searchsorted(off, a, side="right")) - 1
                hi = int(np.searchsorted(off, b - 1, side="right")) - 1
                return f"elements {a}..{b - 1}, rows {start + lo}..{start + max(lo, hi)}"

            arrays[name] = _verify_array(where, name, arr, chunks, digests.get(name, []), keys, rows_of, problems)
            if off is not None and n != off[-1]:
                problems.append(f"{where}: {name} has {n} elements, its per-row counts say {off[-1]}")
        return arrays


def _verify_array(where, name, arr, chunks, digests, keys, describe, problems) -> np.ndarray | None:
    """Check one array's chunks ``[(a, b), ...]`` (positions along axis 0) of one shard against the digests
    the worker recorded; append problems; return the data read, or None if some of it is missing or
    undecodable."""
    if len(digests) != len(chunks):
        problems.append(f"{where}: {name}: {len(chunks)} chunks but {len(digests)} recorded digests")
    per_file = (arr.shards or arr.chunks)[0]  # the stored object: a shard of the sharding codec, or a chunk

    def file_key(a: int) -> str:
        return f"{arr.path}/{arr.metadata.encode_chunk_key((a // per_file,) + (0,) * (arr.ndim - 1))}"

    missing = sorted({file_key(a) for a, _ in chunks} - keys)
    if missing:  # zarr would silently read fill values
        spans = [describe(max(chunks[0][0], a), min(a + per_file, chunks[-1][1]))
                 for a in sorted({(a // per_file) * per_file for a, _ in chunks if file_key(a) in missing})]
        problems.append(f"{where}: {name}: chunk file(s) missing: "
                        + "; ".join(f"{k} ({s})" for k, s in zip(missing, spans)))
        return None
    parts, undecodable, differ = [], [], []
    for i, (a, b) in enumerate(chunks):
        try:
            data = arr[a:b]
        except StoreIOError:  # the storage failed, not the chunk: no verdict on it
            raise
        except Exception as e:  # noqa: BLE001 — codecs raise assorted errors on corrupt input
            undecodable.append(f"{describe(a, b)}: {e!r}")
            continue
        if i < len(digests) and _digest(data) != digests[i]:
            differ.append(describe(a, b))
        parts.append(data)
    for what, items in (("cannot be decoded", undecodable), ("differ from what the worker wrote", differ)):
        if items:
            more = f"; and {len(items) - 5} more" if len(items) > 5 else ""
            problems.append(f"{where}: {name}: {len(items)} chunk(s) {what}: " + "; ".join(items[:5]) + more)
    if undecodable:
        return None
    return np.concatenate(parts) if parts else arr[0:0]


async def _list_keys(store) -> list[str]:
    return [key async for key in store.list()]
