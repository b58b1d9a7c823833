"""The reference cache on disk: a Zarr (format v3) store.  The only module that imports zarr.

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
requested rows need, one slice per run of contiguous rows.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import itertools
import json
import os
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
import zarr.errors
from zarr.codecs import BloscCodec
from zarr.core.sync import sync as _sync  # the one zarr internal we use: run a store coroutine

from fpo_dist.data import BAD_REASONS, BadRow, TokenizedPair

FORMAT_NAME = "fpo-dist-cache"
FORMAT_VERSION = 1

# One compressor for every array.  Byte-shuffle + zstd compresses int32 ids and float32 values well;
# integrity is checked by our own sha256 checksums, not by the codec.
COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")

# Elements per chunk of the flat (ragged) shard arrays (64 Ki elements = 256 KiB of int32/float32).
DEFAULT_RAGGED_CHUNK = 1 << 16

STATUS_NOT_WRITTEN = 0
STATUS_OK = 1
STATUS_BAD_BASE = 2  # status = 2 + k  <=>  bad with reason bad_reasons[k]

OPTIONS = ("token_logps", "token_codes")

# Per-row arrays: name -> (dtype, trailing shape, fill value, option that enables it or None).
_ROW_ARRAYS: dict[str, tuple[str, tuple[int, ...], Any, str | None]] = {
    "status": ("int8", (), STATUS_NOT_WRITTEN, None),
    "uid": ("uint8", (16,), 0, None),
    "lengths": ("int32", (3,), 0, None),  # prompt, chosen, rejected token counts
    "logp_sum": ("float32", (2,), float("nan"), None),  # chosen, rejected
    "n_tokens": ("int32", (2,), 0, None),  # chosen, rejected response tokens in logp_sum
    "nnz": ("int32", (2,), 0, None),  # non-zeros of the pooled chosen / rejected SAE vector
    "tok_nnz": ("int32", (2,), 0, "token_codes"),  # total per-token code non-zeros, chosen / rejected
}

# Flat per-shard arrays: name -> (dtype, per-row array whose columns give each row's segment sizes, option).
# A row's segment in the flat array is the concatenation of its columns' segments, in column order.
_RAGGED_ARRAYS: dict[str, tuple[str, str, str | None]] = {
    "token_ids": ("int32", "lengths", None),  # prompt, chosen, rejected
    "code_indices": ("int32", "nnz", None),  # pooled chosen, pooled rejected
    "code_values": ("float32", "nnz", None),
    "token_logps": ("float32", "n_tokens", "token_logps"),  # per response token, chosen then rejected
    "tok_code_nnz": ("int32", "n_tokens", "token_codes"),  # non-zeros per response token
    "tok_code_indices": ("int32", "tok_nnz", "token_codes"),
    "tok_code_values": ("float32", "tok_nnz", "token_codes"),
}


class StoreError(Exception):
    """Base class for cache-store errors."""


class StoreFormatError(StoreError):
    """The path holds something that is not an fpo-dist cache of a supported format version."""


class StoreMismatchError(StoreError):
    """An existing store was built with a different provenance / plan / options."""

    def __init__(self, path: str, differences: list[tuple[str, Any, Any]]):
        self.path = path
        self.differences = differences
        lines = "\n".join(f"  {key}: store has {old!r}, requested {new!r}" for key, old, new in differences)
        super().__init__(
            f"cache store at {path} was built with a different configuration:\n{lines}\n"
            "Use another path, or pass overwrite=True to delete it and rebuild."
        )


class ShardCommittedError(StoreError):
    """A write to a shard that the driver has already committed."""


class RowsNotAvailableError(StoreError):
    """``read_rows`` was asked for rows that are not ok (bad, not written, or in an uncommitted shard)."""


# --------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """Row ↔ shard ↔ chunk arithmetic, in one place.

    Shard ``k`` owns rows ``[k * rows_per_shard, min((k + 1) * rows_per_shard, n_rows))``: whole chunks of
    ``chunk_rows`` rows of every per-row array.  ``ragged_chunk`` is the chunk length of the flat shard arrays.
    """

    n_rows: int
    rows_per_shard: int
    chunk_rows: int
    ragged_chunk: int = DEFAULT_RAGGED_CHUNK

    def __post_init__(self):
        for name in ("n_rows", "rows_per_shard", "chunk_rows", "ragged_chunk"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"plan.{name} must be a positive integer, got {value!r}")
        if self.rows_per_shard % self.chunk_rows:
            raise ValueError(
                f"rows_per_shard ({self.rows_per_shard}) must be a multiple of chunk_rows ({self.chunk_rows}) "
                "so that every shard owns whole chunks"
            )

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.rows_per_shard)

    def shard_range(self, k: int) -> tuple[int, int]:
        if not 0 <= k < self.n_shards:
            raise IndexError(f"shard {k} out of range [0, {self.n_shards})")
        start = k * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.n_rows)

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(rows, dtype=np.int64) // self.rows_per_shard

    def to_dict(self) -> dict[str, int]:
        return {
            "n_rows": int(self.n_rows),
            "rows_per_shard": int(self.rows_per_shard),
            "chunk_rows": int(self.chunk_rows),
            "ragged_chunk": int(self.ragged_chunk),
            "n_shards": int(self.n_shards),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, int]) -> Plan:
        return cls(d["n_rows"], d["rows_per_shard"], d["chunk_rows"], d["ragged_chunk"])


def _normalize_options(options: Mapping[str, bool] | None) -> dict[str, bool]:
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown store option(s) {unknown}; valid options: {list(OPTIONS)}")
    return {name: bool(options.get(name, False)) for name in OPTIONS}


def _array_names(options: Mapping[str, bool]) -> tuple[list[str], list[str]]:
    """(per-row array names, flat shard array names) present under ``options``, in canonical order."""
    rows = [n for n, (_, _, _, opt) in _ROW_ARRAYS.items() if opt is None or options[opt]]
    ragged = [n for n, (_, _, opt) in _RAGGED_ARRAYS.items() if opt is None or options[opt]]
    return rows, ragged


# --------------------------------------------------------------------------------------------- shard result


def _per_pair(x: Any, dtype: str, what: str, n_pairs: int) -> np.ndarray:
    a = np.asarray(x, dtype=dtype)
    if a.size == 0 and n_pairs == 0:
        return a.reshape(0, 2)
    if a.shape != (n_pairs, 2):
        raise ValueError(f"{what}: expected shape ({n_pairs}, 2) (chosen, rejected per pair), got {a.shape}")
    return a


def _cat(parts: Sequence[np.ndarray], dtype: str) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def _as_1d(x: Any, dtype: str, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=dtype)
    if a.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D array, got shape {a.shape}")
    return a


@dataclass(frozen=True, eq=False)
class ShardResult:
    """Everything a worker produces for one shard: per-row arrays over all rows ``[start, stop)`` (bad rows
    included, with zero lengths / NaN logp_sum) and the shard's flat arrays.  Build it with :meth:`build`."""

    start: int
    stop: int
    rows: dict[str, np.ndarray]  # per-row arrays, each of length stop - start
    flat: dict[str, np.ndarray]  # flat shard arrays
    bad_rows: tuple[BadRow, ...]

    @classmethod
    def build(
        cls,
        start: int,
        stop: int,
        pairs: Sequence[TokenizedPair],
        bad: Sequence[BadRow],
        logp_sum: Any,
        n_tokens: Any,
        pooled_codes: Sequence[tuple[tuple[Any, Any], tuple[Any, Any]]],
        token_logps: Sequence[tuple[Any, Any]] | None = None,
        token_codes: Sequence[tuple[tuple[Any, Any, Any], tuple[Any, Any, Any]]] | None = None,
    ) -> ShardResult:
        """Assemble a shard from per-pair outputs.  Everything per pair is aligned with ``pairs`` and is a
        (chosen, rejected) couple:

        * ``logp_sum``: float [P, 2], summed reference log-prob of the response tokens;
        * ``n_tokens``: int [P, 2], the number of response tokens in that sum (≤ the response length);
        * ``pooled_codes``: per pair ``((idx_c, val_c), (idx_r, val_r))``, the non-zeros of the pooled SAE vector
          (stored sorted by feature index);
        * ``token_logps`` (option): per pair ``(logps_c, logps_r)`` with ``n_tokens`` entries each;
        * ``token_codes`` (option): per pair ``((nnz_c, idx_c, val_c), (nnz_r, idx_r, val_r))``, a CSR over the
          response's ``n_tokens`` tokens: ``nnz`` per token, then the concatenated indices and values.

        Every row in ``[start, stop)`` must appear exactly once, in ``pairs`` or in ``bad``; order is free.
        """
        start, stop = int(start), int(stop)
        n, n_pairs = stop - start, len(pairs)
        if n < 1:
            raise ValueError(f"empty row range [{start}, {stop})")
        _check_coverage(start, stop, [p.index for p in pairs], [b.index for b in bad])
        logp_sum = _per_pair(logp_sum, "float32", "logp_sum", n_pairs)
        n_tokens = _per_pair(n_tokens, "int64", "n_tokens", n_pairs)
        for name, value in (("pooled_codes", pooled_codes), ("token_logps", token_logps), ("token_codes", token_codes)):
            if value is not None and (len(value) != n_pairs or any(len(v) != 2 for v in value)):
                raise ValueError(f"{name} must hold one (chosen, rejected) couple per pair ({n_pairs} pairs)")

        order = sorted(range(n_pairs), key=lambda i: pairs[i].index)
        pairs = [pairs[i] for i in order]
        logp_sum, n_tokens = logp_sum[order], n_tokens[order]
        pooled_codes = [pooled_codes[i] for i in order]
        local = np.array([p.index - start for p in pairs], dtype=np.int64)

        status = np.full(n, STATUS_NOT_WRITTEN, np.int8)
        status[local] = STATUS_OK
        for b in bad:
            if b.reason not in BAD_REASONS:
                raise ValueError(f"row {b.index}: unknown bad-row reason {b.reason!r}; known: {BAD_REASONS}")
            status[b.index - start] = STATUS_BAD_BASE + BAD_REASONS.index(b.reason)

        uid = np.zeros((n, 16), np.uint8)
        for p in pairs:
            if not isinstance(p.uid, (bytes, bytearray)) or len(p.uid) != 16:
                raise ValueError(f"row {p.index}: uid must be 16 bytes, got {p.uid!r}")
        if n_pairs:
            uid[local] = np.frombuffer(b"".join(bytes(p.uid) for p in pairs), np.uint8).reshape(-1, 16)

        lengths = np.zeros((n, 3), np.int32)
        pair_lengths = np.array(
            [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs], np.int64
        ).reshape(-1, 3)
        lengths[local] = pair_lengths
        token_ids = np.fromiter(
            itertools.chain.from_iterable(itertools.chain(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs),
            dtype=np.int32,
            count=int(pair_lengths.sum()),
        )

        bad_tokens = np.nonzero((n_tokens < 0) | (n_tokens > pair_lengths[:, 1:]))[0]
        if len(bad_tokens):
            i = bad_tokens[0]
            raise ValueError(
                f"row {pairs[i].index}: n_tokens {n_tokens[i].tolist()} outside [0, response lengths "
                f"{pair_lengths[i, 1:].tolist()}]"
            )
        bad_logp = np.nonzero(~np.isfinite(logp_sum).all(axis=1))[0]
        if len(bad_logp):
            raise ValueError(f"row {pairs[bad_logp[0]].index}: logp_sum is not finite: {logp_sum[bad_logp[0]]}")
        full_logp = np.full((n, 2), np.nan, np.float32)
        full_logp[local] = logp_sum
        full_ntok = np.zeros((n, 2), np.int32)
        full_ntok[local] = n_tokens

        idx_parts, val_parts, nnz = [], [], np.zeros((n, 2), np.int32)
        for j, (p, codes) in enumerate(zip(pairs, pooled_codes)):
            for side, (idx, val) in enumerate(codes):
                what = f"row {p.index} {'chosen' if side == 0 else 'rejected'} pooled codes"
                idx, val = _as_1d(idx, "int64", what), _as_1d(val, "float32", what)
                if len(idx) != len(val):
                    raise ValueError(f"{what}: {len(idx)} indices but {len(val)} values")
                srt = np.argsort(idx, kind="stable")
                idx, val = idx[srt], val[srt]
                if len(idx) and (idx[0] < 0 or idx[-1] > np.iinfo(np.int32).max or (np.diff(idx) <= 0).any()):
                    raise ValueError(f"{what}: indices must be unique and in [0, 2**31)")
                if not np.isfinite(val).all():
                    raise ValueError(f"{what}: values are not finite")
                idx_parts.append(idx)
                val_parts.append(val)
                nnz[local[j], side] = len(idx)

        rows = {"status": status, "uid": uid, "lengths": lengths, "logp_sum": full_logp, "n_tokens": full_ntok,
                "nnz": nnz}
        flat = {"token_ids": token_ids, "code_indices": _cat(idx_parts, "int32"),
                "code_values": _cat(val_parts, "float32")}

        if token_logps is not None:
            parts = []
            for j, i in enumerate(order):
                for side, lp in enumerate(token_logps[i]):
                    lp = _as_1d(lp, "float32", f"row {pairs[j].index} token_logps")
                    if len(lp) != n_tokens[j, side]:
                        raise ValueError(
                            f"row {pairs[j].index}: {len(lp)} token log-probs for n_tokens={n_tokens[j, side]}"
                        )
                    parts.append(lp)
            flat["token_logps"] = _cat(parts, "float32")

        if token_codes is not None:
            nnz_parts, idx_parts, val_parts = [], [], []
            tok_nnz = np.zeros((n, 2), np.int32)
            for j, i in enumerate(order):
                for side, (tnnz, idx, val) in enumerate(token_codes[i]):
                    what = f"row {pairs[j].index} {'chosen' if side == 0 else 'rejected'} token codes"
                    tnnz = _as_1d(tnnz, "int64", what)
                    idx, val = _as_1d(idx, "int32", what), _as_1d(val, "float32", what)
                    if len(tnnz) != n_tokens[j, side] or (tnnz < 0).any() or not tnnz.sum() == len(idx) == len(val):
                        raise ValueError(
                            f"{what}: need n_tokens={n_tokens[j, side]} per-token counts summing to the number of "
                            f"indices and values; got {len(tnnz)} counts summing to {tnnz.sum()}, "
                            f"{len(idx)} indices, {len(val)} values"
                        )
                    nnz_parts.append(tnnz)
                    idx_parts.append(idx)
                    val_parts.append(val)
                    tok_nnz[local[j], side] = len(idx)
            rows["tok_nnz"] = tok_nnz
            flat["tok_code_nnz"] = _cat(nnz_parts, "int32")
            flat["tok_code_indices"] = _cat(idx_parts, "int32")
            flat["tok_code_values"] = _cat(val_parts, "float32")

        return cls(start, stop, rows, flat, tuple(sorted(bad, key=lambda b: b.index)))

    @property
    def options(self) -> dict[str, bool]:
        return {"token_logps": "token_logps" in self.flat, "token_codes": "tok_code_nnz" in self.flat}

    def checksum(self) -> bytes:
        """sha256 over the canonical serialisation of everything this shard writes (see docs/cache-format.md)."""
        return _shard_checksum(self.start, self.stop, self.bad_rows, {**self.rows, **self.flat})


def _check_coverage(start: int, stop: int, ok: list[int], bad: list[int]) -> None:
    seen = np.array(ok + bad, dtype=np.int64)
    expected = np.arange(start, stop)
    if len(seen) == len(expected) and np.array_equal(np.sort(seen), expected):
        return
    counts = np.bincount(np.clip(seen - start, -1, stop - start) + 1, minlength=stop - start + 2)
    missing = (np.nonzero(counts[1:-1] == 0)[0] + start).tolist()
    duplicate = (np.nonzero(counts[1:-1] > 1)[0] + start).tolist()
    outside = sorted(set(seen[(seen < start) | (seen >= stop)].tolist()))
    raise ValueError(
        f"shard rows [{start}, {stop}) must each appear exactly once in pairs or bad rows: "
        f"missing {missing[:10]}, duplicated {duplicate[:10]}, outside the range {outside[:10]}"
    )


def _canonical(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


def _bad_rows_json(bad_rows: Iterable[BadRow]) -> list[list[Any]]:
    return [[int(b.index), b.reason, b.field, b.detail] for b in bad_rows]


def _shard_checksum(start: int, stop: int, bad_rows: Iterable[BadRow], arrays: Mapping[str, np.ndarray]) -> bytes:
    h = hashlib.sha256(f"{FORMAT_NAME}/{FORMAT_VERSION} shard\0".encode())
    header = {"start": int(start), "stop": int(stop), "bad_rows": _bad_rows_json(bad_rows)}
    h.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    for name in (*_ROW_ARRAYS, *_RAGGED_ARRAYS):  # canonical order; absent optional arrays are skipped
        if name not in arrays:
            continue
        a = _canonical(arrays[name])
        h.update(f"\0{name}\0{a.dtype.str}\0{list(a.shape)}\0".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.digest()


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(_canonical(a).reshape(-1).view(np.uint8)).hexdigest()[:16]


def _chunk_digests(a: np.ndarray, chunk: int) -> list[str]:
    """Short per-chunk digests (along axis 0): a diagnostic manifest, so verify can name the bad chunk."""
    return [_digest(a[i : i + chunk]) for i in range(0, len(a), chunk)]


# --------------------------------------------------------------------------------------------- reading


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

    def __len__(self) -> int:
        return len(self.index)


@dataclass
class _ShardIndex:
    """What a reader keeps per committed shard: its per-row arrays, the row offsets into each flat array, and
    the flat arrays' handles (opened on first use)."""

    start: int
    rows: dict[str, np.ndarray]
    group: zarr.Group | None = None
    offsets: dict[str, np.ndarray] = field(default_factory=dict)  # count array name -> int64 [n + 1]
    _flat: dict[str, zarr.Array] = field(default_factory=dict)

    def __post_init__(self):
        for count in {c for _, c, _ in _RAGGED_ARRAYS.values() if c in self.rows}:
            off = np.zeros(len(self.rows[count]) + 1, np.int64)
            np.cumsum(self.rows[count].sum(axis=1, dtype=np.int64), out=off[1:])
            self.offsets[count] = off

    def flat_array(self, name: str) -> zarr.Array:
        if name not in self._flat:
            self._flat[name] = self.group[name]
        return self._flat[name]


def _runs(sorted_local: np.ndarray) -> list[tuple[int, int]]:
    """Split sorted unique row numbers into runs [a, b) of consecutive rows."""
    breaks = np.nonzero(np.diff(sorted_local) != 1)[0] + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(sorted_local, breaks)]


# --------------------------------------------------------------------------------------------- the store


def _open_root(path: str, mode: str, storage_options: dict | None) -> zarr.Group:
    try:
        return zarr.open_group(path, mode=mode, zarr_format=3, storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as e:
        raise FileNotFoundError(f"no fpo-dist cache store at {path}: {e}") from e


def _root_config(provenance: Mapping[str, Any], plan: Plan, options: Mapping[str, bool]) -> dict[str, Any]:
    """The root attributes that must match for a store to be resumed."""
    try:
        provenance = json.loads(json.dumps(dict(provenance), sort_keys=True))
    except (TypeError, ValueError) as e:
        raise TypeError(f"provenance must be JSON-serialisable: {e}") from e
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "provenance": provenance,
        "plan": plan.to_dict(),
        "options": dict(options),
        "bad_reasons": list(BAD_REASONS),
    }


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            out += _differences(old.get(key, "<absent>"), new.get(key, "<absent>"), name)
        return out
    return [] if old == new else [(prefix, old, new)]


def create_store(
    path: str,
    provenance: Mapping[str, Any],
    n_rows: int,
    rows_per_shard: int,
    chunk_rows: int,
    options: Mapping[str, bool] | None = None,
    overwrite: bool = False,
    ragged_chunk: int = DEFAULT_RAGGED_CHUNK,
    storage_options: dict | None = None,
) -> CacheStore:
    """Create the store (driver side) and return it open for writing.

    If a cache already exists at ``path`` with the same provenance, plan, options and bad-reason table, it is
    opened as is (resume: committed shards stay).  Otherwise :class:`StoreMismatchError` names every differing
    key, unless ``overwrite`` — then the path is deleted and recreated.  ``path`` is a local path or any fsspec
    URL zarr accepts; ``storage_options`` go to fsspec unchanged.
    """
    path = str(path)
    plan = Plan(int(n_rows), int(rows_per_shard), int(chunk_rows), int(ragged_chunk))
    options = _normalize_options(options)
    config = _root_config(provenance, plan, options)

    if not overwrite:
        existing = None
        try:
            existing = zarr.open_group(path, mode="r", zarr_format=3, storage_options=storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
            pass
        if existing is not None:
            attrs = dict(existing.attrs)
            if attrs.get("format") != FORMAT_NAME:
                raise StoreFormatError(f"{path} holds a Zarr group that is not an {FORMAT_NAME} store; "
                                       "pass overwrite=True to replace it")
            diffs = _differences({k: attrs.get(k, "<absent>") for k in config}, config)
            if diffs:
                raise StoreMismatchError(path, diffs)
            return CacheStore(path, mode="r+", storage_options=storage_options)
        if not _store_is_empty(path, storage_options):
            raise StoreFormatError(f"{path} exists and is not empty, but is not a Zarr group; "
                                   "pass overwrite=True to replace it")

    # mode "w" deletes whatever is at path
    root = zarr.open_group(path, mode="w", zarr_format=3, storage_options=storage_options)
    _create_arrays(root, plan, options)
    root.update_attributes({**config, "complete": False, "finalized_at": None, "checksum": None})
    return CacheStore(path, mode="r+", storage_options=storage_options)


def _store_is_empty(path: str, storage_options: dict | None) -> bool:
    """True when nothing is stored at ``path`` (so a new store may be created there without overwrite)."""
    if "://" not in path:
        return not os.path.exists(path) or (os.path.isdir(path) and not any(os.scandir(path)))
    store = zarr.storage.FsspecStore.from_url(path, storage_options=storage_options, read_only=True)
    return bool(_sync(store.is_empty("")))


def _create_arrays(root: zarr.Group, plan: Plan, options: Mapping[str, bool]) -> None:
    row_names, _ = _array_names(options)
    for name in row_names:
        dtype, tail, fill, _ = _ROW_ARRAYS[name]
        root.create_array(name, shape=(plan.n_rows, *tail), dtype=dtype, chunks=(plan.chunk_rows, *tail),
                          fill_value=fill, compressors=COMPRESSOR)
    root.create_array("shard_state", shape=(plan.n_shards,), dtype="int8", chunks=(1,), fill_value=0,
                      compressors=COMPRESSOR)
    root.create_array("shard_checksum", shape=(plan.n_shards, 32), dtype="uint8", chunks=(1, 32), fill_value=0,
                      compressors=COMPRESSOR)
    root.create_group("shards")


def open_store(path: str, mode: str = "r", storage_options: dict | None = None) -> CacheStore:
    """Open an existing cache: ``mode='r'`` (readers) or ``'r+'`` (workers and the driver)."""
    return CacheStore(str(path), mode=mode, storage_options=storage_options)


class CacheStore:
    """An open cache store.  Create with :func:`create_store` or :func:`open_store`."""

    _INDEX_CACHE_SHARDS = 64  # per-shard offsets kept by read_rows (LRU)

    def __init__(self, path: str, mode: str = "r", storage_options: dict | None = None):
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        self.path, self.mode = path, mode
        self._root = _open_root(path, mode, storage_options)
        attrs = dict(self._root.attrs)
        if attrs.get("format") != FORMAT_NAME:
            raise StoreFormatError(f"{path} is not an {FORMAT_NAME} store (root attribute 'format' is "
                                   f"{attrs.get('format')!r})")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreFormatError(f"{path} has {FORMAT_NAME} format version {attrs.get('format_version')}; "
                                   f"this code reads version {FORMAT_VERSION}")
        self.plan = Plan.from_dict(attrs["plan"])
        self.provenance: dict[str, Any] = attrs["provenance"]
        self.options: dict[str, bool] = attrs["options"]
        self.bad_reasons: tuple[str, ...] = tuple(attrs["bad_reasons"])
        self._row_names, self._flat_names = _array_names(self.options)
        self._arrays: dict[str, zarr.Array] = {}
        self._index_cache: OrderedDict[int, _ShardIndex] = OrderedDict()

    def __repr__(self) -> str:
        return f"CacheStore({self.path!r}, mode={self.mode!r}, plan={self.plan})"

    # ------------------------------------------------------------------ small helpers

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes, re-read from the store (the driver may have changed them)."""
        return dict(zarr.open_group(self._root.store, mode=self.mode, zarr_format=3).attrs)

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            arr = self._root[name]
            if self.mode == "r+":  # every chunk a writer touches is stored, so verify can spot a lost file
                arr = arr.with_config({"write_empty_chunks": True})
            self._arrays[name] = arr
        return self._arrays[name]

    def _shard_path(self, k: int) -> str:
        return f"shards/{k:06d}"

    def _require_writable(self) -> None:
        if self.mode != "r+":
            raise PermissionError(f"cache store {self.path} is open read-only (mode='r')")

    def _shard_state(self) -> np.ndarray:
        return self._array("shard_state")[:]

    # ------------------------------------------------------------------ shard bookkeeping

    def committed_shards(self) -> list[int]:
        return np.nonzero(self._shard_state() == 1)[0].tolist()

    def pending_shards(self) -> list[int]:
        return np.nonzero(self._shard_state() != 1)[0].tolist()

    def check_writable(self) -> None:
        """Fail fast (worker start): write and delete a probe group.  Raises if the store is not writable."""
        self._require_writable()
        name = f"_probe_{uuid.uuid4().hex}"
        self._root.create_group(name)
        _sync(self._root.store.delete_dir(name))

    def write_shard(self, k: int, result: ShardResult) -> bytes:
        """Worker side: write shard ``k`` and return its checksum (hand it to the driver for ``commit_shard``).

        The shard's previous content, if any, is replaced, so retrying an uncommitted shard is idempotent.
        Refuses a committed shard.
        """
        self._require_writable()
        start, stop = self.plan.shard_range(k)
        if (result.start, result.stop) != (start, stop):
            raise ValueError(f"shard {k} owns rows [{start}, {stop}); result covers [{result.start}, {result.stop})")
        if result.options != self.options:
            raise ValueError(f"store options {self.options} but the shard result has {result.options}")
        if self.bad_reasons != BAD_REASONS:
            raise StoreFormatError(f"store bad-reason table {self.bad_reasons} differs from this code's {BAD_REASONS}")
        if self._array("shard_state")[k] == 1:
            raise ShardCommittedError(f"shard {k} is already committed; it is never rewritten")

        checksum = result.checksum()
        manifest = {name: _chunk_digests(a, self.plan.chunk_rows) for name, a in result.rows.items()}
        manifest.update({name: _chunk_digests(a, self.plan.ragged_chunk) for name, a in result.flat.items()})
        shard_attrs = {
            "start": start,
            "stop": stop,
            "bad_rows": _bad_rows_json(result.bad_rows),
            "checksum": checksum.hex(),
            "chunk_digests": manifest,
        }
        group = self._root.create_group(self._shard_path(k), overwrite=True, attributes=shard_attrs)
        for name in self._flat_names:
            data = result.flat[name]
            group.create_array(name, data=data, chunks=(self.plan.ragged_chunk,), fill_value=0,
                               compressors=COMPRESSOR, config={"write_empty_chunks": True})
        for name in self._row_names:  # status last: a row reads as written only once all its data is
            if name != "status":
                self._array(name)[start:stop] = result.rows[name]
        self._array("status")[start:stop] = result.rows["status"]
        return checksum

    def commit_shard(self, k: int, checksum: bytes) -> None:
        """Driver side: mark shard ``k`` committed with the checksum its worker returned."""
        self._require_writable()
        self.plan.shard_range(k)
        try:
            recorded = self._root[self._shard_path(k)].attrs["checksum"]
        except KeyError as e:
            raise StoreError(f"cannot commit shard {k}: it has not been written ({e})") from e
        if recorded != bytes(checksum).hex():
            raise StoreError(f"cannot commit shard {k}: the store holds checksum {recorded}, the worker returned "
                             f"{bytes(checksum).hex()} (was the shard rewritten by another attempt?)")
        self._array("shard_checksum")[k] = np.frombuffer(bytes(checksum), np.uint8)
        self._array("shard_state")[k] = 1

    def finalize(self) -> None:
        """Driver side: once every shard is committed, mark the store complete (with a store-level checksum)."""
        self._require_writable()
        pending = self.pending_shards()
        if pending:
            raise StoreError(f"cannot finalize: {len(pending)} shard(s) not committed: {pending[:20]}")
        digest = hashlib.sha256(self._array("shard_checksum")[:].tobytes()).hexdigest()
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._root.update_attributes({"complete": True, "finalized_at": now, "checksum": digest})

    # ------------------------------------------------------------------ reading

    def _shard_index(self, k: int) -> _ShardIndex:
        if k in self._index_cache:
            self._index_cache.move_to_end(k)
            return self._index_cache[k]
        if self._array("shard_state")[k] != 1:
            raise RowsNotAvailableError(f"shard {k} (rows {self.plan.shard_range(k)}) is not committed")
        start, stop = self.plan.shard_range(k)
        rows = {name: self._array(name)[start:stop] for name in self._row_names}
        group = self._root[self._shard_path(k)]
        index = _ShardIndex(start, rows, group)
        self._index_cache[k] = index
        if len(self._index_cache) > self._INDEX_CACHE_SHARDS:
            self._index_cache.popitem(last=False)
        return index

    def _describe_status(self, code: int) -> str:
        if code == STATUS_NOT_WRITTEN:
            return "not written"
        if code == STATUS_OK:
            return "ok"
        k = code - STATUS_BAD_BASE
        return f"bad ({self.bad_reasons[k]})" if 0 <= k < len(self.bad_reasons) else f"invalid status {code}"

    def read_rows(self, indices: Sequence[int] | np.ndarray, extras: bool = False) -> RowBatch:
        """Read rows by global index, in the order given (duplicates allowed).  Every row must be ok and in a
        committed shard, else :class:`RowsNotAvailableError`.  One slice per flat array per run of consecutive
        rows; per-shard offsets are cached.  ``extras=True`` also returns the per-token extras the store has."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.plan.n_rows):
            raise IndexError(f"row indices must be in [0, {self.plan.n_rows})")
        uniq, inverse = np.unique(idx, return_inverse=True)
        flat_names = [n for n in self._flat_names if extras or _RAGGED_ARRAYS[n][2] is None]
        per_row: dict[str, list] = {n: [None] * len(uniq) for n in flat_names}
        row_vals = {n: np.empty((len(uniq), *_ROW_ARRAYS[n][1]), _ROW_ARRAYS[n][0]) for n in self._row_names}
        shards = self.plan.shard_of(uniq)
        reads: list[tuple[int, _ShardIndex, int, int, str]] = []  # (slot of row a, shard, run [a, b), array)
        pos = 0
        for k in np.unique(shards).tolist():
            sel = uniq[shards == k]
            si = self._shard_index(k)
            local = sel - si.start
            status = si.rows["status"][local]
            if (status != STATUS_OK).any():
                bad = [(int(r), self._describe_status(int(s))) for r, s in zip(sel, status) if s != STATUS_OK]
                raise RowsNotAvailableError(f"{len(bad)} requested row(s) are not ok: {bad[:10]}")
            for name in self._row_names:
                row_vals[name][pos : pos + len(sel)] = si.rows[name][local]
            for a, b in _runs(local):
                reads += [(pos, si, a, b, name) for name in flat_names]
                pos += b - a

        # All slices at once: zarr overlaps their I/O and decoding.
        datas = _sync(_gather([
            si.flat_array(name).async_array.getitem(slice(si.offsets[_RAGGED_ARRAYS[name][1]][a],
                                                          si.offsets[_RAGGED_ARRAYS[name][1]][b]))
            for _, si, a, b, name in reads
        ]))
        for (slot, si, a, b, name), data in zip(reads, datas):
            count = _RAGGED_ARRAYS[name][1]
            off = si.offsets[count]
            for r in range(a, b):
                seg = data[off[r] - off[a] : off[r + 1] - off[a]]
                per_row[name][slot + r - a] = np.split(seg, np.cumsum(si.rows[count][r])[:-1])

        def gather(values: list) -> list:
            return [values[i] for i in inverse]

        tokens = gather(per_row["token_ids"])
        codes_i, codes_v = gather(per_row["code_indices"]), gather(per_row["code_values"])
        batch = dict(
            index=idx,
            uid=row_vals["uid"][inverse],
            prompt_ids=[t[0] for t in tokens],
            chosen_ids=[t[1] for t in tokens],
            rejected_ids=[t[2] for t in tokens],
            logp_sum=row_vals["logp_sum"][inverse],
            n_tokens=row_vals["n_tokens"][inverse],
            chosen_codes=Csr.from_rows([(i[0], v[0]) for i, v in zip(codes_i, codes_v)]),
            rejected_codes=Csr.from_rows([(i[1], v[1]) for i, v in zip(codes_i, codes_v)]),
        )
        if "token_logps" in per_row:
            lps = gather(per_row["token_logps"])
            batch.update(chosen_token_logps=[x[0] for x in lps], rejected_token_logps=[x[1] for x in lps])
        if "tok_code_nnz" in per_row:
            tn, ti, tv = (gather(per_row[n]) for n in ("tok_code_nnz", "tok_code_indices", "tok_code_values"))
            for side, key in ((0, "chosen_token_codes"), (1, "rejected_token_codes")):
                batch[key] = [Csr(np.concatenate([[0], np.cumsum(n[side], dtype=np.int64)]), i[side], v[side])
                              for n, i, v in zip(tn, ti, tv)]
        return RowBatch(**batch)

    # ------------------------------------------------------------------ reports

    def status_counts(self) -> dict[str, Any]:
        """``{"ok": n, "not_written": n, "bad": {reason: n, ...}}`` over all source rows (reasons with no rows are
        left out; an ``"invalid"`` count appears only if some status code is outside the table)."""
        n_codes = STATUS_BAD_BASE + len(self.bad_reasons)
        status = self._array("status")[:].astype(np.int64)
        valid = (status >= 0) & (status < n_codes)
        counts = np.bincount(status[valid], minlength=n_codes)
        bad = {reason: int(counts[STATUS_BAD_BASE + i]) for i, reason in enumerate(self.bad_reasons)
               if counts[STATUS_BAD_BASE + i]}
        out = {"ok": int(counts[STATUS_OK]), "not_written": int(counts[STATUS_NOT_WRITTEN]), "bad": bad}
        if not valid.all():
            out["invalid"] = int((~valid).sum())
        return out

    def ok_rows(self) -> np.ndarray:
        """Sorted int64 indices of the rows whose status is ok (what a trainer may read)."""
        return np.nonzero(self._array("status")[:] == STATUS_OK)[0].astype(np.int64)

    def bad_rows(self, shards: Iterable[int] | None = None) -> list[BadRow]:
        """Bad rows recorded by the written shards (all shards by default), sorted by row index."""
        out = []
        for k in range(self.plan.n_shards) if shards is None else shards:
            try:
                group = self._root[self._shard_path(k)]
            except KeyError:  # not written yet
                continue
            out += [BadRow(index, reason, fld, detail) for index, reason, fld, detail in group.attrs["bad_rows"]]
        return sorted(out, key=lambda b: b.index)

    def size_on_disk(self) -> int:
        """Bytes stored: os.walk for a local store, else the sizes the store lists."""
        store = self._root.store
        if isinstance(store, zarr.storage.LocalStore):
            return sum(
                os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(store.root) for f in files
            )
        return int(_sync(store.getsize_prefix("")))

    def info(self) -> dict[str, Any]:
        """A summary for humans and logs."""
        attrs = self.attrs
        status = self._array("status")[:]
        ok = status == STATUS_OK
        lengths, nnz = self._array("lengths")[:][ok], self._array("nnz")[:][ok].reshape(-1)
        size = self.size_on_disk()
        committed = len(self.committed_shards())
        stats = (lambda a: {"mean": float(a.mean()), "median": float(np.median(a)), "max": int(a.max())}
                 if len(a) else {"mean": 0.0, "median": 0.0, "max": 0})
        return {
            "path": self.path,
            "provenance": self.provenance,
            "plan": self.plan.to_dict(),
            "options": self.options,
            "complete": attrs.get("complete"),
            "finalized_at": attrs.get("finalized_at"),
            "checksum": attrs.get("checksum"),
            "shards": {"committed": committed, "pending": self.plan.n_shards - committed},
            "rows": {"total": self.plan.n_rows, **self.status_counts()},
            "size_bytes": size,
            "bytes_per_response": size / (2 * int(ok.sum())) if ok.any() else None,
            "pooled_nnz": stats(nnz),
            "tokens": {
                "total": int(lengths.sum()),
                "prompt": stats(lengths[:, 0]),
                "chosen": stats(lengths[:, 1]),
                "rejected": stats(lengths[:, 2]),
            },
        }

    # ------------------------------------------------------------------ verify

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
            group = self._root[self._shard_path(k)]
            attrs = dict(group.attrs)
            digests = attrs["chunk_digests"]
            bad_rows = [BadRow(*b) for b in attrs["bad_rows"]]
        except Exception as e:  # noqa: BLE001 — any failure here means the shard group is unusable
            return [f"{where}: shard group {self._shard_path(k)} missing or unreadable: {e!r}"]
        problems: list[str] = []
        if attrs.get("checksum") != committed.hex():
            problems.append(f"{where}: shard attrs record checksum {attrs.get('checksum')}, "
                            f"committed checksum is {committed.hex()}")

        arrays: dict[str, np.ndarray] = {}
        # Per-row arrays: this shard's region, chunks of chunk_rows rows.
        for name in self._row_names:
            arr = self._root[name]
            chunks = [(a, min(a + self.plan.chunk_rows, stop)) for a in range(start, stop, self.plan.chunk_rows)]
            arrays[name] = self._verify_array(where, name, arr, chunks, digests.get(name, []), keys,
                                              lambda a, b: f"rows {a}..{b - 1}", problems)
        offsets = _ShardIndex(start, {n: a for n, a in arrays.items() if a is not None}).offsets
        # Flat arrays: chunks of ragged_chunk elements; name the rows whose segments fall in a bad chunk.
        for name in self._flat_names:
            try:
                arr = group[name]
            except Exception as e:  # noqa: BLE001
                problems.append(f"{where}: array {self._shard_path(k)}/{name} missing or unreadable: {e!r}")
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

            arrays[name] = self._verify_array(where, name, arr, chunks, digests.get(name, []), keys, rows_of,
                                              problems)
            if off is not None and n != off[-1]:
                problems.append(f"{where}: {name} has {n} elements, its per-row counts say {off[-1]}")

        if all(a is not None for a in arrays.values()):
            recomputed = _shard_checksum(start, stop, bad_rows, arrays)
            if recomputed != committed:
                problems.append(f"{where}: checksum mismatch: committed {committed.hex()}, "
                                f"recomputed {recomputed.hex()}")
        return problems

    @staticmethod
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


async def _gather(coros: list) -> list:
    return list(await asyncio.gather(*coros))


async def _list_keys(store) -> list[str]:
    return [key async for key in store.list()]
