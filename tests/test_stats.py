"""fpo_dist.demo.stats: t-intervals over seeds, paired tests, Holm, on cases with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fpo_dist.demo.stats import (
    holm,
    paired_difference,
    sign_test_p,
    statistics,
    t_interval,
    t_quantile,
    t_test_p,
    t_two_sided_p,
)

README_DIFFS = (-0.016, -0.113, -0.010, -0.004, -0.322)  # fpo-alpha0 − fpo win rate per seed (issue #21)


# --------------------------------------------------------------------------------------------- the t distribution


def test_t_distribution_hand_values():
    """Closed forms: df 1 is Cauchy (P(|T| ≥ 1) = 1 − (2/π)·atan 1 = 1/2); df 2 has P(|T| ≥ t) = 1 − t/√(2 + t²)
    (t = √2: 1 − 1/√2); and the printed table's two-sided 95 % critical values."""
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5, abs=1e-15)
    assert t_two_sided_p(math.sqrt(2), 2) == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-15)
    assert t_two_sided_p(0.0, 7) == 1.0 and t_two_sided_p(math.inf, 3) == 0.0
    for df, crit in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]:  # 4-digit table values
        assert t_quantile(0.95, df) == pytest.approx(crit, abs=5e-5)
    assert t_quantile(0.99, 4) == pytest.approx(4.6041, abs=5e-5)


def test_t_distribution_against_scipy():
    sp = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 9, 10, 29, 101):
        for t in (0.1, 0.7, 1.5, 2.5, 4.0, 9.0):
            assert t_two_sided_p(t, df) == pytest.approx(2 * sp.t.sf(t, df), rel=1e-9, abs=1e-13)
        assert t_quantile(0.95, df) == pytest.approx(sp.t.ppf(0.975, df), rel=1e-9)
    with pytest.raises(ValueError, match="positive integer"):
        t_two_sided_p(1.0, 0)


# --------------------------------------------------------------------------------------------- intervals


def test_t_interval_hand_derived():
    """Values 1, 2, 3, 4, 5: mean 3, sd √2.5, half-width t(0.975, 4)·√2.5/√5 = 2.7764451·√0.5 = 1.963243."""
    iv = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert iv.mean == 3.0 and iv.n == 5
    assert (iv.hi - iv.lo) / 2 == pytest.approx(2.7764451 * math.sqrt(0.5), rel=1e-7)
    assert iv.lo == pytest.approx(3.0 - 1.963243, abs=1e-6)


def test_one_value_has_no_interval_and_constants_have_zero_width():
    iv = t_interval([0.319])
    assert iv.as_dict() == {"mean": 0.319, "lo": None, "hi": None, "n": 1} and not iv.excludes(0)
    iv = t_interval([0.25] * 4)
    assert (iv.lo, iv.mean, iv.hi) == (0.25, 0.25, 0.25)


def test_readme_alpha0_example_is_not_separated():
    """The README's α = 0 win-rate differences: mean −0.093; sd = √(0.07358/4) = 0.135628 (deviations +0.077, −0.020,
    +0.083, +0.089, −0.229); half-width 2.7764451·0.135628/√5 = 0.168401 → [−0.2614, +0.0754], which holds 0; the
    sign test's p is 2·(1/2)⁵ = 0.0625."""
    d = paired_difference(README_DIFFS, [0.0] * 5)
    assert d.interval.mean == pytest.approx(-0.093, abs=1e-12)
    assert d.interval.lo == pytest.approx(-0.2614, abs=5e-4) and d.interval.hi == pytest.approx(0.0754, abs=5e-4)
    assert not d.interval.excludes(0)
    assert d.p_sign == 0.0625
    # t = −0.093 / (0.135628/√5) = −1.5333; scipy's two-sided p at df 4 is 0.2000 (checked by the oracle test above)
    assert d.p == pytest.approx(t_two_sided_p(1.53327, 4), abs=1e-4) and 0.19 < d.p < 0.21


def test_sign_test_hand_values():
    assert sign_test_p([1, 2, 3, 4, 5, 6]) == 2 / 64
    assert sign_test_p([1, -2, 3, 4, 5]) == pytest.approx(2 * (1 + 5) / 32)  # 0.375
    assert sign_test_p([0.0, 1.0, 2.0]) == 0.5  # the zero is dropped: 2 · (1/2)²
    assert sign_test_p([0.0, 0.0]) == 1.0 and sign_test_p([1, -1]) == 1.0


def test_paired_difference_pairs_seeds():
    """A shared seed effect cancels in the pairs: b = a + 0.1 exactly ⇒ zero-width interval at −0.1, p = 0."""
    a = [0.3, 0.9, 0.1, 0.6, 0.5]
    d = paired_difference(a, [x + 0.1 for x in a])
    assert d.interval.mean == pytest.approx(-0.1) and d.interval.hi - d.interval.lo == pytest.approx(0, abs=1e-12)
    assert d.p == 0.0 and d.p_sign == 0.0625
    assert t_test_p([0.0, 0.0, 0.0]) == 1.0
    with pytest.raises(ValueError, match="same number"):
        paired_difference([1.0, 2.0], [1.0, 2.0, 3.0])


def _coverage(lo_hi, truth: float) -> float:
    lo, hi = np.array(lo_hi).T
    return float(((lo <= truth) & (truth <= hi)).mean())


def test_t_interval_covers_95_percent_of_5_seed_experiments():
    """2,000 simulated experiments of 5 normal per-seed values with mean 0.7: the nominal 95 % interval covers 0.7
    in 93–97 % of them (binomial sd at 2,000 is 0.5 %)."""
    rng = np.random.default_rng(2024)
    data = rng.normal(0.7, 0.05, size=(2000, 5))
    ivs = [t_interval(x) for x in data]
    assert 0.93 <= _coverage([(iv.lo, iv.hi) for iv in ivs], 0.7) <= 0.97


def test_paired_interval_covers_95_percent_of_5_seed_experiments():
    """Two methods with a shared per-seed effect (sd 0.05) and their own noise (sd 0.02); the true difference is
    +0.03.  The paired interval covers it in 93–97 % of 2,000 experiments, and the paired t-test at α = 0.05 rejects
    a true zero difference in 3–7 % of them."""
    rng = np.random.default_rng(7)
    seed_effect = rng.normal(0.0, 0.05, size=(2000, 5))
    a = 0.73 + seed_effect + rng.normal(0, 0.02, size=(2000, 5))
    b = 0.70 + seed_effect + rng.normal(0, 0.02, size=(2000, 5))
    c = 0.70 + seed_effect + rng.normal(0, 0.02, size=(2000, 5))
    diffs = [paired_difference(x, y).interval for x, y in zip(a, b)]
    assert 0.93 <= _coverage([(iv.lo, iv.hi) for iv in diffs], 0.03) <= 0.97
    assert 0.03 <= np.mean([paired_difference(x, y).p < 0.05 for x, y in zip(c, b)]) <= 0.07


def test_percentile_bootstrap_over_5_seeds_undercovers():
    """The interval this module replaced: a percentile bootstrap of the mean over 5 seeds covers the true mean of
    normal data in well under 95 % (its width ignores the t correction and shrinks by √(4/5)); the t-interval on
    the same data covers in 93–97 %."""
    rng = np.random.default_rng(11)
    data = rng.normal(0.0, 1.0, size=(2000, 5))
    draws = rng.integers(0, 5, size=(1000, 5))
    boot = [np.percentile(x[draws].mean(1), [2.5, 97.5]) for x in data]
    assert _coverage(boot, 0.0) < 0.90
    assert 0.93 <= _coverage([(t_interval(x).lo, t_interval(x).hi) for x in data], 0.0) <= 0.97


# --------------------------------------------------------------------------------------------- Holm


def test_holm_hand_derived():
    """p = (0.01, 0.04, 0.03, 0.005), m = 4: sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 →
    running max 0.02, 0.03, 0.06, 0.06; back in input order (0.03, 0.06, 0.06, 0.02)."""
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    # capped at 1; ties keep their order; one p is unadjusted
    assert holm([0.5, 0.2, 0.2]) == pytest.approx([0.6, 0.6, 0.6], abs=1e-15)
    assert holm([0.9, 0.6]) == pytest.approx([1.0, 1.0]) and holm([0.04]) == [0.04] and holm([]) == []
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        holm([0.5, 1.5])


def test_holm_against_statsmodels():
    multipletests = pytest.importorskip("statsmodels.stats.multitest").multipletests
    p = np.random.default_rng(3).uniform(0, 0.2, size=45) ** 2
    assert holm(p) == pytest.approx(multipletests(p, method="holm")[1].tolist(), rel=1e-12)


# --------------------------------------------------------------------------------------------- a report's family


def test_statistics_family_and_separation():
    """Three methods, 5 seeds: a is +0.1 over b on every seed (separated), c is b plus noise (not); the family is
    every reported (pair, metric) and p_holm follows :func:`holm` over it."""
    b = [0.50, 0.62, 0.55, 0.58, 0.47]
    per_seed = {"reference": {"x": [0.3], "y": [1.0]},
                "a": {"x": [v + 0.1 + e for v, e in zip(b, (0.01, -0.01, 0.0, 0.005, -0.005))], "y": b},
                "b": {"x": b, "y": b},
                "c": {"x": [v + e for v, e in zip(b, (0.03, -0.02, 0.01, -0.04, 0.02))], "y": b}}
    st = statistics(per_seed, [("a", "b"), ("c", "b"), ("a", "c")], ["x", "y"])
    assert st["family"] == 6 and st["seeds"] == 5 and "family of all 6 differences" in st["method"]
    assert st["intervals"]["reference"]["x"] == {"mean": 0.3, "lo": None, "hi": None, "n": 1}
    cells = [st["differences"][pair][k] for pair in ("a − b", "c − b", "a − c") for k in ("x", "y")]
    assert [c["p_holm"] for c in cells] == pytest.approx(holm([c["p"] for c in cells]))
    assert st["differences"]["a − b"]["x"]["separated"] and st["differences"]["a − b"]["x"]["mean"] == pytest.approx(0.1)
    assert not st["differences"]["c − b"]["x"]["separated"]
    same = st["differences"]["a − b"]["y"]  # identical per-seed values: zero differences
    assert (same["mean"], same["p"], same["p_sign"], same["separated"]) == (0.0, 1.0, 1.0, False)
    json.dumps(st)  # the reports store it as it is


# --------------------------------------------------------------------------------------------- the demo report


def _eval_dir(path, verdicts, outputs, feature_mse):
    """A fake evaluation directory as fpo_dist.evaluate writes it: 2 prompts, 2 samples each, 3 pairs."""
    path.mkdir(parents=True)
    prompts = ["Name two fruits.", "Name two tools."]
    units = {"pairs": {"prompt": [0, 0, 1], "accuracy_ln": [1.0, 0.0, 1.0], "reward_accuracy_ln": [1.0, 1.0, 0.0],
                       "feature_mse": feature_mse},
             "generations": {"prompt": [0, 0, 1, 1], "verdict": verdicts, "entropy_sum": [1.0, 2.0, 3.0, 6.0],
                             "n_tokens": [2, 2, 3, 3]}}
    (path / "units.json").write_text(json.dumps(units))
    records = [{"instruction": prompts[i // 2], "output": o, "generator": "policy"} for i, o in enumerate(outputs)]
    (path / "policy_outputs.json").write_text(json.dumps(records))
    return path


def test_seed_statistics_from_evaluation_directories(tmp_path):
    """The demo's numbers per seed are the plain metrics of each evaluation (rule-follow from the task's judge)."""
    from fpo_dist.demo.report import seed_statistics

    good, bad = ["Fruits: apple, pear.", "Tools: axe, saw."], ["Vegetables: beet, leek.", "no"]
    a = [_eval_dir(tmp_path / f"a{s}", [1.0, 0.5, 1.0, 1.0], [good[0], good[0], good[1], bad[1]], [0.1, 0.2, 0.3])
         for s in range(2)]
    b = [_eval_dir(tmp_path / f"b{s}", [0.5, 0.5, 0.0, 0.5], [bad[0], good[0], bad[1], bad[1]], [0.0, 0.0, 0.3])
         for s in range(2)]
    ci = seed_statistics({"a": a, "b": b})
    assert ci["per_seed"]["a"]["rule_follow"] == [0.75, 0.75] and ci["per_seed"]["b"]["rule_follow"] == [0.25, 0.25]
    assert ci["intervals"]["a"]["win_rate"]["mean"] == pytest.approx(3.5 / 4)
    assert ci["intervals"]["a"]["entropy"]["mean"] == pytest.approx(12.0 / 10)  # per token, not per sample
    assert ci["intervals"]["a"]["accuracy_ln"]["mean"] == pytest.approx(2 / 3)
    diff = ci["differences"]["a − b"]
    assert diff["rule_follow"]["mean"] == pytest.approx(0.5) and diff["feature_mse"]["mean"] == pytest.approx(0.1)
    assert ci["family"] == 5 and "Student-t intervals over the 2 training seeds" in ci["method"]


def _demo_summary(per_seed: dict) -> dict:
    train = {f"{m}/seed_{s}": {"median_step_s": 0.2 + s / 100, "peak_memory_mb": 700.0 + s}
             for m in per_seed if m != "reference" for s in range(len(per_seed[m]["win_rate"]))}
    return {"results": {}, "statistics": {"per_seed": per_seed}, "train": train, "timings_s": {"total": 1.0}}


def test_rederive_rewrites_only_the_statistics_section(tmp_path):
    """From results.json's per-seed values: results.json's statistics, report.md's section from "Each cell:" to the
    notes, and the interval plot are rewritten; the intro, the notes and the drift section are kept."""
    from fpo_dist.demo import report

    rng = np.random.default_rng(0)
    metrics = [k for k, _, _ in report.METRICS]
    per_seed = {"reference": {k: [0.5] for k in metrics},
                **{m: {k: (0.7 + rng.normal(0, 0.02, 5)).tolist() for k in metrics} for m in ("fpo", "dpo", "simpo")}}
    (tmp_path / "results.json").write_text(json.dumps(_demo_summary(per_seed)))
    old = ["# fpo-dist demo report", "", "INTRO", "", "Each cell: OLD [95 % CI]", "", "| old | table |", "",
           report.NOTES[0], "NOTES", "## The latents that drift", "DRIFT", ""]
    (tmp_path / "report.md").write_text("\n".join(old))
    text = report.rederive(tmp_path).read_text()
    assert "OLD" not in text and "| old |" not in text
    assert text.startswith("# fpo-dist demo report\n\nINTRO\n\nEach cell: the mean over the 5 training seeds")
    assert text.endswith("\n" + "\n".join(old[8:]))
    assert "family of all 15 differences" in text and "| fpo − dpo | judge win rate vs ref |" in text
    assert "| reference | 0.500 | 0.500 |" in text  # no interval for the reference
    saved = json.loads((tmp_path / "results.json").read_text())["statistics"]
    assert saved["family"] == 15 and saved["per_seed"] == per_seed
    assert saved["interval"].startswith("student-t")
    assert (tmp_path / "plots" / "intervals.png").stat().st_size > 0
    assert report.rederive(tmp_path).read_text() == text  # idempotent


def test_study_rederive_from_study_json(tmp_path):
    from fpo_dist.demo import study

    rng = np.random.default_rng(1)
    keys = [k for k, _, _ in study.STUDY_METRICS]
    arms = [study.ARM_BY_NAME[n] for n in ("fpo", "fpo-alpha0", "dpo")]
    per_seed = {a.name: {k: (0.5 + rng.normal(0, 0.02, 5)).tolist() for k in keys} for a in arms}
    study.write_study_report(study.statistics_of(per_seed), arms, 150, tmp_path, 60.0)
    data = json.loads((tmp_path / "study.json").read_text())
    data["method"] = "OLD"
    (tmp_path / "study.json").write_text(json.dumps(data))
    text = study.rederive(tmp_path).read_text()
    assert "OLD" not in text and "family of all 10 differences" in text  # 2 arms × 5 metrics
    assert "| dpo − fpo | median step (s) |" in text and "mean [95 % t-interval]" in text
    assert json.loads((tmp_path / "study.json").read_text())["per_seed"] == per_seed
    with pytest.raises(SystemExit):
        study.main(["--rederive", "--seeds", "10", "--report-dir", str(tmp_path)])


def test_multi_seed_report_and_its_rederivation_agree(tmp_path):
    """The report the demo writes after training and the one re-derived from its results.json are the same text."""
    from fpo_dist.demo import report

    rng = np.random.default_rng(2)
    metrics = [k for k, _, _ in report.METRICS]
    per_seed = {"reference": {k: [0.5] for k in metrics},
                **{m: {k: (0.7 + rng.normal(0, 0.02, 3)).tolist() for k in metrics} for m in ("fpo", "dpo")}}
    summary = _demo_summary(per_seed)
    stats = {m: [summary["train"][f"{m}/seed_{s}"] for s in range(3)] for m in ("fpo", "dpo")}
    ci = report.statistics_of(per_seed)
    text = report.write_multi_seed_report(ci, stats, tmp_path, {"total": 1.0}, 150, {}, {}).read_text()
    assert "family of all 5 differences" in text and "| fpo − dpo | entropy |" in text
    (tmp_path / "results.json").write_text(json.dumps({**summary, "statistics": ci}))
    assert report.rederive(tmp_path).read_text() == text
