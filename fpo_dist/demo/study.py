"""FPO's parts ablated on the demo task: ``make study`` / ``python -m fpo_dist.demo.study``.

    python -m fpo_dist.demo.study [--seeds 10] [--arms fpo,fpo-alpha0,...] [--steps 150] [--parallel 2]
                                  [--out study_out] [--report-dir docs/results/study]
    python -m fpo_dist.demo.study --rederive [--report-dir docs/results/study]   # statistics only, no training

Arms (:data:`ARMS`): FPO with the demo recipe; FPO with α = 0 (length-normalised DPO with the offline reference:
the SAE term removed); top-k from the policy only (the authors' code) instead of the union; no stop-gradient on
the chosen side; k = 10 and k = all features; β at 0.3× and 3× the recipe's; SimPO and DPO as anchors.  Each
arm trains with every training seed (0..N-1: the data order; task data, reference and cache are fixed) and is
evaluated like the demo (``fpo_dist.demo.run.evaluate_policy``).

How it runs: the task data and the Ray-built cache as in the demo; then every (arm, seed) is one job — a fresh
``python -m fpo_dist.demo.study --job FILE`` process that trains through the project's trainer
(``fpo_dist.trainer.main`` with the arm's ``--loss.<key>`` flags; one process, world size 1, DeepSpeed without
ZeRO, the demo's global batch of 8 pairs) and evaluates the policy; ``--parallel`` jobs at a time (one per core).
A job whose ``result.json`` exists is not rerun (an interrupted study resumes).  Step times are therefore those
of a single CPU process with another job beside it: comparable between arms, not with the demo's 2-rank ZeRO-3.

Output (``--report-dir``): ``study.md`` (mean and 95 % t-interval over seeds per arm of the judge win rate,
rule-follow rate, feature MSE vs the reference, entropy and median step time; paired differences against FPO with
paired t-test p-values, Holm-adjusted over all of them), ``study.json`` (with every per-seed value) and ``study.png``.
Statistics: ``fpo_dist.demo.stats``.  ``--rederive`` recomputes them from ``study.json``'s per-seed values and
rewrites the three files, without training.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fpo_dist.demo import report, task
from fpo_dist.demo.recipe import RECIPE
from fpo_dist.demo.run import (
    ASSETS,
    MARKER,
    ROOT,
    build_cache,
    evaluate_policy,
    say,
    train_args,
)
from fpo_dist.machine import describe, label


@dataclass(frozen=True)
class Arm:
    name: str
    loss: str
    what: str
    params: dict = field(default_factory=dict)  # --loss.<key> values over the recipe's


D_SAE = 256  # the bundled SAE's width (fpo_dist/demo/assets/manifest.json): "k = all features"
_B = RECIPE.beta_for("fpo")
ARMS: tuple[Arm, ...] = (
    Arm("fpo", "fpo", f"FPO, the demo recipe (β {_B:g}, α {RECIPE.alpha}, k {RECIPE.k}, union top-k, sg on chosen)"),
    Arm("fpo-alpha0", "fpo", "α = 0: length-normalised DPO with the offline reference (no SAE term)", {"alpha": 0.0}),
    Arm("fpo-topk-policy", "fpo", "top-k from the policy's codes only (authors' code), not the union",
        {"topk_mode": "policy"}),
    Arm("fpo-no-sg", "fpo", "no stop-gradient on the chosen side's feature distance", {"stop_grad_chosen": False}),
    Arm("fpo-k10", "fpo", "k = 10", {"k": 10}),
    Arm("fpo-kall", "fpo", f"k = all {D_SAE} features", {"k": D_SAE}),
    Arm("fpo-beta-lo", "fpo", f"β = {0.3 * _B:g}", {"beta": 0.3 * _B}),
    Arm("fpo-beta-hi", "fpo", f"β = {3 * _B:g}", {"beta": 3 * _B}),
    Arm("simpo", "simpo", f"SimPO anchor (β {RECIPE.beta_for('simpo'):g}, γ {RECIPE.simpo_gamma})"),
    Arm("dpo", "dpo", f"DPO anchor (β {RECIPE.beta_for('dpo'):g}, cached reference)"),
)
ARM_BY_NAME = {a.name: a for a in ARMS}
STUDY_METRICS = (("win_rate", "judge win rate vs ref", ".3f"), ("rule_follow", "rule-follow", ".3f"),
                 ("feature_mse", "feature MSE vs ref", ".2e"), ("entropy", "entropy", ".3f"),
                 ("step_s", "median step (s)", ".3f"))


def arm_train_args(arm: Arm, store: Path, run_dir: Path, steps: int, seed: int) -> list[str]:
    """The trainer CLI of one (arm, seed): the demo recipe on one process, the arm's loss and ``--loss.<key>``s."""
    return train_args(arm.loss, store, run_dir, steps, seed, world=1, loss_overrides=arm.params)


# --------------------------------------------------------------------------------------------- one job


def run_job(job_file: Path, arms: dict[str, Arm] | None = None, kl: bool = False) -> int:
    """Train and evaluate one (arm, seed) in this process; write ``result.json`` into its evaluation directory.
    ``arms``: the arm of each name (default :data:`ARM_BY_NAME`); ``kl``: also evaluate ``kl_ref``, the KL to the
    reference per response token."""
    from fpo_dist import trainer

    job = json.loads(job_file.read_text())
    run_dir, eval_dir = Path(job["run_dir"]), Path(job["eval_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)  # a job interrupted before its result starts over
    rc = trainer.main(job["argv"])
    if rc != 0:
        return rc
    arm = (arms or ARM_BY_NAME)[job["arm"]]
    beta = float(arm.params.get("beta", RECIPE.beta_for(arm.loss)))
    m = evaluate_policy(run_dir / "hf", Path(job["heldout"]), eval_dir, job["manifest"], beta, kl=kl)
    s = report.train_stats(run_dir)
    m.update(step_s=s["median_step_s"], peak_memory_mb=s["peak_memory_mb"])
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # only the exported policy is kept
    (eval_dir / "result.json").write_text(json.dumps(m, indent=1))
    return 0


# --------------------------------------------------------------------------------------------- the study


def _prepare(out: Path) -> tuple[dict, Path, dict]:
    """Task data and the cache (reused when a previous run of the study completed it)."""
    manifest = json.loads((ASSETS / "manifest.json").read_text())
    data = task.write_preference_data(out / "data", seed=RECIPE.data_seed, n_train=RECIPE.n_train_pairs,
                                      n_heldout=RECIPE.n_heldout_pairs)
    store = out / "cache"
    if not _cache_complete(store):
        store, _ = build_cache(data, out, manifest)  # (train store, held-out store): the study trains on the first
    else:
        say(f"reusing the complete cache {store}")
    return data, store, manifest


def _cache_complete(store: Path) -> bool:
    if not store.exists():
        return False
    from fpo_dist.store import open_store

    try:
        return bool(open_store(str(store)).attrs.get("complete"))
    except Exception:  # noqa: BLE001 — anything unreadable is rebuilt
        return False


def run_study(arms: list[Arm], seeds: int, steps: int, parallel: int, out: Path) -> dict[str, list[Path]]:
    """Every (arm, seed) job; returns each arm's evaluation directories in seed order."""
    data, store, manifest = _prepare(out)
    return run_jobs(arms, seeds, parallel, out, "fpo_dist.demo.study", lambda arm, seed, run_dir: {
        "heldout": str(data["heldout"]), "manifest": manifest,
        "argv": arm_train_args(arm, store, run_dir, steps, seed)})


def _job_cmd(job_file: Path, module: str = "fpo_dist.demo.study") -> list[str]:
    return [sys.executable, "-m", module, "--job", str(job_file)]


def run_jobs(arms: list[Arm], seeds: int, parallel: int, out: Path, module: str, spec) -> dict[str, list[Path]]:
    """Every (arm, seed) as one ``python -m <module> --job FILE`` process, ``parallel`` at a time; the job file holds
    ``{arm, seed, run_dir, eval_dir}`` and ``spec(arm, seed, run_dir)``.  A job whose ``result.json`` exists is not
    rerun.  Returns each arm's evaluation directories in seed order."""
    from fpo_dist.demo.run import _run

    jobs, dirs = [], {a.name: [] for a in arms}
    for seed in range(seeds):
        for arm in arms:
            tag = f"{arm.name}/seed_{seed}"
            eval_dir, run_dir = out / "eval" / tag, out / "runs" / tag
            dirs[arm.name].append(eval_dir)
            if (eval_dir / "result.json").exists():
                continue
            job_file = out / "jobs" / f"{arm.name}_seed_{seed}.json"
            job_file.parent.mkdir(parents=True, exist_ok=True)
            job_file.write_text(json.dumps({"arm": arm.name, "seed": seed, "run_dir": str(run_dir),
                                            "eval_dir": str(eval_dir), **spec(arm, seed, run_dir)}, indent=1))
            jobs.append((tag, job_file))
    say(f"{len(jobs)} job(s) to run ({len(arms)} arms × {seeds} seeds, {parallel} at a time)")
    done = [0]

    def one(item) -> None:
        tag, job_file = item
        t0 = time.time()
        _run(_job_cmd(job_file, module), out / "logs" / f"{tag.replace('/', '_')}.log", f"job {tag}")
        done[0] += 1
        say(f"job {tag} done in {time.time() - t0:.0f} s ({done[0]}/{len(jobs)})")

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for f in [pool.submit(one, j) for j in jobs]:
            f.result()
    return dirs


# --------------------------------------------------------------------------------------------- report


def study_statistics(dirs: dict[str, list[Path]], baseline: str = "fpo", metrics=STUDY_METRICS,
                     from_result: tuple[str, ...] = ("step_s",)) -> dict:
    """Per arm and metric the per-seed values (the evaluation's metrics; ``from_result``'s keys, e.g. the run's
    median step time, from each job's ``result.json``), then :func:`statistics_of`."""
    per_seed = {}
    for arm, ds in dirs.items():
        results = [json.loads((d / "result.json").read_text()) for d in ds]
        per_seed[arm] = {k: [r[k] for r in results] for k in from_result}
        if any(k not in from_result for k, _, _ in metrics):
            values = [report.metric_values(d) for d in ds]
            per_seed[arm].update({k: [v[k] for v in values] for k, _, _ in metrics if k not in from_result})
    return statistics_of(per_seed, baseline, metrics)


def statistics_of(per_seed: dict, baseline: str = "fpo", metrics=STUDY_METRICS) -> dict:
    """Mean and 95 % t-interval per arm and metric, and every arm's paired differences against ``baseline`` (the
    family: ``metrics`` × the arms other than ``baseline``; :func:`fpo_dist.demo.stats.statistics`)."""
    from fpo_dist.demo.stats import statistics

    pairs = [(arm, baseline) for arm in per_seed if arm != baseline] if baseline in per_seed else []
    ci = statistics(per_seed, pairs, [k for k, _, _ in metrics])
    ci["method"] += "; step time: each run's median step time, one value per seed"
    return ci


# the metrics study.png plots (key, title)
PLOT_KEYS = (("win_rate", "judge win rate vs ref"), ("rule_follow", "rule-follow"), ("feature_mse", "feature MSE vs ref"))


def write_study_report(ci: dict, arms: list[Arm], steps: int, report_dir: Path, wall_s: float,
                       note: str = "", *, metrics=STUDY_METRICS, title: str = "FPO ablation study on the demo task",
                       command: str = "python -m fpo_dist.demo.study", batch_pairs: int = RECIPE.batch_pairs,
                       extra: dict | None = None, baseline: str = "fpo", plot_keys=PLOT_KEYS,
                       machine: dict | None = None) -> Path:
    """``study.json``, ``study.png`` and ``study.md``; ``note`` (if any) is printed under the first paragraph and kept
    in the JSON; ``extra`` is kept in the JSON; ``machine`` (``fpo_dist.machine.describe`` where the runs ran; None:
    not known) is named beside the wall time and kept in the JSON."""
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "study.json").write_text(json.dumps(
        {**ci, "arms": {a.name: {"loss": a.loss, "params": a.params, "what": a.what} for a in arms},
         "steps": steps, "wall_s": wall_s, **({"note": note} if note else {}), **(extra or {}),
         **({"machine": machine} if machine else {})}, indent=1))
    plot_study(ci, report_dir / "study.png", plot_keys, baseline)
    lines = [
        f"# {title}",
        "",
        f"`{command}` ({ci['seeds']} training seeds per arm, {steps} steps each, global batch "
        f"{batch_pairs} pairs, one process per run; wall time {wall_s / 60:.0f} min"
        f"{f' on {label(machine)}' if machine else ''}). Each cell: mean over "
        f"seeds [95 % t-interval]; {ci['method']}. Differences pair seed i of each arm with seed i of {baseline} (same "
        "data order).",
        "",
        *([note, ""] if note else []),
        "| arm | what | " + " | ".join(t for _, t, _ in metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for arm in arms:
        ivs = ci["intervals"][arm.name]
        lines.append(f"| {arm.name} | {arm.what} | " + " | ".join(
            report._cell(ivs[k], spec) for k, _, spec in metrics) + " |")
    lines += ["", *report.difference_rows(ci, {k: s for k, _, s in metrics}, {k: t for k, t, _ in metrics}),
              "", f"Plot: `study.png` ({', '.join(t for _, t in plot_keys)} per arm, mean and 95 % t-interval). "
              "Per-seed values: `study.json`.", ""]
    path = report_dir / "study.md"
    path.write_text("\n".join(lines))
    return path


def rederive(report_dir: Path) -> Path:
    """Rewrite ``study.md``, ``study.json`` and ``study.png`` from ``study.json``'s per-seed values (no training)."""
    return rederive_report(report_dir, STUDY_METRICS, lambda ci, arms, old, note: write_study_report(
        ci, arms, old["steps"], report_dir, old["wall_s"], note, machine=old.get("machine")))


def rederive_report(report_dir: Path, metrics, write) -> Path:
    """The statistics of ``report_dir/study.json``'s per-seed values recomputed and handed to
    ``write(ci, arms, old json, note)``, which rewrites the report."""
    old = json.loads((report_dir / "study.json").read_text())
    arms = [Arm(name, a["loss"], a["what"], a["params"]) for name, a in old["arms"].items()]
    note = ("Statistics re-derived by `--rederive` from the per-seed values stored in `study.json`; the runs were "
            "not repeated.")
    return write(statistics_of(old["per_seed"], metrics=metrics), arms, old, note)


def plot_study(ci: dict, path: Path, keys=PLOT_KEYS, baseline: str = "fpo") -> Path:
    plt = report._pyplot()
    names = list(ci["intervals"])
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], keys):
        report._errorbars(ax, [ci["intervals"][n][key] for n in names])
        if baseline in ci["intervals"]:
            ax.axhline(ci["intervals"][baseline][key]["mean"], color="C0", lw=0.6, ls="--")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{title} (mean, 95 % t-interval)", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def arms_and_workdir(p: argparse.ArgumentParser, a: argparse.Namespace, known: dict[str, Arm]) -> tuple[list[Arm], Path]:
    """``--arms`` and ``--seeds`` checked (``p.error`` otherwise), and ``--out`` made a study work directory (marked;
    refused when it exists, is not empty and is not one)."""
    unknown = [x for x in a.arms.split(",") if x and x not in known]
    if unknown or a.seeds < 1:
        p.error(f"unknown arm(s) {unknown}; known: {list(known)}" if unknown else "--seeds must be >= 1")
    out = Path(a.out).resolve()
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise SystemExit(f"--out {out} exists, is not empty and is not a study directory; choose another")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(f"written by {p.prog}; reused (resumed) by the next run\n")
    return [known[x] for x in a.arms.split(",") if x], out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fpo_dist.demo.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, help="training seeds per arm (default 10)")
    p.add_argument("--arms", default=",".join(a.name for a in ARMS), help=f"of {[a.name for a in ARMS]}")
    p.add_argument("--steps", type=int, default=RECIPE.steps)
    p.add_argument("--parallel", type=int, default=2, help="jobs at a time (one CPU core each)")
    p.add_argument("--rederive", action="store_true", help="only recompute the statistics of --report-dir's "
                   "study.json from its per-seed values and rewrite the report (no training)")
    p.add_argument("--out", default=str(ROOT / "study_out"), help="work directory (kept: a rerun resumes)")
    p.add_argument("--report-dir", default=str(ROOT / "docs" / "results" / "study"))
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job file in this process
    a = p.parse_args(argv)
    if a.job:
        return run_job(Path(a.job))
    if a.rederive:
        ignored = [f"--{k}" for k in ("seeds", "arms", "steps", "parallel", "out") if getattr(a, k) != p.get_default(k)]
        if ignored:
            p.error(f"--rederive trains nothing: drop {', '.join(ignored)}")
        print(rederive(Path(a.report_dir)).read_text())
        return 0
    a.seeds = 10 if a.seeds is None else a.seeds
    arms, out = arms_and_workdir(p, a, ARM_BY_NAME)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    dirs = run_study(arms, a.seeds, a.steps, a.parallel, out)
    ci = study_statistics(dirs)
    path = write_study_report(ci, arms, a.steps, Path(a.report_dir), time.time() - t0, machine=describe())
    print()
    print(path.read_text())
    say(f"study report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
