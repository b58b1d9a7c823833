"""fpo_dist.demo.stats: the two-way bootstrap on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from fpo_dist.demo.stats import (
    Bootstrap,
    estimate,
    per_prompt,
    seed_values,
    stack_seeds,
)


def _metric(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One unit per (seed, prompt), weight 1."""
    values = np.atleast_2d(values).astype(float)
    return values, np.ones_like(values)


def test_per_prompt_sums_units_and_the_ratio_is_the_plain_metric():
    # 5 units on 3 prompts; per-token style weights: the metric is Σ value / Σ weight, as the demo reports it
    values, prompts, weights = [1.0, 2.0, 3.0, 4.0, 5.0], [0, 2, 0, 1, 2], [1.0, 2.0, 1.0, 4.0, 2.0]
    num, den = per_prompt(values, prompts, 3, weights)
    assert num.tolist() == [[4.0, 4.0, 7.0]] and den.tolist() == [[2.0, 4.0, 4.0]]
    assert estimate((num, den)) == pytest.approx(sum(values) / sum(weights))
    with pytest.raises(ValueError, match="prompt ids"):
        per_prompt([1.0], [3], 3)


def test_estimate_is_the_mean_over_seeds():
    m = stack_seeds([per_prompt([1.0, 0.0], [0, 1], 2), per_prompt([1.0, 1.0], [0, 1], 2)])
    assert seed_values(m).tolist() == [0.5, 1.0] and estimate(m) == 0.75


def test_constant_gives_a_zero_width_interval():
    boot = Bootstrap(n_seeds=4, n_prompts=10, resamples=500)
    iv = boot.interval(_metric(np.full((4, 10), 0.25)))
    assert (iv.mean, iv.lo, iv.hi) == (0.25, 0.25, 0.25)
    assert boot.difference(_metric(np.full((4, 10), 0.25)), _metric(np.full((1, 10), 0.25))).as_dict() == {
        "mean": 0.0, "lo": 0.0, "hi": 0.0}


def test_normal_sample_over_prompts_matches_the_analytic_interval():
    """One seed, P normal values: the bootstrap interval ≈ mean ± 1.96·sd/√P."""
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=800)
    iv = Bootstrap(1, len(x), resamples=4000, seed=2).interval(_metric(x))
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert iv.mean == pytest.approx(x.mean())
    assert iv.lo == pytest.approx(x.mean() - half, abs=0.12 * half)
    assert iv.hi == pytest.approx(x.mean() + half, abs=0.12 * half)


def test_seed_variance_is_captured():
    """Seeds differ by a seed effect, prompts not at all: the interval is that of the mean of S normal seed
    effects (the bootstrap's percentile interval of a mean is ≈ mean ± 1.96·sd·√((S−1)/S)/√S)."""
    rng = np.random.default_rng(3)
    s = 40
    effects = rng.normal(0.0, 1.0, size=s)
    values = np.repeat(effects[:, None], 16, axis=1)
    iv = Bootstrap(s, 16, resamples=4000, seed=4).interval(_metric(values))
    half = 1.96 * effects.std(ddof=0) / np.sqrt(s)
    assert iv.mean == pytest.approx(effects.mean())
    assert (iv.hi - iv.lo) / 2 == pytest.approx(half, rel=0.12)


def test_paired_difference_excludes_zero_only_when_it_should():
    """Prompt difficulty dominates each method's interval; the paired difference cancels it."""
    rng = np.random.default_rng(5)
    s, p = 5, 64
    difficulty = rng.normal(0.5, 0.3, size=p)
    base = difficulty[None, :] + rng.normal(0, 0.02, size=(s, p))
    better = base + 0.03 + rng.normal(0, 0.02, size=(s, p))
    same = base + rng.normal(0, 0.02, size=(s, p))
    boot = Bootstrap(s, p, resamples=2000)
    a, b = boot.interval(_metric(better)), boot.interval(_metric(base))
    assert a.lo < b.hi  # the separate intervals overlap ...
    diff = boot.difference(_metric(better), _metric(base))
    assert diff.excludes(0) and diff.lo > 0 and diff.mean == pytest.approx(0.03, abs=0.01)  # ... the paired one not
    assert not boot.difference(_metric(same), _metric(base)).excludes(0)
    assert boot.difference(_metric(base), _metric(base)).as_dict() == {"mean": 0.0, "lo": 0.0, "hi": 0.0}


def test_shape_errors_name_the_problem():
    boot = Bootstrap(3, 4, resamples=10)
    with pytest.raises(ValueError, match="3 seeds × 4 prompts"):
        boot.interval(_metric(np.zeros((2, 4))))
    with pytest.raises(ValueError, match="positive total weight"):
        boot.interval((np.zeros((3, 4)), np.zeros((3, 4))))
    assert "two-way bootstrap (10 resamples" in boot.describe()


def _eval_dir(path, verdicts, outputs, feature_mse):
    """A fake evaluation directory as fpo_dist.evaluate writes it: 2 prompts, 2 samples each, 3 pairs."""
    import json

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
    ci = seed_statistics({"a": a, "b": b}, resamples=200)
    assert ci["per_seed"]["a"]["rule_follow"] == [0.75, 0.75] and ci["per_seed"]["b"]["rule_follow"] == [0.25, 0.25]
    assert ci["intervals"]["a"]["win_rate"]["mean"] == pytest.approx(3.5 / 4)
    assert ci["intervals"]["a"]["entropy"]["mean"] == pytest.approx(12.0 / 10)  # per token, not per sample
    assert ci["intervals"]["a"]["accuracy_ln"]["mean"] == pytest.approx(2 / 3)
    diff = ci["differences"]["a − b"]
    assert diff["rule_follow"]["mean"] == pytest.approx(0.5) and diff["feature_mse"]["mean"] == pytest.approx(0.1)
    assert "two-way bootstrap (200 resamples" in ci["method"]
