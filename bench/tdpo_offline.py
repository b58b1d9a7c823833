"""Offline vs online TDPO2 at the real shape (issue 23): ``make bench-tdpo-offline`` / ``python -m bench.tdpo_offline``.

    python -m bench.tdpo_offline [--topm 128] [--out bench/results]

Gemma 3 270M (real weights), the real-shape rows (``bench/presets.py`` ``realshape``), 2 ranks under ZeRO-3 on CPU
(fp32), one launch each on the same store, batch and seed (``bench.train``): ``tdpo2`` (a resident ZeRO-3 reference
model, the KL exact over the vocabulary), ``tdpo2-offline`` (no reference model: the KL against the cache's top-M
reference distributions + tail, the cache built with ``--ref_topm M``) and ``fpo`` (the cached reference and the
SAE) beside them.  Step time: the median of the measured steps, with a 95 % t-interval of the per-step ratios
paired by step (``bench.realshape.paired_ratio_interval``).  Memory per rank: the training peak above the
post-setup baseline (the targets; the resident reference is part of the baseline) and the peak as measured (what
dropping the reference saves in all).

Writes ``tdpo-offline-cpu.{json,md}`` into ``--out`` and merges its ratios and targets into ``cpu.json`` / ``cpu.md``
there (``bench.report.merge_part``; a later ``bench.run`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RUNS = ("tdpo2", "tdpo2-offline", "fpo")
DEFAULT_TOPM = 128
TARGETS = (
    ("tdpo_offline_time_vs_online", "real shape: tdpo2-offline / tdpo2 (resident ZeRO-3 reference), step time",
     "<=", 0.8),
    ("tdpo_offline_mem_vs_online", "real shape: tdpo2-offline / tdpo2, peak memory per rank above the post-setup "
     "baseline", "<=", 0.7),
)
SECOND_VALUE = {"tdpo_offline_time_vs_online": "tdpo_offline_cpu_vs_online",
                "tdpo_offline_mem_vs_online": "tdpo_offline_mem_vs_online_measured"}


def ratios(train: dict) -> dict:
    from bench.realshape import paired_ratio_interval

    t = train.get("losses", {})

    def r(a, b, key):
        return t[a][key] / t[b][key] if a in t and b in t and t[a].get(key) and t[b].get(key) else None

    return {
        "tdpo_offline_time_vs_online": r("tdpo2-offline", "tdpo2", "step_time_s"),
        "tdpo_offline_time_vs_online_interval": paired_ratio_interval(t.get("tdpo2-offline"), t.get("tdpo2")),
        "tdpo_offline_cpu_vs_online": r("tdpo2-offline", "tdpo2", "cpu_s_per_step"),
        "tdpo_offline_mem_vs_online": r("tdpo2-offline", "tdpo2", "peak_above_setup_mb"),
        "tdpo_offline_mem_vs_online_measured": r("tdpo2-offline", "tdpo2", "peak_memory_mb"),
        "tdpo_offline_time_vs_fpo": r("tdpo2-offline", "fpo", "step_time_s"),
        "tdpo_offline_time_vs_fpo_interval": paired_ratio_interval(t.get("tdpo2-offline"), t.get("fpo")),
        "tdpo_offline_mem_vs_fpo": r("tdpo2-offline", "fpo", "peak_above_setup_mb"),
        "tdpo_offline_mem_vs_fpo_measured": r("tdpo2-offline", "fpo", "peak_memory_mb"),
    }


def _f(x, fmt=".3f"):
    return "—" if x is None else format(x, fmt)


def markdown(res: dict) -> str:
    from bench.report import PER_STEP_NOTE, check_targets_of, target_row

    rat, t = res["ratios"], res["train"]["losses"]
    lines = [
        "# Offline TDPO2 vs online TDPO2 at the real shape",
        "",
        f"`{res['command']}` — {res['date_utc']}, code {(res.get('commit') or '?')[:12]}; {res['cpu_model']}; "
        f"{res['wall_s']:.0f} s. Gemma 3 270M, {res['sizes']['rows']} real-shape rows, 2 ranks under ZeRO-3 (fp32, "
        f"1 thread per rank), micro-batch {res['sizes']['micro_batch']} pair(s), {res['sizes']['measure_steps']} "
        f"measured steps after {res['sizes']['warmup_steps']} warm-up. The cache holds the reference's top-"
        f"{res['topm']} per response token: {res['cache']['topm_bytes_per_token']:.0f} bytes per response token "
        f"(the whole store: {res['cache']['store_bytes_per_response_token']:.0f}).",
        "",
        "| target | measured | threshold | | CPU seconds / peaks as measured |", "|---|---:|---:|---|---:|",
    ]
    lines += [target_row(tg, rat) for tg in check_targets_of(rat, TARGETS, SECOND_VALUE)]
    ivf = rat.get("tdpo_offline_time_vs_fpo_interval")
    lines += ["", PER_STEP_NOTE + ". tdpo2-offline / fpo step time: per step "
              + (f"{ivf['mean']:.3f} [{ivf['lo']:.3f}, {ivf['hi']:.3f}]" if ivf else "—")
              + f". tdpo2-offline / fpo peak memory above setup {_f(rat.get('tdpo_offline_mem_vs_fpo'))} (as measured "
              f"{_f(rat.get('tdpo_offline_mem_vs_fpo_measured'))}).", "",
              "| run | step time (s) | CPU s / step | peak above setup (MB / rank) | peak (MB / rank) | resident models |",
              "|---|---:|---:|---:|---:|---|"]
    for name in RUNS:
        r = t.get(name)
        if r:
            models = ", ".join(f"{m['class']}" for m in r["resident_models"])
            lines.append(f"| {name} | {r['step_time_s']:.3f} | {_f(r['cpu_s_per_step'])} | "
                         f"{_f(r['peak_above_setup_mb'], '.0f')} | {r['peak_memory_mb']:.0f} | {models} |")
    for name, err in (res["train"].get("failed") or {}).items():
        lines.append(f"| {name} | failed: {err.splitlines()[0][:120]} | | | | |")
    return "\n".join(lines) + "\n"


def run(topm: int, root: Path, log=print) -> dict:
    from bench import assets as bench_assets
    from bench import cache as bench_cache
    from bench import train as bench_train
    from bench.presets import preset_named
    from fpo_dist.store import open_store

    sizes = preset_named("realshape", "cpu")
    a = bench_assets.build_realshape_assets(root / "assets", sizes, "cpu", log)
    job = bench_cache.bench_cache_job(a, sizes, "cpu", [1], root / "cache", retry=False, log=log,
                                      extra=("--ref_topm", str(topm)))
    store = open_store(job["store"])
    extras = store.token_extras_info()["ref_topm"]
    info = store.info()
    train = bench_train.run(job["store"], sizes, 2, "cpu", root / "train", list(RUNS), rerun_loaded=False, log=log,
                            keep_going=True)
    return {"sizes": sizes.to_dict(), "topm": topm, "train": train,
            "cache": {"topm_bytes_per_token": extras["bytes"] / extras["tokens"], "topm_bytes": extras["bytes"],
                      "response_tokens": extras["tokens"],
                      "store_bytes_per_response_token": info["size_bytes"] / extras["tokens"]}}


def main(argv: list[str] | None = None) -> int:
    from bench import report

    p = argparse.ArgumentParser(prog="python -m bench.tdpo_offline", description=__doc__.split("\n\n")[0])
    p.add_argument("--topm", type=int, default=DEFAULT_TOPM)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--work", default="/tmp/fpo-bench-tdpo-offline")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    res = run(a.topm, Path(a.work), log=lambda s: print(s, flush=True))
    m = report.machine_info("cpu")
    res.update(command="python -m bench.tdpo_offline " + " ".join(argv if argv is not None else sys.argv[1:]),
               date_utc=m["date_utc"], commit=m["git"]["commit"], cpu_model=m["cpu_model"],
               wall_s=time.perf_counter() - t0)
    res["ratios"] = ratios(res["train"])
    res["targets"] = report.check_targets_of(res["ratios"], TARGETS, SECOND_VALUE)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tdpo-offline-cpu.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    md = markdown(res)
    (out / "tdpo-offline-cpu.md").write_text(md)
    merged = report.merge_part("tdpo_offline", {k: res[k] for k in ("command", "date_utc", "commit", "cpu_model",
                                                                     "ratios")}, out)
    print(md)
    if merged:
        print(f"merged the ratios into {merged} (and its .md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
