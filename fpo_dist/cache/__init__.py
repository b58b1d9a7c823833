"""Phase 1: the offline reference cache (``python -m fpo_dist.cache``).

``driver`` plans shards and runs Ray actors; ``worker`` holds the frozen reference model + SAE;
``verify`` recomputes sampled rows to check a store.  Ray is imported only when a job runs.

Every Ray instance this project starts on one machine (the cache driver's local instance, the demo's head, the
tests' and the bench's) listens on loopback only.  Ray 2.60 has no bind-address setting: each of its servers (GCS,
raylet, object manager, core workers' gRPC servers, dashboard agent, runtime-env agent, metrics exporter, autoscaler
monitor) listens on 127.0.0.1 if the node address is exactly ``127.0.0.1``, and on every interface otherwise
(C++ ``listen_to_localhost_only = node_ip_address == "127.0.0.1"``; Python ``is_localhost(node_ip)``).  But Ray
rewrites a node address of 127.0.0.1 to the machine's interface address (``resolve_ip_for_localhost``) unless it
runs in its single-node mode, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the default on macOS and Windows).  So a local
instance gets node address 127.0.0.1 and that mode (:data:`LOCAL_RAY_ENV`) while it starts; its processes inherit it.
That mode refuses ``ray start --address`` (a second node): multi-node Ray on one machine (the local SLURM cluster)
runs in a private network namespace instead (cluster/local/slurm-cluster.sh).
"""

from __future__ import annotations

import os
from pathlib import Path

LOOPBACK_NODE_IP = "127.0.0.1"
# the environment of a single-node Ray instance (and of everything started from it): node address 127.0.0.1 kept
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def init_local_ray(**kwargs):
    """``ray.init(address="local", **kwargs)`` with every server of the new instance listening on 127.0.0.1 only;
    returns the ``ray`` module.  Ray's token authentication stays at Ray's default (on for a new local instance).

    Where Ray creates its default token file (``~/.ray/auth_token``, with the umask's mode, often 0644) this makes it
    0600: other users of the machine can reach loopback, and the token is what keeps them out.
    The single-node mode is switched on for the start only (its processes inherit it) and this process's setting is
    restored afterwards, so a later ``ray start --address`` started from here is unaffected.  Raises RuntimeError
    (after shutting the instance down) if Ray nevertheless chose another node address.
    """
    import ray
    from ray._private import ray_constants  # read once at import: set for the start as the environment says

    saved_env = {k: os.environ.get(k) for k in LOCAL_RAY_ENV}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    token_file = Path.home() / ".ray" / "auth_token"
    had_token = token_file.exists()
    os.environ.update(LOCAL_RAY_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", _node_ip_address=LOOPBACK_NODE_IP, **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not had_token and token_file.exists():
        token_file.chmod(0o600)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK_NODE_IP:
        ray.shutdown()
        raise RuntimeError(f"the local Ray instance took node address {node_ip}, not {LOOPBACK_NODE_IP}: its servers "
                           "would listen on every interface (this Ray version ignores RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER)")
    return ray
