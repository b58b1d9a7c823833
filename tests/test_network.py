"""Where the suite's servers can be reached from: the suite runs in a private network namespace (tests/conftest.py)."""

from __future__ import annotations

import os
import sys

import conftest
import pytest


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0 or os.environ.get("FPO_TEST_NETNS") == "0",
                    reason="the private namespace needs root on Linux; elsewhere the run's last lines name the fallback")
def test_a_server_without_a_bind_option_is_reachable_from_nowhere_else():
    """torch's TCPStore (the rendezvous of every DeepSpeed/torchrun run here) listens on every interface; read from
    outside with ``ss``, its socket is there — and its namespace has no interface but ``lo``."""
    from datetime import timedelta

    import torch.distributed as dist
    from listening import listeners

    assert conftest.NETNS_NOTE is None
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=30))
    try:
        socks = [s for s in listeners({os.getpid()}) if s.port == store.port]
        assert socks, "the store's listening socket was not seen"
        assert all(not s.loopback for s in socks)  # it binds every interface: the namespace is what protects it
        assert all(s.interfaces == ("lo",) and not s.exposed for s in socks), [str(s) for s in socks]
    finally:
        del store
