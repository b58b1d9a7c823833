"""Phase 1: the offline reference cache (``python -m fpo_dist.cache``).

``driver`` plans shards and runs Ray actors; ``worker`` holds the frozen reference model + SAE;
``verify`` recomputes sampled rows to check a store.  Ray is imported only when a job runs.
"""

# The node address of a Ray instance this project starts on one machine (the driver's local instance, the demo's and
# the tests' heads): loopback, but not 127.0.0.1 — Ray rewrites exactly 127.0.0.1/localhost to the machine's
# interface address (ray._private.services.resolve_ip_for_localhost), which would take the traffic off loopback.
LOOPBACK_NODE_IP = "127.0.0.2"
