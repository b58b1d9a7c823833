"""Phase 1: the offline reference cache (``python -m fpo_dist.cache``).

``driver`` plans shards and runs Ray actors; ``worker`` holds the frozen reference model + SAE;
``verify`` recomputes sampled rows to check a store.  Ray is imported only when a job runs.
"""
