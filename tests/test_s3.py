"""Caches on object storage: the whole pipeline against a real S3 API (moto's server) on 127.0.0.1.

The cache job (2 Ray workers) writes ``s3://…`` with ``--storage_options @creds.json`` (endpoint and credentials in
a file; the rerun takes them from ``FPO_STORAGE_OPTIONS``; the driver hands them to the workers in their config); the
S3 store is byte-for-byte the store the same job writes to a local path (the path it
replaces: equal store checksums, equal rows); a rerun after an interrupted commit skips the committed shards and
redoes the other (rewriting its objects in the bucket); ``verify`` and ``info`` read it; a training run under the real ``deepspeed`` launcher (2 ZeRO-3 ranks, 2 steps, its
evaluation on the S3 store as well, ``--report_to tensorboard,wandb``) streams from it, its step-0 check passing.
Credentials never reach a command line, an environment, a printed line or a file: every file of the run, of W&B, of
the cache job's Ray session and of the store in the bucket, the launcher's output, and the command lines and
environments of the launcher and its ranks (sampled from /proc while they run) are searched for the key and secret.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import ALPHA, BETA, LR, ROOT, K, _free_port, metrics

pytestmark = pytest.mark.slow

BUCKET = "fpo-test"
KEY, SECRET = "AKIAFPOTESTKEY", "fpo-test-secret-0123456789"  # moto accepts any; distinctive, to find leaks
N_ROWS = 20  # 3 shards of 8


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free loopback port with one bucket; stopped at the end.  ``creds``: the options in a
    file readable only by its owner, the way the README tells users to pass credentials."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        import s3fs
        from conftest import reset_moto

        reset_moto(port)  # moto keeps buckets per process: another test module's server may have made this one

        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": KEY, "secret": SECRET}
        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        creds = tmp_path_factory.mktemp("secrets") / "s3.json"
        creds.write_text(json.dumps(options))
        creds.chmod(0o600)
        yield {"options": options, "fs": fs, "creds": creds}
    finally:
        server.stop()


def _cache_config(tiny, data, output, creds=None, workers=2):
    from fpo_dist.testing import tiny_cache_config

    extra = ["--storage_options", f"@{creds}"] if creds else []  # no creds: FPO_STORAGE_OPTIONS, if set
    return tiny_cache_config(tiny, data, output, workers=workers, extra=extra)


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
    from fpo_dist.cache import init_local_ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    init_local_ray(num_cpus=2, include_dashboard=False, object_store_memory=128 << 20, log_to_driver=False)
    try:
        first = run_cache_job(_cache_config(tiny, data, url, s3["creds"]), log=logs.append)
        # the path S3 replaces (1 worker ≡ 2 workers: tests/test_cache.py)
        run_cache_job(_cache_config(tiny, data, root / "local", workers=1), log=lambda *_: None)
        # the driver died after shard 1 was written, before it committed it: a rerun redoes that shard alone
        zarr.open_array(f"{url}/shard_state", mode="r+", storage_options=options)[1] = 0
        os.environ["FPO_STORAGE_OPTIONS"] = str(s3["creds"])  # the other route: the environment names the file
        try:
            rerun = run_cache_job(_cache_config(tiny, data, url), log=logs.append)
        finally:
            os.environ.pop("FPO_STORAGE_OPTIONS")
        session = Path(ray._private.worker._global_node.get_session_dir_path())  # the job's Ray logs, grepped later
    finally:
        ray.shutdown()
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every parameter
    (root / "zero3_test.json").write_text(json.dumps(ds))
    return {"url": url, "options": options, "local": open_store(str(root / "local")), "first": first, "rerun": rerun,
            "logs": logs, "root": root, "ds": str(root / "zero3_test.json"), "creds": s3["creds"],
            "ray_session": session}


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


def test_verify_and_info_read_s3(s3_cache, capsys, monkeypatch):
    """Options from the environment (verify: JSON in FPO_STORAGE_OPTIONS) or a file (info: @path); inline
    credentials and malformed values are refused without being echoed."""
    from fpo_dist.cache.__main__ import main

    monkeypatch.setenv("FPO_STORAGE_OPTIONS", json.dumps(s3_cache["options"]))
    assert main(["verify", s3_cache["url"]]) == 0
    assert "verify: OK" in capsys.readouterr().out
    monkeypatch.delenv("FPO_STORAGE_OPTIONS")
    assert main(["info", s3_cache["url"], "--json", "--storage_options", f"@{s3_cache['creds']}"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == s3_cache["url"] and info["rows"]["ok"] == N_ROWS and info["complete"]
    assert main(["info", s3_cache["url"], "--storage_options", "[1]"]) == 2  # not a mapping: named, refused
    assert "'storage_options' must be a mapping" in capsys.readouterr().err
    inline = json.dumps(s3_cache["options"])
    for text, message in [(inline, "'storage_options.key', 'storage_options.secret' hold(s) a credential"),
                          (inline[:-1], "'storage_options' must be a JSON mapping")]:  # malformed: never echoed
        assert main(["info", s3_cache["url"], "--storage_options", text]) == 2
        err = capsys.readouterr().err
        assert message in err and SECRET not in err and KEY not in err


def _session_processes(sid: int) -> dict[int, tuple[bytes, bytes]]:
    """``pid -> (cmdline, environ)`` of every process in session ``sid``, read from /proc (from outside them)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[3]) != sid:  # field 6: session id
                continue
            out[int(entry.name)] = ((entry / "cmdline").read_bytes(), (entry / "environ").read_bytes())
        except (OSError, ValueError, IndexError):  # exited meanwhile
            continue
    return out


def _launch_and_sample(cmd: list[str], env: dict, log_dir: Path, timeout: int) -> tuple[int, str, dict]:
    """Run ``cmd`` in its own session, stdout and stderr to files in ``log_dir``; sample the command line and
    environment of each of its processes every 0.2 s while it runs.  Returns (rc, output, {pid: (cmdline, environ)})."""
    seen: dict[int, tuple[bytes, bytes]] = {}
    with open(log_dir / "launcher.out", "w") as out, open(log_dir / "launcher.err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    pytest.fail(f"training timed out after {timeout} s")
                seen.update(_session_processes(proc.pid))
                time.sleep(0.2)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # nothing of the run may outlive it
            except ProcessLookupError:
                pass
            proc.wait()
    output = (log_dir / "launcher.out").read_text() + (log_dir / "launcher.err").read_text()
    return proc.returncode, output, seen


def test_training_streams_from_s3_and_no_secret_escapes(s3_cache, s3):
    """The deepspeed launcher, 2 ZeRO-3 ranks, 2 steps, evaluation at the end on the S3 store too; the step-0 check
    compares the streamed cache with the policy's own recomputation (policy = reference at step 0).  Credentials go
    in as ``--storage_options @file``; then the key and the secret are searched for, as bytes, in every file the run,
    W&B, TensorBoard and the cache job's Ray session wrote, in the objects of the bucket, in the launcher's output,
    and in the command lines and environments of the launcher and its ranks sampled while they ran."""
    root = s3_cache["root"]
    out, wandb_home, logs = root / "run", root / "wandb-home", root / "launcher-logs"
    logs.mkdir()
    args = ["--cache", s3_cache["url"], "--deepspeed", s3_cache["ds"], "--output_dir", str(out),
            "--storage_options", f"@{s3_cache['creds']}", "--eval_cache", s3_cache["url"],
            "--report_to", "tensorboard,wandb", "--max_steps", "2", "--micro_batch_size", "2",
            "--optim.lr", str(LR), "--optim.warmup_steps", "0", "--seed", "3", "--loss.beta", str(BETA),
            "--loss.alpha", str(ALPHA), "--loss.k", str(K), "--dist_timeout_s", "120"]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
           str(ROOT / "launchers" / "train.py"), *args]
    env = {k: v for k, v in os.environ.items() if k != "FPO_STORAGE_OPTIONS"}  # the file route alone
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", WANDB_MODE="offline",
               WANDB_SILENT="true", PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "tests"),
                                                                            os.environ.get("PYTHONPATH")) if p))
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[name] = str(wandb_home / name.lower())
    env.pop("MASTER_PORT", None)
    rc, log, procs = _launch_and_sample(cmd, env, logs, timeout=300)
    assert rc == 0, log[-6000:]
    assert "step-0 check: rows" in log
    m = metrics(out)
    train_steps = [r["step"] for r in m if "loss" in r]
    assert train_steps == [1, 2] and abs(m[0]["loss"] - np.log(2)) < 1e-5
    assert any("eval/loss" in r for r in m)

    # what was looked at is real: the launcher logged its command, both ranks and the launcher were sampled while
    # they ran, W&B recorded the command line, TensorBoard and the checkpoint hold the (masked) config
    assert "cmd = " in log and f"@{s3_cache['creds']}" in log
    cmdlines = [c.replace(b"\0", b" ") for c, _ in procs.values()]
    assert any(b"deepspeed" in c and b"--local_rank" not in c for c in cmdlines)
    assert sum(b"launchers/train.py" in c and b"--local_rank" in c for c in cmdlines) >= 2, cmdlines
    runs = list(wandb_home.rglob("run-*.wandb"))
    assert len(runs) == 1 and f"@{s3_cache['creds']}".encode() in runs[0].read_bytes()
    assert list((out / "tensorboard").glob("events.out.tfevents.*")) and list(out.rglob("fpo_state.json"))
    assert "endpoint_url" in (out / "config.yaml").read_text()

    secrets = (SECRET.encode(), KEY.encode())
    for pid, (cmdline, environ) in procs.items():
        assert not any(s in cmdline or s in environ for s in secrets), (pid, cmdline[:200])
    files = [p for d in (out, wandb_home, logs, s3_cache["ray_session"]) for p in d.rglob("*")
             if p.is_file() and not p.is_symlink()]
    assert len(files) > 20
    for path in files:
        data = path.read_bytes()
        assert not any(s in data for s in secrets), path
    fs = s3["fs"]
    objects = fs.find(f"{BUCKET}/store")
    assert any(o.endswith("/zarr.json") for o in objects)  # the provenance lives in the root's zarr.json
    for obj in objects:
        data = fs.cat_file(obj)
        assert not any(s in data for s in secrets), obj
    printed = "\n".join(s3_cache["logs"])  # the cache job's printed lines (its config, masked)
    assert "endpoint_url" in printed and SECRET not in printed and KEY not in printed
