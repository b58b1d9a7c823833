"""cluster/: the SLURM batch scripts, end to end on a real 2-node SLURM cluster on this machine, with the real jobs.

The dry-run tests (fast, no SLURM) check the layout and the exact commands the scripts would run. The slow tests
bring up ONE private cluster for the module with the project's own harness (cluster/local/slurm-cluster.sh:
munged, slurmctld and two slurmd, node1/node2, all under one temp dir) and submit the real scripts to it, running
the real jobs (`python -m fpo_dist.cache`, `launchers/train.py`) on the tiny local model, SAE and data:

* pipeline.sh: cache.sbatch (Ray head on node1, Ray worker on node2, 2 cache actors: one on each Ray node, each
  did shards; the store verifies) then, after it succeeded, train.sbatch (torchrun, one launcher per node: world
  size 2, node ranks 0 and 1, ZeRO-3 with every parameter partitioned, 2 steps, a checkpoint and the HF export,
  which plain transformers loads);
* a cache job with a configuration error fails its batch job with the driver's exit code (2), and the dependent
  training job never runs;
* a cancelled cache job (stuck: its actor asks for more CPUs than any node has) leaves no process of its job behind;
* train.sbatch with the deepspeed launcher (--no_ssh, node rank from $SLURM_NODEID) resumes the pipeline's run;
* `down` leaves no process behind: daemons, Ray processes and job processes are checked by PID (in the cluster
  fixture's teardown, so it holds whichever tests ran).

No test depends on another: the pipeline runs once per module in the `pipeline` fixture, shared by the tests that
check it and the one that resumes its run; each test passes alone (-k) and in any order.

Set FPO_TEST_KEEP_CLUSTER_DIR=1 to keep the cluster's work dir (job logs, Ray logs, stores, runs) for debugging.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import conftest
import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "cluster" / "local" / "slurm-cluster.sh"
SLURM = ROOT / "cluster" / "slurm"
PY = sys.executable

# ---------------------------------------------------------------------------------------------------------------
# Job commands: the environment that selects each job for cache.sbatch / train.sbatch ({work} is filled in with
# the cluster's work dir, where the Cluster fixture writes the configs, data and DeepSpeed config).
# ---------------------------------------------------------------------------------------------------------------
N_ROWS = 16  # 4 shards of 4 rows: both actors get a shard at once, so each Ray node's actor does >= 1
CACHE_JOB = {"FPO_CACHE_CONFIG": "{work}/cache.yaml", "FPO_CACHE_ARGS": "--workers 2 --cpus_per_worker 1"}
# a configuration error (rows_per_shard not a multiple of chunk_rows): the driver exits 2 before any work
CACHE_JOB_FAILING = {"FPO_CACHE_CONFIG": "{work}/cache.yaml",
                     "FPO_CACHE_ARGS": "--output {work}/bad.zarr --rows_per_shard 3"}
# an actor that asks for more CPUs than any Ray node has (1 each) is never scheduled: the job runs until cancelled
# a long job (8000 pairs, one pair per forward on one worker): it is still running when the test cancels it
CACHE_JOB_HANGING = {"FPO_CACHE_CONFIG": "{work}/cache.yaml",
                     "FPO_CACHE_ARGS": "--output {work}/hang.zarr --workers 1 --data.source {work}/many.jsonl "
                                       "--rows_per_shard 512 --chunk_rows 256 --batch_size 1"}
TRAIN_JOB = {"FPO_TRAIN_CONFIG": "{work}/train.yaml", "FPO_DS_CONFIG": "{work}/zero3_test.json",
             "FPO_TRAIN_ARGS": "--max_steps 2 --micro_batch_size 2"}


def write_job_files(work: Path, tiny) -> None:
    """The tiny preference data, the cache and training configs, and ZeRO-3 with every parameter partitioned."""
    from fpo_dist.testing import toy_pairs

    rows = toy_pairs(N_ROWS)
    (work / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (work / "many.jsonl").write_text("\n".join(json.dumps(rows[i % N_ROWS]) for i in range(8000)) + "\n")
    (work / "cache.yaml").write_text(json.dumps({  # YAML is a superset of JSON
        "model": {"name_or_path": str(tiny.model_dir)},
        "sae": {"source": str(tiny.sae_dir), "layer": tiny.hook_layer},
        "data": {"source": str(work / "pairs.jsonl"), "max_length": 64, "max_prompt_length": 32},
        "output": str(work / "store.zarr"), "rows_per_shard": 4, "chunk_rows": 4, "batch_size": 4,
        "device": "cpu",
    }, indent=1))
    (work / "train.yaml").write_text(json.dumps({
        "cache": str(work / "store.zarr"), "output_dir": str(work / "run"), "seed": 3, "dist_timeout_s": 120,
        "optim": {"lr": 5e-3, "warmup_steps": 0},
    }, indent=1))
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every parameter
    (work / "zero3_test.json").write_text(json.dumps(ds))


def check_cache_log(log: str) -> dict[str, tuple[str, int, int]]:
    """Both Ray nodes joined and both nodes' actors did shards; returns {node id: (host, actor pid, shards)}."""
    assert "all 2 Ray nodes joined" in log, log[-4000:]
    workers = re.findall(r"^\s*worker (\S+):(\d+) \[cpu\] ray node ([0-9a-f]+): (\d+) shards", log, re.M)
    nodes = {node: (host, int(pid), int(shards)) for host, pid, node, shards in workers}
    assert len(workers) == 2 and len(nodes) == 2, log[-4000:]  # two actors, on two distinct Ray nodes
    assert all(shards >= 1 for _, _, shards in nodes.values()), nodes
    assert sum(shards for _, _, shards in nodes.values()) == N_ROWS // 4, nodes
    return nodes


def check_train_log(log: str, launcher: str = "torchrun") -> None:
    """One launcher per node (srun --label: task 0 = node1, task 1 = node2) with node ranks 0 and 1; rank 0, which
    alone prints the trainer's output, ran on node1."""
    starts = set(re.findall(r"^(\d+): \[fpo\] node (\S+): node rank (\d+), ranks (\S+) of (\d+) \((\w+)\)$", log, re.M))
    assert starts == {("0", "node1", "0", "0-0", "2", launcher), ("1", "node2", "1", "1-1", "2", launcher)}, log[-4000:]
    assert re.search(r"^0: fpo-dist train, config:", log, re.M) and not re.search(r"^1: fpo-dist train", log, re.M)


def check_train_run(out: Path, steps: list[int]) -> None:
    """World size 2, the steps' metrics, a ZeRO-3 checkpoint written by both ranks, an HF export that loads."""
    info = json.loads((out / "run_info.json").read_text())
    assert (info["world_size"], info["zero_stage"]) == (2, 3), info
    assert info["ds_config"]["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == steps
    ckpt = out / "checkpoints" / f"step_{steps[-1]}"
    assert (ckpt / "rng_rank0.pt").exists() and (ckpt / "rng_rank1.pt").exists(), list(ckpt.rglob("*"))
    assert len(list(ckpt.rglob("*optim_states.pt"))) == 2, list(ckpt.rglob("*"))  # one ZeRO partition per rank
    from transformers import AutoModelForCausalLM

    assert (out / "hf" / "config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(str(out / "hf"))
    assert type(model).__name__ == "LlamaForCausalLM"


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
NETNS_PID = "FPO_TEST_NETNS_PID"  # in a command's env: run it in that process's network namespace (the cluster's)


def run(cmd, env, timeout=120, check=True):
    if env.get(NETNS_PID):  # SLURM's clients reach slurmctld only from inside the cluster's network namespace
        cmd = ["nsenter", f"--net=/proc/{env[NETNS_PID]}/ns/net", "--", *cmd]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} -> {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


def no_slurm_env() -> dict:
    """This environment minus SLURM_* (as outside any allocation)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def layout_value(out: str, key: str) -> str:
    m = re.search(rf"^{key}\s+(.*)$", out, re.M)
    assert m, f"no '{key}' in:\n{out}"
    return m.group(1).rstrip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """True if pid runs (a zombie, dead but not yet reaped by its parent, does not count)."""
    try:
        return not Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1].startswith("Z")
    except OSError:
        return False


def procs_with_env(**want: str) -> list[int]:
    """Live PIDs whose environment has all of var=value (this cluster's processes carry its SLURM_CONF)."""
    found = []
    items = {f"{k}={v}".encode() for k, v in want.items()}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if items <= set((p / "environ").read_bytes().split(b"\0")):
                found.append(int(p.name))
        except OSError:
            pass
    return [pid for pid in found if pid_alive(pid)]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_gone(pids: set[int], conf: str, job: str, timeout: float = 20) -> None:
    """Wait until none of pids runs and no process carries this cluster's SLURM_CONF with SLURM_JOB_ID=job.
    (A job is over once its batch script exits; step processes may take SLURM's KillWait, 5 s, to go.)"""
    deadline = time.monotonic() + timeout
    while [p for p in pids if pid_alive(p)] or procs_with_env(SLURM_CONF=conf, SLURM_JOB_ID=job):
        assert time.monotonic() < deadline, ([p for p in pids if pid_alive(p)],
                                             procs_with_env(SLURM_CONF=conf, SLURM_JOB_ID=job))
        time.sleep(0.5)


def job_info(job: str, env: dict) -> dict:
    out = run(["scontrol", "show", "job", job], env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_jobs(jobs: list[str], env: dict, timeout: float = 240, on_poll=None) -> list[dict]:
    """Poll (1 s) until none of the jobs is pending or running; `sbatch --wait` polls far slower.  ``on_poll()``, if
    given, is called at every poll while the jobs run."""
    deadline = time.monotonic() + timeout
    while run(["squeue", "-h", "-j", ",".join(jobs)], env, check=False).stdout.strip():
        if on_poll is not None:
            on_poll()
        if time.monotonic() > deadline:
            run(["scancel", *jobs], env, check=False)
            raise AssertionError(f"jobs {jobs} not done after {timeout} s")
        time.sleep(1)
    return [job_info(j, env) for j in jobs]


# ---------------------------------------------------------------------------------------------------------------
# dry runs: no SLURM needed
# ---------------------------------------------------------------------------------------------------------------
def dry(script: str, **env) -> str:
    e = {**no_slurm_env(), **env}
    return run(["bash", str(SLURM / script), "--dry-run", *e.pop("ARGS", "").split()], e, timeout=30).stdout


def test_dry_run_cache_layout():
    out = dry("cache.sbatch", FPO_DRY_NODES="n1 n2 n3", SLURM_JOB_ID="4242", FPO_HEAD_IP="10.9.8.7",
              FPO_GPUS_PER_NODE="4", FPO_CPUS_PER_NODE="16", FPO_CACHE_CONFIG="c.yaml",
              FPO_PYTHON="/opt/py/bin/python", ARGS="-- --shard_rows 64")
    assert layout_value(out, "nodes") == "3 (n1 n2 n3)"
    assert layout_value(out, "head") == "n1"
    assert layout_value(out, "port_base") == "22420"  # 20000 + 10 * (4242 % 1000)
    head = layout_value(out, "head_cmd")
    for part in ("start --head", "--node-ip-address=10.9.8.7", "--port=22420", "--dashboard-port=22421",
                 "--ray-client-server-port=22422", "--num-cpus=16", "--num-gpus=4", "--block", "--temp-dir="):
        assert part in head, (part, head)
    worker = layout_value(out, "worker_cmd")
    assert "--address=10.9.8.7:22420" in worker and "--node-ip-address=$(hostname -I" in worker, worker
    assert "-N2 -n2 -x n1" in layout_value(out, "worker_step")
    assert layout_value(out, "ray_auth") == "token (a per-job token in RAY_AUTH_TOKEN)"  # Ray's token auth, on
    assert "-N1 -n1 -w n1" in layout_value(out, "head_step")
    assert "job submit --address http://10.9.8.7:22421" in layout_value(out, "submit")
    assert layout_value(out, "entrypoint") == (
        f"cd {ROOT} && /opt/py/bin/python -m fpo_dist.cache --config c.yaml --ray_address auto --shard_rows 64")


def test_dry_run_train_torchrun_node_rank_is_expanded_per_node():
    out = dry("train.sbatch", FPO_DRY_NODES="a b", SLURM_JOB_ID="7", FPO_HEAD_IP="10.0.0.5", FPO_CPUS_PER_NODE="8",
              FPO_PROCS_PER_NODE="2", FPO_TRAIN_CONFIG="t.yaml", FPO_PYTHON="echo", ARGS="--resume auto")
    assert (layout_value(out, "device"), layout_value(out, "world_size"), layout_value(out, "omp_threads")) == (
        "cpu", "4", "4")
    assert layout_value(out, "node_ranks") == "a=0 b=1"
    node_cmd = layout_value(out, "node_cmd")
    assert "--node_rank=$SLURM_NODEID" in node_cmd  # left for each node's shell, not expanded in the batch step
    assert "\\$SLURM_NODEID" in layout_value(out, "train_step")
    # what each node's shell makes of it (FPO_PYTHON=echo prints the launcher's argv)
    for nodeid in ("0", "1"):
        argv = run(["bash", "-c", node_cmd], {**no_slurm_env(), "SLURM_NODEID": nodeid}).stdout.split()
        assert argv[:2] == ["-m", "torch.distributed.run"], argv
        assert f"--node_rank={nodeid}" in argv and "--nnodes=2" in argv and "--nproc_per_node=2" in argv
        assert "--master_addr=10.0.0.5" in argv and "--master_port=20075" in argv
        assert argv[-7:] == ["launchers/train.py", "--config", "t.yaml", "--deepspeed", "ds_configs/zero3.json",
                             "--resume", "auto"]


def test_dry_run_train_deepspeed_gpu():
    out = dry("train.sbatch", FPO_DRY_NODES="a b c", FPO_HEAD_IP="10.0.0.5", FPO_GPUS_PER_NODE="8",
              FPO_LAUNCHER="deepspeed", FPO_TRAIN_CONFIG="t.yaml")
    assert (layout_value(out, "device"), layout_value(out, "procs_per_node"), layout_value(out, "world_size")) == (
        "gpu", "8", "24")
    node_cmd = layout_value(out, "node_cmd")
    assert "deepspeed.launcher.runner --no_ssh --no_local_rank --node_rank=$SLURM_NODEID" in node_cmd
    assert "printf '%s slots=8\\n' a b c" in node_cmd
    assert "--gres=gpu:8" in layout_value(out, "train_step")


def test_dry_run_pipeline_chains_afterok():
    out = dry("pipeline.sh", FPO_PARTITION="p1", FPO_CACHE_NODES="3", FPO_TRAIN_NODES="2",
              FPO_CACHE_CONFIG="c.yaml", FPO_TRAIN_CONFIG="t.yaml", FPO_LOG_DIR="/x/logs")
    cache = layout_value(out, "cache_submit")
    train = layout_value(out, "train_submit")
    assert "--parsable" in cache and "--partition=p1" in cache and "--nodes=3" in cache
    assert cache.endswith("cluster/slurm/cache.sbatch") and "--output=/x/logs/%x-%j.out" in cache
    assert "--dependency=afterok:" in train and "--kill-on-invalid-dep=yes" in train and "--nodes=2" in train
    assert "== fpo cache job (dry run) ==" in out and "== fpo train job (dry run) ==" in out


def test_scripts_refuse_to_run_outside_slurm():
    p = run(["bash", str(SLURM / "cache.sbatch")], {**no_slurm_env(), "FPO_CACHE_CONFIG": "c.yaml"}, check=False)
    assert p.returncode == 2 and "not inside a SLURM allocation" in p.stderr


# ---------------------------------------------------------------------------------------------------------------
# a real 2-node SLURM cluster
# ---------------------------------------------------------------------------------------------------------------
class Cluster:
    def __init__(self, work: Path):
        self.work = work
        self.dir = work / "slurm"
        self.conf = str(self.dir / "etc" / "slurm.conf")
        self.harness_env = {**no_slurm_env(), "FPO_SLURM_DIR": str(self.dir),
                            "FPO_SLURM_CTLD_PORT": str(free_port()), "FPO_SLURM_SLURMD_PORT": str(free_port())}
        self.daemon_pids: set[int] = set()
        self.job_pids: set[int] = set()  # Ray processes, cache actors etc. seen while the jobs ran
        self.netns_pid: int | None = None  # the process holding the cluster's private network namespace
        self.listeners: set[str] = set()  # "comm proto address:port" of every listening socket sampled (pipeline)
        self.exposed: set[str] = set()  # those reachable from outside the machine (should stay empty)

    def harness(self, *args, check=True):
        return run(["bash", str(HARNESS), *args], self.harness_env, timeout=300, check=check)

    def env(self, **extra) -> dict:
        """Environment for sbatch / pipeline.sh: this cluster, this Python, small Ray, everything under work/.
        One CPU per node for Ray and the ranks (2 cores in all): one cache actor per Ray node, OMP_NUM_THREADS=1."""
        extra = {k: v.format(work=self.work) for k, v in extra.items()}
        return {**no_slurm_env(), "SLURM_CONF": self.conf, "FPO_PYTHON": PY, "FPO_LOG_DIR": str(self.work / "logs"),
                "FPO_RAY_TEMP_DIR": str(self.work / "ray"), "FPO_RAY_OBJECT_STORE_BYTES": str(80 * 2**20),
                "FPO_RAY_JOIN_TIMEOUT": "120", "FPO_CPUS_PER_NODE": "1", "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                # every node (all on this host) finds its address on loopback, never the network interface's
                # (`hostname -I`, the scripts' default on a real cluster): all traffic of the test stays on 127/8
                "FPO_IP_CMD": "echo 127.0.0.2", NETNS_PID: str(self.netns_pid or ""), **extra}

    def sample_sockets(self) -> None:
        """Record the listening sockets of every process of this cluster (daemons, and everything carrying its
        SLURM_CONF: batch scripts, srun steps, Ray, the cache driver and actors, torchrun and the ranks)."""
        from listening import listeners

        pids = set(procs_with_env(SLURM_CONF=self.conf)) | self.daemon_pids
        for sock in listeners(pids):
            self.listeners.add(f"{sock.comm} {sock.proto} {sock.address}:{sock.port}")
            if sock.exposed:
                self.exposed.add(str(sock))

    def pidfile_pids(self) -> set[int]:
        return {int(f.read_text()) for f in (self.dir / "run").glob("*.pid")}

    def pipeline(self, on_poll=None, **extra) -> tuple[dict, dict]:
        """pipeline.sh with these job settings; waits for both jobs and returns their `scontrol show job` info."""
        env = self.env(FPO_CACHE_NODES="2", FPO_TRAIN_NODES="2", **extra)
        out = run([str(SLURM / "pipeline.sh")], env).stdout
        ids = dict(re.findall(r"^(FPO_\w+_JOB)=(\d+)$", out, re.M))
        cache, train = wait_jobs([ids["FPO_CACHE_JOB"], ids["FPO_TRAIN_JOB"]], env, on_poll=on_poll)
        return cache, train

    def log(self, name: str) -> str:
        path = self.work / "logs" / name
        return path.read_text() if path.exists() else f"(no {path})"


@pytest.fixture(scope="module")
def cluster(tiny):
    """The module's cluster.  Its teardown is a check: after `down`, nothing this module started is alive (daemons,
    Ray and job processes seen by the tests, anything carrying this cluster's SLURM_CONF), and `status` says down."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM harness needs root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("no SLURM and no apt-get to install it")
    if not shutil.which("slurmctld") and conftest.NETNS_NOTE is None:  # in the private namespace: no mirror here
        pytest.fail("slurm-wlm/munge are not installed and this run cannot install them from its private network "
                    "namespace: `bash cluster/local/slurm-cluster.sh install` (root) first; the suite does it before "
                    "it enters the namespace, and said: " + (conftest.SLURM_INSTALL_NOTE or "(it did not try: "
                    "FPO_SLURM_INSTALL=0, or test_cluster.py was not among pytest's arguments)"))
    work = Path(tempfile.mkdtemp(prefix="fpo-cl-"))  # short: unix socket paths live under it
    work.chmod(0o755)  # munged wants every directory above its socket searchable by all
    write_job_files(work, tiny)
    c = Cluster(work)
    served = False
    try:
        c.harness("up", "--nodes", "2", "--cpus", "2")
        c.daemon_pids = c.pidfile_pids()
        netns = c.dir / "run" / "netns.pid"
        c.netns_pid = int(netns.read_text()) if netns.exists() else None
        assert len(c.daemon_pids) == 4 + (c.netns_pid is not None)  # munged, slurmctld, 2 x slurmd (+ netns holder)
        served = True
        yield c
    finally:
        down = c.harness("down", check=False)
        started = c.daemon_pids | c.job_pids
        alive = [p for p in started if pid_alive(p)]
        leftover = procs_with_env(SLURM_CONF=c.conf)
        for pid in set(alive) | set(leftover):  # should be none (checked below); never leave them running
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        status = c.harness("status", check=False)
        if os.environ.get("FPO_TEST_KEEP_CLUSTER_DIR") == "1":
            print(f"\nkept the cluster's work dir: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if served:  # not when `up` failed: its own error is the one to report
        assert down.returncode == 0, f"down -> {down.returncode}\n{down.stdout[-4000:]}\n{down.stderr[-4000:]}"
        assert not alive, {p: cmdline(p)[:100] for p in alive}
        assert leftover == [], {p: cmdline(p)[:100] for p in leftover}
        assert status.returncode != 0, status.stdout + status.stderr


@pytest.fixture(scope="module")
def pipeline(cluster) -> tuple[dict, dict]:
    """pipeline.sh (cache job on Ray, then the torchrun training job) run once for the module: its jobs' info.
    The cache actors' PIDs join the processes the teardown checks."""
    cache, train = cluster.pipeline(on_poll=cluster.sample_sockets, **CACHE_JOB, **TRAIN_JOB)
    cache_log = cluster.log(f"fpo-cache-{cache['JobId']}.out")
    cluster.job_pids |= {int(pid) for pid in re.findall(r"^\s*worker \S+:(\d+) \[cpu\] ray node", cache_log, re.M)}
    return cache, train


@pytest.mark.slow
def test_harness_up_is_idempotent(cluster):
    p = cluster.harness("up", "--nodes", "2")
    assert "already up" in p.stderr
    assert cluster.pidfile_pids() == cluster.daemon_pids
    deadline = time.monotonic() + 30  # after another test's job, a node may take a moment to leave "completing"
    while (sinfo := run(["sinfo", "-h", "-o", "%D %t"], cluster.env()).stdout.split()) != ["2", "idle"]:
        assert time.monotonic() < deadline, sinfo
        time.sleep(1)


@pytest.mark.slow
def test_pipeline_cache_on_ray_then_train_with_torchrun(cluster, pipeline):
    cache, train = pipeline
    cache_log = cluster.log(f"fpo-cache-{cache['JobId']}.out")
    train_log = cluster.log(f"fpo-train-{train['JobId']}.out")
    assert (cache["JobState"], cache["ExitCode"]) == ("COMPLETED", "0:0"), cache_log[-4000:]
    assert (train["JobState"], train["ExitCode"]) == ("COMPLETED", "0:0"), train_log[-4000:]
    assert train["Dependency"] in ("(null)", f"afterok:{cache['JobId']}(unfulfilled)")
    assert train["StartTime"] >= cache["EndTime"]  # ISO timestamps: the chain held

    # cache: Ray over both nodes, one actor on each did shards, the store is complete and verifies
    actors = {pid for _, pid, _ in check_cache_log(cache_log).values()}
    verify = run([PY, "-m", "fpo_dist.cache", "verify", str(cluster.work / "store.zarr")], cluster.env())
    assert "verify: OK" in verify.stdout, verify.stdout
    # the batch script tore down its own Ray (by ending its srun steps), not just SLURM at job end
    cluster.job_pids |= actors
    wait_gone(actors, cluster.conf, cache["JobId"])
    assert (cluster.work / "ray" / "ray_current_cluster").exists()  # per-job Ray temp dir, not /tmp/ray

    # train: one torchrun per node, world size 2, checkpoint, HF export
    check_train_log(train_log)
    check_train_run(cluster.work / "run", steps=[1, 2])
    wait_gone(set(), cluster.conf, train["JobId"])


@pytest.mark.slow
def test_local_cluster_traffic_stays_on_loopback(cluster, pipeline):
    """Nothing the local cluster runs can be reached from outside the machine, sampled every second while the
    pipeline ran (``ss`` in each process's network namespace, ``tests/listening.py``): the daemons and every job
    process (Ray head and worker, GCS, raylets, agents, cache driver and actors, torchrun and the ranks) live in the
    harness's private network namespace, whose only interface is ``lo`` — multi-node Ray binds every interface
    (its node addresses cannot be 127.0.0.1), so the namespace is what keeps it private.  Ray ran with token
    authentication.  And every address the run printed (head, Ray nodes, torchrun's master) is loopback: the nodes
    found theirs through FPO_IP_CMD, not `hostname -I`."""
    import ipaddress

    cache, train = pipeline
    assert cluster.netns_pid is not None, "the harness fell back to the host's network (no network namespace)"
    ns = Path(f"/proc/{cluster.netns_pid}/net/dev").read_text().splitlines()[2:]
    assert [line.split(":")[0].strip() for line in ns] == ["lo"]
    comms = {entry.split()[0] for entry in cluster.listeners}
    assert {"slurmctld", "slurmd", "gcs_server", "raylet"} <= comms, sorted(cluster.listeners)  # sampled mid-run
    assert any(c.startswith("ray::CacheWorke") for c in comms), sorted(comms)  # a cache actor's gRPC server
    assert not cluster.exposed, sorted(cluster.exposed)
    logs = {name: cluster.log(f"fpo-{name}-{job['JobId']}.out") for name, job in (("cache", cache), ("train", train))}
    assert layout_value(logs["cache"], "ray_auth").startswith("token"), logs["cache"][:3000]
    for name, text in logs.items():
        assert ipaddress.ip_address(layout_value(text, "head_ip")).is_loopback, (name, layout_value(text, "head_ip"))
        # Ray's C++ probe for a "local IP" (a UDP connect to 8.8.8.8:53) fails in the namespace — no route — and says
        # so: proof of the isolation, not an address in use
        text = "\n".join(line for line in text.splitlines() if "via external connectivity to: 8.8.8.8" not in line)
        found = set()
        for candidate in re.findall(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.])", text):
            try:
                found.add(ipaddress.ip_address(candidate))
            except ValueError:
                continue
        assert found and all(ip.is_loopback for ip in found), (name, sorted(map(str, found)), [
            line for line in text.splitlines() if any(str(ip) in line for ip in found if not ip.is_loopback)][:5])
    assert "--master_addr=127." in logs["train"] or "master_addr 127." in logs["train"], logs["train"][-3000:]


def test_failing_cache_job_fails_batch_job_and_cancels_training(cluster):
    cache, train = cluster.pipeline(**CACHE_JOB_FAILING, **TRAIN_JOB)
    cache_log = cluster.log(f"fpo-cache-{cache['JobId']}.out")
    assert (cache["JobState"], cache["ExitCode"]) == ("FAILED", "2:0"), cache_log[-4000:]
    assert "all 2 Ray nodes joined" in cache_log  # Ray was up on both nodes; the driver exited 2
    assert "configuration error: 'rows_per_shard' (3) must be a positive multiple" in cache_log, cache_log[-4000:]
    assert train["JobState"] == "CANCELLED" and train["Reason"] == "DependencyNeverSatisfied", train
    assert not (cluster.work / "logs" / f"fpo-train-{train['JobId']}.out").exists()


@pytest.mark.slow
def test_cancelled_cache_job_tears_down_its_ray_cluster(cluster):
    env = cluster.env(**CACHE_JOB_HANGING)
    log = cluster.work / "logs" / "hang-%j.out"
    log.parent.mkdir(exist_ok=True)
    job = run(["sbatch", "--parsable", "-N2", f"--output={log}", str(SLURM / "cache.sbatch")], env).stdout.strip()
    log = Path(str(log).replace("%j", job))
    deadline = time.monotonic() + 180
    # the driver started its actor: Ray is up on both nodes and the job runs
    while "1 cache worker(s)" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and job_info(job, env)["JobState"] in ("PENDING", "RUNNING"), (
            log.read_text()[-4000:] if log.exists() else job_info(job, env))
        time.sleep(1)
    assert "all 2 Ray nodes joined" in log.read_text()
    running = set(procs_with_env(SLURM_CONF=cluster.conf, SLURM_JOB_ID=job))  # batch script, sruns, Ray, driver
    for node in ("node1", "node2"):  # a raylet in each node's srun step
        on_node = procs_with_env(SLURM_CONF=cluster.conf, SLURM_JOB_ID=job, SLURMD_NODENAME=node)
        assert [p for p in on_node if "/raylet " in cmdline(p)], (node, {p: cmdline(p)[:100] for p in running})
    cluster.job_pids |= running
    run(["scancel", job], env)
    (info,) = wait_jobs([job], env, timeout=60)
    assert info["JobState"] == "CANCELLED", info
    wait_gone(running, cluster.conf, job)


@pytest.mark.slow
def test_train_with_deepspeed_launcher_resumes(cluster, pipeline):
    """train.sbatch with the deepspeed launcher continues the pipeline's run (a copy): one more step, both nodes."""
    _, train = pipeline
    assert (train["JobState"], train["ExitCode"]) == ("COMPLETED", "0:0"), cluster.log(
        f"fpo-train-{train['JobId']}.out")[-4000:]
    assert (cluster.work / "run" / "checkpoints" / "step_2").exists()  # the run to resume
    shutil.copytree(cluster.work / "run", cluster.work / "run_ds")
    env = cluster.env(FPO_LAUNCHER="deepspeed", **{
        **TRAIN_JOB, "FPO_TRAIN_ARGS": "--max_steps 3 --micro_batch_size 2 --resume auto --output_dir {work}/run_ds"})
    log = cluster.work / "logs" / "ds-%j.out"
    job = run(["sbatch", "--parsable", "-N2", f"--output={log}", str(SLURM / "train.sbatch")], env).stdout.strip()
    (info,) = wait_jobs([job], env)
    text = Path(str(log).replace("%j", job)).read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-4000:]
    check_train_log(text, launcher="deepspeed")
    assert re.search(r"^0: resumed from \S+/step_2: step 2", text, re.M), text[-4000:]
    check_train_run(cluster.work / "run_ds", steps=[1, 2, 3])
