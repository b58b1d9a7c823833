"""A private network namespace: where the processes a local run starts can be reached by nothing else.

Some servers a local run starts have no bind-address option and listen on every interface: torch's rendezvous store
(``TCPStore``, behind DeepSpeed and torchrun) and Ray's agents when the node address is not exactly 127.0.0.1.  On
Linux, a new network namespace holding only ``lo`` leaves them nothing but loopback to listen on.  Two ways in:

- :func:`private_network_prefix`: a command prefix (``unshare --net``; ``--map-root-user`` unprivileged, where user
  namespaces are allowed) that runs a new process there — the demo re-executes itself through it;
- :func:`enter_private_network`: moves the calling process itself there (root only; the test suite does this before
  its first test, so every process it starts inherits the namespace).

Both bring ``lo`` up and give it 127.0.0.2 as well (``getaddrinfo`` with ``AI_ADDRCONFIG`` finds no usable address
where 127.0.0.1 is the only one).  Where neither is possible (not Linux, no ``unshare``/``ip``, no privilege), the
callers run on the host's network and say so.  Such a run can reach nothing beyond this machine: use it only for
work that reads and writes local files or loopback services.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

SETUP = "ip link set lo up && ip addr add 127.0.0.2/8 dev lo"
CLONE_NEWNET = 0x40000000


def private_network_prefix() -> list[str] | None:
    """The command prefix that runs a command in a new network namespace holding only ``lo`` (up), or None where this
    machine cannot make one (not Linux, no ``unshare``/``ip``, no privilege and no user namespaces)."""
    if sys.platform != "linux" or not (shutil.which("unshare") and shutil.which("ip")):
        return None
    prefix = ["unshare", "--net"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    try:
        ok = subprocess.run([*prefix, "sh", "-c", SETUP], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return [*prefix, "sh", "-c", SETUP + ' && exec "$0" "$@"'] if ok else None


def interfaces() -> list[str]:
    """The network interfaces of this process's namespace."""
    with open("/proc/self/net/dev") as f:
        return sorted(line.split(":", 1)[0].strip() for line in f.read().splitlines()[2:])


def enter_private_network() -> str | None:
    """Move this process into a new network namespace holding only ``lo`` (up, with 127.0.0.2): None on success (or
    when already in one), else why not.  Needs root (CAP_SYS_ADMIN); call it before any socket is opened."""
    if sys.platform != "linux":
        return "not Linux"
    if interfaces() == ["lo"]:
        return None
    if os.geteuid() != 0:
        return "not root (an unprivileged process cannot move itself into a new network namespace)"
    if not shutil.which("ip"):
        return "no `ip` command (iproute2) to bring the loopback interface up"
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    host = os.open("/proc/self/ns/net", os.O_RDONLY)  # to go back if the new namespace cannot be set up
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            return f"unshare(CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())}"
        p = subprocess.run(["sh", "-c", SETUP], capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            libc.setns(host, CLONE_NEWNET)
            return f"`{SETUP}` failed: {p.stderr.strip()}"
        return None
    finally:
        os.close(host)
