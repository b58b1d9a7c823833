"""2. The cache job: throughput against the bare forward (the limit), worker scaling, bytes per response.

- ``reference_pass`` (the worker's computation, its default path: output layer at selected positions, shared-
  prefix rows, the prompt once per pair) and a plain no-grad ``model(input_ids, attention_mask)`` (full logits)
  over the same pairs, in the worker's batch order and batch size, right-padded (the layout a bare transformers
  forward takes), on the same device and threads, interleaved round by round; tokens are the real (unpadded)
  tokens the worker counts (the prompt twice per pair).  ``reference_pass`` on packed rows (the prompt computed
  twice) runs in the same rounds: the shared / packed time ratio.
- The real cache job (``run_cache_job``: Ray actors, Zarr store) with 1 and 2 CPU workers of 1 thread each
  (on GPUs: 1 worker per GPU); per-worker tokens/s is what the job reports (tokenize + forward + SAE + write).
- Bytes per response on disk (``store.info()``) against dense alternatives.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from bench.assets import Assets, tokenized_pairs
from bench.presets import Sizes
from bench.report import measure_quietly

DENSE_16K_FP32_BYTES = 16384 * 4  # a dense pooled 16k-feature vector per response, fp32


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def _patched(module, name: str, wrapper):
    original = getattr(module, name)
    setattr(module, name, wrapper(original))
    try:
        yield original
    finally:
        setattr(module, name, original)


def _timed(module, names: list[str], totals: dict, device):
    """Context managers that add each named function's wall time (synchronised) to ``totals``."""

    def wrap(name):
        def deco(fn):
            def inner(*a, **k):
                sync(device)
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    sync(device)
                    totals[name] += time.perf_counter() - t0
            return inner
        return deco

    return [_patched(module, n, wrap(n)) for n in names]


def bench_reference_pass(assets: Assets, sizes: Sizes, device: str, threads: int | None, log=print) -> dict:
    """reference_pass (the cache worker's computation, its default path) vs a bare no-grad transformers forward
    (full logits) over the same pairs, in the worker's batch order and size, padded: tokens/s of each and the
    ratio."""
    from contextlib import ExitStack

    from fpo_dist import scoring
    from fpo_dist.cache import worker
    from fpo_dist.models import ModelSpec, load_causal_lm
    from fpo_dist.sae import load_sae

    if threads:
        torch.set_num_threads(threads)
    # the same weights twice: varlen attention for reference_pass (as the cache worker loads it for packed rows),
    # the model's own (sdpa) for the bare forward
    spec = ModelSpec(str(assets.model_dir), dtype=sizes.dtype)
    model = load_causal_lm(spec, device=device)
    worker_model = load_causal_lm(spec, device=device, varlen=True)
    sae = load_sae(str(assets.sae_dir), device=device, dtype="float32")
    pairs, pad_id = tokenized_pairs(assets.model_dir, assets.data, sizes, sizes.bare_rows)
    tokens = sum(len(p.prompt_ids) * 2 + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)  # as the worker
    kwargs = {"layout": "shared"}

    def ref_pass(layout=kwargs["layout"]):  # as the cache job runs it (its default layout; output layer at the
        # selected positions); "packed": the prompt computed twice per pair, the layout sharing replaces
        return worker.reference_pass(worker_model, sae, assets.hook_layer, pairs, pad_id, sizes.cache_batch,
                                     layout=layout)

    batches = []  # the pairs of each batch reference_pass builds, padded: what a bare forward runs

    def recording(build):
        def inner(pairs, pad_id, layout="padded"):
            batches.append(build(pairs, pad_id, "padded"))
            return build(pairs, pad_id, layout)
        return inner

    with _patched(worker, "build_batch", recording):
        t0 = time.perf_counter()
        ref_pass()  # also the warm-up: what a fresh worker's first shard pays
        first_call_s = time.perf_counter() - t0
    dev_batches = [(b.input_ids, b.attention_mask) for b in batches]

    @torch.no_grad()
    def bare(subset=dev_batches):
        for ids, att in subset:
            model(input_ids=ids.to(device), attention_mask=att.to(device), use_cache=False)

    bare([(ids[:, :32], att[:, :32]) for ids, att in dev_batches[:1]])  # a short warm-up (the model is warm already)

    ref_pass("packed")  # its warm-up
    t_bare, t_ref, c_bare, c_ref, t_packed = [], [], [], [], []  # wall and process CPU seconds per call
    for _ in range(sizes.bare_rounds):
        for fn, wall, cpu in ((bare, t_bare, c_bare), (ref_pass, t_ref, c_ref),
                              (lambda: ref_pass("packed"), t_packed, [])):
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    # one more reference_pass with its parts timed: where the time beyond the forward goes
    # (module, function) pairs that exist in this version: the batch layout, the decoder + output layer + log-probs,
    # SAE encode + pooling, the sparse conversion
    timed = [(m, n) for m, n in ((worker, "build_batch"), (scoring, "_response_logps"), (scoring, "_pooled_codes"),
                                 (worker, "nonzeros")) if hasattr(m, n)]
    names = [n for _, n in timed]
    parts: dict = defaultdict(float)
    with ExitStack() as stack:
        for module, name in timed:
            for cm in _timed(module, [name], parts, device):
                stack.enter_context(cm)
        sync(device)
        t0 = time.perf_counter()
        ref_pass()
        sync(device)
        total = time.perf_counter() - t0
    parts = {"total": total, **{k: parts[k] for k in names}}
    parts["rest"] = total - sum(v for k, v in parts.items() if k != "total")
    ratios = [b / r for b, r in zip(t_bare, t_ref)]
    computed = int(sum(b.input_ids.numel() for b in batches))
    out = {
        "pairs": len(pairs), "tokens": tokens, "batches": len(batches), "batch_pairs": sizes.cache_batch,
        "padded_tokens": computed, "threads": torch.get_num_threads(),
        "reference_pass_kwargs": kwargs, "bare_layout": "padded",
        # positions whose hidden state / logits feed the cache (predict a response token), of all positions run
        "response_fraction": float(sum(b.prediction_mask.sum() for b in batches) / computed),
        "bare_s": t_bare, "reference_pass_s": t_ref, "reference_pass_first_call_s": first_call_s,
        "bare_tokens_per_s": tokens / statistics.median(t_bare),
        "reference_pass_tokens_per_s": tokens / statistics.median(t_ref),
        "ratio": statistics.median(ratios), "ratios": ratios,
        "bare_cpu_s": c_bare, "reference_pass_cpu_s": c_ref,
        "ratio_cpu": statistics.median(b / r for b, r in zip(c_bare, c_ref)),
        # the default (shared prefix) / the packed layout, time per pass over the same pairs, round by round
        "packed_s": t_packed, "ratio_shared_vs_packed": statistics.median(r / p for r, p in zip(t_ref, t_packed)),
        "computed_tokens": {"shared": sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs),
                            "packed": tokens},
        "reference_pass_parts_s": parts,
    }
    log(f"cache: bare forward {out['bare_tokens_per_s']:.0f} tok/s, reference_pass "
        f"{out['reference_pass_tokens_per_s']:.0f} tok/s (ratio {out['ratio']:.3f}); shared / packed time "
        f"{out['ratio_shared_vs_packed']:.3f}")
    model = sae = None  # free them before the next part (the closures above are done)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return out


def _array_sizes(path: Path) -> dict:
    """Bytes on disk per array of a local store (ragged arrays summed over their per-shard groups)."""
    out: dict = defaultdict(int)
    for f in path.rglob("*"):
        if f.is_file():
            parts = f.relative_to(path).parts
            name = parts[2] if parts[0] == "shards" and len(parts) > 3 else parts[0]
            out[name] += f.stat().st_size
    return dict(sorted(out.items()))


def bench_cache_job(assets: Assets, sizes: Sizes, device: str, workers: list[int], root: Path, retry: bool = True,
                    log=print, extra: tuple[str, ...] = ()) -> dict:
    """The real cache job with each worker count in ``workers`` (each measured again if the host was busy);
    bytes per response of the last store.  ``extra``: more cache-job flags (e.g. ``--ref_topm 128``)."""
    from fpo_dist.cache import init_local_ray
    from fpo_dist.cache.driver import run_cache_job
    from fpo_dist.config import CacheConfig, load_config
    from fpo_dist.store import open_store

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    on_gpu = device == "cuda"
    # as the cache driver's own local instance: loopback only, Ray's default token authentication
    ray = init_local_ray(num_cpus=max(workers) + (2 if on_gpu else 0), include_dashboard=False,
                         object_store_memory=256 << 20, log_to_driver=False)

    def job(n: int, attempt: int) -> dict:
        out = root / f"store_w{n}" / str(attempt)
        cfg = load_config(CacheConfig, None, [
            "--model.name_or_path", str(assets.model_dir), "--model.dtype", sizes.dtype,
            "--sae.source", str(assets.sae_dir), "--sae.layer", str(assets.hook_layer),
            "--data.source", str(assets.data), "--data.max_length", str(sizes.max_length),
            "--data.max_prompt_length", str(sizes.max_prompt_length), "--output", str(out),
            "--workers", str(n), "--cpus_per_worker", "1", "--device", device,
            "--rows_per_shard", str(sizes.rows_per_shard), "--chunk_rows", str(sizes.rows_per_shard),
            "--batch_size", str(sizes.cache_batch), *extra,
        ])
        t0 = time.perf_counter()
        summary = run_cache_job(cfg, log=lambda *_: None)
        wall = time.perf_counter() - t0
        per_worker = sorted(w["tokens_per_s"] for w in summary["workers"].values())
        busy = max(w["seconds"] for w in summary["workers"].values())
        r = {
            "workers": n, "store": str(out), "tokens": summary["tokens"], "wall_s": wall,
            "pool_busy_s": busy, "per_worker_tokens_per_s": per_worker,
            "mean_worker_tokens_per_s": statistics.mean(per_worker),
            "aggregate_tokens_per_s_busy": summary["tokens"] / busy,
            "aggregate_tokens_per_s_wall": summary["tokens"] / wall,
            "shards": {k: v["shards"] for k, v in summary["workers"].items()},
            "counts": summary["counts"],
        }
        log(f"cache job, {n} worker(s): {r['mean_worker_tokens_per_s']:.0f} tok/s per worker, "
            f"{r['aggregate_tokens_per_s_wall']:.0f} tok/s end to end ({wall:.1f} s)")
        return r

    runs = []
    try:
        for n in workers:
            # the n actors themselves count as "other processes" in HostLoad: expect them
            r, load, loads = measure_quietly(lambda attempt: job(n, attempt), f"cache job, {n} worker(s)", log,
                                             expected_cores=n, retry=retry)
            runs.append({**r, "host_load": load, "host_loads": loads})
    finally:
        ray.shutdown()
    store = open_store(runs[-1]["store"])
    info = store.info()
    resp_tokens = (info["tokens"]["chosen"]["mean"] + info["tokens"]["rejected"]["mean"]) / 2
    bpr = info["bytes_per_response"]
    dense_logits = sizes.vocab * resp_tokens * 2
    disk = {
        "bytes_per_response": bpr,
        "pooled_nnz": info["pooled_nnz"],
        "mean_response_tokens": resp_tokens,
        "per_array_bytes": _array_sizes(Path(runs[-1]["store"])),
        "dense_pooled_16k_fp32": DENSE_16K_FP32_BYTES,
        "dense_pooled_this_sae_fp32": sizes.d_sae * 4,
        "dense_logits_bf16": dense_logits,
        "vs_dense_16k": bpr / DENSE_16K_FP32_BYTES,
        "vs_dense_this_sae": bpr / (sizes.d_sae * 4),
        "vs_dense_logits": bpr / dense_logits,
    }
    n_ok = int(info["rows"].get("ok", 0))
    codes = sum(disk["per_array_bytes"].get(a, 0) for a in ("code_indices", "code_values", "nnz"))
    disk["code_bytes_per_response"] = codes / (2 * n_ok) if n_ok else None
    log(f"cache store: {bpr:.0f} bytes/response (pooled nnz mean {info['pooled_nnz']['mean']:.0f}); dense 16k fp32 "
        f"{DENSE_16K_FP32_BYTES}, dense logits {dense_logits:.0f}")
    return {"runs": runs, "disk": disk, "store": runs[-1]["store"]}


def run(assets: Assets, sizes: Sizes, device: str, root: Path, quick: bool = False, log=print) -> dict:
    """``quick``: one cache job with one worker instead of the 1-vs-2 comparison, each part measured once."""
    threads = 1 if device == "cpu" else None  # a CPU cache worker runs cpus_per_worker=1 threads
    compute, load, loads = measure_quietly(lambda _: bench_reference_pass(assets, sizes, device, threads, log),
                                           "cache: reference_pass vs bare forward", log, retry=not quick)
    compute.update(host_load=load, host_loads=loads)
    workers = (list(range(1, min(torch.cuda.device_count(), max(sizes.cache_workers)) + 1)) if device == "cuda"
               else list(sizes.cache_workers))
    job = bench_cache_job(assets, sizes, device, workers[:1] if quick else workers, root, retry=not quick, log=log)
    first = job["runs"][0]
    return {
        "compute": compute,
        "job": job,
        "ratio_reference_pass_vs_bare": compute["ratio"],
        "ratio_worker_vs_bare": first["mean_worker_tokens_per_s"] / compute["bare_tokens_per_s"],
        "store": job["store"],
    }
