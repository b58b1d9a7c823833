"""Run the fpo-dist benchmark and write ``OUT/{device}[-quick].json`` and ``.md``.

    python -m bench.run [--quick] [--device cpu|cuda] [--out bench/results] [--parts cache,train,loader]
                        [--losses fpo,dpo,simpo,dpo-online,tdpo2] [--nproc N] [--keep] [--workdir DIR]

1. training step per loss (ZeRO-3, same model and batch): fpo, dpo, simpo, dpo-online, tdpo2;
2. the cache job against the bare forward, 1 vs 2 workers, bytes per response;
3. the loader streaming from Zarr against the same batches in memory.
The cache part always runs (the other parts train from its store).  Sizes: ``bench/presets.py``
(``cpu``: ~42M-parameter Llama, 2 ranks, ~7-10 min on 2 cores; ``gpu``: ~0.47B, bf16, one GPU; ``quick``: tiny,
fpo and tdpo2 only, 1 rank on CPU: about a minute, for the smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# --quick trains one loss with the cached reference and SAE and one with a resident reference and the KL: every
# branch of the trainer the benchmark times, at the cost of two launches instead of five.
QUICK_LOSSES = ("fpo", "tdpo2")


def parse(argv: list[str] | None) -> argparse.Namespace:
    from bench.train import LOSSES

    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs (seconds of compute)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the JSON and markdown go")
    p.add_argument("--parts", default="cache,train,loader", help="comma-separated subset of cache,train,loader")
    p.add_argument("--losses", default=None,
                   help=f"losses of part 1 (default: {','.join(LOSSES)}; with --quick: {','.join(QUICK_LOSSES)})")
    p.add_argument("--nproc", type=int, default=None,
                   help="training ranks (default: one per GPU; on CPU 2, with --quick 1)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (models, stores, run logs)")
    p.add_argument("--workdir", default=None, help="where the temporary directory goes (default: the system's)")
    a = p.parse_args(argv)
    a.parts = {x.strip() for x in a.parts.split(",") if x.strip()}
    unknown = a.parts - {"cache", "train", "loader"}
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from cache, train, loader")
    a.losses = [x.strip() for x in (a.losses or ",".join(QUICK_LOSSES if a.quick else LOSSES)).split(",") if x.strip()]
    bad = [x for x in a.losses if x not in LOSSES]
    if bad:
        p.error(f"unknown losses {bad}; choose from {', '.join(LOSSES)}")
    return a


def notes(results: dict) -> list[str]:
    """Conditions a reader needs to interpret the numbers."""
    out = []
    if results["machine"]["device"] == "cpu":
        out.append("CPU memory is RSS: it includes a process baseline (Python, torch, transformers, deepspeed, "
                   "sae_lens) that is the same in every run and dilutes every memory ratio towards 1.")
    if results["train"] and results["train"]["nproc"] == 1:
        out.append("One rank: ZeRO-3 partitions nothing across ranks; the code path (engine, hooks, gathers) is the "
                   "multi-rank one.")
    cache = results.get("cache")
    if cache:
        nnz, d_sae = cache["job"]["disk"]["pooled_nnz"]["mean"], results["sizes"]["d_sae"]
        if nnz > 0.3 * d_sae:
            out.append(f"The SAE has random weights: a response's pooled code keeps {nnz:.0f} of {d_sae} features "
                       "non-zero (the union of per-token codes of independent random features), far denser than a "
                       "trained SAE's pooled codes, so bytes per response here are an upper bound.")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # SIGTERM (a test's timeout, a job scheduler) unwinds like an error: temp dir removed, Ray shut down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    from bench import assets as bench_assets
    from bench import cache as bench_cache
    from bench import loader as bench_loader
    from bench import report
    from bench import train as bench_train
    from bench.presets import preset_for

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no GPU visible to torch", file=sys.stderr)
        return 2
    sizes = preset_for(device, args.quick)
    nproc = args.nproc or (torch.cuda.device_count() if device == "cuda" else 1 if args.quick else 2)
    log = lambda msg: print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    results: dict = {"command": " ".join(["python -m bench.run", *(shlex.quote(x) for x in (argv or sys.argv[1:]))]),
                     "sizes": sizes.to_dict(), "machine": report.machine_info(device), "train": None}
    run_load, t_start = report.HostLoad(), time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="fpo-bench-", dir=args.workdir))
    try:
        log(f"device {device}, sizes {sizes.name}, {nproc} training rank(s); work dir {tmp}")
        a = bench_assets.build_assets(tmp / "assets", sizes, device, log)
        results["assets"] = a.to_dict()
        results["cache"] = bench_cache.run(a, sizes, device, tmp, quick=args.quick, log=log)
        store = results["cache"]["store"]
        if "train" in args.parts:
            results["train"] = bench_train.run(store, sizes, nproc, device, tmp, args.losses,
                                               rerun_loaded=not args.quick, log=log)
        if "loader" in args.parts:
            from fpo_dist.models import ModelSpec, load_tokenizer

            fpo = (results["train"] or {}).get("losses", {}).get("fpo")
            step_s = fpo["step_time_s"] if fpo else 0.25
            pad_id = load_tokenizer(ModelSpec(str(a.model_dir))).pad_token_id
            lo, load, loads = report.measure_quietly(
                lambda _: bench_loader.bench_loader(store, sizes, device, step_s, pad_id, nproc, log),
                "loader", log, retry=not args.quick)
            results["loader"] = {**lo, "host_load": load, "host_loads": loads}
        if "cache" not in args.parts:
            results["cache"] = None
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - t_start
    results["host_load"] = run_load.stop()
    results["ratios"] = report.ratios(results)
    results["targets"] = report.check_targets(results["ratios"])
    results["notes"] = notes(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = device + ("-quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    md = report.markdown(results)
    (out / f"{stem}.md").write_text(md)
    log(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')} ({results['wall_s']:.0f} s)")
    for t in results["targets"]:
        verdict = "not run" if t["met"] is None else ("met" if t["met"] else "MISSED")
        value = "—" if t["value"] is None else f"{t['value']:.3f}"
        print(f"  {t['what']}: {value} ({t['op']} {t['threshold']}) {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
