"""The demo's report: training statistics, curves, the metrics table (one seed, or the mean and 95 % t-interval over
seeds), paired differences between methods (Holm-adjusted), and the latents that drift.

Evaluation directories hold what ``fpo_dist.evaluate`` writes (``metrics.json``, ``units.json``,
``policy_outputs.json``, ``drift.json``); the statistics are :mod:`fpo_dist.demo.stats`.

    python -m fpo_dist.demo.report DIR   # re-derive DIR's statistics from DIR/results.json (no training)
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path

from fpo_dist.demo import task
from fpo_dist.demo.recipe import RECIPE

CURVES = ("loss", "reward_accuracy", "margin", "feature_mse_rejected")
DRIFT_SHOWN = 8  # latents per method in the report's drift table (drift.json lists 20)
# (key, column title, number format) of the metrics with intervals, in table order
METRICS = (
    ("accuracy_ln", "pairwise acc. (LN)", ".3f"),
    ("reward_accuracy_ln", "reward acc.", ".3f"),
    ("win_rate", "judge win rate vs ref", ".3f"),
    ("rule_follow", "rule-follow", ".3f"),
    ("entropy", "entropy", ".3f"),
    ("feature_mse", "feature MSE vs ref", ".2e"),
)
DIFFERENCES = ("win_rate", "rule_follow", "entropy", "feature_mse", "accuracy_ln")


def _intro(steps: int, seeds: int) -> str:
    trained = f"Each method trained {steps} optimizer steps" + ("" if seeds == 1 else f" with each of {seeds} training seeds")
    seeded = ("" if seeds == 1 else
              " A training seed sets the order of the training pairs; data, reference, cache and sampling seeds are fixed.")
    return ("Task: *stay on topic* (`fpo_dist/demo/task.py`): a response must name the requested category and list "
            "exactly the requested number of distinct items of it. The reference (SFT on a mix) follows the rule on "
            f"about a third of its samples. {trained} (global batch {RECIPE.batch_pairs} pairs, DeepSpeed ZeRO-3 on "
            f"2 CPU ranks) from the same Ray-built cache; evaluation on held-out prompts.{seeded}")


NOTES = [
    "- *pairwise acc. (LN)*: the policy's length-normalised log-prob ranks each held-out chosen response above its "
    "own rejected one. *reward acc.*: the same for the implicit reward avg logπθ − avg logπref (0 for the reference).",
    "- *judge win rate*: the programmatic judge on sampled generations (temperature "
    f"{RECIPE.temperature}, {RECIPE.samples_per_prompt} per prompt), win 1 / tie 0.5 / loss 0 against the "
    "reference's samples for the same prompts and seeds.",
    "- *entropy*: mean per-token predictive entropy along the policy's own samples (nats). *feature MSE*: mean "
    "pooled-SAE-feature drift from the reference on held-out responses.",
]

# --------------------------------------------------------------------------------------------- training logs


def train_stats(run_dir: Path) -> dict:
    """Step time, memory and the records of a run: ``rows`` (training steps) and ``evals`` (held-out cache)."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    steady = [r["step_time_s"] for r in rows[2:]] or [r["step_time_s"] for r in rows]
    return {"median_step_s": statistics.median(steady), "peak_memory_mb": max(r["peak_memory_mb"] for r in rows),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[2:] or rows), "rows": rows,
            "evals": evals}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(stats: Mapping[str, dict], out: Path) -> list[Path]:
    plt = _pyplot()
    paths = []
    for key in CURVES:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for i, (name, s) in enumerate(stats.items()):
            color = f"C{i}"
            xs = [r["step"] for r in s["rows"] if key in r]
            if xs:
                ax.plot(xs, [r[key] for r in s["rows"] if key in r], label=f"{name} (train)", color=color, alpha=0.6)
            evals = [r for r in s.get("evals", []) if f"eval/{key}" in r]
            if evals:  # the held-out cache's curve next to the training one
                ax.plot([r["step"] for r in evals], [r[f"eval/{key}"] for r in evals], "o--", color=color,
                        label=f"{name} (held-out)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key.replace("_", " "))
        ax.set_title(f"{key.replace('_', ' ')}: training batches and held-out cache")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / "plots" / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------- single seed


def single_seed_table(results: Mapping[str, dict], stats: Mapping[str, dict]) -> list[str]:
    lines = [
        "| method | pairwise acc. (LN) | reward acc. | judge win rate vs ref | rule-follow | entropy | feature MSE "
        "vs ref | median step (s) | peak mem / rank (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results.items():
        s = stats.get(name)
        step = f"{s['median_step_s']:.3f}" if s else "—"
        mem = f"{s['peak_memory_mb']:.0f}" if s else "—"
        lines.append(
            f"| {name} | {m['accuracy_ln']:.3f} | {m.get('reward_accuracy_ln', float('nan')):.3f} | "
            f"{m['win_rate']:.3f} | {m['rule_follow']:.3f} | {m['entropy']:.3f} | {m.get('feature_mse', 0):.2e} | "
            f"{step} | {mem} |"
        )
    return lines


def _held_out_notes(stats: Mapping[str, dict]) -> list[str]:
    with_evals = {name: s["evals"] for name, s in stats.items() if s.get("evals")}
    if not with_evals:
        return []
    return ["- *held-out cache*: the same loss and metrics over all held-out pairs (a cache built with the training "
            f"cache's config), every {RECIPE.eval_every} steps and at the end, dashed in `plots/*.png`: "
            + "; ".join(f"{name} eval loss {e[0]['eval/loss']:.3f} (step {e[0]['step']}) → {e[-1]['eval/loss']:.3f} "
                        f"(step {e[-1]['step']}), reward accuracy {e[-1].get('eval/reward_accuracy', float('nan')):.3f}"
                        for name, e in with_evals.items()) + "."]


def write_report(results: Mapping[str, dict], stats: Mapping[str, dict], out: Path, timings: Mapping[str, float],
                 steps: int, drift_dirs: Mapping[str, Path] | None = None) -> Path:
    lines = ["# fpo-dist demo report", "", _intro(steps, 1), ""]
    lines += single_seed_table(results, stats)
    lines += ["", *NOTES, *_held_out_notes(stats),
              "- Generations in AlpacaEval format: `eval/<method>/policy_outputs.json`; training curves: `plots/*.png`; "
              "logs: `logs/`.", ""]
    if drift_dirs:
        lines += drift_section(drift_dirs, out)
    lines += ["Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------------------------------- drift


def drift_section(eval_dirs: Mapping[str, Path], out: Path, baseline: str = "fpo",
                  overlaps: Mapping[str, Sequence[float]] | None = None) -> list[str]:
    """The top drifting latents of each method, their overlap with ``baseline``'s top set, and the plot."""
    from fpo_dist import drift

    tables = {name: drift.read_drift(d / "drift.json") for name, d in eval_dirs.items() if (d / "drift.json").exists()}
    if not tables:
        return []
    drift.plot_drift_comparison(tables, out / "plots" / "drift.png", baseline)
    n_top = max(len(t) for t in tables.values())
    base = drift.top_ids(tables.get(baseline, []))
    lines = [
        "## The latents that drift",
        "",
        f"SAE latents whose mean pooled activation on the held-out responses moved most from the reference's "
        f"(ranked by |policy − reference|; ids are the SAE's feature indices). *overlap*: the share of {baseline}'s "
        f"top {n_top} that the method's top {n_top} also holds"
        + (" (mean over seeds, min–max)" if overlaps else "") + ". Full listings (reference and policy means): "
        "`eval/<method>/drift.json`; plot: `plots/drift.png`.",
        "",
        f"| method | overlap with {baseline} | top {DRIFT_SHOWN} latents: id (change) |",
        "|---|---|---|",
    ]
    for name, rows in tables.items():
        if overlaps and name in overlaps:
            vals = overlaps[name]
            ov = f"{statistics.mean(vals):.2f} ({min(vals):.2f}–{max(vals):.2f})"
        else:
            ov = f"{drift.overlap(drift.top_ids(rows), base):.2f}" if base else "—"
        shown = ", ".join(f"{r['id']} ({r['change']:+.3f})" for r in rows[:DRIFT_SHOWN])
        lines.append(f"| {name} | {ov} | {shown} |")
    if baseline in tables:
        lines += ["", f"{baseline}'s top latents:", "", "| id | reference mean | policy mean | change |", "|---|---|---|---|"]
        lines += [f"| {r['id']} | {r['reference_mean']:.4f} | {r['policy_mean']:.4f} | {r['change']:+.4f} |"
                  for r in tables[baseline][:10]]
    return lines + [""]


# --------------------------------------------------------------------------------------------- several seeds


def metric_values(eval_dir: Path) -> dict[str, float]:
    """One seed's value of each metric over all held-out prompts, from ``units.json`` and the generations (rule-follow
    is the task's judge on each sample): the mean over pairs or samples, and for entropy the sum over samples over
    the number of tokens (per token) — exactly the single-seed numbers."""
    units = json.loads((eval_dir / "units.json").read_text())
    pairs, gens = units["pairs"], units["generations"]
    outputs = json.loads((eval_dir / "policy_outputs.json").read_text())
    m = {key: statistics.fmean(pairs[key]) for key in ("accuracy_ln", "reward_accuracy_ln", "feature_mse")
         if key in pairs}
    m["win_rate"] = statistics.fmean(gens["verdict"])
    m["rule_follow"] = statistics.fmean(float(task.judge(o["instruction"], o["output"])) for o in outputs)
    m["entropy"] = sum(gens["entropy_sum"]) / sum(gens["n_tokens"])
    return m


def seed_statistics(eval_dirs: Mapping[str, Sequence[Path]]) -> dict:
    """Intervals per method and metric, and paired differences between every two trained methods
    (:func:`fpo_dist.demo.stats.statistics`; the family: :data:`DIFFERENCES` × all pairs).

    ``eval_dirs[method]``: one evaluation directory per training seed, seed order (the reference: one)."""
    per_seed = {}
    for name, dirs in eval_dirs.items():
        values = [metric_values(d) for d in dirs]
        per_seed[name] = {k: [v[k] for v in values] for k in values[0]}
    return statistics_of(per_seed)


def statistics_of(per_seed: Mapping[str, Mapping[str, Sequence[float]]]) -> dict:
    """The demo report's statistics from per-seed values: every two trained methods (not the reference) paired."""
    from fpo_dist.demo.stats import statistics as stats_of

    trained = [n for n in per_seed if n != "reference"]
    return stats_of(per_seed, list(combinations(trained, 2)), DIFFERENCES)


def _cell(iv: Mapping | None, spec: str) -> str:
    """``mean [lo, hi]``; the mean alone where there is no interval (one value) or it has no width."""
    if iv is None:
        return "—"
    if iv["lo"] is None or iv["lo"] == iv["hi"] == iv["mean"]:
        return f"{iv['mean']:{spec}}"
    return f"{iv['mean']:{spec}} [{iv['lo']:{spec}}, {iv['hi']:{spec}}]"


def _p(p: float) -> str:
    return "<0.0001" if p < 0.0001 else f"{p:.4f}"


def difference_rows(ci: Mapping, specs: Mapping[str, str], titles: Mapping[str, str]) -> list[str]:
    """One row per (pair, metric) of ``ci["differences"]``: mean [95 % t-interval], p, Holm-adjusted p, sign-test p;
    **bold** where separated (Holm-adjusted p < alpha)."""
    lines = [f"Paired differences: seed i of one minus seed i of the other, mean [95 % t-interval over "
             f"{ci['seeds']} seeds]; *p*: two-sided paired t-test; *Holm p*: adjusted over the family of all "
             f"{ci['family']} differences below; *sign p*: exact sign test (at {ci['seeds']} seeds never below "
             f"{2 / 2 ** ci['seeds']:.4g}). **bold**: separated (Holm p < {ci['alpha']:g}); every other difference "
             "is not separated.", "",
             "| difference | metric | mean [95 % t-interval] | p | Holm p | sign p |", "|---|---|---|---|---|---|"]
    for pair, ivs in ci["differences"].items():
        for k, d in ivs.items():
            cells = [_cell(d, "+" + specs[k]), _p(d["p"]), _p(d["p_holm"]), _p(d["p_sign"])]
            if d["separated"]:
                cells[0], cells[2] = f"**{cells[0]}**", f"**{cells[2]}**"
            lines.append(f"| {pair} | {titles[k]} | " + " | ".join(cells) + " |")
    return lines


def multi_seed_tables(ci: Mapping, stats: Mapping[str, Sequence[dict]]) -> list[str]:
    head = "| method | " + " | ".join(t for _, t, _ in METRICS) + " | median step (s) | peak mem / rank (MiB) |"
    lines = [head, "|---" * (len(METRICS) + 3) + "|"]
    for name, ivs in ci["intervals"].items():
        cells = [_cell(ivs.get(k), spec) for k, _, spec in METRICS]
        s = stats.get(name)
        step = f"{statistics.mean(x['median_step_s'] for x in s):.3f}" if s else "—"
        mem = f"{max(x['peak_memory_mb'] for x in s):.0f}" if s else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {step} | {mem} |")
    return lines + ["", *difference_rows(ci, {k: s for k, _, s in METRICS}, {k: t for k, t, _ in METRICS})]


def plot_intervals(ci: Mapping, out: Path, keys: Sequence[str] = ("win_rate", "rule_follow")) -> Path:
    plt = _pyplot()
    names = list(ci["intervals"])
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        _errorbars(ax, [ci["intervals"][n][key] for n in names])
        ax.set_xticks(range(len(names)), names)
        ax.set_title(f"{key.replace('_', ' ')} (mean, 95 % t-interval)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "plots" / "intervals.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _errorbars(ax, ivs: Sequence[Mapping]) -> None:
    """Means with their intervals; a value without one (``lo`` None) as a bare point."""
    lo = [i["mean"] if i["lo"] is None else i["lo"] for i in ivs]
    hi = [i["mean"] if i["hi"] is None else i["hi"] for i in ivs]
    ax.errorbar(range(len(ivs)), [i["mean"] for i in ivs],
                yerr=[[i["mean"] - x for i, x in zip(ivs, lo)], [x - i["mean"] for i, x in zip(ivs, hi)]],
                fmt="o", capsize=3)


def statistics_section(ci: Mapping, stats: Mapping[str, Sequence[dict]]) -> list[str]:
    """From "Each cell: …" to the end of the differences table."""
    return [f"Each cell: the mean over the {ci['seeds']} training seeds [95 % t-interval]. Intervals: "
            f"{ci['method']}. A seed's value is the metric over all held-out prompts (pair metrics: over the pairs; "
            "generation metrics: over the samples; entropy: over the tokens). The reference is one model (no "
            "training seed): its values have no interval. Step time: mean over seeds of each run's median; memory: "
            "the largest peak.", "", *multi_seed_tables(ci, stats)]


def write_multi_seed_report(ci: Mapping, stats: Mapping[str, Sequence[dict]], out: Path,
                            timings: Mapping[str, float], steps: int, drift_dirs: Mapping[str, Path],
                            overlaps: Mapping[str, Sequence[float]]) -> Path:
    lines = ["# fpo-dist demo report", "", _intro(steps, ci["seeds"]), "", *statistics_section(ci, stats)]
    lines += ["", *NOTES,
              "- Per seed: `eval/<method>/seed_<i>/` (generations in AlpacaEval format, units.json, drift.json); "
              "training curves of seed 0: `plots/*.png`; intervals: `plots/intervals.png`; all numbers: "
              "`results.json`.", ""]
    lines += drift_section(drift_dirs, out, overlaps=overlaps)
    lines += ["Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------------------------------- re-derive


def rederive(out: Path) -> Path:
    """Recompute a multi-seed report's statistics from its ``results.json`` (``statistics.per_seed``, the per-run
    step time and memory in ``train``) without training: rewrites ``results.json``'s ``statistics``, the statistics
    section of ``report.md`` (from "Each cell:" to the notes; the rest — intro, notes, drift — is kept as it is) and
    ``plots/intervals.png``."""
    summary = json.loads((out / "results.json").read_text())
    ci = statistics_of(summary["statistics"]["per_seed"])
    seeds = range(ci["seeds"])
    stats = {name: [summary["train"][f"{name}/seed_{s}"] for s in seeds]
             for name in ci["per_seed"] if f"{name}/seed_0" in summary["train"]}
    lines = (out / "report.md").read_text().split("\n")
    try:
        start = next(i for i, x in enumerate(lines) if x.startswith("Each cell:"))
        end = next(i for i, x in enumerate(lines) if i > start and x == NOTES[0])
    except StopIteration:
        raise ValueError(f"{out / 'report.md'} has no statistics section (\"Each cell:\" … the notes)") from None
    lines[start:end] = [*statistics_section(ci, stats), ""]
    (out / "report.md").write_text("\n".join(lines))
    summary["statistics"] = ci
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    plot_intervals(ci, out)
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fpo_dist.demo.report",
                                description="Re-derive a multi-seed demo report's statistics from its results.json "
                                            "(per-seed values), without training.")
    p.add_argument("out", help="the report's directory (results.json, report.md), e.g. docs/results/demo-seeds")
    print(rederive(Path(p.parse_args(argv).out)).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
