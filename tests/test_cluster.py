"""cluster/: the SLURM batch scripts, end to end on a real 2-node SLURM cluster on this machine.

The dry-run tests (fast, no SLURM) check the layout and the exact commands the scripts would run. The slow tests
bring up a private cluster with the project's own harness (cluster/local/slurm-cluster.sh: munged, slurmctld and
two slurmd, node1/node2, all under one temp dir) and submit the real scripts to it:

* pipeline.sh: cache.sbatch (Ray head on node1, worker on node2, the job sees 2 Ray nodes and runs a task on each)
  then, after it succeeded, train.sbatch (torchrun, one launcher per node: world size 2, node ranks 0 and 1);
* a failing cache job fails its batch job with the driver's exit code, and the dependent training job never runs;
* a cancelled cache job leaves no Ray process behind;
* train.sbatch with the deepspeed launcher (--no_ssh, node rank from $SLURM_NODEID);
* `down` leaves no process behind: daemons, Ray processes and job processes are checked by PID.

The jobs are stand-ins (section "Job commands" below) until the real entry points can run here; the cluster
scripts run them through the same code paths (ray job submit / srun + torchrun or deepspeed) as the real jobs.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "cluster" / "local" / "slurm-cluster.sh"
SLURM = ROOT / "cluster" / "slurm"
PY = sys.executable

# ---------------------------------------------------------------------------------------------------------------
# Job commands: the only section to change when switching from the stand-ins to the real cache / training jobs.
#
# Each *_JOB is the environment that selects the job for cache.sbatch / train.sbatch ({python}, {standin} and
# {work} are filled in). The scripts' testing hooks FPO_CACHE_CMD / FPO_TRAIN_CMD replace the job program only;
# for the real jobs drop them and set the configs instead, e.g.
#   CACHE_JOB = {"FPO_CACHE_CONFIG": "<tiny cache yaml>", "FPO_CACHE_ARGS": "--store {work}/store.zarr"}
#   TRAIN_JOB = {"FPO_TRAIN_CONFIG": "<tiny train yaml>", "FPO_TRAIN_ARGS": "--store {work}/store.zarr ..."}
# and replace check_cache_log / check_train_log by checks on the store (`python -m fpo_dist.cache verify`) and
# on the HF export.
# ---------------------------------------------------------------------------------------------------------------
CACHE_JOB = {"FPO_CACHE_CMD": "{python} {standin} cache"}
CACHE_JOB_FAILING = {"FPO_CACHE_CMD": "{python} {standin} cache --exit 3"}  # must fail with exit code 3
CACHE_JOB_HANGING = {"FPO_CACHE_CMD": "{python} {standin} cache --sleep 600"}  # runs until cancelled
TRAIN_JOB = {"FPO_TRAIN_CMD": "{standin} train --some-flag 1"}  # torchrun/deepspeed run it with {python}

STANDIN = r'''
"""Stand-in for the cluster jobs: `cache [--exit N]` runs as a Ray job, `train ...` as a torch.distributed rank."""
import datetime, os, sys, time

if sys.argv[1] == "cache":
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init()  # RAY_ADDRESS is set by `ray job submit`
    nodes = [n for n in ray.nodes() if n["Alive"]]
    print("RAY_NODES", len(nodes), flush=True)

    @ray.remote(num_cpus=1)
    def where():  # the worker's parent is its node's raylet, started by that node's srun step
        return os.environ.get("SLURMD_NODENAME"), os.getppid()

    refs = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in nodes]
    for node, raylet in ray.get(refs):
        print("TASK", node, raylet, flush=True)
    if sys.argv[2:3] == ["--sleep"]:
        time.sleep(float(sys.argv[3]))
    sys.exit(int(sys.argv[3]) if sys.argv[2:3] == ["--exit"] else 0)

if sys.argv[1] == "train":
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    total = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(total)
    print(f"RANK {dist.get_rank()} WORLD {dist.get_world_size()} LOCAL_RANK {os.environ['LOCAL_RANK']} "
          f"NODE {os.environ['SLURMD_NODENAME']} NODEID {os.environ['SLURM_NODEID']} SUM {int(total.item())} "
          f"ARGV {' '.join(sys.argv[2:])}", flush=True)
    dist.destroy_process_group()
'''


def check_cache_log(log: str) -> set[int]:
    """The cache job saw both Ray nodes and ran one task on each; returns the raylet PIDs it reported."""
    assert "RAY_NODES 2" in log, log[-3000:]
    tasks = set(re.findall(r"^TASK (\S+) (\d+)$", log, re.M))  # a failed job's status message repeats its log
    assert sorted(node for node, _ in tasks) == ["node1", "node2"], log[-3000:]
    return {int(pid) for _, pid in tasks}


def check_train_log(log: str, world: int = 2) -> None:
    """One rank per node, world size 2, node ranks 0 (node1, rank 0) and 1 (node2, rank 1), all-reduce works."""
    ranks = re.findall(r"RANK (\d+) WORLD (\d+) LOCAL_RANK (\d+) NODE (\S+) NODEID (\d+) SUM (\d+) ARGV (.*)$",
                       log, re.M)
    assert len(ranks) == world, log[-3000:]
    seen = {int(r): (node, int(nodeid)) for r, _, _, node, nodeid, _, _ in ranks}
    assert seen == {0: ("node1", 0), 1: ("node2", 1)}, ranks
    for _, w, local, _, _, total, argv in ranks:
        assert (int(w), int(local), int(total), argv.strip()) == (world, 0, sum(range(world)), "--some-flag 1")


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def run(cmd, env, timeout=120, check=True):
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


def job_info(job: str, env: dict) -> dict:
    out = run(["scontrol", "show", "job", job], env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_jobs(jobs: list[str], env: dict, timeout: float = 240) -> list[dict]:
    """Poll (1 s) until none of the jobs is pending or running; `sbatch --wait` polls far slower."""
    deadline = time.monotonic() + timeout
    while run(["squeue", "-h", "-j", ",".join(jobs)], env, check=False).stdout.strip():
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
        self.job_pids: set[int] = set()  # Ray raylets etc. reported by the jobs

    def harness(self, *args, check=True):
        return run(["bash", str(HARNESS), *args], self.harness_env, timeout=300, check=check)

    def env(self, **extra) -> dict:
        """Environment for sbatch / pipeline.sh: this cluster, this Python, small Ray, everything under work/."""
        fill = {"python": PY, "standin": str(self.work / "standin.py"), "work": str(self.work)}
        extra = {k: v.format(**fill) for k, v in extra.items()}
        return {**no_slurm_env(), "SLURM_CONF": self.conf, "FPO_PYTHON": PY, "FPO_LOG_DIR": str(self.work / "logs"),
                "FPO_RAY_TEMP_DIR": str(self.work / "ray"), "FPO_RAY_OBJECT_STORE_BYTES": str(80 * 2**20),
                "FPO_RAY_JOIN_TIMEOUT": "120", **extra}

    def pidfile_pids(self) -> set[int]:
        return {int(f.read_text()) for f in (self.dir / "run").glob("*.pid")}


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the local SLURM harness needs root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("no SLURM and no apt-get to install it")
    work = Path(tempfile.mkdtemp(prefix="fpo-cl-"))  # short: unix socket paths live under it
    work.chmod(0o755)  # munged wants every directory above its socket searchable by all
    (work / "standin.py").write_text(STANDIN)
    c = Cluster(work)
    try:
        c.harness("up", "--nodes", "2", "--cpus", "2")
        c.daemon_pids = c.pidfile_pids()
        assert len(c.daemon_pids) == 4  # munged, slurmctld, 2 x slurmd
        yield c
    finally:
        c.harness("down", check=False)
        leftover = procs_with_env(SLURM_CONF=c.conf)
        for pid in leftover:  # should be none (test_down_leaves_no_processes); never leave them running
            os.kill(pid, 9)
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow
def test_harness_up_is_idempotent(cluster):
    p = cluster.harness("up", "--nodes", "2")
    assert "already up" in p.stderr
    assert cluster.pidfile_pids() == cluster.daemon_pids
    sinfo = run(["sinfo", "-h", "-o", "%D %t"], cluster.env()).stdout.split()
    assert sinfo == ["2", "idle"], sinfo


@pytest.mark.slow
def test_pipeline_cache_on_ray_then_train_with_torchrun(cluster):
    env = cluster.env(FPO_CACHE_NODES="2", FPO_TRAIN_NODES="2", **CACHE_JOB, **TRAIN_JOB)
    out = run([str(SLURM / "pipeline.sh")], env).stdout
    ids = dict(re.findall(r"^(FPO_\w+_JOB)=(\d+)$", out, re.M))
    cache, train = wait_jobs([ids["FPO_CACHE_JOB"], ids["FPO_TRAIN_JOB"]], env)
    cache_log = (cluster.work / "logs" / f"fpo-cache-{cache['JobId']}.out").read_text()
    train_log = (cluster.work / "logs" / f"fpo-train-{train['JobId']}.out").read_text()
    assert (cache["JobState"], cache["ExitCode"]) == ("COMPLETED", "0:0"), cache_log[-3000:]
    assert (train["JobState"], train["ExitCode"]) == ("COMPLETED", "0:0"), train_log[-3000:]
    assert train["Dependency"] in ("(null)", f"afterok:{cache['JobId']}(unfulfilled)")
    assert train["StartTime"] >= cache["EndTime"]  # ISO timestamps: the chain held
    raylets = check_cache_log(cache_log)
    check_train_log(train_log)
    # the batch script tore down its own Ray (by ending its srun steps), not just SLURM at job end
    cluster.job_pids |= raylets
    assert not [p for p in raylets if pid_alive(p)]
    assert (cluster.work / "ray" / "ray_current_cluster").exists()  # per-job Ray temp dir, not /tmp/ray


@pytest.mark.slow
def test_failing_cache_job_fails_batch_job_and_cancels_training(cluster):
    env = cluster.env(FPO_CACHE_NODES="2", FPO_TRAIN_NODES="2", **CACHE_JOB_FAILING, **TRAIN_JOB)
    out = run([str(SLURM / "pipeline.sh")], env).stdout
    ids = dict(re.findall(r"^(FPO_\w+_JOB)=(\d+)$", out, re.M))
    cache, train = wait_jobs([ids["FPO_CACHE_JOB"], ids["FPO_TRAIN_JOB"]], env)
    cache_log = (cluster.work / "logs" / f"fpo-cache-{cache['JobId']}.out").read_text()
    assert (cache["JobState"], cache["ExitCode"]) == ("FAILED", "3:0"), cache_log[-3000:]
    cluster.job_pids |= check_cache_log(cache_log)  # Ray was up on both nodes; the driver exited 3
    assert train["JobState"] == "CANCELLED" and train["Reason"] == "DependencyNeverSatisfied", train
    assert not (cluster.work / "logs" / f"fpo-train-{train['JobId']}.out").exists()


@pytest.mark.slow
def test_cancelled_cache_job_tears_down_its_ray_cluster(cluster):
    env = cluster.env(**CACHE_JOB_HANGING)
    log = cluster.work / "logs" / "hang-%j.out"
    job = run(["sbatch", "--parsable", "-N2", f"--output={log}", str(SLURM / "cache.sbatch")], env).stdout.strip()
    log = Path(str(log).replace("%j", job))
    deadline = time.monotonic() + 180
    while not re.search(r"^TASK node2 ", log.read_text() if log.exists() else "", re.M):  # Ray up, job running
        assert time.monotonic() < deadline and job_info(job, env)["JobState"] in ("PENDING", "RUNNING"), (
            log.read_text()[-3000:] if log.exists() else job_info(job, env))
        time.sleep(1)
    raylets = check_cache_log(log.read_text())
    cluster.job_pids |= raylets
    run(["scancel", job], env)
    (info,) = wait_jobs([job], env, timeout=60)
    assert info["JobState"] == "CANCELLED", info
    deadline = time.monotonic() + 20  # SLURM's KillWait is 5 s
    while [p for p in raylets if pid_alive(p)] or procs_with_env(SLURM_CONF=cluster.conf, SLURM_JOB_ID=job):
        assert time.monotonic() < deadline, procs_with_env(SLURM_CONF=cluster.conf, SLURM_JOB_ID=job)
        time.sleep(0.5)


@pytest.mark.slow
def test_train_with_deepspeed_launcher(cluster):
    env = cluster.env(FPO_LAUNCHER="deepspeed", **TRAIN_JOB)
    log = cluster.work / "logs" / "ds-%j.out"
    job = run(["sbatch", "--parsable", "-N2", f"--output={log}", str(SLURM / "train.sbatch")], env).stdout.strip()
    (info,) = wait_jobs([job], env)
    text = Path(str(log).replace("%j", job)).read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]
    check_train_log(text)


@pytest.mark.slow
def test_down_leaves_no_processes(cluster):
    """Runs last: after `down`, nothing this module started is alive (daemons, Ray, job processes)."""
    cluster.harness("down")
    started = cluster.daemon_pids | cluster.job_pids
    assert started and not [p for p in started if pid_alive(p)]
    assert procs_with_env(SLURM_CONF=cluster.conf) == []
    assert cluster.harness("status", check=False).returncode != 0
