"""The writer lease (fpo_dist/store/lease.py) against real processes: what a live job cannot lose.

* two processes race to take one dead lease (a killed holder's, and another host's that stopped beating), on a local
  directory and on moto's S3 server: in every round exactly one wins, the loser refuses naming the winner, and the
  store holds the winner's record;
* a live lease whose wall-clock heartbeat is far in the past or future (a skewed clock) is not taken while its record
  advances; once it stops, it is taken after the watch, whatever its timestamp says;
* a holder with this hostname in another pid namespace (a second container: ``unshare --pid``) is not judged by this
  process's pid table;
* a dead holder on this host and pid namespace (killed, even a not yet reaped zombie) is taken at once: no watch;
* a racer stopped between deciding to take a dead lease and taking it, while another racer takes it, refuses on
  resuming and leaves the winner's record (the slow racer of delete-then-create).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from test_s3 import BUCKET, s3  # noqa: F401 — moto's S3 server on 127.0.0.1 (module fixture)

from fpo_dist.store import StoreLockedError, acquire_lease
from fpo_dist.store.lease import LEASE_KEY, host_identity, is_lease_file

ROOT = Path(__file__).resolve().parents[1]

# A process that takes leases.  stdin line 1: {"paths", "options", "stale_s", "pause"}; it answers "ready".  Line 2:
# {"starts": [t, ...]}: at each wall time it tries paths[i] and prints one JSON line.  With "pause", it stops when the
# lease code logs that it takes over a dead lease (decided, not yet written), says "paused" and waits for a line.
# It holds what it won until stdin closes.
_RACER = r"""
import json, sys, time
from fpo_dist.store import StoreLockedError, acquire_lease
cfg = json.loads(sys.stdin.readline())
print("ready", flush=True)
starts = json.loads(sys.stdin.readline())["starts"]

def log(msg):
    if cfg.get("pause") and msg.startswith("taking over"):
        print("paused", flush=True)
        sys.stdin.readline()

held = []
for path, t in zip(cfg["paths"], starts):
    while time.time() < t:
        time.sleep(min(0.01, max(0.0, t - time.time())))
    try:
        lease = acquire_lease(path, cfg["options"], log=log, stale_s=cfg["stale_s"])
        held.append(lease)
        print(json.dumps({"won": True, "token": lease.info.token}), flush=True)
    except StoreLockedError as e:
        print(json.dumps({"won": False, "error": str(e)}), flush=True)
sys.stdin.read()
for lease in held:
    lease.release()
"""

# A holder: takes the lease of every path given on stdin, answers "ready", beats until killed.
_HOLDER = r"""
import json, sys, time
from fpo_dist.store import acquire_lease
cfg = json.loads(sys.stdin.readline())
leases = [acquire_lease(p, cfg["options"], log=lambda *_: None) for p in cfg["paths"]]
print(json.dumps({"tokens": [lease.info.token for lease in leases]}), flush=True)
time.sleep(3600)
"""

# Another host's live job: advances its record every 0.1 s, its wall clock `skew` seconds off.
_BEATER = r"""
import json, sys, time
path, skew = sys.argv[1], float(sys.argv[2])
rec = {"host": "other-host", "boot_id": "0" * 32, "pid_ns": "pid:[4026531836]", "pid": 4242, "pid_start": "7",
       "started_at": "2026-01-01T00:00:00+00:00", "heartbeat_s": 0.1, "token": "their-token", "beat": 0}
while True:
    rec["beat"] += 1
    rec["heartbeat"] = time.time() + skew
    with open(path + ".tmp", "w") as f:
        json.dump(rec, f)
    __import__("os").replace(path + ".tmp", path)
    time.sleep(0.1)
"""


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _spawn(script: str, *args: str, prefix: tuple[str, ...] = (), **env) -> subprocess.Popen:
    return subprocess.Popen([*prefix, sys.executable, "-c", script, *args], cwd=ROOT, env=_env(**env), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process group ``proc`` leads (its own session), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _send(proc: subprocess.Popen, obj) -> None:
    proc.stdin.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
    proc.stdin.flush()


def _kill_holder_of(backend: _Store, names: list[str]) -> None:
    """A real holder on this host takes the leases of ``names`` and is killed holding them: they stay behind."""
    holder = _spawn(_HOLDER)
    try:
        _send(holder, {"paths": [backend.url(n) for n in names], "options": backend.options})
        assert len(json.loads(holder.stdout.readline())["tokens"]) == len(names)
    finally:
        _kill(holder)


def _other_host_record(**over) -> bytes:
    rec = {"host": "other-host", "boot_id": "f" * 32, "pid_ns": "pid:[4026531836]", "pid": 4242, "pid_start": "7",
           "started_at": "2026-01-01T00:00:00+00:00", "heartbeat": time.time(), "beat": 9, "heartbeat_s": 0.1,
           "token": uuid.uuid4().hex, **over}
    return json.dumps(rec).encode()


class _Store:
    """Read/write lease files from outside the code under test: a local directory or a bucket prefix (s3fs)."""

    def __init__(self, root: str, fs=None, options=None):
        self.root, self.fs, self.options = root, fs, options

    def url(self, name: str) -> str:
        return f"s3://{self.root}/{name}" if self.fs else str(Path(self.root) / name)

    def write(self, name: str, data: bytes) -> None:
        if self.fs:
            self.fs.pipe_file(f"{self.root}/{name}/{LEASE_KEY}", data)
        else:
            (Path(self.root) / name).mkdir(parents=True, exist_ok=True)
            (Path(self.root) / name / LEASE_KEY).write_bytes(data)

    def read(self, name: str) -> bytes | None:
        try:
            return (self.fs.cat_file(f"{self.root}/{name}/{LEASE_KEY}") if self.fs
                    else (Path(self.root) / name / LEASE_KEY).read_bytes())
        except FileNotFoundError:
            return None

    def names(self, name: str) -> list[str]:
        if self.fs:
            self.fs.invalidate_cache()
            return sorted(p.rsplit("/", 1)[1] for p in self.fs.ls(f"{self.root}/{name}", detail=False))
        return sorted(p.name for p in (Path(self.root) / name).iterdir())


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    if request.param == "local":
        return _Store(str(tmp_path))
    moto = request.getfixturevalue("s3")
    return _Store(f"{BUCKET}/lease-{uuid.uuid4().hex[:8]}", moto["fs"], moto["options"])


# --------------------------------------------------------------------------------------------- racing


@pytest.mark.slow
def test_two_processes_racing_for_a_dead_lease_exactly_one_wins(backend):
    """Rounds 0-3: a killed holder's lease (same host: both racers take it at once).  Rounds 4-5: another host's
    lease that stopped beating (both watch it for 1 s, then both try).  Two racer processes, released together."""
    dead, frozen = [f"dead{i}" for i in range(4)], [f"frozen{i}" for i in range(2)]
    _kill_holder_of(backend, dead)
    for n in frozen:
        backend.write(n, _other_host_record())
    names = dead + frozen
    cfg = json.dumps({"paths": [backend.url(n) for n in names], "options": backend.options, "stale_s": 1.0})
    racers = [_spawn(_RACER) for _ in range(2)]
    try:
        for r in racers:
            _send(r, cfg)
        assert all(r.stdout.readline().strip() == "ready" for r in racers)
        t0 = time.time() + 0.5
        starts = json.dumps({"starts": [t0 + 0.5 * i for i in range(len(dead))]
                             + [t0 + 0.5 * len(dead) + 2.0 * i for i in range(len(frozen))]})
        for r in racers:
            _send(r, starts)
        results = [[json.loads(r.stdout.readline()) for _ in names] for r in racers]
        wins = []
        for i, name in enumerate(names):
            a, b = results[0][i], results[1][i]
            assert a["won"] != b["won"], (name, a, b)  # exactly one winner
            w = 0 if a["won"] else 1
            winner, loser = results[w][i], results[1 - w][i]
            wins.append(w)
            assert "\n" not in loser["error"] and f"pid {racers[w].pid}, started " in loser["error"], loser
            assert ("took over the writer lease first" in loser["error"]
                    or "is being written by another cache job" in loser["error"]), loser
            record = json.loads(backend.read(name))
            assert record["token"] == winner["token"] and record["pid"] == racers[w].pid
            assert backend.names(name) == [LEASE_KEY], backend.names(name)  # no claim left behind
        print(f"{'s3' if backend.fs else 'local'}: winners by round {wins}")
    finally:
        for r in racers:
            _kill(r)


@pytest.mark.slow
def test_a_racer_paused_after_its_decision_never_replaces_the_winner(backend):
    """The slow racer of delete-then-create, from outside: racer S decides to take a dead lease and is stopped right
    there (its log hook blocks); racer W then takes the lease; S resumes.  S refuses, naming W, and W's record
    stays (the old protocol deleted it and wrote S's)."""
    _kill_holder_of(backend, ["store"])
    slow, fast = _spawn(_RACER), _spawn(_RACER)
    try:
        for r, pause in ((slow, True), (fast, False)):
            _send(r, {"paths": [backend.url("store")], "options": backend.options, "stale_s": 1.0, "pause": pause})
            assert r.stdout.readline().strip() == "ready"
        _send(slow, {"starts": [0]})
        assert slow.stdout.readline().strip() == "paused"
        _send(fast, {"starts": [0]})
        won = json.loads(fast.stdout.readline())
        assert won["won"] and json.loads(backend.read("store"))["token"] == won["token"]
        _send(slow, "go")
        lost = json.loads(slow.stdout.readline())
        assert not lost["won"] and "took over the writer lease first" in lost["error"], lost
        assert f"pid {fast.pid}, started " in lost["error"] and "\n" not in lost["error"], lost
        assert json.loads(backend.read("store"))["token"] == won["token"]
        assert backend.names("store") == [LEASE_KEY]
    finally:
        for r in (slow, fast):
            _kill(r)


def test_an_interrupted_takeover_is_named_with_what_to_do(tmp_path, monkeypatch):
    """A takeover that died after its claim (the claim stays, the lease is still the dead one): the next job refuses,
    naming the claim's owner and the file to delete; the dead lease is not written."""
    import hashlib

    import fpo_dist.store.lease as lease_mod

    path = tmp_path / "store"
    path.mkdir()
    stale = _other_host_record()
    (path / LEASE_KEY).write_bytes(stale)
    claim = path / f"{LEASE_KEY}.takeover-{hashlib.sha256(stale).hexdigest()[:24]}"
    claim.write_bytes(_other_host_record(host="claimer-host", pid=77))
    monkeypatch.setattr(lease_mod, "_CLAIM_GRACE_S", 0.2)
    with pytest.raises(StoreLockedError, match=rf"\(host claimer-host, pid 77, .*a takeover was interrupted: delete "
                                               rf"{claim} and rerun"):
        acquire_lease(str(path), log=lambda *_: None, stale_s=0.3)
    assert (path / LEASE_KEY).read_bytes() == stale


# --------------------------------------------------------------------------------------------- liveness


@pytest.mark.parametrize("skew", [-1e6, 1e6], ids=["clock-behind", "clock-ahead"])
def test_a_live_lease_with_a_skewed_clock_is_kept_while_it_beats(tmp_path, skew):
    """Its wall-clock heartbeat is 11 days off ours: only whether its record advances counts.  Beating: refused
    (the old rule took a lease 'silent' for 120 s at once when behind).  Stopped: taken after the watch (the old rule
    never took one stamped ahead)."""
    path = tmp_path / "store"
    path.mkdir()
    beater = subprocess.Popen([sys.executable, "-c", _BEATER, str(path / LEASE_KEY), str(skew)],
                              start_new_session=True)
    try:
        deadline = time.time() + 30
        while not (path / LEASE_KEY).exists() and time.time() < deadline:
            time.sleep(0.05)
        logs: list[str] = []
        t = time.monotonic()
        with pytest.raises(StoreLockedError) as err:
            acquire_lease(str(path), log=logs.append, stale_s=5.0)
        assert time.monotonic() - t < 4.0  # refused as soon as the record moved, not after the whole watch
        msg = str(err.value)
        assert "\n" not in msg and "host other-host, pid 4242" in msg and "heartbeat advanced" in msg, msg
        assert any("another host" in m and "watched" in m for m in logs), logs
    finally:
        _kill(beater)
    before = (path / LEASE_KEY).read_bytes()
    logs = []
    t = time.monotonic()
    lease = acquire_lease(str(path), log=logs.append, stale_s=1.0)
    waited = time.monotonic() - t
    try:
        assert 1.0 <= waited < 5.0, waited
        assert any("did not advance in 1 s" in m and "host other-host, pid 4242" in m for m in logs), logs
        assert (path / LEASE_KEY).read_bytes() != before
        assert json.loads((path / LEASE_KEY).read_bytes())["token"] == lease.info.token
    finally:
        lease.release()


def test_same_hostname_another_boot_or_pid_namespace_is_not_judged_by_our_pid_table(tmp_path):
    """Records with this hostname whose pid the local pid table would misjudge: a dead local pid (the old rule: taken
    at once) and this very process (the old rule: refused forever).  Both are watched, and taken only because they
    did not change."""
    here = host_identity()
    dead = subprocess.Popen(["true"])
    dead.wait()
    me = open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()[19]
    cases = {"other pid namespace, dead local pid": {"pid_ns": "pid:[1]", "pid": dead.pid, "pid_start": None},
             "other boot, this live pid": {"boot_id": "0" * 32, "pid": os.getpid(), "pid_start": me}}
    for name, over in cases.items():
        path = tmp_path / name.replace(" ", "_").replace(",", "")
        path.mkdir()
        (path / LEASE_KEY).write_bytes(_other_host_record(**{"host": here["host"], "boot_id": here["boot_id"],
                                                            "pid_ns": here["pid_ns"], **over}))
        logs: list[str] = []
        t = time.monotonic()
        acquire_lease(str(path), log=logs.append, stale_s=0.5).release()
        assert time.monotonic() - t >= 0.5, name  # watched: not judged by /proc
        assert any("did not advance" in m for m in logs), (name, logs)


def _unshare_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare --pid` (root, or user namespaces)")
def test_a_live_job_in_another_container_with_this_hostname_keeps_its_lease(tmp_path):
    """A real holder in its own pid namespace (``unshare --pid --mount-proc``; same kernel, same hostname): its record
    says pid 1, which here is another live process (the old rule: 'pid 1 is now another process', taken at once).
    While it beats, refused; killed, its record is taken after the watch."""
    path = tmp_path / "store"
    holder = _spawn(_HOLDER, prefix=("unshare", "--pid", "--fork", "--mount-proc"), FPO_LEASE_HEARTBEAT_S="0.2")
    try:
        _send(holder, {"paths": [str(path)], "options": None})
        token = json.loads(holder.stdout.readline())["tokens"][0]
        record = json.loads((path / LEASE_KEY).read_bytes())
        here = host_identity()
        assert record["token"] == token and record["host"] == here["host"] and record["boot_id"] == here["boot_id"]
        assert record["pid_ns"] != here["pid_ns"] and record["pid"] == 1
        logs: list[str] = []
        with pytest.raises(StoreLockedError, match=rf"host {here['host']}, pid 1, .*heartbeat advanced"):
            acquire_lease(str(path), log=logs.append, stale_s=3.0)
        assert any("another pid namespace" in m for m in logs), logs
    finally:
        _kill(holder)
    lease = acquire_lease(str(path), log=logs.append, stale_s=1.0)
    lease.release()
    assert any("did not advance" in m for m in logs), logs


def test_a_dead_holder_on_this_host_is_taken_at_once(tmp_path):
    """A real holder killed with SIGKILL — first while it is an unreaped zombie, then reaped — is taken without any
    watch, although the watch is set to 10 minutes."""
    paths = [str(tmp_path / "zombie"), str(tmp_path / "reaped")]
    holder = _spawn(_HOLDER)
    try:
        _send(holder, {"paths": paths, "options": None})
        json.loads(holder.stdout.readline())
        os.killpg(holder.pid, signal.SIGKILL)
        deadline = time.time() + 10
        while open(f"/proc/{holder.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.time() < deadline
            time.sleep(0.02)
        for path in paths:
            logs: list[str] = []
            t = time.monotonic()
            lease = acquire_lease(path, log=logs.append, stale_s=600)
            assert time.monotonic() - t < 5.0
            assert any(f"pid {holder.pid} is not running on this host" in m for m in logs), logs
            assert json.loads((Path(path) / LEASE_KEY).read_bytes())["token"] == lease.info.token
            lease.release()
            holder.wait(timeout=30)  # the second path: reaped
    finally:
        _kill(holder)


def test_lease_files_never_make_a_store_path_used():
    assert is_lease_file(LEASE_KEY) and is_lease_file(f"{LEASE_KEY}.takeover-ab12") and not is_lease_file("zarr.json")
