"""The cache job: real Ray actors, real Zarr, tiny local models (and one real Gemma 3 check).

Invariances: 1 worker ≡ 2 workers (bit for bit); a worker dying mid-run ≡ an uninterrupted run; a
killed driver's rerun completes only the missing shards.  Oracles: plain transformers forward, and
sae-lens ``encode`` on the block-ℓ residual output.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fpo_dist.config import CacheConfig, load_config
from fpo_dist.store import open_store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
N_ROWS = 24


def make_rows(n: int) -> list[dict]:
    topics = ["the sea", "apples", "France", "numbers", "a fox", "the sky", "code", "tea"]
    rows = []
    for i in range(n):
        t = topics[i % len(topics)]
        rows.append({
            "prompt": f"Tell me about {t} ({i}).",
            "chosen": f"Here is a short answer about {t}: it is nice." + " Really." * (i % 5),
            "rejected": f"No idea about {t}." + " Sorry" * (i % 3),
        })
    rows[5]["rejected"] = rows[5]["chosen"]  # a bad row: identical responses
    rows[11]["chosen"] = ""  # a bad row: empty field
    return rows


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in make_rows(N_ROWS)) + "\n")
    return str(path)


def cache_config(tiny, dataset, output, **over) -> CacheConfig:
    args = [
        "--model.name_or_path", str(tiny.model_dir), "--sae.source", str(tiny.sae_dir),
        "--sae.layer", str(tiny.hook_layer), "--data.source", dataset, "--data.on_bad_row", "skip",
        "--data.max_length", "96", "--data.max_prompt_length", "48", "--output", str(output),
        "--rows_per_shard", "4", "--chunk_rows", "4", "--batch_size", "3", "--device", "cpu",
    ]
    for k, v in over.items():
        args += [f"--{k}", str(v)]
    return load_config(CacheConfig, None, args)


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance (2 CPUs, listening on loopback only, Ray's default token authentication, capped object
    store) for the in-process builds: started as the cache driver starts its own (``init_local_ray``).

    Its processes, and every process this module's tests start, get a private ``TMPDIR`` (:func:`workers_tmp`),
    removed at the end: what the deliberately killed workers and drivers leave goes with it, and a test can see what
    a job's workers left behind.  Ray's own directory stays the suite's (``RAY_TMPDIR``, set by conftest)."""
    from fpo_dist.cache import init_local_ray
    from fpo_dist.testing import private_tmpdir

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with private_tmpdir("fpo-test-cache-"):
        ray = init_local_ray(num_cpus=2, include_dashboard=False, object_store_memory=128 << 20, log_to_driver=False)
        yield ray
        ray.shutdown()


def workers_tmp() -> Path:
    """The temp directory of this module's Ray workers and subprocesses (set by :func:`ray_session`)."""
    return Path(os.environ["TMPDIR"])


def assert_workers_left_no_temporary_files(before: set[str], timeout_s: float = 15.0) -> None:
    """No file or directory the job's processes made in their temp directory outlives them (their exit is
    asynchronous: allow it ``timeout_s``).  torch's compile cache (``torchinductor_<user>``) is kept on purpose."""
    deadline = time.time() + timeout_s
    while True:
        left = {p for p in os.listdir(workers_tmp()) if not p.startswith("torchinductor_")} - before
        if not left or time.time() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"left in the workers' temp directory {workers_tmp()}: {sorted(left)}"


def test_the_suites_ray_sessions_go_with_its_private_temp_dir(ray_session, tmp_path):
    """Ray never removes a session's directory (logs, sockets): the suite's Ray instances keep theirs under the suite's
    private temp directory (``RAY_TMPDIR``, conftest), which is removed at the end; so is every cache job's local
    instance started from here, which inherits it.  Where that directory's path would make Ray's socket paths too long
    for the kernel, Ray's directory stays where Ray puts it (then this test is skipped, after checking that rule)."""
    import conftest

    from fpo_dist.testing import AF_UNIX_MAX, RAY_SOCKET_TAIL, private_tmpdir

    outer = os.environ["RAY_TMPDIR"]
    deep = tmp_path / ("d" * (AF_UNIX_MAX - RAY_SOCKET_TAIL))
    deep.mkdir()
    kept, tempfile.tempdir = tempfile.tempdir, str(deep)  # where private_tmpdir makes its directory
    try:
        with private_tmpdir("x-", ray=True) as d:
            assert d.parent == deep and os.environ["RAY_TMPDIR"] == outer  # too long: where Ray would put it
            assert os.environ["TMPDIR"] == str(d)
    finally:
        tempfile.tempdir = kept
    assert os.environ["RAY_TMPDIR"] == outer and not d.exists()

    assert conftest.SUITE_TMP is not None
    if outer != str(conftest.SUITE_TMP):
        pytest.skip(f"the suite's temp directory {conftest.SUITE_TMP} is too long for Ray's sockets under it")
    session = Path(ray_session._private.worker._global_node.get_session_dir_path())
    assert session.is_relative_to(conftest.SUITE_TMP / "ray"), session
    longest = max(len(str(p).encode()) for p in (session / "sockets").iterdir())
    assert longest <= len(outer.encode()) + RAY_SOCKET_TAIL <= AF_UNIX_MAX  # the margin holds here


def build(cfg, ray_session):
    from fpo_dist.cache.driver import run_cache_job

    return run_cache_job(cfg, log=lambda *_: None)


@pytest.fixture(scope="module")
def one_worker_store(tiny, dataset, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("w1") / "store"
    summary = build(cache_config(tiny, dataset, out, workers=1, per_token_logps="true"), ray_session)
    return out, summary


def assert_same_store(a, b):
    sa, sb = open_store(str(a)), open_store(str(b))
    assert sa.verify() == [] and sb.verify() == []
    # the store checksum is a hash of every shard's sha256 over all the bytes it wrote
    assert sa.attrs["checksum"] == sb.attrs["checksum"]
    rows = sa.ok_rows()
    ra, rb = sa.read_rows(rows, extras=True), sb.read_rows(rows, extras=True)
    assert np.array_equal(ra.logp_sum, rb.logp_sum) and np.array_equal(ra.chosen_codes.values, rb.chosen_codes.values)


def test_local_ray_instance_listens_on_loopback_only(ray_session):
    """The in-process instance (``init_local_ray``, as the cache driver's) with an actor alive: no process of it (this
    one, GCS, raylet, agents, workers) listens beyond loopback, read from outside with ``ss``."""
    from listening import beyond_loopback, descendants, listeners

    @ray_session.remote
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    probe = Probe.remote()
    actor = ray_session.get(probe.pid.remote())
    pids = descendants(os.getpid())
    assert actor in pids and any(s.pid == actor for s in listeners(pids))  # the actor's gRPC server is seen
    assert not beyond_loopback(pids), beyond_loopback(pids)
    ray_session.kill(probe)


def test_one_worker_equals_two_workers(one_worker_store, tiny, dataset, ray_session, tmp_path):
    out1, summary1 = one_worker_store
    assert summary1["counts"] == {"ok": N_ROWS - 2, "not_written": 0, "bad": {"identical_responses": 1, "empty_field": 1}}
    before = set(os.listdir(workers_tmp()))
    summary2 = build(cache_config(tiny, dataset, tmp_path / "w2", workers=2, per_token_logps="true"), ray_session)
    assert len(summary2["workers"]) == 2  # both actors really did shards
    assert all(w["shards"] > 0 for w in summary2["workers"].values())
    assert_same_store(out1, tmp_path / "w2")
    # the actors exit gracefully (ray.kill would leave wandb's two import-time directories per actor)
    assert_workers_left_no_temporary_files(before)


def test_cached_values_match_plain_transformers_and_sae_lens(one_worker_store, tiny):
    """Oracle: one unpadded sequence at a time through transformers; SAE codes from sae-lens ``encode``."""
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM

    store = open_store(str(one_worker_store[0]))
    model = AutoModelForCausalLM.from_pretrained(tiny.model_dir).eval()
    sae = SAE.load_from_disk(str(tiny.sae_dir))
    rows = store.ok_rows()[:8]
    batch = store.read_rows(rows, extras=True)
    captured = {}  # block ℓ's residual output (the tiny model's LAST block: hidden_states[-1] would be wrong)
    model.model.layers[tiny.hook_layer].register_forward_hook(
        lambda m, i, o: captured.update(h=o[0] if isinstance(o, tuple) else o))
    for b in range(len(rows)):
        for side, ids, codes, tok_lp in (
            (0, batch.chosen_ids[b], batch.chosen_codes, batch.chosen_token_logps[b]),
            (1, batch.rejected_ids[b], batch.rejected_codes, batch.rejected_token_logps[b]),
        ):
            prompt = torch.tensor(batch.prompt_ids[b], dtype=torch.long)
            seq = torch.cat([prompt, torch.tensor(ids, dtype=torch.long)])[None]
            with torch.no_grad():
                out = model(seq)
            logp = out.logits[0, :-1].log_softmax(-1).gather(-1, seq[0, 1:, None])[:, 0]
            resp = logp[len(prompt) - 1 :]  # positions predicting the response tokens
            assert batch.n_tokens[b, side] == len(ids)
            # up to rounding (fpo_dist.testing.rounding_tolerance): 2 blocks + head, 2·max|logit| per token
            # (≈ 6·10⁻⁵ per token here, |logit| ≤ 11; measured 1.9·10⁻⁶): a wrong token or position fails it
            from fpo_dist.testing import assert_rounding_close

            tok_scale = 2 * float(out.logits[0, len(prompt) - 1 : -1].abs().max())
            assert_rounding_close(torch.tensor(batch.logp_sum[b, side]).double(), resp.sum().double(),
                                  dtype=torch.float32, depth=3, scale=tok_scale * len(resp), msg="log-prob sum")
            assert_rounding_close(torch.tensor(tok_lp), resp, dtype=torch.float32, depth=3, scale=tok_scale,
                                  msg="per-token log-probs")
            h = captured["h"][0, len(prompt) - 1 : -1]  # the positions that predict response tokens
            pooled = sae.encode(h).mean(0)
            idx, val = codes.row(b)
            dense = torch.zeros_like(pooled)
            dense[torch.as_tensor(idx, dtype=torch.long)] = torch.as_tensor(val)
            # relative to the vector's largest entry, 2 blocks + the SAE encoder
            assert_rounding_close(dense, pooled, dtype=torch.float32, depth=3, dim=None, msg="pooled codes")
            assert (pooled != 0).sum() == len(idx)  # every non-zero is stored, nothing else


def dies_after_writing(shard: int, marker: Path) -> type:
    """A test-only CacheWorker: the first actor to process ``shard`` writes it, then dies (``os._exit``) before
    returning, so the driver never commits it.  ``marker`` (created by the dying actor, holding its pid) makes
    it happen once.  Defined in a function so that Ray ships the class to its workers by value."""
    from fpo_dist.cache.worker import CacheWorker

    marker = str(marker)

    class DiesAfterWrite(CacheWorker):
        def process(self, s: int) -> dict:
            res = super().process(s)  # the shard is in the store now
            if s == shard and not os.path.exists(marker):
                Path(marker).write_text(str(os.getpid()))
                os._exit(17)
            return res

    return DiesAfterWrite


def test_worker_dies_mid_run_store_identical(one_worker_store, tiny, dataset, ray_session, tmp_path, monkeypatch):
    import fpo_dist.cache.driver as driver

    marker = tmp_path / "died-once"
    # the driver makes its actors from this name (in this process): they run the dying subclass
    monkeypatch.setattr(driver, "CacheWorker", dies_after_writing(2, marker))
    logs: list[str] = []
    summary = driver.run_cache_job(
        cache_config(tiny, dataset, tmp_path / "faulty", workers=2, per_token_logps="true"), log=logs.append)
    assert marker.exists()  # the fault really happened
    assert len([m for m in logs if "died on shard 2" in m]) == 1, logs  # noticed once, and shard 2 re-queued
    n_shards = open_store(str(tmp_path / "faulty")).plan.n_shards
    assert summary["shards_done_now"] == n_shards
    assert sum(w["shards"] for w in summary["workers"].values()) == n_shards  # every shard reported exactly once
    assert_same_store(one_worker_store[0], tmp_path / "faulty")


def _session_pids(sid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid:  # field 6 of stat: session id
                    pids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def _kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while _session_pids(proc.pid) and time.time() < deadline:
        for pid in _session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    assert not _session_pids(proc.pid), "processes of the killed job remain"


def _yaml(cfg: CacheConfig, path: Path) -> Path:
    from fpo_dist.config import to_yaml

    path.write_text(to_yaml(cfg))
    return path


# The cache CLI (``fpo_dist.cache.__main__.main``, as ``python -m fpo_dist.cache`` runs it) with one change: its actor
# commits its first shard and then holds the next one until the file ``release`` exists (never, for a test that kills
# the job).  The tests below need the job mid-run at a given moment; without the hold, a fast machine finishes the
# tiny job between two polls (seen in CI: 6/6 shards committed).  The class is defined in ``__main__``, so Ray ships
# it to the worker by value.
_HELD_CLI = """
import os, sys, time
import fpo_dist.cache.driver as driver
from fpo_dist.cache.__main__ import main

release = sys.argv.pop(1)

class HeldCacheWorker(driver.CacheWorker):
    def process(self, s):
        while getattr(self, "_held_after_one", False) and not os.path.exists(release):
            time.sleep(0.1)
        self._held_after_one = True
        return super().process(s)

driver.CacheWorker = HeldCacheWorker
sys.exit(main(sys.argv[1:]))
"""


def held_cli(cfg_file: Path, release: Path | None = None) -> list[str]:
    release = release or cfg_file.with_name("never-released")
    return [sys.executable, "-c", _HELD_CLI, str(release), "--config", str(cfg_file)]


def test_killed_driver_rerun_completes_only_missing_shards(one_worker_store, tiny, dataset, ray_session, tmp_path):
    out = tmp_path / "killed"
    cfg = cache_config(tiny, dataset, out, workers=1, per_token_logps="true")
    cfg_file = _yaml(cfg, tmp_path / "cache.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(held_cli(cfg_file), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    committed = 0
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (out / "zarr.json").exists():
                try:
                    committed = len(open_store(str(out)).committed_shards())
                except Exception:  # noqa: BLE001 — the store may be mid-creation
                    committed = 0
                if committed >= 1:
                    break
            time.sleep(0.2)
    finally:
        _kill_session(proc)  # the driver and its local Ray instance: the whole process group
    n_shards = open_store(str(out)).plan.n_shards
    before = len(open_store(str(out)).committed_shards())
    assert before == 1 < n_shards, f"the driver was to be killed mid-run, after its first shard ({before}/{n_shards} committed)"
    from fpo_dist.store.lease import LEASE_KEY

    lease = json.loads((out / LEASE_KEY).read_text())  # the killed driver's lease is left behind ...
    assert lease["pid"] == proc.pid
    summary = build(cfg, ray_session)  # ... and the rerun takes it over (same host, pid gone)
    assert summary["shards_committed_before"] == before
    assert summary["shards_done_now"] == n_shards - before  # only the missing ones
    assert_same_store(one_worker_store[0], out)
    assert not (out / LEASE_KEY).exists()  # released at the end


def _descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every descendant of ``pid`` (read from /proc)."""
    from fpo_dist.cache.reaper import _descendants as walk
    from fpo_dist.cache.reaper import _stat

    st = _stat(pid)
    return {p: s for p, s in walk({pid: st[1]}).items() if p != pid} if st else {}


def test_sigkilled_driver_leaves_no_ray_process_behind(tiny, dataset, tmp_path):
    """SIGKILL the cache driver alone (by PID, not its process group) mid-run: every process of the local Ray
    instance it started (GCS, raylet, agents, workers) is gone within a bound.  Before the kill: that instance
    listens on loopback only and has Ray's token authentication on."""
    from listening import beyond_loopback

    from fpo_dist.cache.reaper import _stat

    out = tmp_path / "orphans"
    cfg_file = _yaml(cache_config(tiny, dataset, out, workers=1), tmp_path / "cache.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(held_cli(cfg_file), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                if open_store(str(out)).committed_shards():
                    break
            except Exception:  # noqa: BLE001 — not created yet
                pass
            time.sleep(0.2)
        ray_procs = _descendants(proc.pid)
        names = {p: Path(f"/proc/{p}/comm").read_text().strip() for p in ray_procs if Path(f"/proc/{p}/comm").exists()}
        assert len(ray_procs) >= 3, names  # gcs, raylet, worker(s), agents
        # mid-run, the CLI's local Ray instance (driver, GCS, raylet, agents, the CacheWorker) listens on loopback
        # only (``ss``), and runs with Ray's token authentication (the processes' environment)
        assert any("CacheWorker" in _cmdline(p) for p in ray_procs), names
        assert not beyond_loopback({proc.pid, *ray_procs}), beyond_loopback({proc.pid, *ray_procs})
        gcs = [p for p, n in names.items() if n == "gcs_server"]
        assert gcs and b"RAY_AUTH_MODE=token" in Path(f"/proc/{gcs[0]}/environ").read_bytes().split(b"\0")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 30
        left = ray_procs
        while left and time.time() < deadline:
            left = {p: s for p, s in ray_procs.items() if (st := _stat(p)) is not None and st[1] == s}
            time.sleep(0.2)
        assert not left, {p: names.get(p) for p in left}
    finally:
        _kill_session(proc)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only; unmounted in teardown)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_out_of_disk_stops_clearly_and_a_rerun_completes(one_worker_store, tiny, dataset, ray_session, small_disk,
                                                         tmp_path):
    """The store's disk fills up (from outside: a filler file, once the first shard is committed) while shards are
    written: the job stops with a clear error naming the shard and what to do, that shard is not committed, and a
    rerun after the space is freed completes to a store that verify passes, equal to an uninterrupted one."""
    import threading

    from fpo_dist.cache.driver import CacheJobError, run_cache_job

    out = small_disk / "store"
    cfg = cache_config(tiny, dataset, out, workers=1, per_token_logps="true")
    filler = small_disk / "filler"
    done = threading.Event()

    def fill():  # as soon as shard 0 is committed, take every free byte
        while not done.is_set():
            try:
                if open_store(str(out)).committed_shards():
                    break
            except Exception:  # noqa: BLE001 — not created yet
                pass
            time.sleep(0.05)
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass

    t = threading.Thread(target=fill, daemon=True)
    t.start()
    try:
        with pytest.raises((CacheJobError, OSError)) as err:
            run_cache_job(cfg, log=lambda *_: None)
    finally:
        done.set()
        t.join(30)
    assert "No space left on device" in str(err.value) or getattr(err.value, "errno", None) == 28, err.value
    if isinstance(err.value, CacheJobError):
        assert "not committed" in str(err.value) and "free space" in str(err.value), str(err.value)
    store = open_store(str(out))
    committed = store.committed_shards()
    assert 1 <= len(committed) < store.plan.n_shards
    filler.unlink()  # space freed
    summary = build(cfg, ray_session)
    assert summary["shards_committed_before"] == len(committed)
    assert_same_store(one_worker_store[0], out)


def test_second_job_on_the_same_store_refuses_up_front(one_worker_store, tiny, dataset, tmp_path):
    """Two real cache jobs on one output: the second refuses before planning, naming the first (host, pid, start
    time); the first completes to a store equal to an uninterrupted one and releases its lease."""
    from fpo_dist.store.lease import LEASE_KEY

    out = tmp_path / "shared"
    cfg_file = _yaml(cache_config(tiny, dataset, out, workers=1, per_token_logps="true"), tmp_path / "cache.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "fpo_dist.cache", "--config", str(cfg_file)]
    release = tmp_path / "release"  # the first job holds after its first shard until the second has been refused
    first = subprocess.Popen(held_cli(cfg_file, release), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / LEASE_KEY).exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert (out / LEASE_KEY).exists(), "the first job never took its lease"
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first job was to be still running"
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        err = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(err) == 1 and "is being written by another cache job" in err[0], second.stderr
        assert f"pid {first.pid}, started " in err[0] and f"host {socket.gethostname()}" in err[0]
        assert "Ray" not in second.stdout + second.stderr  # refused before any work
        release.touch()
        output, _ = first.communicate(timeout=400)
        assert first.returncode == 0, output[-3000:]
    finally:
        _kill_session(first)
    assert not (out / LEASE_KEY).exists()
    assert_same_store(one_worker_store[0], out)


def test_rerun_with_different_config_refuses(one_worker_store, tiny, dataset, ray_session):
    from fpo_dist.store import StoreMismatchError

    out = one_worker_store[0]
    with pytest.raises(StoreMismatchError, match="max_length"):
        build(cache_config(tiny, dataset, out, workers=1, per_token_logps="true", **{"data.max_length": 80}),
              ray_session)
    summary = build(cache_config(tiny, dataset, out, workers=1, per_token_logps="true"), ray_session)
    assert summary["shards_done_now"] == 0  # same config: everything already committed


def test_verify_and_info_cli(one_worker_store, tmp_path):
    import shutil

    src = one_worker_store[0]

    def run(*a):
        return subprocess.run([sys.executable, "-m", "fpo_dist.cache", *a], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)

    ok = run("verify", str(src), "--recompute", "4", "--device", "cpu")
    assert ok.returncode == 0 and "verify: OK" in ok.stdout, ok.stdout + ok.stderr
    info = run("info", str(src))
    assert info.returncode == 0
    assert "identical_responses: 1" in info.stdout and "empty_field: 1" in info.stdout
    assert "row 5: field rejected: identical_responses" in info.stdout and "row 11: field chosen" in info.stdout
    assert "bytes per response" in info.stdout

    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    chunk = next(p for p in sorted((broken / "shards" / "000001").rglob("*")) if p.is_file() and "/c/" in str(p))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    victim = next(p for p in sorted((broken / "logp_sum").rglob("*")) if p.is_file() and "/c/" in str(p) and p.name == "0")
    victim.unlink()  # a chunk of shard 0's per-row data vanishes
    store = open_store(str(broken), mode="r+")
    store._array("shard_state")[3] = 0  # and shard 3 is un-committed (a "missing shard")
    bad = run("verify", str(broken))
    assert bad.returncode == 1
    assert "shard 1" in bad.stdout and "shard 0" in bad.stdout and "logp_sum" in bad.stdout
    assert "shard 3" in bad.stdout and "not committed" in bad.stdout


def test_ray_job_submit_against_a_head_on_loopback(tiny, dataset, tmp_path, one_worker_store):
    """The demo's Ray head (``fpo_dist.demo.run.ray_head``: non-default ports, loopback, token authentication) +
    ``ray job submit`` of a cache job.  While the job runs, no process of the head's tree (GCS, raylet, agents,
    the job's driver and its CacheWorker actors) or of ``ray job submit`` listens anywhere but on loopback (``ss``,
    sampled); the dashboard refuses a request without the token; the head is stopped by process group."""
    import urllib.error
    import urllib.request

    from listening import beyond_loopback, descendants

    from fpo_dist.demo.run import ray_head

    ray_bin = Path(sys.executable).parent / "ray"
    cfg = cache_config(tiny, dataset, tmp_path / "submitted", workers=2, per_token_logps="true")
    cfg_file = _yaml(cfg, tmp_path / "job.yaml")
    before = set(os.listdir(workers_tmp()))
    with ray_head(tmp_path / "head.log") as (url, env):
        head_pid = next(p for p in descendants(os.getpid()) if "ray start --head" in _cmdline(p))
        with pytest.raises(urllib.error.HTTPError) as refused:  # no token: refused
            urllib.request.urlopen(f"{url}/api/jobs/", timeout=10)
        assert refused.value.code == 401
        submit = [str(ray_bin), "job", "submit", "--address", url, "--working-dir", str(ROOT),
                  "--", "python", "-m", "fpo_dist.cache", "--config", str(cfg_file)]
        leaks, n_actor_samples, deadline = set(), 0, time.time() + 90
        while True:
            with open(tmp_path / "submit.log", "w") as log:
                proc = subprocess.Popen(submit, env={**env, "OMP_NUM_THREADS": "1"}, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    while proc.poll() is None:  # sample the sockets of every process of the head and of the submit
                        pids = descendants(head_pid, proc.pid)
                        leaks |= set(beyond_loopback(pids))
                        n_actor_samples += any("CacheWorker" in _cmdline(p) for p in pids)
                        time.sleep(0.5)
                finally:
                    _kill_session(proc)
            output = (tmp_path / "submit.log").read_text()
            # the dashboard's job API may take a few seconds more than /api/version to come up
            if proc.returncode == 0 or time.time() > deadline or "Connection" not in output:
                break
            time.sleep(3)
        assert proc.returncode == 0, output[-3000:] + "\nhead:\n" + (tmp_path / "head.log").read_text()[-3000:]
        assert "cache done" in output and "succeeded" in output
    assert n_actor_samples >= 1, "no sample caught a cache actor alive"
    assert not leaks, leaks
    assert_same_store(one_worker_store[0], tmp_path / "submitted")
    # the head, the job and its actors kept their temporary files in the head's own temp dir, removed with it
    assert_workers_left_no_temporary_files(before, timeout_s=0)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.realmodel
def test_gemma3_real_model_cache(gemma_hf_dir, tmp_path):
    """A handful of short pairs through the real Gemma 3 270M; log-probs against plain transformers."""
    from fpo_dist.cache.driver import build_provenance
    from fpo_dist.cache.worker import CacheWorker
    from fpo_dist.data import load_source
    from fpo_dist.store import create_store
    from fpo_dist.testing import build_sae

    sae_dir = tmp_path / "sae640"
    build_sae(sae_dir, d_in=640, d_sae=256, hook_layer=17, threshold=0.5)
    rows = [
        {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " a banana."},
        {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 22"},
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " made of cheese."},
    ]
    data = tmp_path / "g.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = load_config(CacheConfig, None, [
        "--model.name_or_path", str(gemma_hf_dir), "--sae.source", str(sae_dir),
        "--sae.layer", "17", "--data.source", str(data), "--output", str(tmp_path / "gstore"),
        "--rows_per_shard", "4", "--chunk_rows", "4", "--device", "cpu", "--data.max_length", "64",
        "--data.max_prompt_length", "32",
    ])
    from fpo_dist.cache.worker import tokenizer_spec
    from fpo_dist.models import load_tokenizer

    worker_tok = load_tokenizer(tokenizer_spec(cfg.model))
    src = load_source(cfg.data)
    store = create_store(cfg.output, build_provenance(cfg, src, worker_tok), len(src), 4, 4)
    worker = CacheWorker(cfg, threads=2)
    res = worker.process(0)
    store.commit_shard(0, res["checksum"])
    store.finalize()
    batch = open_store(cfg.output).read_rows([0, 1, 2])
    model = worker.model
    for b in range(3):
        for side, ids in ((0, batch.chosen_ids[b]), (1, batch.rejected_ids[b])):
            seq = torch.tensor(np.concatenate([batch.prompt_ids[b], ids]), dtype=torch.long)[None]
            with torch.no_grad():
                logits = model(seq).logits.float()
            logp = logits[0, :-1].log_softmax(-1).gather(-1, seq[0, 1:, None])[:, 0][len(batch.prompt_ids[b]) - 1 :]
            # up to rounding (fpo_dist.testing.rounding_tolerance): another batch shape through 18 blocks and the head
            # (depth 19), a token's log-prob moving by ≤ 2·max|logit| (≈ 25): ≈ 9·10⁻⁴ per token; a wrong token,
            # position or mask moves it by ≫ 10⁻²
            from fpo_dist.testing import assert_rounding_close

            top = float(logits[0, len(batch.prompt_ids[b]) - 1 : -1].abs().max())
            assert_rounding_close(torch.tensor(batch.logp_sum[b, side]).double(), logp.sum().double(),
                                  dtype=torch.float32, depth=19, scale=2 * top * len(logp), msg=f"pair {b}, side {side}")
    assert batch.logp_sum[0, 0] > batch.logp_sum[0, 1]  # a real model prefers " Paris." to " a banana."
    assert (np.diff(batch.chosen_codes.offsets) > 0).all()  # the d_in=640 SAE produced codes at block 17
