"""No orphans: the local Ray instance a cache driver starts does not outlive the driver, however it dies.

Ray's head processes (GCS, raylet, and the agents the raylet spawns: ``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``, …) are the driver's descendants, but a driver killed by SIGKILL runs no cleanup, and some
of them outlive it as orphans.  So the driver starts a small watchdog right after ``ray.init`` (:func:`watch`):

* the watchdog runs in its own session (a ``killpg`` of the driver's group does not take it down with the rest);
* it is told the root pids (the driver's children that appeared during ``ray.init``) and, every
  :data:`POLL_S` seconds, records them and all their descendants with their start times (``/proc/PID/stat``);
* the driver holds the write end of a pipe to the watchdog's stdin and never writes to it again: when the driver
  ends — normally, by an exception, or by any signal — the kernel closes it, the watchdog reads EOF, stops every
  recorded process still alive with the same start time (so a reused pid is never hit), first with SIGSTOP (so no
  one can spawn more), re-reads their children, then SIGKILLs all of them, and exits;
* it also exits when every recorded process has ended (``ray.shutdown()`` in a long-lived driver).

Linux only (``/proc``); elsewhere :func:`watch` does nothing.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

POLL_S = 0.5
_watchdogs: list[subprocess.Popen] = []  # kept alive: the pipe's write end closes when the driver's process ends


def _stat(pid: int) -> tuple[int, str] | None:
    """``(ppid, start time)`` of a running process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[19]
    except (OSError, IndexError, ValueError):
        return None


def _all() -> dict[int, tuple[int, str]]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None:
                out[int(d)] = st
    return out


def children(pid: int) -> set[int]:
    """The current children of ``pid``."""
    return {p for p, (ppid, _) in _all().items() if ppid == pid}


def _descendants(tracked: dict[int, str]) -> dict[int, str]:
    """``tracked`` (pid -> start time, still alive with that start time) plus every descendant of those."""
    procs = _all()
    alive = {p: s for p, s in tracked.items() if p in procs and procs[p][1] == s}
    grew = True
    while grew:
        new = {p: st for p, (ppid, st) in procs.items() if ppid in alive and p not in alive}
        alive.update(new)
        grew = bool(new)
    return alive


def _kill_all(tracked: dict[int, str]) -> None:
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        tracked = _descendants(tracked)
        for pid in tracked:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def watch(roots: set[int]) -> None:
    """Start the watchdog for the processes ``roots`` (and their descendants) of this process."""
    if not roots or not os.path.isdir("/proc"):
        return
    proc = subprocess.Popen([sys.executable, "-m", "fpo_dist.cache.reaper", *map(str, sorted(roots))],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)
    _watchdogs.append(proc)


def main(argv: list[str]) -> int:
    tracked = {pid: st[1] for pid in map(int, argv) if (st := _stat(pid)) is not None}
    while True:
        tracked = _descendants(tracked)
        if not tracked:
            return 0  # everything it watched has ended (ray.shutdown): nothing left to guard
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):  # EOF: the driver is gone
            deadline = time.time() + 10
            while tracked and time.time() < deadline:
                _kill_all(tracked)
                time.sleep(0.1)
                tracked = _descendants(tracked)
            return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the driver's terminal must not end the watchdog
    sys.exit(main(sys.argv[1:]))
