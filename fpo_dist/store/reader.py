"""Reading rows back: :meth:`CacheStore.read_rows` (→ :class:`RowBatch`) and :meth:`CacheStore.read_token_extras`.

A reader never writes.  Every requested row must be ok and in a committed shard, else
:class:`RowsNotAvailableError` names the rows and their status.

Verify on read (``verify_reads``, the default): the bytes that were checked are the bytes used.  The first time a
handle reads from a shard, it reads the whole shard once — its per-row region and every flat array — checks it
against the shard's committed checksum (:meth:`~fpo_dist.store.verify._StoreVerifier._check_shard`) and serves
that call's rows from those same decoded arrays; nothing of the shard is read twice.  It then keeps a sha256 of
each block of the bytes it checked (:class:`_ShardDigests`: per-row arrays per chunk, flat arrays per
:data:`_DIGEST_BLOCK` elements; 32 bytes each, kept for the handle's life).  Every later read of the shard's data —
a flat-array slice, or the per-row region again after the LRU below evicted it — reads whole blocks and checks each
against its kept digest before any of it is used, so a byte changed on the storage after the check (a bad
transfer, an overwrite) raises :class:`ShardCorruptError` naming the shard, array and rows.

Per committed shard the reader keeps the per-row arrays and derives each flat array's row offsets from them
(``docs/cache-format.md``, "Flat shard arrays"), for the last :attr:`CacheStore._INDEX_CACHE_SHARDS` shards (LRU).
Each run of consecutive requested rows costs one block-aligned slice per flat array, and all slices of a call
are fetched concurrently.

The per-token extras (options ``token_logps`` / ``token_codes``, the cache config's ``per_token_logps`` /
``per_token_codes``) come back with ``read_rows(..., extras=True)`` alongside everything else, or alone, reading only
their own flat arrays, with :meth:`~_StoreReader.read_token_extras`.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync as _sync  # the one zarr internal used

from fpo_dist.store.schema import (
    _RAGGED_ARRAYS,
    _ROW_ARRAYS,
    STATUS_BAD_BASE,
    STATUS_NOT_WRITTEN,
    STATUS_OK,
    Plan,
    RowsNotAvailableError,
    ShardCorruptError,
    StoreError,
    _canonical,
    _cat,
)


@dataclass(frozen=True)
class Csr:
    """Sparse rows: row ``i`` has ``indices[offsets[i]:offsets[i+1]]`` / ``values[...]``."""

    offsets: np.ndarray  # int64 [n + 1]
    indices: np.ndarray  # int32 [nnz]
    values: np.ndarray  # float32 [nnz]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.indices[lo:hi], self.values[lo:hi]

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> Csr:
        offsets = np.zeros(len(rows) + 1, np.int64)
        offsets[1:] = np.cumsum([len(i) for i, _ in rows])
        return cls(offsets, _cat([i for i, _ in rows], "int32"), _cat([v for _, v in rows], "float32"))


@dataclass(frozen=True)
class RowBatch:
    """Rows read from the cache, in the order requested.  Per response: index 0 = chosen, 1 = rejected."""

    index: np.ndarray  # int64 [B]
    uid: np.ndarray  # uint8 [B, 16]
    prompt_ids: list[np.ndarray]  # int32 each
    chosen_ids: list[np.ndarray]
    rejected_ids: list[np.ndarray]
    logp_sum: np.ndarray  # float32 [B, 2]
    n_tokens: np.ndarray  # int32 [B, 2]
    chosen_codes: Csr  # pooled SAE non-zeros, one CSR row per batch row
    rejected_codes: Csr
    # Per-token extras: only with read_rows(..., extras=True) on a store that has them, else None.
    chosen_token_logps: list[np.ndarray] | None = None
    rejected_token_logps: list[np.ndarray] | None = None
    chosen_token_codes: list[Csr] | None = None  # per row: one CSR row per response token
    rejected_token_codes: list[Csr] | None = None
    # The reference's top-M next-token distributions (option ref_topm; read_rows(..., extras=True or ref_topm=True)).
    chosen_ref_topm: list[TopM] | None = None
    rejected_ref_topm: list[TopM] | None = None

    def __len__(self) -> int:
        return len(self.index)


@dataclass(frozen=True)
class TopM:
    """One response's cached reference distributions: per response token ``t``, the M most probable next tokens
    ``ids[t]`` (descending), their log-probs ``logps[t]``, and ``tail[t]``, the log of every other token's mass."""

    ids: np.ndarray  # int32 [n_tokens, M]
    logps: np.ndarray  # float32 [n_tokens, M]
    tail: np.ndarray  # float32 [n_tokens]


@dataclass(frozen=True)
class TokenExtras:
    """The per-token extras of some rows, in the order requested (:meth:`CacheStore.read_token_extras`).

    Row ``j``'s chosen response has ``n_tokens[j, 0]`` tokens: ``chosen_token_logps[j]`` holds their reference
    log-probs (float32) and ``chosen_token_codes[j]`` their SAE codes, one :class:`Csr` row per token (int32 feature
    indices, float32 values); likewise ``rejected_*`` with ``n_tokens[j, 1]``.  The log-probs are None when the
    store was built without option ``token_logps``, the codes None without ``token_codes``.
    """

    index: np.ndarray  # int64 [B]
    n_tokens: np.ndarray  # int32 [B, 2]
    chosen_token_logps: list[np.ndarray] | None = None
    rejected_token_logps: list[np.ndarray] | None = None
    chosen_token_codes: list[Csr] | None = None
    rejected_token_codes: list[Csr] | None = None
    chosen_ref_topm: list[TopM] | None = None
    rejected_ref_topm: list[TopM] | None = None

    def __len__(self) -> int:
        return len(self.index)


# Flat arrays are digested in blocks of this many elements (or of a chunk, if smaller): a read hashes only the blocks
# that hold its rows, not the whole chunk zarr decodes (16 KiB of int32 instead of 256 KiB).
_DIGEST_BLOCK = 4096


def _block_sha256(a: np.ndarray, chunk: int) -> list[bytes]:
    """sha256 of the canonical bytes of each piece ``a[i : i + chunk]`` along axis 0."""
    return [hashlib.sha256(_canonical(a[i : i + chunk]).reshape(-1).view(np.uint8)).digest()
            for i in range(0, len(a), chunk)]


@dataclass(frozen=True)
class _ShardDigests:
    """What a handle keeps of a shard that passed its committed checksum: the sha256 of each block of the bytes that
    were checked (per-row arrays: the shard's region in pieces of ``row_chunk`` rows; flat arrays: pieces of
    ``flat_block`` elements) and each flat array's length.  Later reads of the shard are checked against these."""

    row_chunk: int
    flat_block: int
    rows: dict[str, list[bytes]]
    flat: dict[str, list[bytes]]
    lengths: dict[str, int]

    @classmethod
    def of(cls, rows: dict[str, np.ndarray], flat: dict[str, np.ndarray], row_chunk: int, flat_block: int
           ) -> _ShardDigests:
        return cls(row_chunk, flat_block, {n: _block_sha256(a, row_chunk) for n, a in rows.items()},
                   {n: _block_sha256(a, flat_block) for n, a in flat.items()}, {n: len(a) for n, a in flat.items()})


@dataclass
class _ShardIndex:
    """What a reader keeps per committed shard: its per-row arrays, the row offsets into each flat array, and
    the flat arrays' handles (opened on first use).  ``digests``: the chunk digests later reads are checked against
    (None when the handle does not verify).  ``loaded``: the flat arrays read in full by the check, used only by the
    call that made it (:meth:`_StoreReader._read` drops them)."""

    start: int
    rows: dict[str, np.ndarray]
    group: zarr.Group | None = None
    offsets: dict[str, np.ndarray] = field(default_factory=dict)  # count array name -> int64 [n + 1]
    _flat: dict[str, zarr.Array] = field(default_factory=dict)
    digests: _ShardDigests | None = None
    loaded: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        for count in {c for _, c, _ in _RAGGED_ARRAYS.values() if c in self.rows}:
            off = np.zeros(len(self.rows[count]) + 1, np.int64)
            np.cumsum(self.rows[count].sum(axis=1, dtype=np.int64), out=off[1:])
            self.offsets[count] = off

    def flat_array(self, name: str) -> zarr.Array:
        if name not in self._flat:
            self._flat[name] = self.group[name]
        return self._flat[name]


@dataclass(frozen=True)
class _Slice:
    """One run ``[a, b)`` (shard-local rows) of one flat array, for unique-row slots ``slot, slot + 1, ...``."""

    slot: int
    k: int
    si: _ShardIndex
    a: int
    b: int
    name: str

    @property
    def elements(self) -> tuple[int, int]:
        off = self.si.offsets[_RAGGED_ARRAYS[self.name][1]]
        return int(off[self.a]), int(off[self.b])


@dataclass
class _Read:
    """Rows read by :meth:`_StoreReader._read`: values per *unique* requested row, and ``inverse`` mapping each
    requested row to its unique slot.  ``flat[name][u]`` is unique row u's segments, one per count column."""

    inverse: np.ndarray
    rows: dict[str, np.ndarray]
    flat: dict[str, list]

    def gather(self, name: str) -> list:
        values = self.flat[name]
        return [values[i] for i in self.inverse]


class _StoreReader:
    """The reading half of :class:`CacheStore` (a mixin: ``CacheStore`` provides the attributes below)."""

    _INDEX_CACHE_SHARDS = 64  # per-shard offsets kept by read_rows (LRU)
    plan: Plan
    options: dict[str, bool]
    bad_reasons: tuple[str, ...]
    _root: zarr.Group
    _row_names: list[str]
    _flat_names: list[str]
    _index_cache: OrderedDict[int, _ShardIndex]
    _array: Callable[[str], zarr.Array]
    _shard_path: Callable[[int], str]
    _shard_group: Callable[[int], zarr.Group]
    _check_shard: Callable[[int, dict, zarr.Group], dict[str, np.ndarray]]
    verify_reads: bool
    _verified: dict[int, _ShardDigests]
    path: str

    def read_rows(self, indices: Sequence[int] | np.ndarray, extras: bool = False, ref_topm: bool = False
                  ) -> RowBatch:
        """Read rows by global index, in the order given (duplicates allowed).  Every row must be ok and in a
        committed shard, else :class:`RowsNotAvailableError`.  One slice per flat array per run of consecutive
        rows; per-shard offsets are cached.  ``extras=True`` also returns the per-token extras the store has;
        ``ref_topm=True`` only the top-M reference distributions (what offline TDPO trains on)."""
        idx = self._row_indices(indices)
        opts = {None} | ({"ref_topm"} if ref_topm else set())
        read = self._read(idx, [n for n in self._flat_names if extras or _RAGGED_ARRAYS[n][2] in opts])
        tokens = read.gather("token_ids")
        codes_i, codes_v = read.gather("code_indices"), read.gather("code_values")
        return RowBatch(
            index=idx,
            uid=read.rows["uid"][read.inverse],
            prompt_ids=[t[0] for t in tokens],
            chosen_ids=[t[1] for t in tokens],
            rejected_ids=[t[2] for t in tokens],
            logp_sum=read.rows["logp_sum"][read.inverse],
            n_tokens=read.rows["n_tokens"][read.inverse],
            chosen_codes=Csr.from_rows([(i[0], v[0]) for i, v in zip(codes_i, codes_v)]),
            rejected_codes=Csr.from_rows([(i[1], v[1]) for i, v in zip(codes_i, codes_v)]),
            **_token_extras(read, self.options["ref_topm"]),
        )

    def read_token_extras(self, indices: Sequence[int] | np.ndarray) -> TokenExtras | None:
        """The per-token extras of rows by global index, in the order given (duplicates allowed): None when the
        store was built with neither option, else a :class:`TokenExtras`.  Reads only the extras' flat arrays;
        the same row requirements and errors as :meth:`read_rows`."""
        names = [n for n in self._flat_names if _RAGGED_ARRAYS[n][2] is not None]
        if not names:
            return None
        idx = self._row_indices(indices)
        read = self._read(idx, names)
        return TokenExtras(index=idx, n_tokens=read.rows["n_tokens"][read.inverse], **_token_extras(read, self.options["ref_topm"]))

    # ------------------------------------------------------------------ internals

    def _row_indices(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.plan.n_rows):
            raise IndexError(f"row indices must be in [0, {self.plan.n_rows})")
        return idx

    def _read(self, idx: np.ndarray, flat_names: list[str]) -> _Read:
        """Every per-row array and the named flat arrays, for the unique rows of ``idx``."""
        uniq, inverse = np.unique(idx, return_inverse=True)
        per_row: dict[str, list] = {n: [None] * len(uniq) for n in flat_names}
        row_vals = {n: np.empty((len(uniq), *_ROW_ARRAYS[n][1]), _ROW_ARRAYS[n][0]) for n in self._row_names}
        shards = self.plan.shard_of(uniq)
        reads: list[_Slice] = []
        touched: list[_ShardIndex] = []
        pos = 0
        try:
            for k in np.unique(shards).tolist():
                sel = uniq[shards == k]
                si = self._shard_index(k)
                touched.append(si)
                local = sel - si.start
                self._require_ok(sel, si.rows["status"][local])
                for name in self._row_names:
                    row_vals[name][pos : pos + len(sel)] = si.rows[name][local]
                for a, b in _runs(local):
                    reads += [_Slice(pos, k, si, a, b, name) for name in flat_names]
                    pos += b - a
            self._fetch(reads, per_row)
        finally:
            for si in touched:  # the check's full arrays serve only the call that made it
                si.loaded = {}
        return _Read(inverse, row_vals, per_row)

    def _require_ok(self, rows: np.ndarray, status: np.ndarray) -> None:
        if (status != STATUS_OK).any():
            bad = [(int(r), self._describe_status(int(s))) for r, s in zip(rows, status) if s != STATUS_OK]
            raise RowsNotAvailableError(f"{len(bad)} requested row(s) are not ok: {bad[:10]}")

    def _shard_index(self, k: int) -> _ShardIndex:
        if k in self._index_cache:
            self._index_cache.move_to_end(k)
            return self._index_cache[k]
        if self._array("shard_state")[k] != 1:
            raise RowsNotAvailableError(f"shard {k} (rows {self.plan.shard_range(k)}) is not committed")
        start, stop = self.plan.shard_range(k)
        rows = {name: self._read_region(k, name, start, stop) for name in self._row_names}
        group = self._shard_group(k)
        if not self.verify_reads:
            index = _ShardIndex(start, rows, group)
        elif k in self._verified:  # checked earlier by this handle, evicted since: rows re-read above, checked
            index = _ShardIndex(start, rows, group, digests=self._verified[k])
        else:  # first read: the whole shard once, checked, and this call's rows come from the same arrays
            flat = self._check_shard(k, rows, group)  # before any of its rows is returned
            digests = _ShardDigests.of(rows, flat, self.plan.chunk_rows, min(_DIGEST_BLOCK, self.plan.ragged_chunk))
            self._verified[k] = digests
            index = _ShardIndex(start, rows, group, digests=digests, loaded=flat)
        self._index_cache[k] = index
        if len(self._index_cache) > self._INDEX_CACHE_SHARDS:
            self._index_cache.popitem(last=False)
        return index

    def _read_region(self, k: int, name: str, start: int, stop: int) -> np.ndarray:
        """Shard ``k``'s rows of per-row array ``name``; checked against the kept digests if the shard was verified."""
        digests = self._verified.get(k) if self.verify_reads else None
        if digests is None:
            return self._array(name)[start:stop]
        try:
            data = self._array(name)[start:stop]
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 — codecs raise assorted errors on undecodable bytes
            raise self._changed(k, name, f"rows {start}..{stop - 1} cannot be decoded ({type(e).__name__}: {e})"
                                ) from e
        bad = _differing(_block_sha256(data, digests.row_chunk), digests.rows[name])
        if bad:
            c = digests.row_chunk
            spans = ", ".join(f"rows {start + j * c}..{min(start + (j + 1) * c, stop) - 1}" for j in bad)
            raise self._changed(k, name, f"{spans} differ from the bytes that passed the check")
        return data

    def _fetch(self, reads: list[_Slice], per_row: dict[str, list]) -> None:
        """Every run's slice of every flat array, and split each into per-row segments, one per count column:
        ``per_row[name][slot] = [segment, ...]``.  A run of a shard checked by this very call is cut from the arrays
        the check read; the others are fetched all at once (zarr overlaps their I/O and decoding) — for a verified
        shard as whole digest blocks, each checked before use."""
        fetched = iter(_sync(_gather_results([self._get_slice(r) for r in reads if r.name not in r.si.loaded])))
        for r in reads:
            lo, hi = r.elements
            if r.name in r.si.loaded:
                data = r.si.loaded[r.name][lo:hi]
            else:
                data = self._checked_slice(r, next(fetched))
            count = _RAGGED_ARRAYS[r.name][1]
            off = r.si.offsets[count]
            for row in range(r.a, r.b):
                seg = data[off[row] - lo : off[row + 1] - lo]
                per_row[r.name][r.slot + row - r.a] = np.split(seg, np.cumsum(r.si.rows[count][row])[:-1])

    def _get_slice(self, r: _Slice):
        """The coroutine reading ``r``'s elements: exactly them, or (verified shard) the whole blocks holding them."""
        lo, hi = r.elements
        if r.si.digests is not None and hi > lo:
            c = r.si.digests.flat_block
            lo, hi = (lo // c) * c, min(-(-hi // c) * c, r.si.digests.lengths[r.name])
        return r.si.flat_array(r.name).async_array.getitem(slice(lo, hi))

    def _checked_slice(self, r: _Slice, data) -> np.ndarray:
        """``r``'s elements from what :meth:`_get_slice` returned (an array or the exception it raised), after
        checking each whole block against the digest kept when the shard passed its checksum."""
        lo, hi = r.elements
        digests = r.si.digests
        if isinstance(data, BaseException):
            if digests is None or isinstance(data, StoreError):
                raise data
            raise self._changed(r.k, r.name, f"{self._describe_flat(r, lo, hi)} cannot be decoded "
                                             f"({type(data).__name__}: {data})") from data
        if digests is None or hi == lo:
            return data
        c = digests.flat_block
        first = lo // c
        bad = _differing(_block_sha256(data, c), digests.flat[r.name][first : first + -(-len(data) // c)])
        if bad:
            spans = "; ".join(self._describe_flat(r, (first + j) * c, min((first + j + 1) * c,
                                                                          digests.lengths[r.name])) for j in bad)
            raise self._changed(r.k, r.name, f"{spans} differ from the bytes that passed the check")
        return data[lo - first * c : hi - first * c]

    def _describe_flat(self, r: _Slice, a: int, b: int) -> str:
        """Elements ``[a, b)`` of ``r``'s flat array, and the shard's rows whose segments fall in them."""
        off = r.si.offsets[_RAGGED_ARRAYS[r.name][1]]
        lo = int(np.searchsorted(off, a, side="right")) - 1
        hi = int(np.searchsorted(off, max(b - 1, a), side="right")) - 1
        return f"elements {a}..{b - 1} (rows {r.si.start + lo}..{r.si.start + max(lo, hi)})"

    def _changed(self, k: int, name: str, what: str) -> ShardCorruptError:
        start, stop = self.plan.shard_range(k)
        return ShardCorruptError(
            f"cache store {self.path}: shard {k} (rows {start}..{stop - 1}) changed after this process checked it "
            f"against its committed checksum, so none of the rows read from it now were used: {name}: {what}. Run "
            f"`python -m fpo_dist.cache verify {self.path}` for the full report, then copy the store again from a "
            "good source or rebuild it")

    def _describe_status(self, code: int) -> str:
        if code == STATUS_NOT_WRITTEN:
            return "not written"
        if code == STATUS_OK:
            return "ok"
        k = code - STATUS_BAD_BASE
        return f"bad ({self.bad_reasons[k]})" if 0 <= k < len(self.bad_reasons) else f"invalid status {code}"


def _token_extras(read: _Read, m: int) -> dict[str, Any]:
    """The ``chosen_/rejected_token_logps``, ``…_token_codes`` and ``…_ref_topm`` fields that ``read`` holds."""
    out: dict[str, Any] = {}
    if "ref_topm_ids" in read.flat:
        ids, lps, tail = (read.gather(n) for n in ("ref_topm_ids", "ref_topm_logps", "ref_tail_logp"))
        for side, key in ((0, "chosen_ref_topm"), (1, "rejected_ref_topm")):
            out[key] = [TopM(i[side].reshape(-1, m), v[side].reshape(-1, m), t[side])
                        for i, v, t in zip(ids, lps, tail)]
    if "token_logps" in read.flat:
        lps = read.gather("token_logps")
        out.update(chosen_token_logps=[x[0] for x in lps], rejected_token_logps=[x[1] for x in lps])
    if "tok_code_nnz" in read.flat:
        tn, ti, tv = (read.gather(n) for n in ("tok_code_nnz", "tok_code_indices", "tok_code_values"))
        for side, key in ((0, "chosen_token_codes"), (1, "rejected_token_codes")):
            out[key] = [Csr(np.concatenate([[0], np.cumsum(n[side], dtype=np.int64)]), i[side], v[side])
                        for n, i, v in zip(tn, ti, tv)]
    return out


def _runs(sorted_local: np.ndarray) -> list[tuple[int, int]]:
    """Split sorted unique row numbers into runs [a, b) of consecutive rows."""
    breaks = np.nonzero(np.diff(sorted_local) != 1)[0] + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(sorted_local, breaks)]


def _differing(got: list[bytes], kept: list[bytes]) -> list[int]:
    """Positions of the blocks whose digest differs from the kept one (a missing or extra block counts)."""
    return [j for j in range(max(len(got), len(kept))) if j >= len(got) or j >= len(kept) or got[j] != kept[j]]


async def _gather(coros: list) -> list:
    return list(await asyncio.gather(*coros))


async def _gather_results(coros: list) -> list:
    """Like :func:`_gather`, but each coroutine's exception is returned in its place (so it can be told apart)."""
    return list(await asyncio.gather(*coros, return_exceptions=True))
