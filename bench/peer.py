"""Peer benchmark (issue 22): TRL 1.16's ``DPOTrainer`` side by side with fpo-dist's DPO and FPO, in one run.

    python -m bench.peer [--preset realshape|quick] [--steps 5] [--rounds 2] [--warmup 1] [--out bench/results]
                         [--worlds 1,2] [--lr 1e-6] [--keep] [--workdir DIR]
    python -m bench.peer --rederive bench/results/peer-cpu.json   # checks, ratios, targets, .md from its runs

One cache store (the real Ray cache job, ``bench.cache.bench_cache_job``) holds the token ids and the reference
log-prob sums; then ``--rounds`` launches of each run (torchrun on 127.0.0.1, gloo, in its own process group, killed
as a group), interleaved ABC CBA … with the other runs' so that a drift of the host's speed falls on both sides of
every ratio (``bench.train.launch_order``, ``pool_rounds``):

- 1 process: fpo-dist ``dpo`` and ``fpo`` without a DeepSpeed config (ZeRO stage 0: what one device runs), and TRL's
  ``DPOTrainer`` on plain PyTorch;
- 2 ranks: fpo-dist ``dpo`` and ``fpo`` under ``ds_configs/zero3.json``, and TRL's ``DPOTrainer`` under DeepSpeed
  ZeRO-3 with the same JSON (accelerate's DeepSpeed plugin through ``TrainingArguments.deepspeed``).

Same token ids, order, batch and optimizer on both sides: TRL is handed the cached token ids (``prompt_ids``/
``chosen_ids``/``rejected_ids``) in the order of fpo-dist's loader (``SampleOrder.epoch_order``, 1 pair per rank per
step: step ``k`` of rank ``r`` is position ``k * world + r``), read with a sequential sampler (``bench.peer_rank``),
and every step's tokens are checked against that order by hash.  fp32, β, lr (constant, no warm-up), grad clip 1.0,
weight decay 0, AdamW (0.9, 0.999, 1e-8) with torch's fused kernel on both sides, no dropout, grad_accum 1, seed 0.
fpo-dist's DPO reads the reference log-prob sums from the cache; TRL computes them in its precompute pass
(``precompute_ref_log_probs=True``) before training.  Per run: median step time over the measured steps (the first
``--warmup`` skipped), CPU seconds per step, peak RSS per rank and the peak above the post-setup baseline, and the
per-step loss and reward margin (mean over ranks), compared between TRL and fpo-dist's DPO as a check that both
train the same thing.  A launch measured while other processes kept more than 0.25 cores busy is run once more
and the quieter attempt kept.  Writes ``OUT/peer-cpu.json`` and ``.md`` (``--preset quick``: ``peer-cpu-quick.*``);
``realshape`` (Gemma 3 270M, the realshape preset's rows, 2 rounds of 1 + 5 steps) takes ~20 min on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from bench.train import max_abs_diff, threads_per_rank

ROOT = Path(__file__).resolve().parents[1]
ZERO3 = ROOT / "ds_configs" / "zero3.json"
LN2 = math.log(2.0)
# (ratio key, what, comparison, threshold); memory ratios are judged above the post-setup baseline
TARGETS = (
    ("peer_time_dpo_vs_trl_1proc", "1 process: fpo-dist DPO (no DeepSpeed config) / TRL DPOTrainer (precomputed "
     "reference), step time", "<=", 0.85),
    ("peer_mem_dpo_vs_trl_1proc", "1 process: fpo-dist DPO / TRL DPOTrainer, peak RSS above the post-setup baseline",
     "<=", 1.0),
    ("peer_time_dpo_vs_trl_2ranks", "2 ranks, ZeRO-3: fpo-dist DPO / TRL DPOTrainer (precomputed reference), step "
     "time", "<=", 0.7),
    ("peer_mem_dpo_vs_trl_2ranks", "2 ranks, ZeRO-3: fpo-dist DPO / TRL DPOTrainer, peak RSS per rank above the "
     "post-setup baseline", "<=", 0.95),
    ("peer_time_fpo_vs_dpo_1proc", "1 process: fpo-dist FPO / fpo-dist DPO, step time", "<=", 1.05),
    ("peer_time_fpo_vs_dpo_2ranks", "2 ranks, ZeRO-3: fpo-dist FPO / fpo-dist DPO, step time", "<=", 1.05),
)
# the value shown next to each judged one: CPU seconds for a time ratio, the peaks as measured for a memory ratio
SECOND_VALUE = {
    "peer_time_dpo_vs_trl_1proc": "peer_cpu_dpo_vs_trl_1proc", "peer_mem_dpo_vs_trl_1proc": "peer_mem_dpo_vs_trl_1proc_measured",
    "peer_time_dpo_vs_trl_2ranks": "peer_cpu_dpo_vs_trl_2ranks",
    "peer_mem_dpo_vs_trl_2ranks": "peer_mem_dpo_vs_trl_2ranks_measured",
    "peer_time_fpo_vs_dpo_1proc": "peer_cpu_fpo_vs_dpo_1proc", "peer_time_fpo_vs_dpo_2ranks": "peer_cpu_fpo_vs_dpo_2ranks",
}
# |Δ loss| per step, TRL vs fpo-dist DPO, fp32: at most LOSS_CHECK_ATOL × max(1, |loss|) (measured: ~1e-5 relative)
LOSS_CHECK_ATOL = 1e-4
WORLD_NAME = {1: "1proc", 2: "2ranks"}


# --------------------------------------------------------------------------------------------- the data TRL reads


def global_order(ok_rows, seed: int, world: int, steps: int) -> tuple[list[int], int]:
    """The source rows fpo-dist's loader trains on, in its global order (1 pair per rank per step, grad_accum 1):
    position ``k * world + r`` is rank ``r``'s pair at step ``k``; and the epochs that takes (each epoch reshuffles,
    its tail that does not fill a step is not used)."""
    from fpo_dist.loader import SampleOrder

    order = SampleOrder(ok_rows, seed)
    per_epoch = order.steps_per_epoch(world)
    if per_epoch < 1:
        raise ValueError(f"{order.n} ok rows are fewer than one global batch of {world}")
    rows: list[int] = []
    for k in range(steps):
        e, j = divmod(k, per_epoch)
        rows.extend(int(x) for x in order.epoch_order(e)[j * world:(j + 1) * world])
    return rows, -(-steps // per_epoch)


def write_dataset(store_path: str, rows: list[int], out: Path) -> list[dict]:
    """The cached token ids of ``rows``, in that order, as a ``datasets`` directory TRL reads; returns the pairs."""
    import datasets

    from fpo_dist.store import open_store

    batch = open_store(store_path).read_rows(rows)
    pairs = [{"row": int(i), "prompt_ids": [int(t) for t in p], "chosen_ids": [int(t) for t in c],
              "rejected_ids": [int(t) for t in r]}
             for i, p, c, r in zip(batch.index, batch.prompt_ids, batch.chosen_ids, batch.rejected_ids)]
    cols = ("prompt_ids", "chosen_ids", "rejected_ids")
    datasets.Dataset.from_dict({k: [p[k] for p in pairs] for k in cols}).save_to_disk(str(out))
    return pairs


def expected_hashes(pairs: list[dict], world: int, rank: int) -> list[str]:
    from bench.peer_rank import pair_hash

    return [pair_hash(p["prompt_ids"] + p["chosen_ids"], p["prompt_ids"] + p["rejected_ids"])
            for p in pairs[rank::world]]


# --------------------------------------------------------------------------------------------- launches


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int, root: Path, name: str, timeout: int) -> float:
    """``python -m torch.distributed.run --nproc_per_node nproc ... args`` in its own session; everything it started
    is killed by process group afterwards (torchrun's ranks run in sessions of their own).  Raises with the log's
    tail on failure; returns the launch's wall seconds."""
    from bench.train import run_in_group

    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "--log-dir", str(root / f"torchelastic_{name}"), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads_per_rank(nproc)),
           "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1",
           "HF_DATASETS_CACHE": str(root / "hf_datasets")}  # nothing of the run outside its directory
    env.pop("MASTER_PORT", None)
    log_path = root / f"launch_{name}.log"
    t0 = time.perf_counter()
    rc = run_in_group(cmd, env, log_path, timeout)
    if rc != 0:
        raise RuntimeError(f"{name} {'timed out' if rc is None else f'failed (exit {rc})'}:\n"
                           f"{log_path.read_text()[-5000:]}")
    return time.perf_counter() - t0


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every run shares."""

    warmup: int
    steps: int  # measured, per launch
    lr: float
    beta: float
    seed: int = 0
    grad_clip: float = 1.0
    fused: bool = True
    timeout_s: int = 900
    trl_keep_precompute_engine: bool = False  # skip TRL's ZeRO-3 workaround (to see whether it is still needed)
    rounds: int = 1  # launches per run, interleaved with the other runs' (bench.train.launch_order)

    @property
    def total(self) -> int:
        return self.warmup + self.steps


def ours_args(loss: str, store: str, root: Path, world: int, plan: Plan, epochs: int) -> list[str]:
    """``bench.train_rank`` (the real trainer, setup → train → cleanup, no checkpoint or export) for ``loss``:
    without a DeepSpeed config on 1 process, ZeRO-3 on more."""
    return ["-m", "bench.train_rank", "--bench_root", str(root), "--bench_loss", loss,
            "--bench_steps", str(plan.total), "--bench_profile", "0",
            "--cache", store, "--deepspeed", str(ZERO3) if world > 1 else "",
            "--micro_batch_size", "1", "--grad_accum", "1", "--seed", str(plan.seed), "--epochs", str(epochs),
            "--optim.lr", str(plan.lr), "--optim.warmup_steps", "0", "--optim.grad_clip", str(plan.grad_clip),
            "--optim.weight_decay", "0", "--optim.fused", str(plan.fused).lower(), "--loss.beta", str(plan.beta),
            "--dtype", "float32", "--export", "false", "--dist_timeout_s", "300", "--step0_check", "false",
            "--report_to", "none"]


def trl_args(dataset: Path, model_dir: str, out: Path, world: int, plan: Plan) -> list[str]:
    return ["-m", "bench.peer_rank", "--out", str(out), "--dataset", str(dataset), "--model", model_dir,
            "--steps", str(plan.total), "--deepspeed", str(ZERO3) if world > 1 else "", "--lr", str(plan.lr),
            "--beta", str(plan.beta), "--grad_clip", str(plan.grad_clip), "--seed", str(plan.seed),
            "--fused", str(plan.fused).lower(), *(["--keep_precompute_engine"] if plan.trl_keep_precompute_engine else [])]


# --------------------------------------------------------------------------------------------- summaries


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize_ours(out: Path, plan: Plan, loss: str) -> dict:
    """One fpo-dist run (``bench.train.summarize``) plus its per-step loss and reward margin."""
    from bench.train import summarize

    s = summarize(loss, out, SimpleNamespace(warmup_steps=plan.warmup, measure_steps=plan.steps))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r and r.get("step", 0) >= 1]
    keep = ("step_time_s", "step_times_s", "min_step_time_s", "cpu_s_per_step", "peak_memory_mb", "peak_above_setup_mb",
            "memory_by_rank", "world_size", "zero_stage", "batch_layout", "logits", "padding", "tokens_per_s")
    return {**{k: s.get(k) for k in keep}, "side": "fpo-dist", "loss": loss,
            "losses": [r["loss"] for r in records], "margins": [r.get("margin") for r in records],
            "grad_norms": [r.get("grad_norm") for r in records]}


def summarize_trl(out: Path, plan: Plan, world: int, pairs: list[dict]) -> dict:
    """The TRL ranks' files: step time (median over the measured steps, max over ranks per step), CPU seconds per
    step (summed over ranks), peaks, the loss sequence, and the token check against the order asked for."""
    from bench.train import above_setup

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    n = plan.total
    if any(len(r["step_times_s"]) != n for r in ranks):
        raise RuntimeError(f"TRL ran {[len(r['step_times_s']) for r in ranks]} steps per rank, expected {n}")
    step = [max(r["step_times_s"][i] for r in ranks) for i in range(n)]
    cpu = [sum(r["cpu_s_per_step"][i] for r in ranks) for i in range(n)]
    measured = list(range(plan.warmup, n))
    mismatched = [r["rank"] for r in ranks if r["hashes"] != expected_hashes(pairs, world, r["rank"])]
    log = ranks[0]["losses"]
    return {
        "side": "trl", "loss": "dpo", "world_size": world, "zero_stage": ranks[0]["zero_stage"],
        "step_time_s": statistics.median(step[i] for i in measured), "step_times_s": [step[i] for i in measured],
        "min_step_time_s": min(step[i] for i in measured), "cpu_s_per_step": statistics.median(cpu[i] for i in measured),
        "peak_memory_mb": max(r["memory"]["train_peak"]["hwm_mb"] for r in ranks),
        "peak_above_setup_mb": max(above_setup(r["memory"]) for r in ranks),
        "memory_by_rank": [r["memory"] for r in ranks],
        "losses": [h["loss"] for h in log], "margins": [h.get("margin") for h in log],
        "grad_norms": [h.get("grad_norm") for h in log],
        "tokens_match_order": not mismatched, "ranks_off_order": mismatched,
        "precompute_and_init_s": max(r["init_s"] for r in ranks), "workaround": ranks[0]["workaround"],
        "cpu_workaround": ranks[0].get("cpu_workaround"),
        "distributed_type": ranks[0]["distributed_type"], "optimizer": ranks[0]["optimizer"],
        "optimizer_fused": ranks[0].get("optimizer_fused"), "optim": ranks[0]["optim"],
        "attn_implementation": ranks[0]["attn_implementation"], "threads": ranks[0]["threads"],
        "versions": ranks[0]["versions"],
    }


def compare(ours: dict | None, trl: dict | None) -> dict:
    """The per-step loss (and reward margin) of fpo-dist's DPO and TRL's: max |Δ|, and how far the loss moved from
    ln 2 (step 1 is ln 2 on both sides whatever they compute: the policy is the reference)."""
    if not ours or not trl:
        return {"loss_max_abs_diff": None, "margin_max_abs_diff": None}
    d = max_abs_diff(ours["losses"], trl["losses"])
    tol = LOSS_CHECK_ATOL * max([1.0] + [abs(x) for x in ours["losses"]])
    return {"loss_max_abs_diff": d, "tolerance": tol, "margin_max_abs_diff": max_abs_diff(ours["margins"], trl["margins"]),
            "loss_max_abs_from_ln2": max(abs(x - LN2) for x in ours["losses"]), "steps": len(ours["losses"]),
            "ok": d is not None and d <= tol and trl.get("tokens_match_order", False)}


def ratios(runs: dict) -> dict:
    """``runs[world][name]`` (name: dpo, fpo, trl) → the peer ratios (None where a run is missing)."""
    from bench.realshape import paired_ratio_interval

    out: dict = {}

    def r(world, a, b, key):
        w = runs.get(world) or {}
        x, y = (w.get(a) or {}).get(key), (w.get(b) or {}).get(key)
        return x / y if x and y else None

    for world, tag in WORLD_NAME.items():
        out[f"peer_time_dpo_vs_trl_{tag}"] = r(world, "dpo", "trl", "step_time_s")
        out[f"peer_cpu_dpo_vs_trl_{tag}"] = r(world, "dpo", "trl", "cpu_s_per_step")
        out[f"peer_mem_dpo_vs_trl_{tag}"] = r(world, "dpo", "trl", "peak_above_setup_mb")
        out[f"peer_mem_dpo_vs_trl_{tag}_measured"] = r(world, "dpo", "trl", "peak_memory_mb")
        out[f"peer_time_fpo_vs_dpo_{tag}"] = r(world, "fpo", "dpo", "step_time_s")
        out[f"peer_cpu_fpo_vs_dpo_{tag}"] = r(world, "fpo", "dpo", "cpu_s_per_step")
        out[f"peer_mem_fpo_vs_dpo_{tag}_measured"] = r(world, "fpo", "dpo", "peak_memory_mb")
        w = runs.get(world) or {}
        # the same pair at each step on both sides: the median of the per-step ratios cancels the pairs' lengths
        for a, b, key in (("dpo", "trl", f"peer_time_dpo_vs_trl_{tag}_paired"),
                          ("fpo", "dpo", f"peer_time_fpo_vs_dpo_{tag}_paired")):
            x, y = (w.get(a) or {}).get("step_times_s"), (w.get(b) or {}).get("step_times_s")
            out[key] = statistics.median(p / q for p, q in zip(x, y)) if x and y and len(x) == len(y) else None
            # the judged time ratio's interval: the per-step ratios' geometric mean, 95 % t-interval over the steps
            out[key.removesuffix("_paired") + "_interval"] = (paired_ratio_interval(w.get(a), w.get(b))
                                                              if x and y and len(x) == len(y) else None)
        out[f"peer_loss_max_abs_diff_{tag}"] = compare(w.get("dpo"), w.get("trl"))["loss_max_abs_diff"]
    return out


def check_targets(rat: dict) -> list[dict]:
    """:data:`TARGETS` judged (``bench.report.check_targets_of``), ``second`` = the CPU-seconds / as-measured ratio."""
    from bench.report import check_targets_of

    return [{**t, "second": t["value_cpu_time"]} for t in check_targets_of(rat, TARGETS, SECOND_VALUE)]


def cpu_info() -> dict:
    """The CPU (model and ISA extensions, ``fpo_dist.machine.cpu_model``), its core count and the cores this process
    may run on (``fpo_dist.machine.usable_cores``: the launches' threads are split from these)."""
    from fpo_dist.machine import cpu_model, usable_cores

    return {"model": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable_cores()}


# --------------------------------------------------------------------------------------------- markdown


def _f(x, fmt=".3f"):
    return "—" if x is None else format(x, fmt)


def markdown(res: dict) -> str:
    from bench.report import PER_STEP_NOTE, target_row

    cpu = res["cpu"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in (cpu.get("flags") or {}).items())  # older files
    usable = ("" if cpu.get("usable_cores") in (None, cpu["cores"])  # older files name no affinity
              else f" ({cpu['usable_cores']} usable by this process)")
    p = res["plan"]
    lines = [f"# Peer benchmark: fpo-dist vs TRL {res['versions'].get('trl')} DPOTrainer (CPU)", "",
             f"`{res['command']}` — {res['date_utc']}, commit {res.get('commit')}"
             f"{' (dirty tree)' if res.get('dirty') else ''}, {res['wall_s']:.0f} s in all.", "",
             f"CPU: {cpu['model']}, {cpu['cores']} cores{usable}{f' ({flags})' if flags else ''}. torch "
             f"{res['versions'].get('torch')}, "
             f"deepspeed {res['versions'].get('deepspeed')}, transformers {res['versions'].get('transformers')}, "
             f"trl {res['versions'].get('trl')}.", "",
             f"Model: {res['model']}. {res['data']}", "",
             "## Targets", "",
             "| target | measured | threshold | | CPU seconds / peaks as measured |", "|---|---:|---:|---|---:|"]
    rat = res.get("ratios") or {}
    lines += [target_row(t, rat) for t in res["targets"]]
    paired = "; ".join(f"{k.removeprefix('peer_time_').removesuffix('_paired').replace('_', ' ')} {_f(v)}"
                       for k, v in rat.items() if k.endswith("_paired") and v is not None)
    per_step = any(v for k, v in rat.items() if k.endswith("_interval"))
    lines += ["", "Time ratios: median wall-clock step time over the measured steps (CPU seconds of the ranks next to "
                  "them)" + (f"; {PER_STEP_NOTE}" if per_step else "")
              + (f"; the median of the per-step ratios (the same pair on both sides at each step): {paired}"
                 if paired else "") + ". Memory ratios: per rank, the training steps' peak RSS minus that "
                  "rank's RSS after setup (fpo-dist: after `Trainer.setup`; TRL: at `on_train_begin`, after its engine, optimizer and "
                  "precompute pass), max over ranks; the peaks as measured next to them.", "",
              "## Same training on both sides: the loss sequences", ""]
    for world, tag in WORLD_NAME.items():
        c = res["checks"].get(tag)
        if not c or c.get("loss_max_abs_diff") is None:
            continue
        w = res["runs"][str(world)]
        lines += [f"**{tag}**: max |Δ loss| TRL vs fpo-dist DPO over {c['steps']} steps **{c['loss_max_abs_diff']:.2e}** "
                  f"(reward margin {_f(c['margin_max_abs_diff'], '.2e')}); the loss moved up to "
                  f"{c['loss_max_abs_from_ln2']:.2e} from ln 2; TRL's tokens per step "
                  f"{'match' if w['trl']['tokens_match_order'] else '**do not match**'} the loader's order "
                  f"(checked by hash, every rank and step) — check {'passed' if c['ok'] else '**failed**'} "
                  f"(|Δ| ≤ {c['tolerance']:.1e} = {LOSS_CHECK_ATOL:g} × max(1, |loss|)).", "",
                  "| step | fpo-dist DPO loss | TRL loss | fpo-dist margin | TRL margin |", "|---:|---:|---:|---:|---:|"]
        for i, (a, b) in enumerate(zip(w["dpo"]["losses"], w["trl"]["losses"])):
            lines.append(f"| {i + 1} | {a:.7f} | {b:.7f} | {_f(w['dpo']['margins'][i], '.6f')} | "
                         f"{_f(w['trl']['margins'][i], '.6f')} |")
        lines.append("")
    from bench.train import after_setup_mb

    lines += ["## Runs", "",
              "| world | run | ZeRO stage | step time (s), median [min] | measured steps (s) | CPU s/step | peak RSS (MB/rank) "
              "| after setup (MB) | peak − after setup (MB) | host load (cores) |",
              "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for world, runs in res["runs"].items():
        for name, r in runs.items():
            if not r:
                continue
            after = r.get("after_setup_mb") or after_setup_mb(r)
            label = {"dpo": "fpo-dist dpo", "fpo": "fpo-dist fpo", "trl": "TRL DPOTrainer"}[name]
            steps = " / ".join(", ".join(f"{x:.2f}" for x in q["step_times_s"])  # the rounds apart
                               for q in r.get("rounds") or [r] if q.get("step_times_s"))
            lines.append(f"| {world} | {label} | {r.get('zero_stage')} | {r['step_time_s']:.2f} [{r['min_step_time_s']:.2f}] "
                         f"| {steps} | {_f(r.get('cpu_s_per_step'), '.1f')} | {r['peak_memory_mb']:.0f} | {after:.0f} | "
                         f"{_f(r.get('peak_above_setup_mb'), '.0f')} | {_f((r.get('host_load') or {}).get('others_cores'), '.2f')} |")
    rounds = p.get("rounds", 1)
    if rounds > 1:
        same = [f"{WORLD_NAME.get(int(w), w)} {name} {_f(r.get('rounds_loss_max_abs_diff'), '.1e')}"
                for w, runs in res["runs"].items() for name, r in runs.items() if r]
        how = (f"{rounds} launches per run, each from scratch on the same pairs, in the order "
               f"{' '.join(res.get('order') or [])} (run and round) at each world size: a drift of the host's speed "
               "falls on both sides of every ratio; the measured steps of all rounds are pooled (step i of round k "
               "paired with the other runs' step i of round k), memory and CPU seconds are the median over rounds. "
               f"The rounds train the same: max |Δ loss| from round 0's: {'; '.join(same)}. ")
    else:
        how = ""
    lines += ["", f"Steps: {how}{p['warmup']} warm-up + {p['steps']} measured per launch; 1 pair per rank per step, grad_accum 1; "
                  f"lr {p['lr']:g} constant (no warm-up), β {p['beta']:g}, grad clip {p['grad_clip']:g}, weight decay 0, "
                  f"AdamW (0.9, 0.999, 1e-8) {'fused' if p['fused'] else 'per-tensor'} on both sides, fp32, seed "
                  f"{p['seed']}. Threads: {res['threads_note']}. Host load: cores other processes kept busy during the "
                  "launch (a launch with more than 0.25 is measured once more and the quieter attempt kept)"
                  + (f"; measured twice: {', '.join(res['rerun'])} (both attempts in the JSON's `attempts`)"
                     if res.get("rerun") else "") + ". The measured steps are different pairs (their lengths differ "
                  "several-fold); both sides train the same pair at each step.", ""]
    lines += ["## How the two sides are set up", ""] + [f"- {n}" for n in res["notes"]] + [""]
    for name, tail in (res.get("failed") or {}).items():
        lines += [f"**{name} failed**: see the JSON's `failed`.", ""]
    return "\n".join(lines)


def notes(res: dict) -> list[str]:
    trl = [r["trl"] for r in res["runs"].values() if r.get("trl")]
    out = [
        "Tokens: TRL's `_prepare_dataset` is overridden to return the cached token ids as `prompt_ids`/`chosen_ids`/"
        "`rejected_ids` (no chat template, EOS or truncation on TRL's side: `max_length=None`), and `_get_train_sampler` "
        "returns a `SequentialSampler` over the rows in fpo-dist's loader order; accelerate's batch sharding gives "
        "rank r positions r, r + world, … — fpo-dist's `Topology.micro_slice`. Every step's unpadded token ids are "
        "hashed on each TRL rank and compared with the order asked for.",
        "Reference: fpo-dist reads the reference log-prob sums from the cache store; TRL computes them in its own "
        "`precompute_ref_log_probs` pass at construction (not in the step times).",
        "Layouts as each side runs by default: fpo-dist's DPO its shared-prefix rows and selected-position output "
        "layer; TRL its right-padded `[chosen; rejected]` batch and fused LM head "
        + (f"(attention `{trl[0]['attn_implementation']}`)." if trl else "."),
        "DPOConfig defaults changed to match fpo-dist: `bf16=False` (fp32), `gradient_checkpointing=False`, "
        "`lr_scheduler_type='constant'`, `report_to='none'` (fpo-dist: `--report_to none`), `logging_steps=1`.",
        "Collectives: gloo on both sides; DeepSpeed's shared-memory allreduce op is disabled in the TRL ranks as "
        "fpo-dist's `init_distributed` does.",
    ]
    for r in trl:
        if r.get("workaround"):
            out.append(f"TRL workaround (world {r['world_size']}, ZeRO-3): {r['workaround']}. TRL 1.16 builds a "
                       "forward-only DeepSpeed engine over the policy for the precompute pass and keeps it; its "
                       "parameter hooks stay on the policy next to the training engine's, and the first training step "
                       "fails (`IndexError: pop from an empty deque` in DeepSpeed's `partitioned_param_coordinator`; "
                       "reproduced here at Gemma 3 270M with `--trl_keep_precompute_engine`, not on a tiny Llama). "
                       "`destroy()` only removes those hooks: no effect on the numbers.")
        if r.get("cpu_workaround"):
            out.append(f"TRL workaround (world {r['world_size']}, CPU only): {r['cpu_workaround']}; without it "
                       "DeepSpeed's `auto` train_batch_size is filled as 1 for 2 ranks and its batch check fails at "
                       "model creation.")
    for r in trl:
        out.append(f"TRL world {r['world_size']}: {r['distributed_type']}, ZeRO stage {r['zero_stage']}, optimizer "
                   f"{r['optimizer']} (optim `{r['optim']}`, fused={r.get('optimizer_fused')}), {r['threads']} thread(s) "
                   f"per rank; construction incl. the precompute pass {r['precompute_and_init_s']:.0f} s.")
    for world, runs in res["runs"].items():
        if runs.get("dpo") and res["epochs"].get(world, 1) > 1:
            out.append(f"World {world}: {res['epochs'][world]} epochs of the store's rows (fpo-dist `--epochs`): TRL "
                       "reads the concatenated epoch orders as one sequence.")
    return out


# --------------------------------------------------------------------------------------------- the run


def build_store(sizes, root: Path, log) -> tuple[str, str, dict]:
    """The model, data and SAE of ``sizes`` and the cache store the trainer reads: ``(store, model_dir, info)``."""
    from bench import assets as bench_assets
    from bench import cache as bench_cache

    if sizes.model == "gemma3-270m":
        # the real SAE for FPO; no calibrated random contrast (bench/realshape.py's, not needed here)
        sizes = dataclasses.replace(sizes, contrast_d_sae=0)
        a = bench_assets.build_realshape_assets(root / "assets", sizes, "cpu", log)
    else:
        a = bench_assets.build_assets(root / "assets", sizes, "cpu", log)
    job = bench_cache.bench_cache_job(a, sizes, "cpu", [1], root / "cache", retry=False, log=log)
    return job["store"], str(a.model_dir), {"assets": a.to_dict(), "cache_job": job["runs"][0]}


def run(preset: str, plan: Plan, root: Path, worlds: tuple[int, ...], log=print,
        names: tuple[str, ...] = ("dpo", "trl", "fpo"), rerun_loaded: bool = True) -> dict:
    """Every run of ``names`` at each world size, ``plan.rounds`` launches each in ``bench.train.launch_order``,
    pooled by ``bench.train.pool_rounds``.  ``rerun_loaded``: a launch measured while other processes kept more than
    ``bench.report.LOADED_CORES`` cores busy (with 2 threads on 2 cores a third busy process inflates a step
    several-fold) is run once more at the end and the quieter attempt kept (both listed under ``attempts``)."""
    from bench.presets import preset_named
    from bench.report import LOADED_CORES, HostLoad
    from bench.train import launch_order, pool_rounds
    from fpo_dist.store import open_store

    sizes = preset_named(preset, "cpu")
    store, model_dir, built = build_store(sizes, root, log)
    ok = open_store(store).ok_rows()
    launches: dict = {}  # world → name → round → the launch's summary (None: failed)
    epochs: dict = {}
    failed: dict = {}
    pairs_by_world: dict = {}
    datasets: dict = {}

    def attempt(world: int, name: str, where: Path, tag: str = "") -> dict | None:
        load = HostLoad()
        try:
            if name == "trl":
                wall = launch(trl_args(datasets[world], model_dir, where, world, plan), world, where, name,
                              plan.timeout_s)
                r = summarize_trl(where, plan, world, pairs_by_world[world])
            else:
                wall = launch(ours_args(name, store, where, world, plan, epochs[world]), world, where, name,
                              plan.timeout_s)
                r = summarize_ours(where / f"train_{name}", plan, name)
        except (RuntimeError, OSError, KeyError, ValueError) as e:
            log(f"world {world} {name}{tag}: {str(e).splitlines()[0]}")
            failed[f"{WORLD_NAME.get(world, world)}_{name}{tag}"] = str(e)[-3000:]
            return None
        r.update(host_load=load.stop(), launch_s=wall)
        log(f"world {world} {name}{tag}: {r['step_time_s']:.3f} s/step (median of {plan.steps}), peak "
            f"{r['peak_memory_mb']:.0f} MB/rank, above setup {_f(r['peak_above_setup_mb'], '.0f')} MB, launch "
            f"{wall:.0f} s, other processes {r['host_load']['others_cores']:.2f} cores, losses "
            f"{[round(x, 6) for x in r['losses']]}")
        return r

    def where(world: int, k: int, name: str, sub: str = "") -> tuple[Path, str]:
        tag = f"_round{k}" if plan.rounds > 1 else ""
        return root / sub / f"w{world}" / (f"r{k}" if plan.rounds > 1 else "") / name, tag

    for world in worlds:
        rows, epochs[world] = global_order(ok, plan.seed, world, plan.total)
        datasets[world] = root / f"dataset_w{world}"
        pairs_by_world[world] = write_dataset(store, rows, datasets[world])
        launches[world] = {name: [None] * plan.rounds for name in names}
        for k, name in launch_order(names, plan.rounds):
            launches[world][name][k] = attempt(world, name, *where(world, k, name))
    loaded = [(w, n, k) for w in worlds for n in names for k in range(plan.rounds)
              if rerun_loaded and launches[w][n][k] and launches[w][n][k]["host_load"]["others_cores"] > LOADED_CORES]
    for world, name, k in loaded:
        first = launches[world][name][k]
        log(f"world {world} {name}: other processes kept {first['host_load']['others_cores']:.2f} cores busy; "
            "measuring once more")
        path, tag = where(world, k, name, "rerun")
        again = attempt(world, name, path, tag + "_rerun")
        if again is None:
            continue
        keep = min((first, again), key=lambda r: r["host_load"]["others_cores"])
        keep["attempts"] = [{key: r[key] for key in ("step_time_s", "step_times_s", "cpu_s_per_step", "peak_memory_mb",
                                                     "peak_above_setup_mb", "host_load")} for r in (first, again)]
        launches[world][name][k] = keep
    runs = {w: {n: None if None in ls else pool_rounds(ls) for n, ls in by_name.items()}
            for w, by_name in launches.items()}
    return {"sizes": sizes.to_dict(), "built": built, "store": store, "model_dir": model_dir, "runs": runs,
            "epochs": epochs, "failed": failed,
            "rerun": [f"{WORLD_NAME[w]}_{n}" + (f"_round{k}" if plan.rounds > 1 else "") for w, n, k in loaded],
            "order": [f"{n}{k}" for k, n in launch_order(names, plan.rounds)],
            "rows": {WORLD_NAME.get(w, w): [p["row"] for p in ps] for w, ps in pairs_by_world.items()}}


def describe(sizes: dict, built: dict) -> tuple[str, str]:
    a = built["assets"]
    if sizes["model"] == "gemma3-270m":
        m = a.get("model") or {}
        model = (f"Gemma 3 270M (real weights), {a['n_params'] / 1e6:.0f} M parameters, {m.get('blocks')} blocks, "
                 f"vocabulary {m.get('vocab')}, fp32; FPO with the real {sizes['d_sae']}-wide SAE on block "
                 f"{sizes['hook_layer']}")
        L = a.get("lengths") or {}
        data = (f"Data: {sizes['rows']} rows of the realshape preset (UltraFeedback-like lengths, scaled ~4x down): "
                f"prompt median {L.get('prompt', {}).get('median', 0):.0f} tokens, responses median "
                f"{L.get('response', {}).get('median', 0):.0f} [{L.get('response', {}).get('min')}–"
                f"{L.get('response', {}).get('max')}].")
    else:
        model = (f"random-init Llama ({sizes['layers']} blocks, d {sizes['hidden']}, vocabulary {sizes['vocab']}), "
                 f"{a['n_params'] / 1e6:.2f} M parameters, fp32")
        data = f"Data: {sizes['rows']} synthetic rows (preset `{sizes['name']}`)."
    return model, data


def finish(res: dict) -> dict:
    """The checks, ratios, targets and notes of ``res`` (from its ``runs``; also to re-derive a results file)."""
    runs = {int(w): v for w, v in res["runs"].items()}
    res["checks"] = {WORLD_NAME[w]: compare((v or {}).get("dpo"), (v or {}).get("trl")) for w, v in runs.items()}
    res["ratios"] = ratios(runs)
    res["targets"] = check_targets(res["ratios"])
    res["notes"] = notes(res)
    return res


def rederive(path: Path) -> dict:
    """Recompute a results file's checks, ratios, targets and notes from its runs (no training), rewrite it and its
    markdown, and merge a realshape run's ratios into ``cpu.json`` beside it."""
    res = finish(json.loads(path.read_text()))
    path.write_text(json.dumps(res, indent=1, default=str) + "\n")
    path.with_suffix(".md").write_text(markdown(res))
    if res.get("preset") == "realshape":
        merge_into_bench_results(res, path.parent)
    return res


def merge_into_bench_results(res: dict, out: Path) -> Path | None:
    """Put this run's ratios, targets and checks into ``out/cpu.json`` (``bench.report.merge_part``)."""
    from bench import report

    return report.merge_part("peer", {"command": res["command"], "date_utc": res["date_utc"],
                                      "commit": res.get("commit"), "cpu_model": res["cpu"]["model"],
                                      "checks": res["checks"], "ratios": res["ratios"]}, out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="realshape", choices=("realshape", "quick"))
    ap.add_argument("--steps", type=int, default=None,
                    help="measured steps per launch (default: realshape 5, quick 2)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="launches per run, interleaved ABC CBA … with the other runs' (default: realshape 2, quick 1)")
    ap.add_argument("--warmup", type=int, default=1, help="steps skipped before the measured ones")
    ap.add_argument("--worlds", default="1,2", help="comma-separated world sizes among 1 and 2")
    ap.add_argument("--runs", default="dpo,trl,fpo", help="comma-separated subset of dpo, trl, fpo (development)")
    ap.add_argument("--lr", type=float, default=None,
                    help="constant learning rate on both sides (default: realshape 1e-6, bench/train.py's; quick 1e-4: "
                         "large enough that the loss moves away from ln 2 within a few steps, so the loss comparison "
                         "can tell the two sides apart)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--timeout", type=int, default=None, help="seconds per launch (default: realshape 900, quick 300)")
    ap.add_argument("--rederive", metavar="FILE", help="recompute FILE's ratios, targets and markdown from its runs")
    ap.add_argument("--trl_keep_precompute_engine", action="store_true",
                    help="development: skip TRL's ZeRO-3 workaround (destroying its precompute engine)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args(argv)
    if a.rederive:
        res = rederive(Path(a.rederive))
        print(markdown(res))
        return res
    worlds = tuple(int(x) for x in a.worlds.split(",") if x.strip())
    if not set(worlds) <= {1, 2}:
        ap.error("--worlds: 1 and/or 2")
    names = tuple(x for x in a.runs.split(",") if x.strip())
    if not set(names) <= {"dpo", "trl", "fpo"}:
        ap.error("--runs: a subset of dpo, trl, fpo")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: temp dir removed, Ray shut down
    for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                 ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(k, v)
    from fpo_dist.netns import enter_private_network

    # torch's rendezvous stores and Ray's agents listen on every interface: where this process can (root), it and all
    # it starts run in a network namespace holding only lo
    netns = enter_private_network() if os.environ.get("FPO_BENCH_NETNS") != "0" else "FPO_BENCH_NETNS=0"
    log = lambda msg: print(f"[peer {time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    log("network: " + ("a private namespace (only lo)" if netns is None else f"the host's ({netns})"))
    real = a.preset == "realshape"
    plan = Plan(warmup=a.warmup, steps=a.steps or (5 if real else 2), lr=a.lr or (1e-6 if real else 1e-4), beta=a.beta,
                timeout_s=a.timeout or (900 if real else 300), trl_keep_precompute_engine=a.trl_keep_precompute_engine,
                rounds=a.rounds or (2 if real else 1))
    if plan.rounds < 1 or plan.steps < 1:
        ap.error("--rounds and --steps: at least 1")
    command = " ".join(["python -m bench.peer", *(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))])
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="fpo-peer-", dir=a.workdir))
    log(f"preset {a.preset}, worlds {worlds}, {plan.rounds} round(s) of {plan.warmup}+{plan.steps} steps per run; "
        f"work dir {tmp}")
    try:
        r = run(a.preset, plan, tmp, worlds, log, names)
    finally:
        if a.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    from bench.report import _git, _version

    model, data = describe(r["sizes"], r["built"])
    git = _git()
    res = {
        "command": command, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git["commit"],
        "dirty": git["dirty"], "cpu": cpu_info(), "network": "private namespace (lo only)" if netns is None else netns,
        "versions": {p: _version(p) for p in ("torch", "deepspeed", "transformers", "trl", "accelerate", "datasets")},
        "preset": a.preset, "plan": dataclasses.asdict(plan), "model": model, "data": data,
        "threads_note": f"{threads_per_rank(1)} per process at 1 process, {threads_per_rank(2)} per rank at 2 "
                        "ranks (OMP_NUM_THREADS), the same on both sides",
        "runs": {str(w): v for w, v in r["runs"].items()}, "epochs": {str(w): v for w, v in r["epochs"].items()},
        "rows": r["rows"], "failed": r["failed"], "rerun": r["rerun"], "order": r["order"], "sizes": r["sizes"],
        "cache_job": r["built"]["cache_job"],
        "wall_s": time.perf_counter() - t0,
    }
    finish(res)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "peer-cpu" if real else "peer-cpu-quick"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(res))
    log(f"wrote {out / (stem + '.json')} and .md ({res['wall_s']:.0f} s)")
    if real:
        merged = merge_into_bench_results(res, out)
        if merged:
            log(f"merged the peer ratios into {merged} (and its .md)")
    for t in res["targets"]:
        verdict = "not run" if t["met"] is None else ("met" if t["met"] else "MISSED")
        print(f"  {t['what']}: {_f(t['value'])} ({t['op']} {t['threshold']}) {verdict}")
    for tag, c in res["checks"].items():
        print(f"  loss sequences {tag}: max |Δ| {_f(c.get('loss_max_abs_diff'), '.2e')} "
              f"({'ok' if c.get('ok') else 'NOT OK'})")
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)
