"""The cache driver: plan shards, run a pool of Ray actors over them, commit, finalize, report.

The driver does no per-row work: it reads the dataset's size and schema, creates (or resumes) the
store, and hands shard numbers to :class:`~fpo_dist.cache.worker.CacheWorker` actors — one per GPU on
GPU clusters, ``cpus_per_worker`` CPUs each otherwise.  A worker writes its shard; the driver alone
commits it (so a shard written by a worker that then died is simply redone).  An actor that dies has
its shard re-queued on a fresh actor, up to ``max_retries`` times per shard.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import fpo_dist
from fpo_dist.cache import init_local_ray
from fpo_dist.cache.worker import CacheWorker
from fpo_dist.config import CacheConfig, mask_text, to_dict, to_yaml
from fpo_dist.data import (
    BadRow,
    file_sha256,
    format_bad_report,
    load_source,
    local_files,
    tokenizer_fingerprint,
    uses_chat_template,
)
from fpo_dist.models import load_tokenizer, tokenizer_spec
from fpo_dist.resolve import resolve_cache_config


class CacheJobError(RuntimeError):
    """The cache job cannot complete (bad data under on_bad_row=fail, or a shard failed too often)."""


# --------------------------------------------------------------------------------------------- provenance


def build_provenance(cfg: CacheConfig, source, tokenizer) -> dict:
    """Everything that determines the store's contents; a rerun with different values is refused."""
    files = local_files(cfg.data.source)
    data = {
        "source": cfg.data.source,
        "split": None if files else cfg.data.split,
        "revision": cfg.data.revision,
        "content_sha256": file_sha256(files) if files else getattr(source.dataset, "_fingerprint", None),
        "schema": source.schema,
        "columns": source.columns,
        "template": "chat" if uses_chat_template(tokenizer, cfg.data) else "plain",
        "max_length": cfg.data.max_length,
        "max_prompt_length": cfg.data.max_prompt_length,
        "truncation_mode": cfg.data.truncation_mode,
        "over_length": cfg.data.over_length,
        "on_bad_row": cfg.data.on_bad_row,
        "max_rows": cfg.data.max_rows,
        "n_rows": len(source),
    }
    return {
        # the reference's top-M distributions per response position (also the store option ref_topm); absent
        # without them, as in stores written before they existed
        **({"ref_topm": cfg.ref_topm} if cfg.ref_topm else {}),
        "code_version": fpo_dist.__version__,
        "model": {**to_dict(cfg.model), "files": _model_files(cfg.model.name_or_path)},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "sae": {**to_dict(cfg.sae), **_sae_files(cfg.sae.source)},
        "hook": f"blocks.{cfg.sae.layer}.hook_resid_post",
        "data": data,
        "batch_size": cfg.batch_size,
        "batch_layout": cfg.batch_layout,
        "attention_kernel": cfg.attention_kernel,
    }


def _model_files(path: str) -> dict | None:
    """For a local model: config hash and weight-file sizes (cheap stand-ins for hashing GBs)."""
    p = Path(path)
    if not p.is_dir():
        return None
    out = {}
    for f in sorted(p.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin", ".gguf") and f.is_file():
            out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest() if f.suffix == ".json" else f.stat().st_size
    return out


def _sae_files(source: str) -> dict:
    p = Path(source)
    if not p.is_dir():
        return {}
    meta = {}
    cfg_file = p / "cfg.json"
    if cfg_file.exists():
        c = json.loads(cfg_file.read_text())
        meta = {"d_in": c.get("d_in"), "d_sae": c.get("d_sae"), "architecture": c.get("architecture")}
    weights = p / "sae_weights.safetensors"
    if weights.exists():
        meta["weights_sha256"] = file_sha256([str(weights)])
    return meta


# --------------------------------------------------------------------------------------------- Ray


def connect_ray(cfg: CacheConfig):
    """Attach to a cluster (``ray_address`` or RAY_ADDRESS, as under ``ray job submit``) or start a local one, which
    listens on loopback only, with Ray's token authentication at Ray's default (:func:`fpo_dist.cache.init_local_ray`)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # token authentication: Ray's default (on, local)
    if ray.is_initialized():
        return ray
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        from fpo_dist.cache import reaper

        n_cpus = max(1, cfg.workers * cfg.cpus_per_worker) if cfg.workers else None
        before = reaper.children(os.getpid())
        init_local_ray(num_cpus=n_cpus, include_dashboard=False, object_store_memory=256 << 20)  # loopback only
        reaper.watch(reaper.children(os.getpid()) - before)  # the instance dies with this process, by any signal
    return ray


def plan_workers(cfg: CacheConfig, resources: dict, n_pending: int) -> tuple[int, dict]:
    """How many actors and what each asks for: one per GPU, else ``cpus_per_worker`` CPUs each."""
    gpus = int(resources.get("GPU", 0))
    if cfg.device != "cpu" and gpus > 0:
        fit, opts, what = gpus, {"num_gpus": 1, "num_cpus": 1}, f"{gpus} GPU(s)"
    else:
        if cfg.device == "cuda":
            raise CacheJobError("device 'cuda' requested but the Ray cluster has no GPUs")
        cpus = int(resources.get("CPU", 1))
        fit, opts = cpus // cfg.cpus_per_worker, {"num_cpus": cfg.cpus_per_worker}
        what = f"{cpus} CPU(s) at cpus_per_worker={cfg.cpus_per_worker}"
    if fit < 1 or cfg.workers > fit:
        # an actor that can never be scheduled would hold its shard forever
        raise CacheJobError(f"workers={cfg.workers or 'auto'} does not fit the Ray cluster ({what}): at most "
                            f"{max(fit, 0)} worker(s); lower 'workers'/'cpus_per_worker' or add nodes")
    return max(1, min(cfg.workers or fit, n_pending)), opts


# --------------------------------------------------------------------------------------------- job


def run_cache_job(cfg: CacheConfig, log=print) -> dict:
    """Build (or complete) the store described by ``cfg``; return the summary dict."""
    from fpo_dist.store import acquire_lease

    t_start = time.time()
    log("fpo-dist cache job, config:\n" + to_yaml(cfg))
    # model, tokenizer and SAE found (or downloaded) and checked once, before the store is touched or any worker
    # starts; workers load the local directories of work_cfg and never touch the hub.  The provenance keeps the
    # names the user gave.
    work_cfg = resolve_cache_config(cfg)
    with acquire_lease(cfg.output, cfg.storage_options or None, log=log) as lease:  # one writer per store, first
        return _run_job(cfg, work_cfg, lease, log, t_start)


def _run_job(cfg: CacheConfig, work_cfg: CacheConfig, lease, log, t_start: float) -> dict:
    from fpo_dist.store import create_store

    tokenizer = load_tokenizer(tokenizer_spec(work_cfg.model))
    source = load_source(cfg.data)
    provenance = build_provenance(cfg, source, tokenizer)
    store = create_store(
        cfg.output, provenance, n_rows=len(source), rows_per_shard=cfg.rows_per_shard, chunk_rows=cfg.chunk_rows,
        options={"token_logps": cfg.per_token_logps, "token_codes": cfg.per_token_codes, "ref_topm": cfg.ref_topm}, overwrite=cfg.overwrite,
        storage_options=cfg.storage_options or None,
    )
    lease.beat()  # rewrites the lease if overwrite deleted it
    plan = store.plan
    pending = store.pending_shards()
    done_before = plan.n_shards - len(pending)
    log(f"store {mask_text(cfg.output)}: {plan.n_rows} rows in {plan.n_shards} shards of {plan.rows_per_shard}; "
        f"{done_before} already committed, {len(pending)} to do")
    results: list[dict] = []
    if pending:
        results = _run_pool(work_cfg, store, pending, log, lease)
    lease.check()
    store.finalize()
    summary = _summary(cfg, store, source, results, time.time() - t_start, done_before)
    log(format_summary(summary))
    return summary


def _run_pool(cfg: CacheConfig, store, pending: list[int], log, lease) -> list[dict]:
    ray = connect_ray(cfg)
    from ray.exceptions import RayActorError, RayTaskError
    from tqdm import tqdm

    n_workers, opts = plan_workers(cfg, ray.cluster_resources(), len(pending))
    # the driver's FPO_*/HF_* settings (offline mode, fault injection in tests) reach every actor
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("FPO_", "HF_")) and "TOKEN" not in k}  # credentials stay out of Ray's GCS
    remote_cls = ray.remote(CacheWorker).options(
        max_restarts=0, max_concurrency=1, runtime_env={"env_vars": env} if env else None, **opts
    )
    threads = None if "num_gpus" in opts else cfg.cpus_per_worker

    def new_actor():
        return remote_cls.remote(cfg, threads)

    queue = list(pending)
    attempts: Counter = Counter()
    idle = [new_actor() for _ in range(n_workers)]
    log(f"{n_workers} cache worker(s), each {opts}")
    running: dict = {}  # future -> (actor, shard)
    results: list[dict] = []
    plan = store.plan
    rows_total = sum(plan.shard_range(k)[1] - plan.shard_range(k)[0] for k in pending)
    bar = tqdm(total=rows_total, unit="row", desc="cache", file=sys.stderr, dynamic_ncols=True)
    tokens, t0 = 0, time.time()
    try:
        while queue or running:
            while queue and idle:
                actor, shard = idle.pop(), queue.pop(0)
                running[actor.process.remote(shard)] = (actor, shard)
            ready, _ = ray.wait(list(running), num_returns=1)
            fut = ready[0]
            actor, shard = running.pop(fut)
            try:
                res = ray.get(fut)
            except RayActorError as e:
                attempts[shard] += 1
                if attempts[shard] > cfg.max_retries:
                    raise CacheJobError(f"shard {shard} failed {attempts[shard]} times; last error: {e}") from e
                log(f"worker died on shard {shard} (attempt {attempts[shard]}); re-queued on a new worker")
                queue.insert(0, shard)
                idle.append(new_actor())
                continue
            except RayTaskError as e:  # an error inside the worker (not its death): retrying cannot help
                start, stop = plan.shard_range(shard)
                cause = e.cause if getattr(e, "cause", None) else e
                hint = (f"; free space where the store lives ({cfg.output}) and rerun: committed shards are kept, "
                        "this one is redone" if getattr(cause, "errno", None) == errno.ENOSPC else "")
                raise CacheJobError(f"shard {shard} (rows {start}..{stop - 1}) failed in its worker, not committed: "
                                    f"{cause}{hint}") from e
            if "error" in res:
                raise CacheJobError(res["error"])
            lease.check()  # never commit after another job took the store
            store.commit_shard(shard, res["checksum"])
            results.append(res)
            tokens += res["tokens"]
            bar.update(res["rows"])
            bar.set_postfix(tok_s=f"{tokens / max(time.time() - t0, 1e-9):.0f}", shards=len(results))
            idle.append(actor)
    finally:
        bar.close()
        for fut, (actor, _) in running.items():
            ray.cancel(fut, force=True)
        _end_actors(ray, idle, [a for a, _ in running.values()])
    return results


def _end_actors(ray, idle: list, busy: list, timeout_s: float = 30.0) -> None:
    """Idle actors leave through Ray's graceful exit (:meth:`CacheWorker.exit`), which runs their ``atexit``
    handlers: the temporary directories libraries make when imported (two per process from wandb, which sae-lens
    imports) go with them, where ``ray.kill`` would leave them in the node's temp directory. Busy actors (their shard
    cancelled after an error) are killed."""
    exits = [actor.exit.remote() for actor in idle]
    if exits:  # resolves (as the actor's death) once each has begun to exit
        ray.wait(exits, num_returns=len(exits), timeout=timeout_s)
    for actor in busy:
        try:
            ray.kill(actor)
        except Exception:  # already gone
            pass


def _summary(cfg, store, source, results: list[dict], wall: float, done_before: int) -> dict:
    counts = store.status_counts()
    per_worker: dict = {}
    for r in results:
        key = f"{r['worker']['host']}:{r['worker']['pid']}"
        w = per_worker.setdefault(key, {"shards": 0, "tokens": 0, "seconds": 0.0, "device": r["worker"]["device"],
                                        "node": r["worker"].get("node")})
        w["shards"] += 1
        w["tokens"] += r["tokens"]
        w["seconds"] += r["seconds"]
    for w in per_worker.values():
        w["tokens_per_s"] = w["tokens"] / max(w["seconds"], 1e-9)
    bad = [BadRow(*b) for r in results for b in r["bad"]]
    return {
        "store": cfg.output,
        "counts": counts,
        "shards_done_now": len(results),
        "shards_committed_before": done_before,
        "tokens": sum(r["tokens"] for r in results),
        "wall_s": wall,
        "workers": per_worker,
        "size_bytes": store.size_on_disk(),
        "bad_report": format_bad_report(sorted(bad, key=lambda b: b.index), source),
    }


def format_summary(s: dict) -> str:
    lines = [
        f"cache done: {s['store']}",
        f"  rows: {json.dumps(s['counts'])}",
        f"  shards processed now: {s['shards_done_now']} (already committed before: {s['shards_committed_before']})",
        f"  tokens: {s['tokens']}, wall time {s['wall_s']:.1f} s, store size {s['size_bytes'] / 1e6:.2f} MB",
    ]
    for name, w in sorted(s["workers"].items()):
        node = f" ray node {w['node']}" if w.get("node") else ""
        lines.append(f"  worker {name} [{w['device']}]{node}: {w['shards']} shards, {w['tokens_per_s']:.0f} tokens/s")
    lines.append("  " + s["bad_report"].replace("\n", "\n  "))
    return "\n".join(lines)
