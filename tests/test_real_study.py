"""fpo_dist.demo.real_study: every arm's flags reach the loss it names, the schedule covers the steps asked for, and
the report's statistics are re-derivable from its per-seed values (the study itself: ``make study-real``)."""

from __future__ import annotations

import json
import math

import pytest

from fpo_dist.demo.real_study import ARMS, DEFAULT_ARMS, METRICS, SETUP, main, train_args, write_report


def _config(arm, tmp_path, steps=24, n_pairs=100):
    from fpo_dist.config import TrainConfig, load_config

    return load_config(TrainConfig, None, train_args(arm, tmp_path / "cache", tmp_path / arm.name, steps, 0, n_pairs))


def test_the_default_arms_are_the_issues():
    assert set(DEFAULT_ARMS) == {"fpo", "fpo-alpha0", "dpo", "simpo", "tdpo2"}
    assert {a.name for a in ARMS} >= set(DEFAULT_ARMS)


@pytest.mark.parametrize("arm", ARMS, ids=[a.name for a in ARMS])
def test_arm_flags_reach_the_loss(arm, tmp_path):
    cfg = _config(arm, tmp_path)
    assert cfg.loss.name == arm.loss and cfg.max_steps == 24 and cfg.dtype == "float32"
    assert cfg.micro_batch_size * cfg.grad_accum == SETUP.batch_pairs and cfg.optim.lr == SETUP.lr
    for key, value in arm.params.items():
        assert cfg.loss.params[key] == pytest.approx(value), key


@pytest.mark.parametrize(("steps", "n_pairs"), [(24, 100), (25, 100), (96, 101), (1, 3)])
def test_enough_epochs_for_the_steps(tmp_path, steps, n_pairs):
    cfg = _config(ARMS[0], tmp_path, steps, n_pairs)
    assert cfg.epochs == max(1, math.ceil(steps * SETUP.batch_pairs / n_pairs))
    assert cfg.epochs * (n_pairs // SETUP.batch_pairs) >= steps or cfg.epochs * n_pairs / SETUP.batch_pairs >= steps


def test_report_and_rederive(tmp_path):
    from fpo_dist.demo.study import statistics_of

    arms = [a for a in ARMS if a.name in DEFAULT_ARMS]
    per_seed = {a.name: {k: [0.1 * i + j * 0.01 + (a.name == "dpo") * 0.05 for j in range(5)]
                         for i, (k, _, _) in enumerate(METRICS)} for a in arms}
    pairs = {"train": {"prompts": 135, "rows": 100, "reference_rule_follow": 0.25, "no_following_sample": 30,
                       "no_violating_sample": 5}, "heldout": {"prompts": 45, "rows": 44}}
    ci = statistics_of(per_seed, metrics=METRICS)
    machine = {"cpu": "AMD EPYC 7B13 (AVX2)", "cpu_cores": 2, "cpu_cores_usable": 2, "torch": "2.13.0", "gpu": None}
    path = write_report(ci, arms, 24, tmp_path, 60.0, pairs, machine=machine)
    text = path.read_text()
    assert "wall time 1 min on AMD EPYC 7B13 (AVX2), 2 cores)" in text  # the step times' machine, named
    for _, title, _ in METRICS:
        assert title in text
    assert "100 from 135 questions" in text and "| dpo |" in text
    first = json.loads((tmp_path / "study.json").read_text())
    assert first["pairs"] == pairs and first["setup"]["lr"] == SETUP.lr
    assert main(["--rederive", "--report-dir", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "study.json").read_text())
    assert again["intervals"] == first["intervals"] and again["differences"] == first["differences"]
    assert again["machine"] == machine  # where the runs ran, not where the statistics were re-derived
    assert "re-derived" in (tmp_path / "study.md").read_text()
    assert "on AMD EPYC 7B13 (AVX2), 2 cores" in (tmp_path / "study.md").read_text()


def test_term_scale_reads_each_fpo_runs_logged_terms(tmp_path):
    from fpo_dist.demo.real_study import ARM_BY_NAME, term_scale

    for seed, rows in enumerate([[(0.1, 1.0), (0.3, 3.0)], [(0.2, 1.0), (0.2, 1.0)]]):
        d = tmp_path / "runs" / "fpo" / f"seed_{seed}"
        d.mkdir(parents=True)
        lines = [{"step": i + 1, "feature_term_abs": f, "reward_margin_abs": m} for i, (f, m) in enumerate(rows)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [{"event": "start"}, *lines]))
    arms = [ARM_BY_NAME[n] for n in ("fpo", "fpo-alpha0", "dpo")]  # α = 0 and other losses: no feature term
    assert term_scale(tmp_path, arms, 2) == {"fpo": [pytest.approx(0.1), pytest.approx(0.2)]}
