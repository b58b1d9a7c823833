"""1. Training step cost per loss: the real trainer under one ZeRO-3 config, model and batch; one launch per loss.

Each loss runs ``bench.train_rank`` under torchrun in its own process group (killed as a group afterwards).
From the trainer's ``metrics.jsonl``: the median ``step_time_s`` and ``tokens_per_s`` over the measured steps
(warm-up steps skipped) and the peak of ``peak_memory_mb`` (max over ranks; the high-water mark is reset after
setup, so it is the training steps' peak).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.report import LOADED_CORES, HostLoad
from fpo_dist.machine import usable_cores

LOSSES = ("fpo", "dpo", "simpo", "dpo-online", "tdpo2", "fpo-lora")  # the default list of the cpu/gpu presets
# bench entries that are a registered loss with extra train flags: name → (loss.name, flags)
VARIANTS = {
    "fpo-lora": ("fpo", ["--policy.lora.rank", "16", "--policy.lora.alpha", "32"]),
    # the path the selected-position head and packed rows replace: full [rows, T, vocab] logits, padded rows
    # (what the authors' code and TRL's default do); the layout flag only where this trainer has it
    "fpo-materialized": ("fpo", ["--logits", "materialized", "--batch_layout", "padded"]),
    # the layout prefix sharing replaces: each pair's prompt computed twice, once per sequence (issue 22)
    "fpo-packed": ("fpo", ["--batch_layout", "packed"]),
    # no DeepSpeed config: the trainer's own engine without ZeRO partitioning (stage 0; what one process runs
    # without --deepspeed), against ZeRO-3 at the same world size (issue 22: one process is not a cluster)
    "fpo-stage0": ("fpo", ["--deepspeed", ""]),
}
CHOICES = LOSSES + tuple(v for v in VARIANTS if v not in LOSSES)


def has_batch_layout() -> bool:
    """Whether this trainer has ``TrainConfig.batch_layout`` (packed rows); without it every run is padded."""
    import dataclasses

    from fpo_dist.config import TrainConfig

    return any(f.name == "batch_layout" for f in dataclasses.fields(TrainConfig))


def run_in_group(cmd: list[str], env: dict, log_path: Path, timeout: float) -> int | None:
    """Run ``cmd`` (from the repository root) in a session of its own, its output to ``log_path``: the exit code,
    None when it ran past ``timeout`` seconds.  Afterwards nothing of it may outlive it: its group and those of its
    descendants are killed (torchrun starts its ranks in sessions of their own; killing torchrun alone would orphan
    them)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            for pid in [proc.pid, *_children(proc.pid)]:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            proc.wait()
    return rc


def variant_flags(loss: str) -> list[str]:
    flags = list(VARIANTS.get(loss, (loss, []))[1])
    if "--batch_layout" in flags and not has_batch_layout():
        i = flags.index("--batch_layout")
        del flags[i : i + 2]
    return flags
ROOT = Path(__file__).resolve().parents[1]
ZERO3 = ROOT / "ds_configs" / "zero3.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc; empty where there is none)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # fields after "(comm)": state, ppid, ...
            out.append(int(stat.parent.name))
    return out


def threads_per_rank(nproc: int) -> int:
    """CPU threads each of ``nproc`` processes gets (``OMP_NUM_THREADS``): the cores this process may run on
    (its affinity mask: a cgroup or SLURM cpuset may allow fewer than the machine has), split evenly."""
    return max(1, usable_cores() // nproc)


def launch(loss: str, store: str, root: Path, sizes, nproc: int, device: str) -> None:
    """One launch training ``loss`` into ``root/train_{loss}`` (raises with the log's tail on failure)."""
    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), "--log-dir", str(root / "torchelastic"),  # not a /tmp dir per launch
           "-m", "bench.train_rank",
           "--bench_root", str(root), "--bench_loss", loss,
           "--bench_steps", str(sizes.warmup_steps + sizes.measure_steps),
           "--bench_profile", str(sizes.profile_steps),
           "--cache", store, "--deepspeed", str(ZERO3),
           "--micro_batch_size", str(sizes.micro_batch), "--grad_accum", "1", "--seed", "0",
           "--optim.lr", "1e-6", "--optim.warmup_steps", "0", "--export", "false", "--dist_timeout_s", "300",
           "--step0_check", "false",  # the step-0 check is tests/test_train.py's business, not a step cost
           *(["--dtype", sizes.train_dtype] if sizes.train_dtype else []),
           *variant_flags(loss)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("MASTER_PORT", None)
    if device == "cpu":
        env.update(OMP_NUM_THREADS=str(threads_per_rank(nproc)), DS_ACCELERATOR="cpu",
                   CUDA_VISIBLE_DEVICES="")
    else:
        env.setdefault("OMP_NUM_THREADS", "4")
    log_path = root / f"launch_{loss}.log"
    rc = run_in_group(cmd, env, log_path, sizes.train_timeout_s)
    if rc != 0:
        tail = log_path.read_text()[-5000:]
        raise RuntimeError(f"training {loss} {'timed out' if rc is None else f'failed (exit {rc})'}:\n{tail}")


def _mfu(measured: list[dict], info: dict) -> float | None:
    """The median over the measured steps of each step's MFU (``bench.mfu``; None off a known GPU or in fp32)."""
    import torch

    from bench.mfu import mfu

    shape, policy = info.get("policy_shape"), next((m for m in info["resident_models"] if m["trainable"]), None)
    if shape is None or policy is None or not str(info["device"]).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    values = [mfu(policy["numel"], shape, r["tokens_per_s"], r.get("scored_tokens_per_s", 0.0), info["world_size"],
                  name, info["dtype"]) for r in measured]
    return None if None in values else statistics.median(values)


def summarize(loss: str, out: Path, sizes) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    n = sizes.warmup_steps + sizes.measure_steps
    measured = [r for r in records if sizes.warmup_steps < r["step"] <= n]
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    phases = json.loads((out / "phases.json").read_text()) if (out / "phases.json").exists() else None
    profiled = [r for r in records if r["step"] > n]
    if phases is not None and profiled:
        phases["step_time_s"] = profiled[-1]["step_time_s"]
    info = json.loads((out / "run_info.json").read_text())
    # CPU seconds per step summed over ranks (entry i of a rank's list is step i + 1)
    cpu = [sum(r["cpu_s_per_step"][s - 1] for r in ranks) for s in (x["step"] for x in measured)
           if all(len(r["cpu_s_per_step"]) >= s for r in ranks)]
    pads = [r["padding"] for r in ranks if r.get("padding")]
    padding = None
    if pads:
        pad, comp = sum(x["padding_tokens"] for x in pads), sum(x["computed_tokens"] for x in pads)
        padding = {"padding_tokens": pad, "computed_tokens": comp, "share": pad / comp if comp else None,
                   "micro_batches": sum(x["micro_batches"] for x in pads),
                   "layouts": sorted({y for x in pads for y in x["layouts"]})}
    return {
        "loss": loss,
        "logits": ranks[0].get("logits") if ranks else None,
        "batch_layout": ranks[0].get("batch_layout") if ranks else None,
        "padding": padding,
        # per rank: the step's peak above the post-setup baseline (memory after Trainer.setup, before the first
        # step: weights, optimizer state, reference model, SAE, and on CPU the process's imports), max over ranks
        "peak_above_setup_mb": max((above_setup(r["memory"]) for r in ranks), default=None),
        "steps_measured": [r["step"] for r in measured],
        "step_time_s": statistics.median(r["step_time_s"] for r in measured),
        "step_times_s": [r["step_time_s"] for r in measured],
        "min_step_time_s": min(r["step_time_s"] for r in measured),
        "cpu_s_per_step": statistics.median(cpu) if cpu else None,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in measured),
        "scored_tokens_per_s": statistics.median(r.get("scored_tokens_per_s", 0.0) for r in measured),
        "mfu": _mfu(measured, info),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in measured),
        "world_size": info["world_size"], "dtype": info["dtype"], "zero_stage": info["zero_stage"],
        "reference_model_resident": info["reference_model_resident"], "sae_resident": info["sae_resident"],
        "resident_models": info["resident_models"], "policy_shape": info.get("policy_shape"),
        "memory_by_rank": [r["memory"] for r in ranks],
        "phases": phases,
        "profile_top": (out / "profile.txt").read_text() if (out / "profile.txt").exists() else None,
        "out": str(out),
    }


def above_setup(mem: dict) -> float:
    """A rank's training peak above its memory after setup (RSS on CPU, allocated on GPU)."""
    if "max_allocated_mb" in mem["train_peak"]:
        return mem["train_peak"]["max_allocated_mb"] - mem["after_setup"]["allocated_mb"]
    return mem["train_peak"]["hwm_mb"] - mem["after_setup"]["rss_mb"]


def launch_order(names, rounds: int) -> list[tuple[int, str]]:
    """``(round, run)`` in launch order: the runs forwards in even rounds and backwards in odd ones (ABC CBA ABC …).
    A run's launches are each paired with the other runs' of the same round, minutes apart, so a drift of the
    host's speed over a bench's half hour falls on both sides of every ratio; with an even number of rounds every
    two runs go first equally often, so a trend within a round cancels too."""
    names = tuple(names)
    return [(k, n) for k in range(rounds) for n in (names if k % 2 == 0 else names[::-1])]


ROUND_KEYS = ("step_time_s", "step_times_s", "cpu_s_per_step", "peak_memory_mb", "peak_above_setup_mb", "after_setup_mb",
              "host_load", "launch_s", "attempts")
ROUND_MEDIANS = ("cpu_s_per_step", "peak_memory_mb", "peak_above_setup_mb", "after_setup_mb", "tokens_per_s",
                 "scored_tokens_per_s")


def after_setup_mb(r: dict) -> float | None:
    """A run's memory after setup, max over ranks (RSS on CPU, allocated on GPU)."""
    mem = r.get("memory_by_rank") or []
    key = "allocated_mb" if mem and "allocated_mb" in mem[0]["after_setup"] else "rss_mb"
    return max(m["after_setup"][key] for m in mem) if mem else None


def max_abs_diff(a: list | None, b: list | None) -> float | None:
    """max |a_i - b_i| of two sequences of equal length; None where either is missing, empty or holds a None."""
    if not a or not b or len(a) != len(b) or any(x is None for x in a + b):
        return None
    return max(abs(x - y) for x, y in zip(a, b))


def pool_rounds(launches: list[dict]) -> dict:
    """One run's launches (each from scratch on the same pairs in the same order) as one run: the measured steps of
    every round in round order (step ``i`` of round ``k`` pairs with the other runs' step ``i`` of round ``k``), the
    median step time over all of them, the median over rounds of CPU seconds, throughput and each memory figure;
    the rest of round 0 (losses, padding, phases, …), and ``rounds_loss_max_abs_diff``: how far the other rounds'
    losses are from round 0's where a run has them (the same training again: 0 where it is deterministic).
    ``rounds`` keeps each launch's own figures.  One launch is returned as it is."""
    if len(launches) == 1:
        return launches[0]
    launches = [{**r, "after_setup_mb": r.get("after_setup_mb") or after_setup_mb(r)} for r in launches]  # copies
    first = launches[0]
    times = [t for r in launches for t in r["step_times_s"]]
    pooled = {**first, "step_times_s": times, "step_time_s": statistics.median(times), "min_step_time_s": min(times),
              "host_load": {"others_cores": max(r["host_load"]["others_cores"] for r in launches)},
              "launch_s": sum(r["launch_s"] for r in launches),
              "rounds": [{k: r.get(k) for k in ROUND_KEYS} for r in launches]}
    for key in ROUND_MEDIANS:
        xs = [r.get(key) for r in launches]
        pooled[key] = statistics.median(xs) if all(x is not None for x in xs) else None
    if first.get("losses"):
        diffs = [max_abs_diff(first["losses"], r.get("losses")) for r in launches[1:]]
        pooled["rounds_loss_max_abs_diff"] = None if None in diffs else max(diffs)
    if "tokens_match_order" in first:  # the peer bench's TRL runs: every round's tokens checked
        pooled["tokens_match_order"] = all(r["tokens_match_order"] for r in launches)
        pooled["ranks_off_order"] = sorted({x for r in launches for x in r["ranks_off_order"]})
    return pooled


def run(store: str, sizes, nproc: int, device: str, root: Path, losses=LOSSES, rerun_loaded: bool = True,
        log=print, keep_going: bool = False, rounds: int = 1) -> dict:
    """Train each loss in its own launch; ``rounds`` launches per loss, interleaved ABC CBA … (:func:`launch_order`)
    and pooled step by step (:func:`pool_rounds`).  On a shared host, a launch measured while other processes kept
    more than ``LOADED_CORES`` cores busy is re-run once at the end (``rerun_loaded``), and the attempt with the
    quieter host is kept (both are listed under ``attempts``).  ``keep_going``: a failed launch (e.g. killed by the
    kernel's OOM killer when other processes hold the shared host's memory) is tried once more after the others,
    and if it fails again it is listed under ``failed`` with its log's tail instead of ending the run (with several
    rounds the whole loss is left out then: its steps would no longer pair with the other losses')."""

    def name(loss: str, k: int) -> str:
        return f"{loss} round {k}" if rounds > 1 else loss

    def place(k: int, sub: str = "") -> Path:
        return root / sub / (f"r{k}" if rounds > 1 else "")

    def attempt(loss: str, k: int, where: Path) -> dict:
        load, t0 = HostLoad(), time.perf_counter()
        launch(loss, store, where, sizes, nproc, device)
        r = {**summarize(loss, where / f"train_{loss}", sizes), "host_load": load.stop(),
             "launch_s": time.perf_counter() - t0}
        log(f"train {name(loss, k)}: {r['step_time_s']:.3f} s/step, {r['tokens_per_s']:.0f} tok/s, launch "
            f"{r['launch_s']:.0f} s, peak {r['peak_memory_mb']:.0f} MB/rank (other processes: "
            f"{r['host_load']['others_cores']:.2f} cores)")
        return r

    launches, failed = {loss: [None] * rounds for loss in losses}, {}
    for k, loss in launch_order(losses, rounds):
        try:
            launches[loss][k] = attempt(loss, k, place(k))
        except RuntimeError as e:
            if not keep_going:
                raise
            log(f"train {name(loss, k)}: {str(e).splitlines()[0]}; trying again after the others")
            failed[(loss, k)] = str(e)[-3000:]
    for loss, k in list(failed):
        try:
            launches[loss][k] = attempt(loss, k, place(k, "retry"))
            del failed[(loss, k)]
        except RuntimeError as e:
            log(f"train {name(loss, k)}: {str(e).splitlines()[0]} again; listed as failed")
            failed[(loss, k)] = str(e)[-3000:]
    done = [(loss, k) for k, loss in launch_order(losses, rounds) if launches[loss][k] is not None]
    loaded = [(loss, k) for loss, k in done
              if rerun_loaded and launches[loss][k]["host_load"]["others_cores"] > LOADED_CORES]
    for loss, k in reversed(loaded):
        first, again = launches[loss][k], attempt(loss, k, place(k, "rerun"))
        keep = min((first, again), key=lambda r: r["host_load"]["others_cores"])
        keep["attempts"] = [{key: r[key] for key in ("step_time_s", "cpu_s_per_step", "peak_memory_mb", "host_load")}
                            for r in (first, again)]
        launches[loss][k] = keep
    results = {loss: pool_rounds(ls) for loss, ls in launches.items() if None not in ls}
    return {"losses": results, "nproc": nproc, "rounds": rounds, "rerun": [name(loss, k) for loss, k in loaded],
            "ds_config": str(ZERO3.relative_to(ROOT)), "failed": {name(loss, k): v for (loss, k), v in failed.items()}}
