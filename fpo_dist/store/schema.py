"""The store's format, in code: names, dtypes, options, the plan, provenance checks and the canonical checksum.

Everything here is part of the on-disk contract in ``docs/cache-format.md`` (``fpo-dist-cache``, version 1):
changing a table, a dtype, the array order or the checksum serialisation changes the format and must bump
:data:`FORMAT_VERSION`.  Nothing here reads or writes a store; the other modules of :mod:`fpo_dist.store` do.

* :data:`_ROW_ARRAYS` / :data:`_RAGGED_ARRAYS` list every array, in canonical (checksum) order;
* :class:`Plan` is the only place that does row ↔ shard ↔ chunk arithmetic;
* :func:`_root_config` is what must match for a store to be resumed (provenance, plan, options, bad reasons),
  :func:`_differences` names what does not;
* :func:`_shard_checksum` is the canonical serialisation of a shard, :func:`_chunk_digests` the per-chunk manifest;
* :func:`unreadable` / :func:`reading` map what zarr and the storage raise to one :class:`StoreError`, and
  :func:`is_transient` / :class:`RetryPolicy` say which I/O errors a read retries, and for how long.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec

from fpo_dist.data import BAD_REASONS, BadRow

FORMAT_NAME = "fpo-dist-cache"
# Version 2 added the reference's top-M next-token distributions (option ``ref_topm``); a store built without them is
# written as version 1, byte for byte what version 1 was, so readers of version 1 still read it.  This code reads
# both.
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)

# One compressor for every array.  Byte-shuffle + zstd compresses int32 ids and float32 values well;
# integrity is checked by our own sha256 checksums, not by the codec.
COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")

# Elements per chunk of the flat (ragged) shard arrays (64 Ki elements = 256 KiB of int32/float32).
DEFAULT_RAGGED_CHUNK = 1 << 16

STATUS_NOT_WRITTEN = 0
STATUS_OK = 1
STATUS_BAD_BASE = 2  # status = 2 + k  <=>  bad with reason bad_reasons[k]

# Options: which optional arrays a store holds.  ``token_logps`` / ``token_codes`` are on/off; ``ref_topm`` is M, the
# number of top reference tokens kept per response position (0: none).
OPTIONS = ("token_logps", "token_codes", "ref_topm")

# Per-row arrays: name -> (dtype, trailing shape, fill value, option that enables it or None).
_ROW_ARRAYS: dict[str, tuple[str, tuple[int, ...], Any, str | None]] = {
    "status": ("int8", (), STATUS_NOT_WRITTEN, None),
    "uid": ("uint8", (16,), 0, None),
    "lengths": ("int32", (3,), 0, None),  # prompt, chosen, rejected token counts
    "logp_sum": ("float32", (2,), float("nan"), None),  # chosen, rejected
    "n_tokens": ("int32", (2,), 0, None),  # chosen, rejected response tokens in logp_sum
    "nnz": ("int32", (2,), 0, None),  # non-zeros of the pooled chosen / rejected SAE vector
    "tok_nnz": ("int32", (2,), 0, "token_codes"),  # total per-token code non-zeros, chosen / rejected
    "topm_n": ("int32", (2,), 0, "ref_topm"),  # n_tokens · M, chosen / rejected: the top-M arrays' segment sizes
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
    # per response token, chosen then rejected: the reference's M most probable next tokens (descending), their
    # log-probs, and the log of the mass of every other token (the tail bucket; -inf when M is the vocabulary)
    "ref_topm_ids": ("int32", "topm_n", "ref_topm"),
    "ref_topm_logps": ("float32", "topm_n", "ref_topm"),
    "ref_tail_logp": ("float32", "n_tokens", "ref_topm"),
}


# --------------------------------------------------------------------------------------------- errors


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


class StoreNotFoundError(StoreError, FileNotFoundError):
    """Nothing at the path is a Zarr group (no ``zarr.json``): not a store at all."""


class StoreUnreadableError(StoreError):
    """A file of the store is missing or cannot be parsed (a half-finished copy, a truncated or corrupted
    metadata file).  The message names the file and what to do; ``detail`` is the problem alone."""

    def __init__(self, path: str, detail: str, todo: str | None = None):
        self.path, self.detail = path, detail
        super().__init__(f"cache store {path}: {detail}: {todo or _REPAIR.format(path=path)}")


class ShardCorruptError(StoreError):
    """Verify on read: a shard's content differs from its committed checksum.  Nothing of it was returned."""


class StoreLockedError(StoreError):
    """Another live cache job holds the store's writer lease."""


class StoreIOError(StoreError):
    """Reading the store failed with an I/O error (a timeout, a dropped connection, a 5xx or throttling answer of an
    object store, after :class:`RetryPolicy`'s retries for a transient one): nothing says the store is damaged, so
    the message names the error and never calls it corrupted.  ``cause`` is the last error seen."""

    def __init__(self, path: str, where: str, cause: BaseException, attempts: int = 1, waited_s: float = 0.0):
        self.path, self.where, self.cause, self.attempts = path, where, cause, attempts
        detail = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
        if is_transient(cause):
            tries = f" ({attempts} attempts over {waited_s:.1f} s)" if attempts > 1 else ""
            what = f"a transient I/O error{tries}"
            todo = ("the store itself is not known to be damaged: check that the storage is reachable (endpoint, "
                    "network, service status) and run again")
        else:
            what = "an I/O error"
            todo = "check the storage (mount, disk, service) and run again"
        super().__init__(f"cache store {path}: reading {where} failed with {what}: {detail}; {todo}")


# One place maps what zarr / the filesystem raise on a damaged store to a StoreError that names the file.
_REPAIR = ("copy the store again from its source, or rebuild it (`python -m fpo_dist.cache --config CFG "
           "--overwrite true`); `python -m fpo_dist.cache verify {path}` lists every problem")


def unreadable(path: str, node: str, exc: BaseException) -> StoreError:
    """The :class:`StoreError` for ``exc``, raised while reading node ``node`` ('' = root) of the store at ``path``.

    Only bytes that cannot be parsed are called corrupted (with :data:`_REPAIR`'s advice); an I/O error — transient
    or not — is a :class:`StoreIOError` naming it, never advice to rebuild."""
    if isinstance(exc, StoreError):
        return exc
    where = f"{path.rstrip('/')}/{node}" if node else path
    if isinstance(exc, (KeyError, FileNotFoundError)) or type(exc).__name__ in (
            "NodeNotFoundError", "GroupNotFoundError", "ArrayNotFoundError"):
        return StoreUnreadableError(path, f"{where} is missing (an interrupted copy?)")
    if isinstance(exc, PermissionError):
        return StoreUnreadableError(path, f"cannot read {where}: permission denied",
                                    "give this user read access to the whole store")
    if isinstance(exc, OSError) or is_transient(exc):
        return StoreIOError(path, where, exc)
    detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
    return StoreUnreadableError(path, f"{where}/zarr.json is corrupted or truncated ({detail})")


@contextlib.contextmanager
def reading(path: str, node: str = "") -> Iterator[None]:
    """Re-raise any failure to open node ``node`` of the store at ``path`` as a :class:`StoreError` naming it."""
    try:
        yield
    except StoreError:
        raise
    except (KeyError, OSError, ValueError, TypeError) as e:  # JSON/Unicode errors are ValueErrors
        raise unreadable(path, node, e) from e
    except Exception as e:  # zarr's own errors (metadata validation, node type, ...), a storage client's I/O errors
        if type(e).__module__.startswith("zarr") or is_transient(e):
            raise unreadable(path, node, e) from e
        raise


# --------------------------------------------------------------------------------------------- transient I/O

# errno values of a network or a busy service, not of the bytes: s3fs maps S3's 503 / SlowDown / ServiceUnavailable to
# EBUSY and 500 / InternalError to EREMOTEIO; sockets and NFS give the others.
_TRANSIENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ETIMEDOUT", "ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "EHOSTUNREACH", "EHOSTDOWN", "ENETUNREACH",
    "ENETDOWN", "ENETRESET", "EPIPE", "EAGAIN", "EBUSY", "EREMOTEIO") if hasattr(errno, name))
# Exception classes (matched by name along the class's MRO, so that no storage client is imported here) that a
# storage client raises for a network failure: builtins' ConnectionError / TimeoutError (asyncio's and fsspec's
# FSTimeoutError included), botocore's ConnectionError (EndpointConnectionError, ConnectTimeoutError, ...) and
# HTTPClientError (ReadTimeoutError, ConnectionClosedError, ...), aiohttp's ClientConnectionError /
# ClientPayloadError, http.client's IncompleteRead.
_TRANSIENT_CLASSES = frozenset({"ConnectionError", "TimeoutError", "HTTPClientError", "ClientConnectionError",
                                "ClientPayloadError", "IncompleteRead"})
# Error codes of an object store's HTTP answer that mean "try again" (botocore's ClientError, untranslated).
_TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                              "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests"})


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is an I/O failure that may pass if the read is retried:
    a timeout, a refused / reset / dropped connection, an HTTP 5xx, 429 or throttling answer of an object store.
    Missing files, permissions and undecodable bytes are not transient."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            return False
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            return True
        if any(c.__name__ in _TRANSIENT_CLASSES for c in type(exc).__mro__):
            return True
        response = getattr(exc, "response", None)
        if isinstance(response, dict):  # botocore ClientError
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if status >= 500 or status == 429 or response.get("Error", {}).get("Code") in _TRANSIENT_CODES:
                return True
        exc, seen = exc.__cause__, seen + 1
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """How a read retries a transient I/O error (:func:`is_transient`): at most ``attempts`` tries in all, waiting
    ``first_delay_s``, then twice as long each time (at most ``max_delay_s``, each wait jittered down by up to a
    quarter), and no try starts more than ``deadline_s`` after the first failure.  Then the read fails with
    :class:`StoreIOError`.  The default rides out a storage endpoint that is away for ~30 s."""

    attempts: int = 8
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0
    deadline_s: float = 60.0

    def __post_init__(self):
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be a positive integer, got {self.attempts!r}")
        for name in ("first_delay_s", "max_delay_s", "deadline_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"RetryPolicy.{name} must be >= 0, got {getattr(self, name)!r}")

    def delay(self, retry: int, jitter: float = 0.0) -> float:
        """Seconds to wait before retry number ``retry`` (1 = the second try); ``jitter`` in [0, 1)."""
        return min(self.first_delay_s * 2 ** (retry - 1), self.max_delay_s) * (1 - jitter / 4)


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(attempts=1)


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


# --------------------------------------------------------------------------------------------- options, provenance


def _normalize_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every option, with its default: ``token_logps`` / ``token_codes`` bool, ``ref_topm`` an int ≥ 0.  A
    version-1 store's attributes (without ``ref_topm``) normalize to ``ref_topm = 0``."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown store option(s) {unknown}; valid options: {list(OPTIONS)}")
    topm = options.get("ref_topm") or 0
    if isinstance(topm, bool) or not isinstance(topm, int) or topm < 0:
        raise ValueError(f"store option ref_topm must be an integer >= 0 (tokens kept per position), got {topm!r}")
    return {"token_logps": bool(options.get("token_logps", False)),
            "token_codes": bool(options.get("token_codes", False)), "ref_topm": topm}


def format_version(options: Mapping[str, Any]) -> int:
    """The format version a store with ``options`` is written in: 2 with top-M reference data, else 1."""
    return 2 if options.get("ref_topm") else 1


def _array_names(options: Mapping[str, bool]) -> tuple[list[str], list[str]]:
    """(per-row array names, flat shard array names) present under ``options``, in canonical order."""
    rows = [n for n, (_, _, _, opt) in _ROW_ARRAYS.items() if opt is None or options[opt]]
    ragged = [n for n, (_, _, opt) in _RAGGED_ARRAYS.items() if opt is None or options[opt]]
    return rows, ragged


def _root_config(provenance: Mapping[str, Any], plan: Plan, options: Mapping[str, bool]) -> dict[str, Any]:
    """The root attributes that must match for a store to be resumed."""
    try:
        provenance = json.loads(json.dumps(dict(provenance), sort_keys=True))
    except (TypeError, ValueError) as e:
        raise TypeError(f"provenance must be JSON-serialisable: {e}") from e
    return {
        "format": FORMAT_NAME,
        "format_version": format_version(options),
        "provenance": provenance,
        "plan": plan.to_dict(),
        # version 1 stores never wrote ref_topm: leave it out when it is 0, so that they still resume
        "options": {k: v for k, v in options.items() if k != "ref_topm" or v},
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


# --------------------------------------------------------------------------------------------- checksums


def _cat(parts: Sequence[np.ndarray], dtype: str) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def _canonical(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


def _bad_rows_json(bad_rows: Iterable[BadRow]) -> list[list[Any]]:
    return [[int(b.index), b.reason, b.field, b.detail] for b in bad_rows]


def _shard_checksum(start: int, stop: int, bad_rows: Iterable[BadRow], arrays: Mapping[str, np.ndarray]) -> bytes:
    version = 2 if "ref_topm_ids" in arrays else 1  # format_version(options): the top-M arrays are there or not
    h = hashlib.sha256(f"{FORMAT_NAME}/{version} shard\0".encode())
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
