"""Test helper: the sockets a process tree really listens on, read from outside it (``ss``), for the loopback tests.

``ss -H -ltunp`` lists every listening TCP socket and bound UDP socket of a network namespace with the processes
holding it; a process in another network namespace (the local SLURM cluster's) is looked at with
``nsenter --net=/proc/PID/ns/net ss …``.  A socket is *exposed* if its address is not loopback (``*``, ``0.0.0.0``,
``[::]`` or an interface address) and its namespace has an interface other than ``lo`` (names from
``/proc/PID/net/dev``): only then can anything outside this machine reach it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

_USER = re.compile(r'\("([^"]*)",pid=(\d+),fd=\d+\)')


@dataclass(frozen=True)
class Listener:
    pid: int
    comm: str
    proto: str
    address: str  # as ss prints it: 127.0.0.1, *, 0.0.0.0, ::ffff:127.0.0.1, ::
    port: int
    netns: int  # inode of the process's network namespace
    interfaces: tuple[str, ...]  # of that namespace

    @property
    def loopback(self) -> bool:
        host = self.address.split("%", 1)[0]
        if host in ("*", ""):
            return False
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        mapped = getattr(ip, "ipv4_mapped", None)
        return (mapped or ip).is_loopback

    @property
    def exposed(self) -> bool:
        return not self.loopback and any(i != "lo" for i in self.interfaces)

    def __str__(self) -> str:
        where = "" if self.netns == own_netns() else f" in netns {self.netns} {list(self.interfaces)}"
        return f"{self.comm}[{self.pid}] {self.proto} {self.address}:{self.port}{where}"


def own_netns() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def descendants(*roots: int) -> set[int]:
    """``roots`` and every live descendant of them (from /proc)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = set(), [r for r in roots if r in parent]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += [c for c, pp in parent.items() if pp == p]
    return out


def _interfaces(pid: int) -> tuple[str, ...]:
    lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    return tuple(sorted(line.split(":", 1)[0].strip() for line in lines))


def listeners(pids: set[int]) -> list[Listener]:
    """Every listening socket held by one of ``pids``, in whichever network namespace each process is."""
    by_ns: dict[int, int] = {}  # netns inode -> one pid in it
    for pid in pids:
        try:
            by_ns.setdefault(os.stat(f"/proc/{pid}/ns/net").st_ino, pid)
        except OSError:  # gone
            pass
    found = []
    for ns, pid in by_ns.items():
        try:
            interfaces = _interfaces(pid)
        except OSError:
            continue
        cmd = ["ss", "-H", "-ltunp"]
        if ns != own_netns():
            cmd = ["nsenter", f"--net=/proc/{pid}/ns/net", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
        for line in out.splitlines():
            fields = line.split()
            if len(fields) < 6:
                continue
            host, _, port = fields[4].rpartition(":")
            for comm, holder in _USER.findall(line):
                if int(holder) in pids:
                    found.append(Listener(int(holder), comm, fields[0], host.strip("[]"), int(port), ns, interfaces))
    return found


def beyond_loopback(pids: set[int]) -> list[str]:
    """The listening sockets of ``pids`` bound to anything but a loopback address, whatever their namespace (the
    suite runs in a private one, where :func:`exposed` holds for any socket: the servers that have a bind option —
    Ray's on 127.0.0.1, moto — are held to their address with this)."""
    return sorted({str(s) for s in listeners(pids) if not s.loopback})


def exposed(pids: set[int]) -> list[str]:
    """The listening sockets of ``pids`` that something outside this machine could reach (should be none)."""
    return sorted({str(s) for s in listeners(pids) if s.exposed})
