"""3. Loader overhead: streaming from Zarr (``CacheLoader``, prefetch 2) against the same micro-batches in memory.

A training-like loop per micro-batch: move it to the device, touch its tensors, then a fixed-cost compute
stand-in (square matmuls) calibrated to the real FPO step time per micro-batch measured in part 1, on the threads
one training rank has (CPU: cores / ranks).  Rounds alternate memory/streaming; the first micro-batch of each is
a warm-up (the prefetch thread's start), the rest are timed.  Wall time shows stalls (the consumer waiting for
data); process CPU time (prefetch thread included) shows the CPU the loader burns, which becomes wall time when
every core is busy, as in a CPU training run.  (The stand-in does not use every core itself: OpenMP matmuls
spread over cores that other processes also use slow down many-fold, which measures the host, not the loader.)
"""

from __future__ import annotations

import statistics
import time

import torch


class StandIn:
    """``n`` square matmuls of size ``dim``: calibrated so one call takes ``seconds``."""

    def __init__(self, seconds: float, device: str):
        self.device = device
        self.dim = 1024 if device == "cpu" else 8192
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        self.a = torch.randn(self.dim, self.dim, device=device, dtype=dtype)
        self.b = torch.randn(self.dim, self.dim, device=device, dtype=dtype)
        self.n = 4
        self.__call__()  # warm-up (thread pool, caches)
        self.n = max(1, round(seconds / self._per_matmul()))

    def _per_matmul(self, min_s: float = 1.0) -> float:
        """Seconds per matmul, timed over at least ``min_s`` (the median of 3 such timings)."""
        times = []
        for _ in range(3):
            calls, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < min_s / 3 or calls == 0:
                self.__call__()
                calls += 1
            times.append((time.perf_counter() - t0) / (calls * self.n))
        return statistics.median(times)

    def __call__(self) -> float:
        x = self.a
        for _ in range(self.n):
            x = torch.mm(x, self.b)
            x = x * (1.0 / self.dim**0.5)
        return float(x[0, 0])  # a host sync, as the trainer's loss.item()


def bench_loader(store: str, sizes, device: str, step_s: float, pad_id: int, nproc: int, log=print) -> dict:
    from bench.train import threads_per_rank
    from fpo_dist.loader import CacheLoader

    if device == "cpu":
        torch.set_num_threads(threads_per_rank(nproc))
    kwargs = dict(micro_batch_size=sizes.micro_batch, grad_accum=1, world_size=1, rank=0, seed=0, pad_id=pad_id)
    n = sizes.loader_steps
    with CacheLoader(store, prefetch=0, **kwargs) as loader:
        t0 = time.perf_counter()
        in_memory = [mb for _, mb in zip(range(n), loader)]  # read in this thread: the raw read cost
        read_s = (time.perf_counter() - t0) / n
    verify = verify_on_read_cost(store, sizes.micro_batch)
    compute = StandIn(step_s, device)

    def step(mb) -> None:
        mb = mb.to(device)
        float(mb.input_ids.sum() + mb.ref_logp_sum.sum() + mb.ref_codes_chosen.values.sum())
        compute()

    def timed(batches) -> tuple[list[float], float]:
        """Wall seconds per micro-batch and process CPU seconds (all threads), the first micro-batch excluded."""
        times, t, c0 = [], time.perf_counter(), None
        for mb in batches:
            step(mb)
            now = time.perf_counter()
            times.append(now - t)
            t = now
            c0 = time.process_time() if c0 is None else c0
        return times[1:], time.process_time() - c0

    mem_s, stream_s, mem_cpu, stream_cpu = [], [], [], []
    for _ in range(sizes.loader_rounds):
        wall, cpu = timed(in_memory)
        mem_s.append(wall)
        mem_cpu.append(cpu)
        with CacheLoader(store, prefetch=2, **kwargs) as loader:
            wall, cpu = timed(mb for _, mb in zip(range(n), loader))
        stream_s.append(wall)
        stream_cpu.append(cpu)
    totals = [(sum(m), sum(s)) for m, s in zip(mem_s, stream_s)]
    overhead = statistics.median(s / m - 1 for m, s in totals)
    out = {
        "micro_batches_timed": n - 1, "rounds": sizes.loader_rounds, "micro_batch_pairs": sizes.micro_batch,
        "prefetch": 2, "threads": torch.get_num_threads(), "stand_in_target_s": step_s,
        "stand_in": {"dim": compute.dim, "matmuls": compute.n},
        "in_memory_step_s": statistics.median(t for r in mem_s for t in r),
        "streaming_step_s": statistics.median(t for r in stream_s for t in r),
        "in_memory_total_s": [m for m, _ in totals], "streaming_total_s": [s for _, s in totals],
        "read_s_per_micro_batch": read_s, "overhead": overhead,
        "max_streaming_step_s": max(t for r in stream_s for t in r),
        "in_memory_cpu_s": mem_cpu, "streaming_cpu_s": stream_cpu,
        "overhead_cpu": statistics.median(s / m - 1 for m, s in zip(mem_cpu, stream_cpu)),
        "verify_on_read": verify,
    }
    log(f"loader: in memory {out['in_memory_step_s']:.3f} s/step, streaming {out['streaming_step_s']:.3f} s/step, "
        f"overhead {100 * overhead:+.2f}%; verify on read: {1e3 * verify['s_per_shard']:.1f} ms per shard, one epoch's "
        f"reads {verify['epoch_read_s_verified']:.3f} s vs {verify['epoch_read_s_unverified']:.3f} s unverified")
    return out


def verify_on_read_cost(store: str, micro_batch: int, repeats: int = 3) -> dict:
    """One epoch of reads (every ok row, in a shuffled order, ``micro_batch`` rows per call) through a fresh store
    handle with verify on read and without: the best of ``repeats``.  With it, each shard is read once in full and
    checked against its committed checksum (that call's rows come from the same bytes), and every later read is
    checked against the digests of the blocks that passed; their difference is what verify on read costs a
    process over one epoch, reported per shard and per read call."""
    import numpy as np

    from fpo_dist.store import open_store

    ok = open_store(store).ok_rows()
    order = np.random.default_rng(0).permutation(ok)
    calls = -(-len(order) // micro_batch)

    def epoch(verify: bool) -> float:
        handle = open_store(store, verify_reads=verify)
        t0 = time.perf_counter()
        for i in range(0, len(order), micro_batch):
            handle.read_rows(order[i : i + micro_batch])
        return time.perf_counter() - t0

    on = min(epoch(True) for _ in range(repeats))
    off = min(epoch(False) for _ in range(repeats))
    n_shards = open_store(store).plan.n_shards
    return {"epoch_read_s_verified": on, "epoch_read_s_unverified": off, "shards": n_shards, "read_calls": calls,
            "s_per_shard": max(on - off, 0.0) / n_shards, "s_per_read_call": max(on - off, 0.0) / calls}
