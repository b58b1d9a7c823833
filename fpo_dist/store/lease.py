"""One writer at a time: the cache job's lease on a store (``<store>/fpo_writer_lease.json``).

Zarr has no locking, and two cache jobs on one output would both plan and compute every shard, racing on the
uncommitted ones.  So the driver takes a lease before it plans (:func:`acquire_lease`) and holds it until it ends:

* the lease records ``host``, ``pid``, the process's start time (``pid_start``, from ``/proc``: a reused pid is not
  the same process), the job's ``started_at`` and a ``heartbeat`` time the holder refreshes every
  :data:`HEARTBEAT_S` seconds, plus a random ``token``;
* **taking it:** create-if-absent (``set_if_not_exists``: an atomic ``link`` on a local filesystem), then read it back
  after a short pause and hold it only if the token is ours (two jobs racing for a stale lease: exactly one wins);
* **a live lease refuses** the second job up front (:class:`StoreLockedError`, naming host, pid and start time);
* **a stale lease is taken over**, with a log line.  Stale means: on the same host, the pid is not alive or is
  another process (start time differs); on another host (where pids cannot be checked), no heartbeat for
  :data:`STALE_AFTER_S` seconds;
* the holder's heartbeat also notices a lease that is no longer its own (:meth:`WriterLease.check` raises before the
  next commit); a lease deleted under it (``create_store(overwrite=True)`` deletes the path) is written again.

On object stores (fsspec URLs) create-if-absent is not atomic; the read-back makes a race unlikely, not impossible.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync as _sync  # the one zarr internal used

from fpo_dist.store.schema import StoreLockedError

LEASE_KEY = "fpo_writer_lease.json"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0  # another host's lease without a heartbeat for this long is stale
_CONFIRM_S = 0.3


@dataclass(frozen=True)
class LeaseInfo:
    host: str
    pid: int
    pid_start: str | None
    started_at: str
    heartbeat: float
    token: str

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return f"host {self.host}, pid {self.pid}, started {self.started_at}, last heartbeat {age:.0f} s ago"


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), None if it is not running."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _host() -> str:
    return socket.gethostname()


def stale_reason(info: LeaseInfo, now: float | None = None) -> str | None:
    """Why ``info`` is stale (a dead holder), or None when its holder may still be running."""
    if info.host == _host():
        start = _proc_start(info.pid)
        if start is None:
            return f"pid {info.pid} is not running on this host"
        if info.pid_start is not None and start != info.pid_start:
            return f"pid {info.pid} is now another process"
        return None
    age = (time.time() if now is None else now) - info.heartbeat
    return f"no heartbeat for {age:.0f} s (> {STALE_AFTER_S:.0f} s)" if age > STALE_AFTER_S else None


def _kv_store(path: str, storage_options: dict | None):
    if "://" not in path:
        return zarr.storage.LocalStore(path)
    return zarr.storage.FsspecStore.from_url(path, storage_options=storage_options)


class WriterLease:
    """The lease a cache driver holds on a store (see the module docstring).  Use :func:`acquire_lease`."""

    def __init__(self, path: str, storage_options: dict | None = None, log: Callable[[str], None] = print):
        self.path, self.log = path, log
        self._store = _kv_store(path, storage_options)
        self.info = LeaseInfo(_host(), os.getpid(), _proc_start(os.getpid()),
                              _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), time.time(),
                              uuid.uuid4().hex)
        self.lost: LeaseInfo | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ key access

    def read(self) -> LeaseInfo | None:
        buf = _sync(self._store.get(LEASE_KEY, prototype=default_buffer_prototype()))
        if buf is None:
            return None
        try:
            return LeaseInfo(**json.loads(buf.to_bytes()))
        except (ValueError, TypeError):  # a torn or foreign file: nobody can hold it
            return LeaseInfo("?", -1, None, "?", 0.0, "?")

    def _put(self, exclusive: bool) -> None:
        self.info = LeaseInfo(**{**asdict(self.info), "heartbeat": time.time()})
        buf = default_buffer_prototype().buffer.from_bytes(json.dumps(asdict(self.info)).encode())
        _sync(self._store.set_if_not_exists(LEASE_KEY, buf) if exclusive else self._store.set(LEASE_KEY, buf))

    # ------------------------------------------------------------------ protocol

    def acquire(self) -> WriterLease:
        for _ in range(3):
            held = self.read()
            if held is not None:
                why = stale_reason(held)
                if why is None:
                    raise StoreLockedError(
                        f"cache store {self.path} is being written by another cache job ({held.describe()}): wait "
                        f"for it to finish, or stop it; a dead job's lease is taken over by the next run (same host: "
                        f"at once; another host: after {STALE_AFTER_S:.0f} s without heartbeat)")
                self.log(f"taking over the writer lease of a dead cache job ({held.describe()}: {why})")
                _sync(self._store.delete(LEASE_KEY))
            self._put(exclusive=True)
            time.sleep(_CONFIRM_S)
            now = self.read()
            if now is not None and now.token == self.info.token:
                self._thread = threading.Thread(target=self._beat, name="fpo-store-lease", daemon=True)
                self._thread.start()
                return self
        raise StoreLockedError(f"cache store {self.path}: another cache job took the writer lease at the same time "
                               f"({now.describe() if now else 'unknown'}); run one job per store")

    def beat(self) -> None:
        """Refresh the heartbeat; write the lease again if it vanished (overwrite); note a lease lost to another."""
        held = self.read()
        if held is not None and held.token != self.info.token:
            self.lost = held
            return
        self._put(exclusive=held is None)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001 — a failed heartbeat is retried; check() reports a lost lease
                self.log(f"writer lease heartbeat failed: {e!r}")

    def check(self) -> None:
        """Raise :class:`StoreLockedError` if another job holds the lease now (call before committing)."""
        if self.lost is not None:
            raise StoreLockedError(f"cache store {self.path}: this job lost its writer lease to another cache job "
                                   f"({self.lost.describe()}); stopping before the next commit")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            held = self.read()
            if held is not None and held.token == self.info.token:
                _sync(self._store.delete(LEASE_KEY))
        except Exception as e:  # noqa: BLE001 — a leftover lease of a dead pid is taken over by the next run
            self.log(f"could not release the writer lease of {self.path}: {e!r}")

    def __enter__(self) -> WriterLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_lease(path: str, storage_options: dict | None = None, log: Callable[[str], None] = print) -> WriterLease:
    """Take the writer lease of the store at ``path`` (before planning), or raise :class:`StoreLockedError`."""
    return WriterLease(str(path), storage_options, log).acquire()


@contextlib.contextmanager
def keep_lease(path: str, storage_options: dict | None, active: bool = True) -> Iterator[None]:
    """Put the lease file back after the block (``create_store(overwrite=True)`` deletes the whole path)."""
    if not active:
        yield
        return
    store = _kv_store(path, storage_options)
    try:
        saved = _sync(store.get(LEASE_KEY, prototype=default_buffer_prototype()))
    except FileNotFoundError:
        saved = None
    yield
    if saved is not None:
        _sync(store.set(LEASE_KEY, saved))
