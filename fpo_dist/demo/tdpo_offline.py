"""Offline TDPO2 against online TDPO2 on the demo task: ``make tdpo-offline-demo`` / ``python -m fpo_dist.demo.tdpo_offline``.

    python -m fpo_dist.demo.tdpo_offline [--seeds 10] [--topm 8] [--steps 150] [--parallel 2]
                                         [--out tdpo_offline_out] [--report-dir docs/results/tdpo-offline/demo]

Two arms, trained and evaluated like the demo's study (``fpo_dist.demo.study``: one process per run, the demo
recipe, the training seed sets the data order): ``tdpo2`` — a resident reference model, the sequential KL exact
over the vocabulary — and ``tdpo2-offline`` — no reference model, the KL against the cache's top-M reference
distributions plus one tail bucket (the cache built with ``--ref_topm M``).  Both read the same cache (built once,
with the top-M arrays; ``tdpo2`` ignores them).  The evaluation adds ``kl_ref``, the policy's KL to the reference
per response token on the held-out responses, exact over the vocabulary.

The demo model's vocabulary is 674 tokens, so the default M is the smallest of the real-model study
(``make tdpo-topm-approx``), 8: the share of the reference's mass outside the top-M, over the cache's response
tokens, is stated in the report.  ``study.md``: mean and 95 % t-interval per arm and metric over seeds, the paired
difference offline − online with Holm-adjusted p-values (``fpo_dist.demo.stats``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from fpo_dist.demo import task
from fpo_dist.demo.recipe import RECIPE
from fpo_dist.demo.run import ASSETS, ROOT, build_cache, say
from fpo_dist.demo.study import (
    Arm,
    _cache_complete,
    arm_train_args,
    arms_and_workdir,
    run_job,
    run_jobs,
    study_statistics,
    write_study_report,
)
from fpo_dist.machine import describe

DEFAULT_TOPM = 8
ARMS = (
    Arm("tdpo2", "tdpo2", f"TDPO2, resident reference: the KL exact over the vocabulary (β {RECIPE.beta_for('tdpo2'):g}, "
        f"α {RECIPE.alpha})"),
    Arm("tdpo2-offline", "tdpo2-offline", "TDPO2, no reference model: the KL against the cache's top-M + tail"),
)
ARM_BY_NAME = {a.name: a for a in ARMS}
METRICS = (("win_rate", "judge win rate vs ref", ".3f"), ("rule_follow", "rule-follow", ".3f"),
           ("kl_ref", "KL to ref per token", ".4f"), ("entropy", "entropy", ".3f"),
           ("step_s", "median step (s)", ".3f"), ("peak_memory_mb", "peak memory (MB)", ".0f"))


def missing_mass(store: Path) -> dict:
    """Over the cache's response tokens: the reference's mass outside its top-M (mean, median, 99th percentile)."""
    from fpo_dist.store import open_store

    s = open_store(str(store))
    rows = s.ok_rows()
    tails = []
    for a in range(0, len(rows), 256):
        b = s.read_rows(rows[a:a + 256], ref_topm=True)
        tails += [t.tail for t in (*b.chosen_ref_topm, *b.rejected_ref_topm)]
    p = np.exp(np.concatenate(tails).astype(np.float64))
    return {"m": s.options["ref_topm"], "tokens": int(len(p)), "mean": float(p.mean()), "median": float(np.median(p)),
            "p99": float(np.quantile(p, 0.99))}


def run(arms: list[Arm], seeds: int, steps: int, parallel: int, out: Path, topm: int) -> tuple[dict, dict]:
    manifest = json.loads((ASSETS / "manifest.json").read_text())
    data = task.write_preference_data(out / "data", seed=RECIPE.data_seed, n_train=RECIPE.n_train_pairs,
                                      n_heldout=RECIPE.n_heldout_pairs)
    store = out / "cache"
    if not _cache_complete(store):
        store, _ = build_cache(data, out, manifest, ref_topm=topm)
    else:
        say(f"reusing the complete cache {store}")
    mass = missing_mass(store)
    if mass["m"] != topm:
        raise SystemExit(f"the cache {store} holds the top-{mass['m']}, not --topm {topm}: use another --out")
    dirs = run_jobs(arms, seeds, parallel, out, "fpo_dist.demo.tdpo_offline", lambda arm, seed, run_dir: {
        "heldout": str(data["heldout"]), "manifest": manifest,
        "argv": arm_train_args(arm, store, run_dir, steps, seed)})
    return dirs, mass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fpo_dist.demo.tdpo_offline", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--arms", default=",".join(ARM_BY_NAME), help=f"of {list(ARM_BY_NAME)}")
    p.add_argument("--topm", type=int, default=DEFAULT_TOPM, help="M of the cache's top-M reference distributions")
    p.add_argument("--steps", type=int, default=RECIPE.steps)
    p.add_argument("--parallel", type=int, default=2, help="jobs at a time (one CPU core each)")
    p.add_argument("--out", default=str(ROOT / "tdpo_offline_out"), help="work directory (kept: a rerun resumes)")
    p.add_argument("--report-dir", default=str(ROOT / "docs" / "results" / "tdpo-offline" / "demo"))
    p.add_argument("--job", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.job:  # one (arm, seed), as the demo's study runs it, with kl_ref
        return run_job(Path(a.job), ARM_BY_NAME, kl=True)
    arms, out = arms_and_workdir(p, a, ARM_BY_NAME)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    dirs, mass = run(arms, a.seeds, a.steps, a.parallel, out, a.topm)
    ci = study_statistics(dirs, baseline="tdpo2", metrics=METRICS,
                          from_result=("kl_ref", "step_s", "peak_memory_mb"))
    note = (f"The cache holds the reference's top-{mass['m']} next-token distributions (the demo vocabulary: 674 "
            f"tokens); the reference's mass outside them, over the cache's {mass['tokens']} response tokens: mean "
            f"{mass['mean']:.2e}, median {mass['median']:.2e}, 99th percentile {mass['p99']:.2e}.")
    path = write_study_report(ci, arms, a.steps, Path(a.report_dir), time.time() - t0, note, metrics=METRICS,
                              title="Offline TDPO2 (cached top-M reference) against online TDPO2 on the demo task",
                              command="python -m fpo_dist.demo.tdpo_offline", extra={"missing_mass": mass},
                              baseline="tdpo2", plot_keys=[(k, t) for k, t, _ in METRICS[:3]], machine=describe())
    print()
    print(path.read_text())
    say(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
