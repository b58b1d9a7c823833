"""One writer at a time: the cache job's lease on a store (``<store>/fpo_writer_lease.json``).

Zarr has no locking, and two cache jobs on one output would both plan and compute every shard, racing on the
uncommitted ones.  So the driver takes a lease before it plans (:func:`acquire_lease`) and holds it until it ends.

**The record** names the holder: ``host`` (hostname, for people), ``boot_id`` (the kernel's boot id) and ``pid_ns``
(the pid namespace) — together the only scope in which a pid means something — ``pid``, the process's start time
(``pid_start``: a reused pid is not the same process), ``started_at``, a ``beat`` counter the holder advances every
``heartbeat_s`` seconds (:data:`HEARTBEAT_S`), and a random ``token``.  Its wall-clock ``heartbeat`` is for people
only: no decision compares one host's clock with another's.

**Liveness** of a lease found in the store:

* written in this process's own host *and* pid namespace (same ``boot_id`` and ``pid_ns``): the pid table decides,
  at once — the pid is gone, a zombie or another process (start time differs): dead; else alive.  The hostname plays
  no part: two containers with one hostname have different pid namespaces (and a ``/etc/machine-id`` copied from one
  image), so neither judges the other by its own pids;
* anything else (another host, another container, an older or unreadable record): unknown.  This process *watches*
  the record for ``max(stale_after_s, 3 × the holder's heartbeat_s)`` seconds (:data:`STALE_AFTER_S`, or
  ``FPO_LEASE_STALE_S``): if it changes at all, the holder is alive; only a record that did not change for the whole
  watch is dead.  Only this case waits; a fresh store and a provably dead holder are taken at once.

**Taking it** is a conditional create, so exactly one of several racers wins:

* no lease: create-if-absent — ``link`` of a complete temporary file on a filesystem (atomic, also on NFS), a put
  with ``If-None-Match: *`` on S3 (s3fs ``mode="create"``; AWS and moto's server refuse the second with 412);
* a dead lease (observed bytes ``R``): create-if-absent of a *claim* key named after ``sha256(R)``; the one racer that
  creates it checks that the lease still holds ``R``, replaces it with its own record, then deletes the claim.  A
  racer that fails the claim, or finds the lease no longer ``R`` (a slow racer, after the winner has finished), never
  writes the lease: it refuses, naming the winner.  A dead lease is never deleted first.
* the holder's heartbeat notices a lease that is no longer its own (:meth:`WriterLease.check` raises before the
  next commit); a lease deleted under it (``create_store(overwrite=True)`` deletes the path) is created again.

On fsspec stores other than S3 and ``memory://``, create-if-absent may not be atomic: a read-back after a short pause
makes a lost race unlikely there, not impossible.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator

from fpo_dist.store.schema import StoreError, StoreLockedError

LEASE_KEY = "fpo_writer_lease.json"
HEARTBEAT_S = 10.0  # the holder advances its record this often (FPO_LEASE_HEARTBEAT_S)
STALE_AFTER_S = 120.0  # a lease of unknown liveness is dead only if unchanged while watched this long (FPO_LEASE_STALE_S)
_CLAIM_GRACE_S = 2.0  # a racer that lost the claim waits this long for the winner's record before naming the claim
_CONFIRM_S = 0.3  # read-back pause where create-if-absent is not atomic
_ATOMIC_CREATE = {"s3", "s3a", "memory"}  # fsspec protocols whose create-if-absent is atomic


def is_lease_file(name: str) -> bool:
    """True for the lease, its takeover claims and their temporary files (none of them make a store path "used")."""
    return name.startswith(LEASE_KEY)


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise StoreError(f"{env}={raw!r}: expected a number of seconds > 0")
    return value


def heartbeat_s() -> float:
    return _seconds("FPO_LEASE_HEARTBEAT_S", HEARTBEAT_S)


def stale_after_s() -> float:
    return _seconds("FPO_LEASE_STALE_S", STALE_AFTER_S)


# --------------------------------------------------------------------------------------------- who and where


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time in clock ticks since boot)`` from ``/proc/PID/stat``, None if there is no such pid."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    try:
        rest = text.rsplit(")", 1)[1].split()
        return rest[0], rest[19]
    except IndexError:
        return None


def _proc_start(pid: int) -> str | None:
    """The process's start time (``/proc/PID/stat`` field 22), None if it is not running (or is a zombie)."""
    st = _proc_stat(pid)
    return None if st is None or st[0] in ("Z", "X") else st[1]


def _pid_ns() -> str | None:
    """This process's pid namespace (``pid:[inode]``), None where ``/proc`` is not this namespace's (then no pid of
    ``/proc`` can be trusted)."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
        own = _read("/proc/self/stat")
        return ns if own is not None and int(own.split()[0]) == os.getpid() else None
    except (OSError, ValueError):
        return None


def host_identity() -> dict:
    """Where this process's pids mean something: ``{"host", "boot_id", "pid_ns"}`` (``boot_id``/``pid_ns`` None
    where unknown; then this process judges no lease by its pid)."""
    return {"host": socket.gethostname(), "boot_id": _read("/proc/sys/kernel/random/boot_id"), "pid_ns": _pid_ns()}


@dataclass(frozen=True)
class LeaseInfo:
    host: str
    boot_id: str | None
    pid_ns: str | None
    pid: int
    pid_start: str | None
    started_at: str
    heartbeat: float  # the holder's wall clock: shown, never compared
    beat: int
    heartbeat_s: float
    token: str

    @classmethod
    def parse(cls, raw: bytes) -> LeaseInfo:
        """The record in ``raw``; an unreadable or foreign one becomes a record of an unknown holder (watched)."""
        def opt(v) -> str | None:
            return None if v is None else str(v)

        try:
            d = json.loads(raw)
            return cls(str(d["host"]), opt(d.get("boot_id")), opt(d.get("pid_ns")), int(d["pid"]),
                       opt(d.get("pid_start")), str(d.get("started_at", "?")), float(d.get("heartbeat", 0.0)),
                       int(d.get("beat", 0)), float(d.get("heartbeat_s", HEARTBEAT_S)), str(d["token"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            return cls("?", None, None, -1, None, "?", 0.0, 0, HEARTBEAT_S, "?")

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started_at}"

    def watch_s(self, stale_s: float) -> float:
        """How long an unchanged record must be watched before it counts as dead: at least three of its beats."""
        beat = self.heartbeat_s if 0 < self.heartbeat_s <= 3600 else HEARTBEAT_S  # NaN: the default
        return max(stale_s, 3 * beat)


def judge(info: LeaseInfo, here: dict | None = None) -> tuple[bool | None, str]:
    """``(alive, why)``: True/False when ``info`` was written in this host's pid namespace (its pid decides), None
    when it was not (or that is unknown) and only watching its record can tell."""
    here = host_identity() if here is None else here
    if info.boot_id is None or info.pid_ns is None or here["boot_id"] is None or here["pid_ns"] is None:
        return None, "it does not record a host and pid namespace this process can check"
    if (info.boot_id, info.pid_ns) != (here["boot_id"], here["pid_ns"]):
        other = "another host" if info.boot_id != here["boot_id"] else f"another pid namespace ({info.pid_ns})"
        return None, f"it was written on {other}"
    start = _proc_start(info.pid)
    if start is None:
        return False, f"pid {info.pid} is not running on this host"
    if info.pid_start is not None and start != info.pid_start:
        return False, f"pid {info.pid} is now another process"
    return True, f"pid {info.pid} is running on this host"


# --------------------------------------------------------------------------------------------- key access


class _LocalKeys:
    """The store directory: atomic replace (rename) and create-if-absent (``link``)."""

    def __init__(self, root: str):
        self.root = root

    def url(self, key: str) -> str:
        return os.path.join(self.root, key)

    def get(self, key: str) -> bytes | None:
        try:
            with open(self.url(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _tmp(self, key: str, data: bytes) -> str:
        os.makedirs(self.root, exist_ok=True)
        tmp = self.url(f"{key}.{uuid.uuid4().hex}.partial")
        with open(tmp, "wb") as f:
            f.write(data)
        return tmp

    def put(self, key: str, data: bytes) -> None:
        tmp = self._tmp(key, data)
        try:
            os.replace(tmp, self.url(key))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def create(self, key: str, data: bytes) -> bool:
        tmp = self._tmp(key, data)
        try:
            os.link(tmp, self.url(key))
            return True
        except FileExistsError:  # on NFS a retransmitted LINK may say EEXIST although it was ours: count the links
            return os.stat(tmp).st_nlink == 2
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.url(key))


class _FsspecKeys:
    """An fsspec URL: create-if-absent is ``pipe_file(mode="create")`` (``If-None-Match: *`` with s3fs)."""

    def __init__(self, url: str, storage_options: dict | None):
        from fsspec.core import url_to_fs

        self.fs, self.root = url_to_fs(url, **(storage_options or {}))
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.atomic = bool(_ATOMIC_CREATE.intersection(protocols))
        self._url = url.rstrip("/")

    def url(self, key: str) -> str:
        return f"{self._url}/{key}"

    def _path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"

    def get(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(key), data)

    def create(self, key: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self._path(key), data, mode="create")
        except FileExistsError:
            return False
        if self.atomic:
            return True
        time.sleep(_CONFIRM_S)  # not atomic here: the last of two racing writers is the one that reads itself back
        return self.get(key) == data

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(key))


def _keys(path: str, storage_options: dict | None):
    if "://" not in path:
        return _LocalKeys(path)
    keys = _FsspecKeys(path, storage_options)
    from fsspec.implementations.local import LocalFileSystem

    return _LocalKeys(keys.root) if isinstance(keys.fs, LocalFileSystem) else keys


# --------------------------------------------------------------------------------------------- the lease


class WriterLease:
    """The lease a cache driver holds on a store (see the module docstring).  Use :func:`acquire_lease`."""

    def __init__(self, path: str, storage_options: dict | None = None, log: Callable[[str], None] = print,
                 stale_s: float | None = None):
        self.path, self.log = path, log
        self.stale_s = stale_after_s() if stale_s is None else stale_s
        self._keys = _keys(path, storage_options)
        here = host_identity()
        self.info = LeaseInfo(here["host"], here["boot_id"], here["pid_ns"], os.getpid(), _proc_start(os.getpid()),
                              _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), time.time(), 0,
                              heartbeat_s(), uuid.uuid4().hex)
        self.lost: LeaseInfo | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> LeaseInfo | None:
        raw = self._keys.get(LEASE_KEY)
        return None if raw is None else LeaseInfo.parse(raw)

    def _record(self) -> bytes:
        self.info = replace(self.info, heartbeat=time.time(), beat=self.info.beat + 1)
        return self.info.to_bytes()

    # ------------------------------------------------------------------ taking it

    def acquire(self) -> WriterLease:
        for _ in range(5):  # a lease released or replaced while this job decided is looked at again
            raw = self._keys.get(LEASE_KEY)
            if raw is None:
                if self._keys.create(LEASE_KEY, self._record()):
                    return self._start()
                continue
            held = LeaseInfo.parse(raw)
            alive, why = judge(held)
            if alive:
                raise self._locked(held)
            if alive is None:
                wait = held.watch_s(self.stale_s)
                self.log(f"the store's writer lease is held by another cache job ({held.describe()}); {why}, so its "
                         f"heartbeat is watched for up to {wait:.0f} s (FPO_LEASE_STALE_S) before it is taken over")
                now = self._watch(raw, wait)
                if now is None:
                    continue
                if now != raw:
                    raise self._locked(LeaseInfo.parse(now), "its heartbeat advanced while this job watched")
                why = f"its heartbeat did not advance in {wait:.0f} s"
            self.log(f"taking over the writer lease of a dead cache job ({held.describe()}: {why})")
            if self._take_over(raw):
                return self._start()
        now = self.read()
        raise StoreLockedError(f"cache store {self.path}: the writer lease kept changing while this job tried to "
                               f"take it ({now.describe() if now else 'now free'}); run one job per store, then rerun")

    def _watch(self, raw: bytes, wait: float) -> bytes | None:
        """The lease's bytes as soon as they differ from ``raw`` (None: deleted), else ``raw`` after ``wait`` s."""
        step = max(0.05, min(1.0, wait / 20))
        deadline = time.monotonic() + wait
        while True:
            now = self._keys.get(LEASE_KEY)
            if now != raw or time.monotonic() >= deadline:
                return now
            time.sleep(min(step, max(0.0, deadline - time.monotonic())))

    def _take_over(self, raw: bytes) -> bool:
        """Replace the dead lease ``raw`` by this job's, unless another racer does first (then raise, naming it).
        False when the lease vanished meanwhile (look again)."""
        claim = f"{LEASE_KEY}.takeover-{hashlib.sha256(raw).hexdigest()[:24]}"
        mine = self._record()
        if not self._keys.create(claim, mine):
            deadline = time.monotonic() + _CLAIM_GRACE_S
            while (now := self._keys.get(LEASE_KEY)) == raw and time.monotonic() < deadline:
                time.sleep(0.05)  # the claim's owner is writing its record
            if now is None:
                return False
            if now != raw:
                raise self._lost_race(LeaseInfo.parse(now))
            claimer = self._keys.get(claim)
            who = LeaseInfo.parse(claimer).describe() if claimer is not None else "unknown"
            raise StoreLockedError(
                f"cache store {self.path}: another cache job is taking over the writer lease ({who}); run one job per "
                f"store — if no job is running on it, a takeover was interrupted: delete {self._keys.url(claim)} "
                "and rerun")
        try:
            now = self._keys.get(LEASE_KEY)
            if now != raw:  # a racer that finished before this claim existed: its lease stays
                if now is None:
                    return False
                raise self._lost_race(LeaseInfo.parse(now))
            self._keys.put(LEASE_KEY, mine)
        finally:
            self._keys.delete(claim)
        return True

    def _locked(self, held: LeaseInfo, seen: str | None = None) -> StoreLockedError:
        return StoreLockedError(
            f"cache store {self.path} is being written by another cache job ({held.describe()}"
            f"{'; ' + seen if seen else ''}): wait for it to finish, or stop it; a dead job's lease is taken over by "
            f"the next run (same host and pid namespace: at once; elsewhere: once its heartbeat has not advanced for "
            f"{held.watch_s(self.stale_s):.0f} s)")

    def _lost_race(self, winner: LeaseInfo) -> StoreLockedError:
        return StoreLockedError(f"cache store {self.path}: another cache job took over the writer lease first "
                                f"({winner.describe()}); run one job per store")

    def _start(self) -> WriterLease:
        self._thread = threading.Thread(target=self._beat, name="fpo-store-lease", daemon=True)
        self._thread.start()
        return self

    # ------------------------------------------------------------------ holding it

    def beat(self) -> None:
        """Advance the record; create it again if it vanished (overwrite); note a lease lost to another job."""
        with self._lock:
            raw = self._keys.get(LEASE_KEY)
            held = None if raw is None else LeaseInfo.parse(raw)
            if held is not None and held.token != self.info.token:
                self.lost = held
            elif held is not None:
                self._keys.put(LEASE_KEY, self._record())
            elif not self._keys.create(LEASE_KEY, self._record()):
                self.lost = self.read()

    def _beat(self) -> None:
        while not self._stop.wait(self.info.heartbeat_s):
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
            with self._lock:
                held = self.read()
                if held is not None and held.token == self.info.token:
                    self._keys.delete(LEASE_KEY)
        except Exception as e:  # noqa: BLE001 — a leftover lease of a dead pid is taken over by the next run
            self.log(f"could not release the writer lease of {self.path}: {e!r}")

    def __enter__(self) -> WriterLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_lease(path: str, storage_options: dict | None = None, log: Callable[[str], None] = print,
                  stale_s: float | None = None) -> WriterLease:
    """Take the writer lease of the store at ``path`` (before planning), or raise :class:`StoreLockedError`.
    ``stale_s``: how long a lease of unknown liveness is watched (default ``FPO_LEASE_STALE_S`` or
    :data:`STALE_AFTER_S`)."""
    return WriterLease(str(path), storage_options, log, stale_s).acquire()


@contextlib.contextmanager
def keep_lease(path: str, storage_options: dict | None, active: bool = True) -> Iterator[None]:
    """Put the lease file back after the block (``create_store(overwrite=True)`` deletes the whole path)."""
    if not active:
        yield
        return
    keys = _keys(path, storage_options)
    try:
        saved = keys.get(LEASE_KEY)
    except FileNotFoundError:
        saved = None
    yield
    if saved is not None:
        keys.put(LEASE_KEY, saved)
