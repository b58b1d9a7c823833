"""Benchmarks of what FPO exists for (run with ``python -m bench.run``; see bench/README.md)."""
