"""Creating and opening a store, the write protocol, and reports: :class:`CacheStore`, :func:`create_store`,
:func:`open_store`.

Zarr has no locking, so writes follow one protocol (``docs/cache-format.md``, "Write protocol"):

* the driver creates the store (:func:`create_store`) and is the only writer of root attributes and of
  ``shard_state`` / ``shard_checksum`` (:meth:`CacheStore.commit_shard`, :meth:`CacheStore.finalize`);
* exactly one worker at a time writes shard ``k`` (:meth:`CacheStore.write_shard`): its chunks of the per-row
  arrays and its own shard group.  Rewriting an uncommitted shard is idempotent; a committed shard is never
  rewritten.

:class:`CacheStore` gets its reading methods from :mod:`fpo_dist.store.reader` and ``verify`` from
:mod:`fpo_dist.store.verify`.  It reads through :class:`_RetryingStore`: every read of the storage is retried on a
transient I/O error (:func:`~fpo_dist.store.schema.is_transient`) as its :class:`RetryPolicy` says, then fails with
:class:`StoreIOError` naming the error — never "corrupted".
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import logging
import os
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import numpy as np
import zarr
import zarr.errors
from zarr.core.sync import sync as _sync  # the one zarr internal used

from fpo_dist.data import BAD_REASONS, BadRow
from fpo_dist.store.reader import _gather, _ShardDigests, _ShardIndex, _StoreReader
from fpo_dist.store.schema import (
    _ROW_ARRAYS,
    COMPRESSOR,
    DEFAULT_RAGGED_CHUNK,
    DEFAULT_RETRY,
    FORMAT_NAME,
    FORMAT_VERSION,
    READ_VERSIONS,
    STATUS_BAD_BASE,
    STATUS_NOT_WRITTEN,
    STATUS_OK,
    Plan,
    RetryPolicy,
    ShardCommittedError,
    StoreError,
    StoreFormatError,
    StoreIOError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreUnreadableError,
    _array_names,
    _bad_rows_json,
    _chunk_digests,
    _differences,
    _normalize_options,
    _root_config,
    is_transient,
    reading,
)
from fpo_dist.store.verify import _StoreVerifier
from fpo_dist.store.writer import ShardResult

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


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
            with reading(path):
                existing = zarr.open_group(path, mode="r", zarr_format=3, storage_options=storage_options)
        except StoreUnreadableError as e:
            if not isinstance(e.__cause__, (FileNotFoundError, zarr.errors.GroupNotFoundError,
                                            zarr.errors.NodeTypeValidationError)):
                raise  # a corrupted root zarr.json: never silently replaced
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

    # overwrite: mode "w" deletes whatever is at path, except the writer lease, put back at once (the driver took it
    # before planning); a new store: mode "a" creates the group next to the lease
    from fpo_dist.store.lease import keep_lease

    with keep_lease(path, storage_options, active=overwrite):
        root = zarr.open_group(path, mode="w" if overwrite else "a", zarr_format=3, storage_options=storage_options)
    _create_arrays(root, plan, options)
    root.update_attributes({**config, "complete": False, "finalized_at": None, "checksum": None})
    return CacheStore(path, mode="r+", storage_options=storage_options)


def open_store(path: str, mode: str = "r", storage_options: dict | None = None, verify_reads: bool = True,
               retry: RetryPolicy | None = None) -> CacheStore:
    """Open an existing cache: ``mode='r'`` (readers) or ``'r+'`` (workers and the driver).

    Any store that cannot be read raises a :class:`StoreError` naming the file and what to do.  With
    ``verify_reads`` (the default) each shard is checked against its committed checksum the first time this
    handle reads rows from it, and every later read of its data against the bytes that passed
    (:class:`ShardCorruptError` on a mismatch).  ``retry`` (default :data:`~fpo_dist.store.schema.DEFAULT_RETRY`)
    bounds the retries of a transient I/O error; after it, :class:`StoreIOError`.
    """
    return CacheStore(str(path), mode=mode, storage_options=storage_options, verify_reads=verify_reads,
                      retry=retry)


def _open_root(path: str, mode: str, storage_options: dict | None, retry: RetryPolicy) -> zarr.Group:
    try:
        with reading(path):
            store = _RetryingStore(_base_store(path, mode, storage_options), path, retry)
            return zarr.open_group(store=store, mode=mode, zarr_format=3)
    except StoreUnreadableError as e:
        if isinstance(e.__cause__, (FileNotFoundError, zarr.errors.GroupNotFoundError,
                                    zarr.errors.NodeTypeValidationError)):
            raise StoreNotFoundError(f"no fpo-dist cache store at {path} (no Zarr group there: "
                                     f"{' '.join(str(e.__cause__).split())}); check the path, or build the cache "
                                     "with `python -m fpo_dist.cache --config CFG`") from e.__cause__
        raise


def _base_store(path: str, mode: str, storage_options: dict | None) -> zarr.abc.store.Store:
    """The zarr store ``zarr.open_group(path, storage_options=...)`` would make: fsspec for a URL, else local.

    An fsspec store is made on zarr's event-loop thread, as zarr makes its own: fsspec caches one filesystem instance
    per thread, with its directory listings, so this store shares the instance (and the cache coherence) of every
    ``zarr.open_group(path)`` in this process — e.g. :func:`create_store`'s writes."""
    read_only = mode == "r"
    if "://" in path or ("::" in path and "local://" not in path):  # zarr's own test for an fsspec URL
        return _sync(_fsspec_store(path, storage_options, read_only))
    if storage_options:
        raise TypeError(f"storage_options are for an fsspec URL; {path} is a local path")
    return zarr.storage.LocalStore(path, read_only=read_only)


async def _fsspec_store(path: str, storage_options: dict | None, read_only: bool) -> zarr.storage.FsspecStore:
    return zarr.storage.FsspecStore.from_url(path, storage_options=storage_options, read_only=read_only)


class _RetryingStore(zarr.storage.WrapperStore):
    """A zarr store that retries every read of the wrapped one (``get``, ``get_partial_values``, ``exists``, sizes,
    listings) on a transient I/O error (:func:`~fpo_dist.store.schema.is_transient`), waiting as ``retry`` says and
    logging each retry; when the policy is spent, :class:`StoreIOError` names the key and the last error.  Any other
    error (a missing key, undecodable bytes) passes at once; writes pass through unchanged."""

    def __init__(self, store: zarr.abc.store.Store, path: str = "", retry: RetryPolicy = DEFAULT_RETRY):
        super().__init__(store)
        self._path, self._retry = path, retry

    def _with_store(self, store: zarr.abc.store.Store) -> _RetryingStore:
        return type(self)(store, self._path, self._retry)

    def __repr__(self) -> str:  # zarr's messages name the store: the wrapped one is what the user opened
        return repr(self._store)

    def __str__(self) -> str:
        return str(self._store)

    async def _retrying(self, key: str, call: Callable[[], Awaitable[_T]]) -> _T:
        first_failure, attempt = None, 1
        while True:
            try:
                return await call()
            except StoreError:
                raise
            except Exception as e:
                if not is_transient(e):
                    raise
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                delay = self._retry.delay(attempt, random.random())
                if attempt >= self._retry.attempts or now + delay - first_failure > self._retry.deadline_s:
                    where = f"{self._path.rstrip('/')}/{key}" if key else self._path
                    raise StoreIOError(self._path, where, e, attempt, now - first_failure) from e
                logger.warning("cache store %s: transient I/O error reading %s (%s: %s); try %d of %d in %.1f s",
                               self._path, key or "/", type(e).__name__, " ".join(str(e).split())[:200],
                               attempt + 1, self._retry.attempts, delay)
                await asyncio.sleep(delay)
                attempt += 1

    async def get(self, key, prototype, byte_range=None):
        return await self._retrying(key, lambda: self._store.get(key, prototype, byte_range))

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        key = key_ranges[0][0] if key_ranges else ""
        return await self._retrying(key, lambda: self._store.get_partial_values(prototype, key_ranges))

    async def _get_many(self, requests):
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def exists(self, key: str) -> bool:
        return await self._retrying(key, lambda: self._store.exists(key))

    async def getsize(self, key: str) -> int:
        return await self._retrying(key, lambda: self._store.getsize(key))

    async def getsize_prefix(self, prefix: str) -> int:
        return await self._retrying(prefix, lambda: self._store.getsize_prefix(prefix))

    async def list(self) -> AsyncIterator[str]:
        for key in await self._retrying("", lambda: _collect(self._store.list())):
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key in await self._retrying(prefix, lambda: _collect(self._store.list_prefix(prefix))):
            yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        for key in await self._retrying(prefix, lambda: _collect(self._store.list_dir(prefix))):
            yield key


async def _collect(keys: AsyncIterator[str]) -> list[str]:
    return [key async for key in keys]


def _check_format(path: str, attrs: Mapping[str, Any]) -> None:
    """Refuse a group that is not an fpo-dist cache, or one of another format version (naming what to do)."""
    if attrs.get("format") != FORMAT_NAME:
        raise StoreFormatError(f"{path} is not an {FORMAT_NAME} store (root attribute 'format' is "
                               f"{attrs.get('format')!r}); check the path")
    version = attrs.get("format_version")
    if version not in READ_VERSIONS:
        from fpo_dist import __version__

        todo = ("upgrade fpo-dist to a version that reads it, or rebuild the cache with this one"
                if isinstance(version, int) and version > FORMAT_VERSION else "rebuild the cache with this fpo-dist")
        raise StoreFormatError(f"{path} has {FORMAT_NAME} format version {version!r}; fpo-dist {__version__} reads "
                               f"versions {', '.join(map(str, READ_VERSIONS))}: {todo}")


def _store_is_empty(path: str, storage_options: dict | None) -> bool:
    """True when nothing is stored at ``path`` (so a new store may be created there without overwrite)."""
    from fpo_dist.store.lease import is_lease_file  # the writer lease is taken before the store is created

    if "://" not in path:
        return not os.path.exists(path) or (os.path.isdir(path) and not any(
            not is_lease_file(e.name) for e in os.scandir(path)))
    store = zarr.storage.FsspecStore.from_url(path, storage_options=storage_options, read_only=True)
    return not [k for k in _sync(_list_dir(store)) if not is_lease_file(k)]


async def _list_dir(store) -> list[str]:
    return [key async for key in store.list_dir("")]


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


class CacheStore(_StoreReader, _StoreVerifier):
    """An open cache store.  Create with :func:`create_store` or :func:`open_store`.

    Writing: :meth:`check_writable`, :meth:`write_shard` (workers); :meth:`commit_shard`, :meth:`finalize`
    (driver).  Reading: :meth:`read_rows`, :meth:`read_token_extras`.  Reports: :meth:`status_counts`,
    :meth:`ok_rows`, :meth:`bad_rows`, :meth:`size_on_disk`, :meth:`info`, :meth:`token_extras_info`, :meth:`verify`.
    """

    def __init__(self, path: str, mode: str = "r", storage_options: dict | None = None, verify_reads: bool = True,
                 retry: RetryPolicy | None = None):
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        self.path, self.mode = path, mode
        self.storage_options = storage_options  # kept so that readers (the loader's thread) can reopen the store
        self.retry = retry or DEFAULT_RETRY  # likewise
        self._root = _open_root(path, mode, storage_options, self.retry)
        attrs = dict(self._root.attrs)
        _check_format(path, attrs)
        try:
            self.plan = Plan.from_dict(attrs["plan"])
            self.provenance: dict[str, Any] = attrs["provenance"]
            self.options: dict[str, bool] = _normalize_options(attrs["options"])
            self.bad_reasons: tuple[str, ...] = tuple(attrs["bad_reasons"])
        except (KeyError, TypeError, ValueError) as e:
            raise StoreUnreadableError(path, f"the root attributes in {path.rstrip('/')}/zarr.json are incomplete "
                                             f"or invalid ({type(e).__name__}: {e})") from e
        self._row_names, self._flat_names = _array_names(self.options)
        self._arrays: dict[str, zarr.Array] = {}
        self._index_cache: OrderedDict[int, _ShardIndex] = OrderedDict()
        self.verify_reads = verify_reads
        # verify on read: shard -> digests of the chunks that passed its committed checksum in this handle
        self._verified: dict[int, _ShardDigests] = {}

    def __repr__(self) -> str:
        return f"CacheStore({self.path!r}, mode={self.mode!r}, plan={self.plan})"

    # ------------------------------------------------------------------ small helpers

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes, re-read from the store (the driver may have changed them)."""
        with reading(self.path):
            return dict(zarr.open_group(self._root.store, mode=self.mode, zarr_format=3).attrs)

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            with reading(self.path, name):
                arr = self._root[name]
            if self.mode == "r+":  # every chunk a writer touches is stored, so verify can spot a lost file
                arr = arr.with_config({"write_empty_chunks": True})
            self._arrays[name] = arr
        return self._arrays[name]

    def _shard_path(self, k: int) -> str:
        return f"shards/{k:06d}"

    def _shard_group(self, k: int) -> zarr.Group:
        """The group of shard ``k`` (a committed shard's group must exist: a missing one is a StoreError)."""
        with reading(self.path, self._shard_path(k)):
            return self._root[self._shard_path(k)]

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
        """Bad rows recorded by the written shards (all shards by default), sorted by row index.  A committed
        shard whose group is missing or unreadable raises :class:`StoreUnreadableError`."""
        out = []
        committed = set(self.committed_shards())
        for k in range(self.plan.n_shards) if shards is None else shards:
            try:
                group = self._shard_group(k)
            except StoreUnreadableError as e:
                if k not in committed and isinstance(e.__cause__, KeyError):  # not written yet
                    continue
                raise
            out += [BadRow(index, reason, fld, detail) for index, reason, fld, detail in group.attrs["bad_rows"]]
        return sorted(out, key=lambda b: b.index)

    def size_on_disk(self) -> int:
        """Bytes stored: os.walk for a local store, else the sizes the store lists."""
        store = self._root.store
        base = getattr(store, "_store", store)  # the store _RetryingStore wraps
        if isinstance(base, zarr.storage.LocalStore):
            return sum(
                os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(base.root) for f in files
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

        def stats(a: np.ndarray) -> dict[str, float]:
            if not len(a):
                return {"mean": 0.0, "median": 0.0, "max": 0}
            return {"mean": float(a.mean()), "median": float(np.median(a)), "max": int(a.max())}

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
            "bad_rows_recorded": len(self.bad_rows()),  # reads every written shard's attributes
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

    def token_extras_info(self) -> dict[str, Any] | None:
        """Which per-token extras the store holds and how big they are: None when it was built with neither
        option, else ``{"token_logps": {"values", "bytes"} or None, "token_codes": {"tokens", "nnz", "bytes"} or
        None, "ref_topm": {"m", "tokens", "bytes"} or None}``.  ``values`` / ``tokens`` count the response tokens of the ok rows, ``nnz`` their code non-zeros,
        ``bytes`` what the extras' flat arrays store in committed shards.  Reads the per-row counts only;
        :meth:`read_token_extras` reads the values."""
        if not any(self.options.values()):
            return None
        ok = self._array("status")[:] == STATUS_OK
        n_tokens = int(self._array("n_tokens")[:][ok].sum())
        out: dict[str, Any] = {"token_logps": None, "token_codes": None, "ref_topm": None}
        if self.options["token_logps"]:
            out["token_logps"] = {"values": n_tokens, "bytes": self._flat_bytes("token_logps")}
        if self.options["token_codes"]:
            out["token_codes"] = {"tokens": n_tokens, "nnz": int(self._array("tok_nnz")[:][ok].sum()),
                                  "bytes": self._flat_bytes("tok_code_nnz", "tok_code_indices", "tok_code_values")}
        if self.options["ref_topm"]:
            out["ref_topm"] = {"m": self.options["ref_topm"], "tokens": n_tokens,
                               "bytes": self._flat_bytes("ref_topm_ids", "ref_topm_logps", "ref_tail_logp")}
        return out

    def _flat_bytes(self, *names: str) -> int:
        """Bytes stored by the named flat arrays of the committed shards."""
        prefixes = [f"{self._shard_path(k)}/{name}" for k in self.committed_shards() for name in names]
        return int(sum(_sync(_gather([self._root.store.getsize_prefix(p) for p in prefixes]))))
