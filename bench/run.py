"""Run the fpo-dist benchmark and write ``OUT/{device}[-quick].json`` and ``.md``.

    python -m bench.run [--quick] [--device cpu|cuda] [--preset cpu|gpu|quick|realshape[,realshape]]
                        [--out bench/results] [--parts cache,train,loader]
                        [--losses fpo,dpo,simpo,dpo-online,tdpo2] [--nproc N] [--keep] [--workdir DIR]

1. training step per loss (ZeRO-3, same model and batch): fpo, dpo, simpo, dpo-online, tdpo2;
2. the cache job against the bare forward, 1 vs 2 workers, bytes per response;
3. the loader streaming from Zarr against the same batches in memory.
The cache part always runs (the other parts train from its store).  Sizes: ``bench/presets.py``
(``cpu``: ~42M-parameter Llama, 2 ranks, ~7-10 min on 2 cores; ``gpu``: ~0.47B, bf16, one GPU; ``quick``: tiny,
fpo and tdpo2 only, 1 rank on CPU: about a minute, for the smoke test).

``--preset realshape`` (bench/realshape.py): Gemma 3 270M (real weights) + the real 4k SAE of ``make real-sae``,
UltraFeedback-like lengths; fpo vs fpo with materialized logits + padding vs dpo-online, fpo with a calibrated random
16k SAE as a contrast, and the cache pass vs a bare forward (~22 min on 2 CPU cores: 2 interleaved launches per
training run).  ``--preset cpu,realshape`` runs both in one run.  A run that leaves out the base preset (or
realshape) keeps that part of an existing ``OUT/{device}.json`` and says in the markdown that it ran separately.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    from bench.train import CHOICES, LOSSES

    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs (seconds of compute)")
    p.add_argument("--preset", default=None,
                   help="comma-separated: the base preset (cpu, gpu: the device's default; quick) and/or realshape "
                        "(default: the device's base preset, quick with --quick)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the JSON and markdown go")
    p.add_argument("--parts", default="cache,train,loader", help="comma-separated subset of cache,train,loader")
    p.add_argument("--losses", default=None,
                   help=f"losses of part 1 (default: {','.join(LOSSES)}; with --quick: {','.join(QUICK_LOSSES)})")
    p.add_argument("--nproc", type=int, default=None,
                   help="training ranks (default: one per GPU; on CPU 2, with --quick 1)")
    p.add_argument("--train_rounds", type=int, default=None,
                   help="launches per training run, interleaved ABC CBA … with the other runs' and pooled step by step "
                        "(default: the preset's; realshape 2, the others 1)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (models, stores, run logs)")
    p.add_argument("--workdir", default=None, help="where the temporary directory goes (default: the system's)")
    a = p.parse_args(argv)
    a.parts = {x.strip() for x in a.parts.split(",") if x.strip()}
    unknown = a.parts - {"cache", "train", "loader"}
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from cache, train, loader")
    a.losses = [x.strip() for x in (a.losses or ",".join(QUICK_LOSSES if a.quick else LOSSES)).split(",") if x.strip()]
    bad = [x for x in a.losses if x not in CHOICES]
    if bad:
        p.error(f"unknown losses {bad}; choose from {', '.join(CHOICES)}")
    names = [x.strip() for x in (a.preset or ("quick" if a.quick else "default")).split(",") if x.strip()]
    a.realshape = any(x.startswith("realshape") for x in names)
    base = [x for x in names if not x.startswith("realshape")]
    if len(base) > 1 or (base and base[0] not in ("default", "cpu", "gpu", "quick")):
        p.error(f"--preset {a.preset!r}: at most one base preset (cpu, gpu, quick), plus realshape")
    a.base = base[0] if base else None
    if a.base == "quick":
        a.quick = True
    if a.quick and a.realshape:
        p.error("--quick and the realshape preset exclude each other (realshape loads Gemma 3 270M)")
    if a.train_rounds is not None and a.train_rounds < 1:
        p.error("--train_rounds: at least 1")
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


BASE_KEYS = ("command", "sizes", "machine", "train", "assets", "cache", "loader", "wall_s", "host_load")


def _previous(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def merge_previous(results: dict, previous: dict, ran_base: bool, ran_realshape: bool) -> dict:
    """Keep what this run did not measure from the previous results file: the base parts (when only realshape
    ran; the markdown's header then describes them, and the real-shape part says it ran separately), the
    real-shape part (when only the base preset ran; it carries its own command, date and commit) and the peer
    bench's (``python -m bench.peer`` writes it)."""
    if not ran_base and previous.get("sizes"):
        results.update({k: previous.get(k) for k in BASE_KEYS})
    if not ran_realshape and previous.get("realshape"):
        results["realshape"] = previous["realshape"]
    from bench.report import MERGED_PARTS

    for part in MERGED_PARTS:  # e.g. bench/peer.py's part: it merges itself in, a bench.run keeps it
        if previous.get(part):
            results[part] = previous[part]
    return results


def run_base(args, sizes, device: str, nproc: int, tmp: Path, results: dict, log) -> None:
    """Parts 1-3 at the base preset's sizes, into ``results``."""
    from bench import assets as bench_assets
    from bench import cache as bench_cache
    from bench import loader as bench_loader
    from bench import report
    from bench import train as bench_train

    log(f"device {device}, sizes {sizes.name}, {nproc} training rank(s); work dir {tmp}")
    a = bench_assets.build_assets(tmp / "assets", sizes, device, log)
    results["assets"] = a.to_dict()
    results["cache"] = bench_cache.run(a, sizes, device, tmp, quick=args.quick, log=log)
    store = results["cache"]["store"]
    if "train" in args.parts:
        results["train"] = bench_train.run(store, sizes, nproc, device, tmp, args.losses,
                                           rerun_loaded=not args.quick, log=log, rounds=sizes.train_rounds)
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


def run_realshape(device: str, nproc: int, tmp: Path, command: str, log, rounds: int | None = None) -> dict:
    from bench import realshape, report
    from bench.presets import preset_named

    sizes = preset_named("realshape", device)
    if rounds:
        sizes = dataclasses.replace(sizes, train_rounds=rounds)
    log(f"device {device}, sizes {sizes.name}, {nproc} training rank(s); work dir {tmp}")
    load, t0 = report.HostLoad(), time.perf_counter()
    # measured once each (a re-run on a busy host adds ~5 min per launch; the host load is recorded per part)
    rs = realshape.run(sizes, device, tmp, nproc, log, rerun_loaded=False)
    m = report.machine_info(device)
    rs["run"] = {"command": command, "date_utc": m["date_utc"], "commit": m["git"]["commit"], "dirty": m["git"]["dirty"],
                 "wall_s": time.perf_counter() - t0, "host_load": load.stop(), "cpu_model": m["cpu_model"]}
    return rs


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # SIGTERM (a test's timeout, a job scheduler) unwinds like an error: temp dir removed, Ray shut down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from fpo_dist.netns import enter_private_network

    # the training launches' rendezvous stores (torch TCPStore) listen on every interface: where this process can
    # (root), it and all it starts run in a network namespace holding only lo (fpo_dist.netns)
    netns = enter_private_network() if os.environ.get("FPO_BENCH_NETNS") != "0" else "FPO_BENCH_NETNS=0"
    print("[bench] network: " + ("a private namespace (only lo)" if netns is None else
          f"the host's ({netns}): the training runs' rendezvous stores listen on every interface"), flush=True)
    import torch

    from bench import report
    from bench.presets import preset_for

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no GPU visible to torch", file=sys.stderr)
        return 2
    sizes = preset_for(device, args.quick) if args.base else None
    if sizes and args.train_rounds:
        sizes = dataclasses.replace(sizes, train_rounds=args.train_rounds)
    nproc = args.nproc or (torch.cuda.device_count() if device == "cuda" else 1 if args.quick else 2)
    log = lambda msg: print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    command = " ".join(["python -m bench.run", *(shlex.quote(x) for x in (argv or sys.argv[1:]))])
    out = Path(args.out)
    stem = device + ("-quick" if args.quick else "")
    previous = _previous(out / f"{stem}.json")
    results: dict = {"command": command, "sizes": sizes.to_dict() if sizes else None,
                     "machine": report.machine_info(device), "train": None}
    run_load, t_start = report.HostLoad(), time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="fpo-bench-", dir=args.workdir))
    try:
        if sizes:
            run_base(args, sizes, device, nproc, tmp, results, log)
        if args.realshape:
            results["realshape"] = run_realshape(device, nproc, tmp / "realshape", command, log, args.train_rounds)
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - t_start
    results["host_load"] = run_load.stop()
    merge_previous(results, previous, ran_base=sizes is not None, ran_realshape=args.realshape)
    results["ratios"] = report.ratios(results)
    results["targets"] = report.check_targets(results["ratios"])
    results["notes"] = notes(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    md = report.markdown(results)
    (out / f"{stem}.md").write_text(md)
    log(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')} ({time.perf_counter() - t_start:.0f} s)")
    for t in results["targets"]:
        verdict = "not run" if t["met"] is None else ("met" if t["met"] else "MISSED")
        value = "—" if t["value"] is None else f"{t['value']:.3f}"
        print(f"  {t['what']}: {value} ({t['op']} {t['threshold']}) {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
