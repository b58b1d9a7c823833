"""Machine label, host load, target checks and the results markdown.

    python -m bench.report bench/results/cpu.json     # re-render cpu.md from its JSON (no measuring)
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path

from bench import realshape
from fpo_dist.machine import cpu_model, usable_cores

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "deepspeed", "transformers", "sae-lens", "ray", "zarr", "numpy")


# --------------------------------------------------------------------------------------------- machine


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _git() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine_info(device: str) -> dict:
    import torch

    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable_cores(),
        "ram_gib": _ram_gib(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in PACKAGES},
        "device": device,
        "git": _git(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda)
    return info


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


class HostLoad:
    """CPU use of the whole host during a part, and how much of it was not this benchmark: ``others_cores`` is the
    average number of cores other processes kept busy (host busy time from /proc/stat minus this process and its
    reaped children; Ray actors are not children, so during the cache job they count as "others")."""

    def __init__(self):
        self.t0, self.host0, self.ours0 = time.perf_counter(), self._host_busy(), self._ours()

    @staticmethod
    def _host_busy() -> float:
        try:
            f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return float("nan")
        user, nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ours() -> float:
        import resource

        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                    resource.getrusage(resource.RUSAGE_CHILDREN)))

    def stop(self) -> dict:
        wall = max(time.perf_counter() - self.t0, 1e-9)
        host, ours = (self._host_busy() - self.host0) / wall, (self._ours() - self.ours0) / wall
        return {"wall_s": wall, "host_busy_cores": host, "ours_cores": ours, "others_cores": max(0.0, host - ours)}


LOADED_CORES = 0.25  # a measurement during which other processes kept more cores busy than this is repeated once


def measure_quietly(run, label: str, log, expected_cores: float = 0.0, retry: bool = True):
    """``run(attempt)`` under :class:`HostLoad`.  If other processes kept more than ``LOADED_CORES`` cores busy
    (beyond ``expected_cores`` of this benchmark's own that HostLoad cannot attribute, e.g. Ray actors), measure
    once more and keep the quieter attempt.  Returns ``(result, host_load, loads of all attempts)``."""
    attempts = []
    for i in range(2 if retry else 1):
        load = HostLoad()
        result = run(i)
        attempts.append((result, load.stop()))
        busy = attempts[-1][1]["others_cores"] - expected_cores
        if busy <= LOADED_CORES:
            break
        if i == 0 and retry:
            log(f"{label}: other processes kept {busy:.2f} cores busy; measuring again")
    result, load = min(attempts, key=lambda a: a[1]["others_cores"])
    return result, load, [a[1] for a in attempts]


def load_note(load: dict | None, cores: int | None, attempts: list | None = None, expected: float = 0.0) -> str:
    if not load:
        return ""
    busy = load["others_cores"] - expected > LOADED_CORES
    note = f"other processes kept {load['others_cores']:.2f} of {cores} cores busy during this part"
    if attempts and len(attempts) > 1:
        tries = " / ".join(f"{a['others_cores']:.2f}" for a in attempts)
        note += f" (measured twice, the quieter attempt kept: {tries})"
    return note + (" — timings are noisy" if busy else "")


# --------------------------------------------------------------------------------------------- targets


def ratios(results: dict) -> dict:
    """The side-by-side ratios (None where a part or loss did not run)."""
    t = (results.get("train") or {}).get("losses", {})

    def r(a, b, key):
        return t[a][key] / t[b][key] if a in t and b in t and t[a].get(key) and t[b].get(key) else None

    cache, loader = results.get("cache"), results.get("loader")
    return {
        "time_fpo_dpo_online": r("fpo", "dpo-online", "step_time_s"),
        "time_fpo_tdpo2": r("fpo", "tdpo2", "step_time_s"),
        "time_fpo_simpo": r("fpo", "simpo", "step_time_s"),
        "time_fpo_dpo": r("fpo", "dpo", "step_time_s"),
        "cpu_fpo_dpo_online": r("fpo", "dpo-online", "cpu_s_per_step"),
        "cpu_fpo_tdpo2": r("fpo", "tdpo2", "cpu_s_per_step"),
        "cpu_fpo_simpo": r("fpo", "simpo", "cpu_s_per_step"),
        "cpu_fpo_dpo": r("fpo", "dpo", "cpu_s_per_step"),
        "mem_fpo_dpo_online": r("fpo", "dpo-online", "peak_memory_mb"),
        "mem_fpo_tdpo2": r("fpo", "tdpo2", "peak_memory_mb"),
        "mem_fpo_simpo": r("fpo", "simpo", "peak_memory_mb"),
        "mem_fpo_dpo": r("fpo", "dpo", "peak_memory_mb"),
        "mem_fpo_lora_fpo": r("fpo-lora", "fpo", "peak_memory_mb"),
        "time_fpo_lora_fpo": r("fpo-lora", "fpo", "step_time_s"),
        "mfu_fpo": t.get("fpo", {}).get("mfu"),  # not a ratio of two runs: the FPO step's MFU (bench.mfu; GPU only)
        "cache_reference_pass_vs_bare": cache["ratio_reference_pass_vs_bare"] if cache else None,
        "cache_reference_pass_vs_bare_cpu": cache["compute"].get("ratio_cpu") if cache else None,
        "cache_worker_vs_bare": cache["ratio_worker_vs_bare"] if cache else None,
        "loader_overhead": loader["overhead"] if loader else None,
        "loader_overhead_cpu": loader.get("overhead_cpu") if loader else None,
        **realshape.ratios(results.get("realshape")),
        # the separately run benches' ratios, merged in by them (merge_part): peer_*, tdpo_offline_*
        **{k: v for part in MERGED_PARTS for k, v in ((results.get(part) or {}).get("ratios") or {}).items()},
    }


# Benches run on their own that merge their ratios into the bench's results file (``merge_part``): part name →
# (module with TARGETS / SECOND_VALUE, section title, its own results file).  ``bench.run`` keeps them.
MERGED_PARTS = {"peer": ("bench.peer", "Peer: TRL's DPOTrainer on the same tokens", "peer-cpu.md"),
                "tdpo_offline": ("bench.tdpo_offline", "Offline TDPO2 (cached top-M reference) vs online TDPO2",
                                 "tdpo-offline-cpu.md")}


def merge_part(part: str, entry: dict, out: Path) -> Path | None:
    """Put a separately run bench's ``entry`` (``command``, ``date_utc``, ``commit``, ``cpu_model``, ``ratios``, and
    optionally ``checks``) into ``out/cpu.json`` as ``part`` and re-render ``cpu.md``; None where there is no such
    file yet."""
    path = out / "cpu.json"
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    results[part] = entry
    results["ratios"] = ratios(results)
    results["targets"] = check_targets(results["ratios"])
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "cpu.md").write_text(markdown(results))
    return path


# (ratio key, what, comparison, threshold).  Judged on wall-clock time (GPU: device memory); on a CPU host the
# same ratio in process CPU seconds is shown next to it: it does not move with other processes' load.
TARGETS = (
    ("time_fpo_dpo_online", "fpo / dpo-online step time", "<=", 0.80),
    ("time_fpo_simpo", "fpo / simpo step time", "<=", 1.05),
    ("mem_fpo_simpo", "fpo / simpo peak memory per rank", "<=", 1.02),
    ("mem_fpo_tdpo2", "fpo / tdpo2 peak memory per rank", "<=", 0.75),
    ("mem_fpo_lora_fpo", "fpo LoRA (rank 16) / fpo full fine-tuning peak memory per rank", "<=", 0.95),
    ("cache_reference_pass_vs_bare", "cache: reference_pass / bare forward tokens/s (same pairs and batches, "
     "padded for the bare forward; same threads)", ">=", 0.90),
    ("cache_worker_vs_bare", "cache job: tokens/s per worker (fewest workers) / bare forward", ">=", 0.90),
    ("loader_overhead", "loader overhead: streaming vs in memory", "<=", 0.02),
    ("mfu_fpo", "MFU of the FPO step (bench/mfu.py: 6·N_body·tokens + 6·d·V·scored positions over the dense bf16 "
     "peak; a lower bound; GPU bf16 only)", ">=", 0.35),
)
CPU_TIME_KEY = {"time_fpo_dpo_online": "cpu_fpo_dpo_online", "time_fpo_simpo": "cpu_fpo_simpo",
                "cache_reference_pass_vs_bare": "cache_reference_pass_vs_bare_cpu", "loader_overhead": "loader_overhead_cpu"}


def _met(value, op: str, threshold: float):
    return None if value is None else (value <= threshold if op == "<=" else value >= threshold)


def check_targets_of(rat: dict, targets, second: dict) -> list[dict]:
    """One entry per target: the value judged, and next to it the ``second`` ratio (CPU seconds for a time ratio,
    the ratio as measured for a memory ratio judged above a baseline)."""
    out = []
    for key, what, op, threshold in targets:
        value, cpu = rat.get(key), rat.get(second.get(key, ""))
        out.append({"key": key, "what": what, "op": op, "threshold": threshold, "value": value,
                    "met": _met(value, op, threshold), "value_cpu_time": cpu, "met_cpu_time": _met(cpu, op, threshold)})
    return out


# what target_row's "(per step …)" after a time ratio is (said under every table that shows one)
PER_STEP_NOTE = ("\"per step\": the geometric mean of the per-step time ratios (step i of both runs on the same pairs) "
                 "and its 95 % t-interval, valid at the number of steps measured")


def verdict(t: dict) -> str:
    """A judged target's verdict cell: **met**, **missed** or not run."""
    return "not run" if t["met"] is None else ("**met**" if t["met"] else "**missed**")


def target_row(t: dict, rat: dict) -> str:
    """A judged target (:func:`check_targets_of`) as a markdown row: what; the value judged (a ratio of medians),
    followed, where the bench gives ``<key>_interval`` in ``rat``, by the geometric mean of the per-step ratios
    (paired by step) and its 95 % t-interval; the threshold; the verdict, qualified where that interval holds the
    threshold (not separated) or lies wholly on the other side of it; the second value."""
    value, cell, note = t["value"], _f(t["value"]), ""
    iv = rat.get(t["key"] + "_interval")
    if iv and value is not None:
        cell += f" (per step {iv['mean']:.3f} [{iv['lo']:.3f}, {iv['hi']:.3f}])"
        if iv["lo"] <= t["threshold"] <= iv["hi"]:
            note = " (not separated: the per-step interval holds the threshold)"
        elif _met(iv["mean"], t["op"], t["threshold"]) != t["met"]:
            note = " (the per-step interval lies on the other side of the threshold)"
    return (f"| {t['what']} | {cell} | {t['op']} {t['threshold']} | {verdict(t)}{note} | "
            f"{_f(t.get('value_cpu_time'))} |")


def check_targets(rat: dict) -> list[dict]:
    """The base preset's targets, then the real shape's (``realshape_*``; None until a realshape run) and those of
    the benches in :data:`MERGED_PARTS` (``peer_*``: bench/peer.py, ``tdpo_offline_*``: bench/tdpo_offline.py)."""
    import importlib

    out = check_targets_of(rat, TARGETS, CPU_TIME_KEY) + check_targets_of(rat, realshape.TARGETS, realshape.SECOND_VALUE)
    for module, _, _ in MERGED_PARTS.values():
        m = importlib.import_module(module)
        out += check_targets_of(rat, m.TARGETS, m.SECOND_VALUE)
    return out


# --------------------------------------------------------------------------------------------- markdown


def _f(x, fmt=".3f", none="—"):
    return none if x is None else format(x, fmt)


def _pct(x):
    return "—" if x is None else f"{100 * x:+.2f} %"


OUTSIDE_STEP = ("metrics_reduce",)  # the trainer takes step_time_s before reducing the step's metrics
PHASE_ORDER = ("loader_next", "policy_forward", "reference_forward", "logps", "kl", "sae_encode_pool", "loss_fn",
               "finite_check", "backward", "optimizer_step", "metrics_reduce")


def _other(p: dict) -> float | None:
    """Step time not covered by a timed phase."""
    if p.get("step_time_s") is None:
        return None
    return p["step_time_s"] - sum(v for k, v in p["seconds"].items() if k not in OUTSIDE_STEP)


def _phase_table(losses: dict) -> list[str]:
    have = [n for n, r in losses.items() if r.get("phases")]
    if not have:
        return []
    lines = ["| phase (s, profiled step, rank 0) | " + " | ".join(have) + " |",
             "|---|" + "---:|" * len(have)]
    for ph in PHASE_ORDER + ("other",):
        cells = [_f(_other(losses[n]["phases"]) if ph == "other" else losses[n]["phases"]["seconds"].get(ph))
                 for n in have]
        if any(c != "—" for c in cells):
            label = f"{ph} (after step_time_s)" if ph in OUTSIDE_STEP else ph
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| step (trainer's step_time_s) | " + " | ".join(_f(losses[n]["phases"].get("step_time_s")) for n in have) + " |")
    return lines


def _phase_memory_table(losses: dict, unit: str) -> list[str]:
    have = [n for n, r in losses.items() if (r.get("phases") or {}).get("peak_above_start_mb")]
    if not have:
        return []
    lines = [f"| phase: {unit} peak above the phase's start (MB, profiled step, rank 0) | " + " | ".join(have) + " |",
             "|---|" + "---:|" * len(have)]
    for ph in PHASE_ORDER:
        cells = [_f(losses[n]["phases"]["peak_above_start_mb"].get(ph), ".0f") for n in have]
        if any(c != "—" for c in cells):
            lines.append(f"| {ph} | " + " | ".join(cells) + " |")
    return lines


def _rerun_note(tr: dict) -> str:
    notes = []
    for n in tr.get("rerun") or []:
        loss, _, k = n.partition(" round ")  # with several rounds "<loss> round <k>": the attempts are that round's
        r = tr["losses"].get(loss) or {}
        if k:
            rounds = r.get("rounds") or []
            r = rounds[int(k)] if int(k) < len(rounds) else {}
        a = r.get("attempts") or []
        notes.append(f"{n} (" + " / ".join(f"{x['step_time_s']:.3f} s/step at {x['host_load']['others_cores']:.2f} cores"
                                           for x in a) + ")")
    return (" Re-run because the host was busy, the quieter attempt kept: " + "; ".join(notes) + ".") if notes else ""


def _peak_rank(r: dict) -> dict:
    """The memory record of the rank with the highest training peak (the one the table reports)."""
    return max(r["memory_by_rank"], key=lambda x: x["train_peak"].get("max_allocated_mb", x["train_peak"]["hwm_mb"]))


def _mem_rows(losses: dict) -> list[str]:
    lines = ["| loss | after imports | after setup (weights, optimizer, ref model, SAE) | step peak | step peak − after setup |",
             "|---|---:|---:|---:|---:|"]
    for n, r in losses.items():
        m = _peak_rank(r)
        key = "allocated_mb" if "allocated_mb" in m["after_setup"] else "rss_mb"
        peak_key = "max_allocated_mb" if key == "allocated_mb" else "hwm_mb"
        a, s, p = m["after_imports"][key], m["after_setup"][key], m["train_peak"][peak_key]
        lines.append(f"| {n} | {a:.0f} | {s:.0f} | {p:.0f} | {p - s:.0f} |")
    return lines


def _time_finding(losses: dict, a: str, b: str) -> list[str]:
    pa, pb = (losses.get(x, {}).get("phases") for x in (a, b))
    if not pa or not pb:
        return [f"- no phase profile for {a} / {b}"]
    keys = (set(pa["seconds"]) | set(pb["seconds"])) - set(OUTSIDE_STEP)
    delta = {k: pa["seconds"].get(k, 0.0) - pb["seconds"].get(k, 0.0) for k in keys}
    total_a, total_b = pa.get("step_time_s"), pb.get("step_time_s")
    if total_a is not None and total_b is not None:
        delta["other"] = _other(pa) - _other(pb)
    top = sorted(delta.items(), key=lambda kv: -abs(kv[1]))[:5]
    lines = [f"- profiled step: {a} {_f(total_a)} s vs {b} {_f(total_b)} s; largest phase differences "
             f"({a} − {b}): " + ", ".join(f"{k} {v:+.3f} s" for k, v in top)]
    for name, p in ((a, pa), (b, pb)):
        tot = p.get("step_time_s")
        if tot:
            shares = sorted(((k, v) for k, v in p["seconds"].items() if k not in OUTSIDE_STEP), key=lambda kv: -kv[1])[:4]
            lines.append(f"- {name}: " + ", ".join(f"{k} {100 * v / tot:.0f} %" for k, v in shares) + " of the step")
    sa, sb = pa["seconds"], pb["seconds"]
    if total_a and total_b:
        # what the ratio would be if the losses differed only in their own phases (both from profiled steps)
        own_a = sa.get("sae_encode_pool", 0.0) + sa.get("reference_forward", 0.0) + sa.get("kl", 0.0)
        own_b = sb.get("sae_encode_pool", 0.0) + sb.get("reference_forward", 0.0) + sb.get("kl", 0.0)
        common = total_a - own_a
        lines.append(f"- if {a} and {b} differed only in their own phases (SAE encode, reference forward, KL: "
                     f"{own_a:.3f} s vs {own_b:.3f} s) on {a}'s common step of {common:.3f} s, the ratio would be "
                     f"{(common + own_a) / (common + own_b):.3f}")
    prof = pa.get("profile_cpu_s")
    if prof and prof.get("all"):
        lines.append(f"- costs every loss pays alike, in {a}'s profiled step (self CPU s, rank 0): ZeRO-3 gradient hooks "
                     f"(inside autograd's AccumulateGrad) {prof['zero3_accumulate_grad']:.3f}, collectives "
                     f"{prof['collectives']:.3f}, dense matmuls {prof['matmul']:.3f}, of {prof['all']:.3f} in all")
    return lines


def _phase_peaks(na: str, nb: str, pa: dict, pb: dict) -> list[str]:
    """The six phases of the profiled step with the highest peak above their start, in either run (ties by name)."""
    keys = sorted(set(pa) | set(pb), key=lambda k: (-max(pa.get(k, 0), pb.get(k, 0)), k))[:6]
    return [f"- peak above each phase's start in the profiled step ({na} / {nb}, MB): " + ", ".join(
        f"{k} {_f(pa.get(k), '.0f')} / {_f(pb.get(k), '.0f')}" for k in keys)] if keys else []


def _mem_finding(results: dict, a: str, b: str) -> list[str]:
    losses = results["train"]["losses"]
    if a not in losses or b not in losses:
        return []
    out = []
    for n in (a, b):
        m = _peak_rank(losses[n])
        key = "allocated_mb" if "allocated_mb" in m["after_setup"] else "rss_mb"
        peak = m["train_peak"]["max_allocated_mb" if key == "allocated_mb" else "hwm_mb"]
        out.append((n, m["after_imports"][key], m["after_setup"][key], peak))
    (na, ia, sa, pa), (nb, ib, sb, pb) = out
    lines = [f"- rank with the highest peak: {na} = {ia:.0f} MB after imports + {sa - ia:.0f} MB setup + {pa - sa:.0f} MB in the step "
             f"= {pa:.0f} MB; {nb} = {ib:.0f} + {sb - ib:.0f} + {pb - sb:.0f} = {pb:.0f} MB",
             f"- difference {pa - pb:+.0f} MB: setup {(sa - ia) - (sb - ib):+.0f} MB, step {(pa - sa) - (pb - sb):+.0f} MB, "
             f"process baseline {ia - ib:+.0f} MB"]
    if results["machine"]["device"] == "cpu":
        lines.append(f"- excluding the process baseline (Python, torch, transformers, deepspeed, sae_lens: "
                     f"{ia:.0f} MB, the same in every run) the ratio {na}/{nb} is {(pa - ia) / max(pb - ib, 1e-9):.3f}")
    pa_mem = (losses[na].get("phases") or {}).get("peak_above_start_mb") or {}
    pb_mem = (losses[nb].get("phases") or {}).get("peak_above_start_mb") or {}
    if pa_mem and pb_mem:
        lines += _phase_peaks(na, nb, pa_mem, pb_mem)
    assets, sizes = results.get("assets") or {}, results["sizes"]
    rows, T = 2 * sizes["micro_batch"], sizes["max_length"]
    mib = lambda x: f"{x / 2**20:.0f} MB"  # noqa: E731
    if nb == "simpo" and assets:
        lines.append(f"- what FPO holds beyond simpo: the SAE, replicated on every rank in fp32 ({mib(assets['sae_params'] * 4)}; "
                     f"W_dec, half of it, is never used by the FPO loss), and transiently the no-grad full encode "
                     f"of all {rows}×T positions, [{rows}, T, {sizes['d_sae']}] fp32 (up to {mib(rows * T * sizes['d_sae'] * 4)} "
                     "at T = max_length, more in sae-lens' intermediates), before the selected columns are re-encoded "
                     "with gradients")
    if nb == "tdpo2" and assets:
        world = results["train"]["losses"][nb]["world_size"]
        width, dt = (2, "bf16") if results["machine"]["device"] == "cuda" else (4, "fp32")
        lines.append(f"- what tdpo2 holds beyond fpo: the reference model ({mib(assets['n_params'] * width / world)} "
                     f"partition per rank in {dt}, and the gathered full {mib(assets['n_params'] * width)} while it runs "
                     f"under ZeRO-3) and its full-vocabulary logits for the KL, [{rows}, T, {sizes['vocab']}] "
                     f"({mib(rows * T * sizes['vocab'] * width)} {dt} at T = max_length) next to the policy's")
    return lines


def _merged_markdown(results: dict, part: str) -> list[str]:
    """A separately run bench's targets (:data:`MERGED_PARTS`), when it merged them in."""
    p = results.get(part)
    if not p:
        return []
    _, title, details = MERGED_PARTS[part]
    lines = [f"## {title}", "",
             f"`{p['command']}` on {p['date_utc']}, code {(p.get('commit') or '?')[:12]}, {p.get('cpu_model', '')}; "
             f"details and runs: [{details}]({details}).", "",
             "| target | measured | threshold | | CPU seconds / peaks as measured |", "|---|---:|---:|---|---:|"]
    rat = results.get("ratios") or {}
    for t in (t for t in results["targets"] if t["key"].startswith(part + "_")):
        lines.append(target_row(t, rat))
    if any(rat.get(t["key"] + "_interval") for t in results["targets"] if t["key"].startswith(part + "_")):
        lines += ["", PER_STEP_NOTE + "."]
    checks = p.get("checks") or {}
    lines += ["", *(["Loss sequences, TRL vs fpo-dist DPO (max |Δ loss| over the steps): " + ", ".join(
        f"{tag} {_f(c.get('loss_max_abs_diff'), '.2e')} ({'check passed' if c.get('ok') else 'CHECK FAILED'})"
        for tag, c in checks.items()) + ".", ""] if checks else [])]
    return lines


def markdown(results: dict) -> str:
    m, sizes, rat = results["machine"], results.get("sizes"), results["ratios"]
    rs = results.get("realshape")
    names = " + ".join(x for x in ((sizes or {}).get("name"), (rs or {}).get("sizes", {}).get("name")) if x)
    lines = [f"# fpo-dist benchmark: {m['device']} ({names} sizes)", ""]
    label = f"{m['cpu_model']}, {m['cpu_cores']} cores, {_f(m['ram_gib'], '.0f')} GiB RAM"
    if m["device"] == "cuda":
        label = f"{m['gpu_count']}× {m['gpu']} ({m['gpu_memory_gib']:.0f} GiB, CUDA {m['cuda']}); host " + label
    v = m["versions"]
    lines += [
        f"- machine: {label}",
        f"- software: Python {m['python']}, " + ", ".join(f"{k} {v[k]}" for k in PACKAGES),
        f"- date: {m['date_utc']}; code: {(m['git']['commit'] or '?')[:12]}{' (+ uncommitted changes)' if m['git']['dirty'] else ''}",
        f"- host load: other processes kept {results['host_load']['others_cores']:.2f} of {m['cpu_cores']} cores busy "
        f"on average during the run" + (" — a shared host: wall-clock timings are noisy (see the CPU-seconds columns)"
                                        if results["host_load"]["others_cores"] > 0.25 else ""),
        f"- command: `{results['command']}` ({results['wall_s']:.0f} s)",
        "",
    ]
    if rs and rs.get("run"):
        r = rs["run"]
        same = r.get("command") == results["command"]
        lines += [f"The real-shape part ({rs['sizes']['name']})" + (" ran in the same run" if same else
                  f" ran separately: `{r['command']}` on {r['date_utc']}, code {(r['commit'] or '?')[:12]}"
                  + (" (+ uncommitted changes)" if r.get("dirty") else "")
                  + (f", on {r['cpu_model']}" if r.get("cpu_model") and r["cpu_model"] != m["cpu_model"] else ""))
                  + f", {r['wall_s']:.0f} s; other processes kept {r['host_load']['others_cores']:.2f} cores busy on "
                  "average during it.", ""]
    lines += realshape.markdown(rs, rat, m["device"], m.get("cpu_cores"))
    for part in MERGED_PARTS:
        lines += _merged_markdown(results, part)
    if not sizes:
        return "\n".join(lines).rstrip() + "\n"
    a = results.get("assets")
    if a:
        lines += [f"Model: random-init Llama, {a['n_params'] / 1e6:.1f} M parameters ({sizes['layers']} blocks, d_model "
                  f"{sizes['hidden']}, vocab {sizes['vocab']}), {sizes['dtype']} in the cache job; SAE: JumpReLU "
                  f"{sizes['hidden']}×{sizes['d_sae']} ({a['sae_params'] / 1e6:.1f} M parameters) on block "
                  f"{sizes['hook_layer']}, thresholds calibrated to a per-token L0 of {a['calibrated_l0']:.0f}. "
                  f"Data: {sizes['rows']} synthetic pairs, max length {sizes['max_length']} (prompt "
                  f"≤ {sizes['max_prompt_length']}).", ""]

    cpu_col = m["device"] == "cpu"
    lines += ["## Targets", "",
              "| target | measured | threshold | | in CPU seconds |" if cpu_col else "| target | measured | threshold | |",
              "|---|---:|---:|---|---|" if cpu_col else "|---|---:|---:|---|"]
    for t in (t for t in results["targets"] if not t["key"].startswith(("realshape_", "peer_"))):
        fmt = _pct if t["key"] == "loader_overhead" else _f
        thr = _pct(t["threshold"]) if t["key"] == "loader_overhead" else f"{t['threshold']:.2f}"
        row = f"| {t['what']} | {fmt(t['value'])} | {t['op']} {thr} | {verdict(t)} |"
        if cpu_col:
            row += ("" if t["value_cpu_time"] is None else
                    f" {fmt(t['value_cpu_time'])} ({'met' if t['met_cpu_time'] else 'missed'})") + " |"
        lines.append(row)
    lines += [""]
    if cpu_col:
        lines += ["Targets are judged on wall-clock time. \"In CPU seconds\": the same ratio in CPU time of the "
                  "benchmarked processes (all threads, summed over ranks), which other processes on a shared host "
                  "do not inflate; it misses waiting (communication, stalls), so where the two disagree on a quiet "
                  "host, wall time is right; on a loaded host, CPU time is the steadier of the two.", ""]
    lines += ["Ratios (fpo / other) from part 1:", "",
              "| fpo / | step time | CPU s per step | peak memory per rank |", "|---|---:|---:|---:|"]
    for other, key in (("dpo-online", "dpo_online"), ("tdpo2", "tdpo2"), ("simpo", "simpo"), ("dpo", "dpo")):
        lines.append(f"| {other} | {_f(rat['time_fpo_' + key])} | {_f(rat['cpu_fpo_' + key])} | "
                     f"{_f(rat['mem_fpo_' + key])} |")
    lines.append("")

    tr = results.get("train")
    if tr:
        losses = tr["losses"]
        mem_label = "peak max_allocated (MB/rank)" if m["device"] == "cuda" else "peak RSS (MB/rank)"
        lines += ["## 1. Training step per loss", "",
                  f"Real trainer (`Trainer.setup` + `train`), `{tr['ds_config']}`, {tr['nproc']} rank(s), micro-batch "
                  f"{sizes['micro_batch']} pair(s)/rank, grad_accum 1; median over steps {sizes['warmup_steps'] + 1}-"
                  f"{sizes['warmup_steps'] + sizes['measure_steps']} (first {sizes['warmup_steps']} skipped). Memory: "
                  "high-water mark over the steps (reset after setup), max over ranks; every run imports the same "
                  "modules.", "",
                  "Host load per launch (cores other processes kept busy): " + "; ".join(
                      f"{n} {r['host_load']['others_cores']:.2f}" for n, r in losses.items() if r.get("host_load"))
                  + "." + _rerun_note(tr), "",
                  f"| loss | reference | step time (s), median [min] | tokens/s | CPU s/step (all ranks) | {mem_label} "
                  "| time vs fpo | memory vs fpo |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        fpo = losses.get("fpo")
        for n, r in losses.items():
            ref = ("resident model (ZeRO-3)" if r["reference_model_resident"] else
                   "cache + SAE" if r["sae_resident"] else "none" if n == "simpo" else "cache")
            tv = _f(r["step_time_s"] / fpo["step_time_s"], ".2f") + "×" if fpo else "—"
            mv = _f(r["peak_memory_mb"] / fpo["peak_memory_mb"], ".2f") + "×" if fpo else "—"
            lines.append(f"| {n} | {ref} | {r['step_time_s']:.3f} [{r['min_step_time_s']:.3f}] | "
                         f"{r['tokens_per_s']:.0f} | {_f(r.get('cpu_s_per_step'))} | {r['peak_memory_mb']:.0f} | {tv} | {mv} |")
        lines += ["", "Where the time goes (one extra profiled step, phases timed by wrapping the trainer's "
                      "building blocks; `other` = the rest of the step):", ""] + _phase_table(losses)
        lines += ["", "Memory by stage (rank with the highest peak, MB):", ""] + _mem_rows(losses)
        unit = "allocated" if m["device"] == "cuda" else "RSS"
        caveat = ("" if m["device"] == "cuda" else " On CPU, RSS grows only when the heap has no freed memory left to "
                  "reuse, so a row is what the phase added beyond memory the process already held (a lower bound of "
                  "its transient allocations).")
        lines += ["", "Memory by phase (how far each phase pushed memory above where it started; the step's peak is "
                      "the largest of a phase's starting point plus its row)." + caveat, ""] \
            + _phase_memory_table(losses, unit) + [""]

    c = results.get("cache")
    if c:
        comp, job, disk = c["compute"], c["job"], c["job"]["disk"]
        parts = comp["reference_pass_parts_s"]
        lines += ["## 2. Cache job", "",
                  f"`reference_pass` vs a bare no-grad `model(input_ids, attention_mask)` on the same "
                  f"{comp['batches']} batches ({comp['pairs']} pairs, {comp['batch_pairs']} pairs per forward, "
                  f"{comp['tokens']} tokens, {comp['padded_tokens']} with padding), {comp['threads']} thread(s), "
                  f"{len(comp['bare_s'])} interleaved round(s); {load_note(comp.get('host_load'), m['cpu_cores'], comp.get('host_loads'))}:", "",
                  "| | tokens/s | vs bare |", "|---|---:|---:|",
                  f"| bare forward (the limit) | {comp['bare_tokens_per_s']:.0f} | 1.000 |",
                  f"| reference_pass (forward + log-probs + SAE + pooling) | {comp['reference_pass_tokens_per_s']:.0f} | "
                  f"{comp['ratio']:.3f} (CPU time: {_f(comp.get('ratio_cpu'))}) |"]
        for r in job["runs"]:
            lines.append(f"| cache job, {r['workers']} worker(s): per worker (tokenize + pass + write) | "
                         f"{r['mean_worker_tokens_per_s']:.0f} | {r['mean_worker_tokens_per_s'] / comp['bare_tokens_per_s']:.3f} |")
        for r in job["runs"]:
            lines.append(f"| cache job, {r['workers']} worker(s): all workers, busy time / wall incl. Ray + model "
                         f"load | {r['aggregate_tokens_per_s_busy']:.0f} / {r['aggregate_tokens_per_s_wall']:.0f} | — |")
        if len(job["runs"]) > 1:
            one, two = job["runs"][0], job["runs"][-1]
            lines += ["", f"Scaling {one['workers']} → {two['workers']} workers: "
                          f"{two['aggregate_tokens_per_s_busy'] / one['aggregate_tokens_per_s_busy']:.2f}× tokens/s over "
                          f"busy time, {two['aggregate_tokens_per_s_wall'] / one['aggregate_tokens_per_s_wall']:.2f}× end "
                          f"to end (wall {one['wall_s']:.1f} s → {two['wall_s']:.1f} s, including Ray actors loading the "
                          "model)."]
        lines += ["", "Cache jobs: " + "; ".join(
            f"{r['workers']} worker(s): {load_note(r.get('host_load'), m['cpu_cores'], r.get('host_loads'), r['workers'])}"
            for r in job["runs"]) + " (the Ray actors themselves count as other processes here)."]
        lines += ["", "Inside one `reference_pass` call (s): " + ", ".join(
            f"{k} {v:.3f}" for k, v in parts.items()) + " (`_response_logps` = the decoder, the output layer and "
            "the log-probs; `rest` = everything else; the bare "
            f"forward alone took {statistics.median(comp['bare_s']):.3f}). The forward computes the output layer and "
            f"`_pooled_codes` (SAE encode + mean pooling) only at the positions that predict a response token: "
            f"{100 * comp['response_fraction']:.0f} % of all positions.", ""]
        lines += ["Bytes on disk per response (`store.info()`, whole store incl. tokens and metadata):", "",
                  "| | bytes/response | store vs it |", "|---|---:|---:|",
                  f"| this cache (pooled nnz mean {disk['pooled_nnz']['mean']:.0f} of {sizes['d_sae']}) | "
                  f"{disk['bytes_per_response']:.0f} | 1 |",
                  f"| of which pooled codes (indices + values + nnz) | {_f(disk['code_bytes_per_response'], '.0f')} | — |",
                  f"| dense pooled 16k fp32 vector | {disk['dense_pooled_16k_fp32']} | "
                  f"{disk['vs_dense_16k']:.3f} |",
                  f"| dense pooled vector of this SAE ({sizes['d_sae']} fp32) | {disk['dense_pooled_this_sae_fp32']} | "
                  f"{disk['vs_dense_this_sae']:.3f} |",
                  f"| dense per-token logits (vocab {sizes['vocab']} × {disk['mean_response_tokens']:.0f} tokens × 2 B) | "
                  f"{disk['dense_logits_bf16']:.0f} | {disk['vs_dense_logits']:.5f} |", ""]

    lo = results.get("loader")
    if lo:
        lines += ["## 3. Loader", "",
                  f"`CacheLoader` (prefetch {lo['prefetch']}) vs the same {lo['micro_batches_timed']} micro-batches "
                  f"({lo['micro_batch_pairs']} pair(s) each) held in memory; per micro-batch: `.to(device)`, touch the "
                  f"tensors, then a compute stand-in of {lo['stand_in']['matmuls']} matmuls {lo['stand_in']['dim']}² on "
                  f"{lo['threads']} thread(s) ≈ {lo['stand_in_target_s']:.3f} s (the measured FPO step); "
                  f"{lo['rounds']} alternating round(s); {load_note(lo.get('host_load'), m['cpu_cores'], lo.get('host_loads'))}.", "",
                  "| | s / micro-batch (median) | total (s, per round) |", "|---|---:|---|",
                  f"| in memory | {lo['in_memory_step_s']:.4f} | {', '.join(f'{x:.3f}' for x in lo['in_memory_total_s'])} |",
                  f"| streaming from Zarr | {lo['streaming_step_s']:.4f} | {', '.join(f'{x:.3f}' for x in lo['streaming_total_s'])} |",
                  "", f"Overhead {_pct(lo['overhead'])} (median over rounds of streaming total / in-memory total − 1; "
                      f"in process CPU time, prefetch thread included: {_pct(lo.get('overhead_cpu'))}). "
                      f"A synchronous read costs {1000 * lo['read_s_per_micro_batch']:.1f} ms per micro-batch "
                      f"({100 * lo['read_s_per_micro_batch'] / lo['stand_in_target_s']:.2f} % of the step) before "
                      "prefetching hides it.", ""]

    lines += findings(results)
    return "\n".join(lines).rstrip() + "\n"


def _realshape_finding(results: dict, key: str) -> list[str]:
    rs = results.get("realshape") or {}
    losses = (rs.get("train") or {}).get("losses", {})
    if key in ("realshape_time_fpo_vs_materialized", "realshape_time_fpo_vs_dpo_online"):
        return _time_finding(losses, "fpo", "fpo-materialized" if "materialized" in key else "dpo-online")
    if key == "realshape_mem_fpo_vs_materialized":
        pa = (losses.get("fpo", {}).get("phases") or {}).get("peak_above_start_mb") or {}
        pb = (losses.get("fpo-materialized", {}).get("phases") or {}).get("peak_above_start_mb") or {}
        return _phase_peaks("fpo", "fpo-materialized", pa, pb)
    if key == "realshape_cache_vs_bare_forward":
        parts = ((rs.get("cache") or {}).get("compute") or {}).get("reference_pass_parts_s") or {}
        tot = parts.get("total") or 1.0
        return ["- inside reference_pass: " + ", ".join(f"{n} {100 * v / tot:.0f} %" for n, v in parts.items()
                                                       if n != "total") + " of the call"]
    if key == "realshape_padding_share":
        pad = (losses.get("fpo") or {}).get("padding") or {}
        return [f"- fpo's micro-batches: layouts {pad.get('layouts')}, {pad.get('padding_tokens')} padding of "
                f"{pad.get('computed_tokens')} computed positions"
                + ("; this trainer has no batch_layout switch yet (padded rows)" if not rs.get("batch_layout_available")
                   else "")]
    return []


def findings(results: dict) -> list[str]:
    """For each missed target: where the time or memory goes (from the phase profile and memory stages)."""
    missed = [t for t in results["targets"] if t["met"] is False or t.get("met_cpu_time") is False]
    if not missed:
        return []
    lines = ["## Missed targets: where it goes", ""]
    losses = (results.get("train") or {}).get("losses", {})
    for t in missed:
        how = "" if t["met"] is False else f"; met in wall time, missed in CPU seconds: {_f(t['value_cpu_time'])}"
        lines += [f"### {t['what']}: {_f(t['value'])} (target {t['op']} {t['threshold']}{how})", ""]
        k = t["key"]
        if k.startswith("time_"):
            other = {"time_fpo_dpo_online": "dpo-online", "time_fpo_simpo": "simpo"}[k]
            lines += _time_finding(losses, "fpo", other)
            for n in ("fpo", other):
                if losses.get(n, {}).get("profile_top"):
                    top = "\n".join(losses[n]["profile_top"].splitlines()[:16])
                    lines += ["", f"<details><summary>torch.profiler, {n}, top ops by self time</summary>", "",
                              "```text", top, "```", "</details>"]
        elif k.startswith("mem_"):
            this, other = {"mem_fpo_simpo": ("fpo", "simpo"), "mem_fpo_tdpo2": ("fpo", "tdpo2"),
                           "mem_fpo_lora_fpo": ("fpo-lora", "fpo")}[k]
            lines += _mem_finding(results, this, other)
        elif k == "cache_reference_pass_vs_bare" or k == "cache_worker_vs_bare":
            c = results["cache"]
            parts = c["compute"]["reference_pass_parts_s"]
            tot = parts["total"]
            lines.append("- inside reference_pass: " + ", ".join(
                f"{n} {100 * v / tot:.0f} %" for n, v in parts.items() if n != "total") + " of the call")
            extra = parts.get("_pooled_codes", 0.0) / tot
            frac = c["compute"]["response_fraction"]
            lines.append(f"- SAE encode + pooling take {100 * extra:.0f} % of the call, over the {100 * frac:.0f} % of "
                         "the positions that predict a response token")
            if k == "cache_worker_vs_bare":
                r, comp = c["job"]["runs"][0], c["compute"]
                lines.append(f"- the job's worker time also covers tokenization and the Zarr write; worker "
                             f"{r['mean_worker_tokens_per_s']:.0f} tok/s vs reference_pass "
                             f"{comp['reference_pass_tokens_per_s']:.0f} tok/s in-process")
                first, warm = comp.get("reference_pass_first_call_s"), statistics.median(comp["reference_pass_s"])
                shards = sum(r["shards"].values()) / max(len(r["shards"]), 1)
                if first and first > 1.05 * warm:
                    lines.append(f"- a fresh worker's first shard is cold: in-process, the first reference_pass call "
                                 f"took {first:.2f} s against {warm:.2f} s warm (per {comp['pairs']} pairs); with "
                                 f"{shards:.0f} shard(s) per worker in this job, start-up is amortised over little "
                                 "work (a real job runs thousands of shards per worker)")
        elif k.startswith("realshape_"):
            lines += _realshape_finding(results, k)
        elif k == "loader_overhead":
            lo = results["loader"]
            lines.append(f"- synchronous read {1000 * lo['read_s_per_micro_batch']:.1f} ms per micro-batch; slowest "
                         f"streamed step {lo['max_streaming_step_s']:.3f} s vs median {lo['streaming_step_s']:.3f} s")
        lines.append("")
    notes = results.get("notes") or []
    if notes:
        lines += ["### Notes", ""] + [f"- {n}" for n in notes] + [""]
    return lines


if __name__ == "__main__":
    import json
    import sys

    for path in sys.argv[1:]:
        res = json.loads(Path(path).read_text())
        res["targets"] = check_targets(res["ratios"])
        Path(path).with_suffix(".md").write_text(markdown(res))
        print(f"wrote {Path(path).with_suffix('.md')}")
