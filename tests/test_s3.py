"""Caches on object storage: the whole pipeline against a real S3 API (moto's server) on 127.0.0.1.

The cache job (2 Ray workers) writes ``s3://…`` with ``--storage_options`` (endpoint and credentials, handed to the
workers in their config); the S3 store is byte-for-byte the store the same job writes to a local path (the path it
replaces: equal store checksums, equal rows); a rerun after an interrupted commit skips the committed shards and
redoes the other (rewriting its objects in the bucket); ``verify`` and ``info`` read it; a training run (1 rank, 2 steps, its evaluation on the S3 store as well)
streams from it, its step-0 check passing.  Credentials never reach a printed line or a file of the run.
"""

from __future__ import annotations

import json
import logging
import os
import socket

import numpy as np
import pytest
import torch
from test_train import ROOT, metrics, train  # the real launcher (own process group)

pytestmark = pytest.mark.slow

BUCKET = "fpo-test"
KEY, SECRET = "AKIAFPOTESTKEY", "fpo-test-secret-0123456789"  # moto accepts any; distinctive, to find leaks
N_ROWS = 20  # 3 shards of 8


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free loopback port with one bucket; stopped at the end."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        import s3fs

        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": KEY, "secret": SECRET}
        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield {"options": options, "fs": fs}
    finally:
        server.stop()


def _cache_config(tiny, data, output, options=None, workers=2):
    from fpo_dist.config import CacheConfig, load_config

    extra = ["--storage_options", json.dumps(options)] if options else []
    return load_config(CacheConfig, None, [
        "--model.name_or_path", str(tiny.model_dir), "--sae.source", str(tiny.sae_dir),
        "--sae.layer", str(tiny.hook_layer), "--data.source", str(data), "--output", str(output),
        "--rows_per_shard", "8", "--chunk_rows", "8", "--workers", str(workers), "--device", "cpu",
        "--data.max_length", "64", "--data.max_prompt_length", "32", *extra,
    ])


def _assert_same_rows(a, b):
    assert a.attrs["checksum"] == b.attrs["checksum"]  # a hash over every shard's bytes
    rows = a.ok_rows()
    assert np.array_equal(rows, b.ok_rows()) and len(rows) == N_ROWS
    ra, rb = a.read_rows(rows), b.read_rows(rows)
    assert np.array_equal(ra.logp_sum, rb.logp_sum)
    assert np.array_equal(ra.chosen_codes.values, rb.chosen_codes.values)
    assert np.array_equal(ra.rejected_codes.indices, rb.rejected_codes.indices)


@pytest.fixture(scope="module")
def s3_cache(s3, tiny, tmp_path_factory):
    """The cache job writes the S3 store and a local one, then resumes the S3 store after an interrupted commit."""
    import ray
    import zarr

    from fpo_dist.cache.driver import run_cache_job
    from fpo_dist.store import open_store

    root = tmp_path_factory.mktemp("s3")
    data = root / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Question {i} on topic {i % 5}?",
                                          "chosen": f"A helpful answer {i}." + " Indeed." * (i % 3),
                                          "rejected": f"Nope {i}." + " Meh" * (i % 4)}) for i in range(N_ROWS)))
    url, options = f"s3://{BUCKET}/store", s3["options"]
    logs: list[str] = []
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", _node_ip_address="127.0.0.2", num_cpus=2, include_dashboard=False,
             object_store_memory=128 << 20, log_to_driver=False)
    try:
        first = run_cache_job(_cache_config(tiny, data, url, options), log=logs.append)
        # the path S3 replaces (1 worker ≡ 2 workers: tests/test_cache.py)
        run_cache_job(_cache_config(tiny, data, root / "local", workers=1), log=lambda *_: None)
        # the driver died after shard 1 was written, before it committed it: a rerun redoes that shard alone
        zarr.open_array(f"{url}/shard_state", mode="r+", storage_options=options)[1] = 0
        rerun = run_cache_job(_cache_config(tiny, data, url, options), log=logs.append)
    finally:
        ray.shutdown()
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every parameter
    (root / "zero3_test.json").write_text(json.dumps(ds))
    return {"url": url, "options": options, "local": open_store(str(root / "local")), "first": first, "rerun": rerun,
            "logs": logs, "root": root, "ds": str(root / "zero3_test.json")}


def test_the_cache_job_writes_s3_with_two_workers_and_resumes(s3_cache, s3):
    from fpo_dist.store import open_store

    first, rerun = s3_cache["first"], s3_cache["rerun"]
    assert len(first["workers"]) == 2 and all(w["shards"] > 0 for w in first["workers"].values())
    assert first["shards_done_now"] == 3 and first["counts"]["ok"] == N_ROWS
    assert rerun["shards_committed_before"] == 2 and rerun["shards_done_now"] == 1  # committed shards are skipped
    # the store lives in the bucket (listed by s3fs, not through fpo_dist)
    assert s3["fs"].exists(f"{BUCKET}/store/zarr.json") and s3["fs"].exists(f"{BUCKET}/store/shards/000002/zarr.json")
    store = open_store(s3_cache["url"], storage_options=s3_cache["options"])
    assert store.attrs["complete"] and store.verify() == []
    _assert_same_rows(store, s3_cache["local"])  # S3 ≡ local path
    assert store.size_on_disk() > 0
    # the loader opens the URL with the options (its own handle; the prefetch thread reads S3)
    from fpo_dist.loader import CacheLoader

    kw = dict(micro_batch_size=4, grad_accum=1, world_size=1, rank=0, seed=1, pad_id=0, prefetch=2)
    with CacheLoader(s3_cache["url"], storage_options=s3_cache["options"], **kw) as a, \
            CacheLoader(s3_cache["local"], **kw) as b:
        pairs = list(zip(a, b, strict=True))
    assert len(pairs) == N_ROWS // 4
    for mb_a, mb_b in pairs:
        assert mb_a.uids == mb_b.uids and torch.equal(mb_a.input_ids, mb_b.input_ids)
        assert torch.equal(mb_a.ref_logp_sum, mb_b.ref_logp_sum)
    printed = "\n".join(s3_cache["logs"])
    assert "endpoint_url" in printed and SECRET not in printed and KEY not in printed  # the config, masked


def test_verify_and_info_read_s3(s3_cache, capsys):
    from fpo_dist.cache.__main__ import main

    opts = json.dumps(s3_cache["options"])
    assert main(["verify", s3_cache["url"], "--storage_options", opts]) == 0
    assert "verify: OK" in capsys.readouterr().out
    assert main(["info", s3_cache["url"], "--json", "--storage_options", opts]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == s3_cache["url"] and info["rows"]["ok"] == N_ROWS and info["complete"]
    assert main(["info", s3_cache["url"], "--storage_options", "[1]"]) == 2  # not a mapping: named, refused
    assert "'storage_options' must be a mapping" in capsys.readouterr().err


def test_training_streams_from_s3(s3_cache):
    """1 rank, 2 steps, evaluation at the end on the S3 store too; the step-0 check compares the streamed cache with
    the policy's own recomputation (policy = reference at step 0)."""
    out = s3_cache["root"] / "run"
    cache = {"store": s3_cache["url"], "ds": s3_cache["ds"]}
    rc, log = train(cache, out, "--max_steps", "2", "--storage_options", json.dumps(s3_cache["options"]),
                    "--eval_cache", s3_cache["url"], "--report_to", "none", nproc=1, timeout=240)
    assert rc == 0, log[-6000:]
    assert "step-0 check: rows" in log
    m = metrics(out)
    train_steps = [r["step"] for r in m if "loss" in r]
    assert train_steps == [1, 2] and abs(m[0]["loss"] - np.log(2)) < 1e-5
    assert any("eval/loss" in r for r in m)
    for path in [*out.rglob("*")]:  # no credential in any file of the run (config.yaml, checkpoint, logs)
        if path.is_file():
            data = path.read_bytes()
            assert SECRET.encode() not in data and KEY.encode() not in data, path
    assert SECRET not in log and KEY not in log
