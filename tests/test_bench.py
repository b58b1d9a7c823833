"""Smoke test of the benchmark: ``python -m bench.run --quick`` runs every part at tiny sizes (real Ray cache job,
the real ZeRO-3 trainer for fpo and tdpo2 — one loss per launch, as in the full run — and the loader) and writes
its JSON and markdown.  ~1 min on 2 cores.  The numbers are not checked: at these sizes they measure start-up
overheads, not FPO."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
QUICK_LOSSES = {"fpo", "tdpo2"}  # cached reference + SAE; resident reference + KL


def test_bench_quick_runs_every_part(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    # --workdir: models, stores and logs stay under tmp_path even if the run is killed
    # --train_rounds 2: each loss launched twice, interleaved fpo tdpo2 tdpo2 fpo, pooled step by step
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--device", "cpu", "--out", str(out), "--workdir", str(tmp_path),
           "--train_rounds", "2", "--keep"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=480)  # ~1 min alone; more on a shared host
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # let the bench unwind (Ray shutdown), then make sure
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        pytest.fail(f"bench --quick timed out:\n{output[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, output[-6000:]

    res = json.loads((out / "cpu-quick.json").read_text())
    m = res["machine"]
    assert m["cpu_model"] and m["cpu_cores"] >= 1 and m["ram_gib"] > 0 and m["date_utc"]
    assert m["versions"]["torch"] and m["versions"]["deepspeed"]

    train = res["train"]["losses"]
    assert set(train) == QUICK_LOSSES and res["train"]["rounds"] == 2
    # the launches ran in the order fpo, tdpo2, tdpo2, fpo (each round's run directory written when it ran)
    kept = next(tmp_path.glob("fpo-bench-*"))
    started = sorted((p.stat().st_mtime_ns, f"{p.parent.parent.name}/{p.parent.name}")
                  for p in kept.glob("r*/train_*/config.yaml"))
    assert [x for _, x in started] == ["r0/train_fpo", "r0/train_tdpo2", "r1/train_tdpo2", "r1/train_fpo"], started
    for name, r in train.items():
        assert r["step_time_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0, name
        assert r["cpu_s_per_step"] > 0 and r["zero_stage"] == 3 and r["world_size"] == 1, name
        assert r["phases"]["seconds"]["policy_forward"] > 0 and r["phases"]["seconds"]["backward"] > 0, name
        assert len(r["steps_measured"]) == res["sizes"]["measure_steps"], name
        # two rounds pooled: both rounds' measured steps in round order, their median; each round kept
        assert [len(x["step_times_s"]) for x in r["rounds"]] == [res["sizes"]["measure_steps"]] * 2, name
        assert r["step_times_s"] == r["rounds"][0]["step_times_s"] + r["rounds"][1]["step_times_s"], name
        assert r["step_time_s"] == pytest.approx(statistics.median(r["step_times_s"])), name
        assert r["peak_memory_mb"] == pytest.approx(statistics.median(x["peak_memory_mb"] for x in r["rounds"])), name
        # the response tokens the head scores: some of the rows' tokens, never more; no MFU off a GPU
        assert 0 < r["scored_tokens_per_s"] < r["tokens_per_s"] and r["mfu"] is None, name
        sz = res["sizes"]  # the bench's Llama: untied head; the shape read from the ZeRO-3 partitioned policy
        assert r["policy_shape"] == {"d_model": sz["hidden"], "vocab": sz["vocab"], "tied_head": False}, name
    # what each loss holds: FPO the SAE and no reference model; tdpo2 a resident reference and its KL
    assert train["fpo"]["sae_resident"] and not train["fpo"]["reference_model_resident"]
    assert train["tdpo2"]["reference_model_resident"] and not train["tdpo2"]["sae_resident"]
    assert {"reference_forward", "kl"} <= set(train["tdpo2"]["phases"]["seconds"])
    assert "sae_encode_pool" in train["fpo"]["phases"]["seconds"]
    assert "reference_forward" not in train["fpo"]["phases"]["seconds"]

    cache = res["cache"]
    assert cache["compute"]["bare_tokens_per_s"] > 0 and cache["compute"]["reference_pass_tokens_per_s"] > 0
    assert cache["job"]["runs"] and all(r["counts"]["ok"] == res["sizes"]["rows"] for r in cache["job"]["runs"])
    assert 0 < cache["job"]["disk"]["bytes_per_response"] < cache["job"]["disk"]["dense_logits_bf16"]
    assert math.isfinite(res["loader"]["overhead"])

    measured = {t["key"] for t in res["targets"] if t["value"] is not None}
    assert {"mem_fpo_tdpo2", "cache_reference_pass_vs_bare", "cache_worker_vs_bare", "loader_overhead"} <= measured
    md = (out / "cpu-quick.md").read_text()
    for heading in ("## Targets", "## 1. Training step per loss", "## 2. Cache job", "## 3. Loader"):
        assert heading in md
    assert m["cpu_model"] in md and "fpo / tdpo2 peak memory per rank" in md


# ------------------------------------------------------------------------------------------------ the real shape
# (no Gemma here: the data generator, the padding count and the report's arithmetic, on hand-made inputs)


def test_realshape_lengths_follow_the_stated_distribution():
    import random

    from bench.assets import lognormal_lengths

    xs = lognormal_lengths(random.Random(0), (96, 0.7, 16, 320), 4000)
    assert min(xs) >= 16 and max(xs) <= 320
    assert 90 <= statistics.median(xs) <= 102  # the median is the stated one
    q = statistics.quantiles(xs, n=10)
    assert 3.5 < q[-1] / q[0] < 8  # exp(2 · 1.2816 · 0.7) ≈ 6.0: responses vary several-fold


def test_realshape_rows_have_drawn_independent_lengths(tmp_path):
    import json

    from bench.assets import length_stats
    from bench.presets import PRESETS
    from fpo_dist.data import TokenizedPair
    from fpo_dist.testing import build_tokenizer

    tok = build_tokenizer()
    sizes = PRESETS["realshape"]
    path = tmp_path / "rows.jsonl"
    from bench.assets import write_realshape_rows

    write_realshape_rows(path, tok, sizes, 40, seed=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 40 and all(r["prompt"] and r["chosen"].strip() and r["rejected"].strip() for r in rows)
    n = lambda text: len(tok(text, add_special_tokens=False).input_ids)  # noqa: E731
    chosen, rejected = [n(r["chosen"]) for r in rows], [n(r["rejected"]) for r in rows]
    lo, hi = sizes.response_tokens[2], sizes.response_tokens[3]
    assert all(lo - 3 <= x <= hi + 3 for x in chosen + rejected)  # decoded windows re-tokenize to ~the drawn length
    assert abs(statistics.correlation(chosen, rejected)) < 0.5  # drawn independently
    assert max(chosen + rejected) > 3 * min(chosen + rejected)
    pairs = [TokenizedPair(i, bytes(16), (1,) * 10, (2,) * c, (3,) * r) for i, (c, r) in enumerate(zip(chosen, rejected))]
    stats = length_stats(pairs)
    assert stats["chosen"]["median"] == statistics.median(chosen) and stats["prompt"]["max"] == 10
    assert stats["chosen"]["min"] <= stats["chosen"]["p10"] <= stats["chosen"]["p90"] <= stats["chosen"]["max"]


def test_padding_count_from_the_micro_batches():
    import types

    import torch

    from bench.train_rank import PaddingCount

    padded = types.SimpleNamespace(input_ids=torch.zeros(2, 5), attention_mask=torch.tensor([[1, 1, 1, 0, 0],
                                                                                                [1, 1, 1, 1, 1]]))
    packed = types.SimpleNamespace(input_ids=torch.zeros(1, 8), attention_mask=None, position_ids=torch.zeros(1, 8),
                                   padding_tokens=1)
    batches = iter([padded, packed])
    count = PaddingCount()
    nxt = count.wrap(lambda: next(batches))
    assert nxt() is padded and nxt() is packed
    d = count.to_dict()
    assert (d["padding_tokens"], d["computed_tokens"], d["micro_batches"]) == (3, 18, 2)
    assert d["share"] == 3 / 18 and d["layouts"] == ["packed", "padded"]


def _fake_run(step, peak, after_setup, cpu, padding=None, logits="selected", layout="packed"):
    mem = {"after_imports": {"rss_mb": 500.0, "hwm_mb": 500.0}, "after_setup": {"rss_mb": after_setup, "hwm_mb": 0},
           "train_peak": {"rss_mb": peak, "hwm_mb": peak}}
    return {"step_time_s": step, "min_step_time_s": step, "cpu_s_per_step": cpu, "peak_memory_mb": peak,
            "peak_above_setup_mb": peak - after_setup, "memory_by_rank": [mem], "padding": padding, "logits": logits,
            "batch_layout": layout, "host_load": {"others_cores": 0.0}, "reference_model_resident": False,
            "sae_resident": True, "tokens_per_s": 1.0}


def test_realshape_ratios_targets_and_markdown():
    from bench import report
    from bench.presets import PRESETS
    from bench.run import merge_previous

    losses = {
        "fpo": _fake_run(10.0, 4000.0, 3000.0, 20.0, {"padding_tokens": 0, "computed_tokens": 700, "share": 0.0,
                                                      "micro_batches": 8, "layouts": ["shared"]}, layout="shared"),
        "fpo-packed": _fake_run(12.0, 4100.0, 3000.0, 23.0),  # the prompt computed once per sequence
        "fpo-materialized": _fake_run(20.0, 6000.0, 3000.0, 40.0, logits="materialized", layout="padded"),
        "dpo-online": _fake_run(12.5, 5000.0, 3500.0, 25.0),
        "fpo-random-sae": _fake_run(11.0, 4200.0, 3100.0, 22.0),  # the calibrated 16k contrast
    }
    compute = {"ratio": 1.5, "ratio_cpu": 1.4, "reference_pass_kwargs": {"layout": "packed"}, "pairs": 8, "tokens": 100,
               "padded_tokens": 120, "batches": 2, "batch_pairs": 4, "threads": 1, "bare_s": [2.0],
               "reference_pass_tokens_per_s": 75.0, "bare_tokens_per_s": 50.0, "reference_pass_parts_s": {"total": 1.0},
               "ratio_shared_vs_packed": 0.9, "packed_s": [2.2], "computed_tokens": {"shared": 80, "packed": 100}}
    rs = {"sizes": PRESETS["realshape"].to_dict(), "batch_layout_available": True,
          "assets": {"n_params": 268e6, "calibrated_l0": 64.2, "model": {"blocks": 18, "d_model": 640, "vocab": 262144},
                     "lengths": {}, "sae_kind": "real", "contrast_d_sae": 16384, "contrast_l0": 70.0},
          "train": {"losses": losses, "nproc": 2, "ds_config": "ds_configs/zero3.json"},
          "cache": {"compute": compute, "job": {"runs": [{"mean_worker_tokens_per_s": 40.0}]},
                    "ratio_reference_pass_vs_bare": 1.5, "ratio_worker_vs_bare": 0.8},
          "run": {"command": "python -m bench.run --preset realshape", "date_utc": "2026-12-03", "commit": "abc",
                  "dirty": False, "wall_s": 500.0, "host_load": {"others_cores": 0.1}}}
    rat = report.ratios({"realshape": rs})
    assert rat["realshape_mem_fpo_vs_materialized"] == 1000 / 3000  # above the post-setup baseline
    assert rat["realshape_mem_fpo_vs_materialized_measured"] == 4000 / 6000
    assert rat["realshape_time_fpo_vs_materialized"] == 0.5 and rat["realshape_time_fpo_vs_dpo_online"] == 0.8
    assert rat["realshape_cache_vs_bare_forward"] == 1.5 and rat["realshape_padding_share"] == 0.0
    assert rat["realshape_time_fpo_random_sae_vs_real"] == 1.1
    assert rat["realshape_mem_fpo_random_sae_vs_real_measured"] == 4200 / 4000
    assert rat["realshape_time_fpo_shared_vs_packed"] == 10 / 12 and rat["realshape_cpu_fpo_shared_vs_packed"] == 20 / 23
    assert rat["realshape_cache_shared_vs_packed"] == 0.9
    targets = {t["key"]: t for t in report.check_targets(rat)}
    assert {k: targets[k]["met"] for k in targets if k.startswith("realshape_")} == {
        "realshape_mem_fpo_vs_materialized": True, "realshape_time_fpo_vs_materialized": True,
        "realshape_time_fpo_vs_dpo_online": False, "realshape_cache_vs_bare_forward": True,
        "realshape_padding_share": True, "realshape_time_fpo_shared_vs_packed": True,
        "realshape_cache_shared_vs_packed": False}
    assert targets["time_fpo_dpo_online"]["met"] is None  # the base preset did not run

    previous = {"sizes": {"name": "cpu"}, "command": "python -m bench.run", "train": {"x": 1}, "realshape": {"old": 1}}
    merged = merge_previous({"command": "new", "realshape": rs}, previous, ran_base=False, ran_realshape=True)
    assert merged["train"] == {"x": 1} and merged["command"] == "python -m bench.run" and merged["realshape"] is rs
    kept = merge_previous({"command": "new", "sizes": {"name": "cpu"}}, previous, ran_base=True, ran_realshape=False)
    assert kept["realshape"] == {"old": 1} and kept["command"] == "new"

    results = {"machine": {"device": "cpu", "cpu_model": "x", "cpu_cores": 2, "ram_gib": 24, "python": "3.11",
                           "versions": dict.fromkeys(report.PACKAGES, "1"), "date_utc": "d",
                           "git": {"commit": "abc", "dirty": False}},
               "sizes": None, "command": "python -m bench.run --preset realshape", "wall_s": 1.0,
               "host_load": {"others_cores": 0.0}, "realshape": rs, "ratios": rat, "targets": list(targets.values())}
    md = report.markdown(results)
    assert "## Real shape: Gemma 3 270M + the real 4k SAE" in md and "ran in the same run" in md
    assert "`make real-sae` trains" in md and "random JumpReLU 640×16384" in md and "L0 of 70" in md
    assert "`fpo-random-sae` / `fpo` (random 16384-wide SAE / the real 4096-wide one): step time 1.100" in md
    assert "| fpo-materialized | materialized | padded | 20.00 [20.00] |" in md
    assert "| fpo-packed | selected | packed | 12.00 [12.00] |" in md
    assert "shared / packed time per pass 0.900 (median over the 1 rounds); positions computed 80 / 100 = 0.800" in md
    assert "above the post-setup baseline" in md and "0.333 | <= 0.6 | **met** | 0.667 |" in md
    assert "launches per run" not in md  # one round: nothing to say

    # two interleaved rounds: the order is stated; a re-run launch is named with its round and its attempts shown
    fpo = losses["fpo"]
    fpo["rounds"] = [{"step_time_s": 10.0}, {"step_time_s": 10.0, "attempts": [
        {"step_time_s": 14.0, "host_load": {"others_cores": 0.6}}, {"step_time_s": 10.0, "host_load": {"others_cores": 0.0}}]}]
    rs["train"].update(rounds=2, rerun=["fpo round 1"])
    md = report.markdown({**results, "realshape": rs})
    assert ("in each of 2 launches per run, interleaved fpo fpo-packed fpo-materialized dpo-online dpo-online "
            "fpo-materialized fpo-packed fpo (the runs forwards, then backwards)") in md
    assert report._rerun_note(rs["train"]) == (" Re-run because the host was busy, the quieter attempt kept: fpo round 1 "
                                               "(14.000 s/step at 0.60 cores / 10.000 s/step at 0.00 cores).")


def test_optimizer_bench_writes_its_ratio(tmp_path):
    """``python -m bench.optimizer`` at a tiny size: both optimizers step, the ratio and the markdown are written."""
    from bench.optimizer import main

    result = main(["--numel", "4099", "--steps", "2", "--device", "cpu", "--out", str(tmp_path)])
    assert set(result["runs"]) == {"per_tensor", "fused"}
    assert all(r["step_s"] > 0 and len(r["steps_s"]) == 2 for r in result["runs"].values())
    saved = json.loads((tmp_path / "optimizer-cpu.json").read_text())
    assert saved["ratios"]["optimizer_fused_vs_per_tensor"] == pytest.approx(
        result["runs"]["fused"]["step_s"] / result["runs"]["per_tensor"]["step_s"])
    assert "optimizer_fused_vs_per_tensor" in (tmp_path / "optimizer-cpu.md").read_text()


def test_head_grad_bench_runs_both_paths_and_they_agree(tmp_path):
    """``python -m bench.head_grad`` (a part of the GPU session, bench/gpu_session.sh) at a small shape: both weight-
    gradient paths run, their gradients agree to bf16 rounding, the ratios and the markdown are written."""
    from bench.head_grad import main

    result = main(["--vocab", "65536", "--d", "64", "--positions", "32", "--rounds", "1", "--device", "cpu",
                   "--out", str(tmp_path)])
    # one fp32 sum per entry on both paths, rounded once to bf16: at most one bf16 ulp (2⁻⁷ of the value) apart
    assert 0 < result["weight_grad_max_abs"]
    assert result["weight_grad_max_abs_diff"] <= 2**-7 * result["weight_grad_max_abs"], result
    assert set(result["ratios"]) == {"head_grad_mem_vocab_vs_positions", "head_grad_time_vocab_vs_positions"}
    assert json.loads((tmp_path / "head-grad-cpu.json").read_text())["ratios"] == result["ratios"]
    assert "head_grad_mem_vocab_vs_positions" in (tmp_path / "head-grad-cpu.md").read_text()


def test_mfu_counts_the_body_per_token_and_the_head_per_scored_position():
    """bench.mfu, hand-derived: 6 FLOPs per weight and token for the body (the embedding and the head taken out of the
    parameter count: once when tied, twice when not), 6·d·V per scored position for the head; over the peak of the
    named device in bf16 only."""
    from bench.mfu import mfu, peak_flops, step_model_flops

    d, v, body = 4, 10, 100
    assert step_model_flops(body + 2 * d * v, d, v, False, tokens=7, scored=3) == 6 * 100 * 7 + 6 * 40 * 3 == 4920
    assert step_model_flops(body + d * v, d, v, True, tokens=7, scored=3) == 4920
    with pytest.raises(ValueError, match="cannot hold"):
        step_model_flops(d * v, d, v, False, tokens=1, scored=1)
    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12 and peak_flops("NVIDIA H200", "bfloat16") == 989.4e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "float32") is None and peak_flops(None, "bfloat16") is None
    assert peak_flops("Some Future GPU", "bfloat16") is None
    shape = {"d_model": d, "vocab": v, "tied_head": True}
    assert mfu(body + d * v, shape, 7e12, 3e12, 2, "NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(
        4920e12 / (2 * 989.4e12))
    assert mfu(body + d * v, shape, 7e12, 3e12, 2, None, "bfloat16") is None


def test_realshape_time_ratio_interval_pairs_steps():
    """Per-step time ratios are paired by step (same pairs in both runs); the interval is the t-interval of their
    log's mean, on the ratio scale; fewer than 2 steps: none."""
    import math

    from bench.realshape import paired_ratio_interval

    same = paired_ratio_interval({"step_times_s": [10.0, 11.0, 12.0]}, {"step_times_s": [20.0, 22.0, 24.0]})
    assert same["n"] == 3 and math.isclose(same["mean"], 0.5) and math.isclose(same["lo"], 0.5)
    spread = paired_ratio_interval({"step_times_s": [8.0, 9.0, 10.0, 12.0]}, {"step_times_s": [10.0, 10.0, 10.0, 10.0]})
    assert spread["lo"] < spread["mean"] < spread["hi"] and spread["lo"] < 0.8 and spread["hi"] > 0.95
    # paired by step: a slow batch slows both runs and leaves the ratio alone
    paired = paired_ratio_interval({"step_times_s": [5.0, 50.0]}, {"step_times_s": [10.0, 100.0]})
    assert math.isclose(paired["lo"], 0.5) and math.isclose(paired["hi"], 0.5)
    assert paired_ratio_interval({"step_times_s": [1.0]}, {"step_times_s": [2.0]}) is None
    assert paired_ratio_interval(None, {"step_times_s": [1.0, 2.0]}) is None


def test_tdpo_offline_bench_ratios_merge_and_markdown(tmp_path):
    """bench/tdpo_offline.py: its ratios (memory above the post-setup baseline judged, as measured beside it; the
    step-time interval paired by step), its targets, its part merged into an existing cpu.json (and kept by the next
    bench.run) and both markdowns."""
    import json

    from bench import report, tdpo_offline
    from bench.run import merge_previous

    def run(steps, peak, after_setup, cpu, models):
        r = _fake_run(sum(steps) / len(steps), peak, after_setup, cpu)
        return {**r, "step_times_s": steps, "resident_models": [{"class": c} for c in models]}

    losses = {"tdpo2": run([20.0, 22.0, 21.0], 8000.0, 3000.0, 40.0, ["Gemma", "Gemma"]),
              "tdpo2-offline": run([10.0, 11.5, 10.0], 6500.0, 2500.0, 20.0, ["Gemma"]),
              "fpo": run([10.0, 10.0, 10.0], 6600.0, 2600.0, 19.0, ["Gemma"])}
    rat = tdpo_offline.ratios({"losses": losses})
    assert rat["tdpo_offline_time_vs_online"] == pytest.approx(10.5 / 21.0)  # of the median-free fake: means
    assert rat["tdpo_offline_mem_vs_online"] == pytest.approx(4000 / 5000)  # above setup: judged
    assert rat["tdpo_offline_mem_vs_online_measured"] == pytest.approx(6500 / 8000)
    iv = rat["tdpo_offline_time_vs_online_interval"]
    geo = (10 / 20 * 11.5 / 22 * 10 / 21) ** (1 / 3)  # the geometric mean of the per-step ratios
    assert iv["n"] == 3 and iv["lo"] < iv["mean"] < iv["hi"] and iv["mean"] == pytest.approx(geo, rel=1e-9)
    met = {t["key"]: t["met"] for t in report.check_targets_of(rat, tdpo_offline.TARGETS, tdpo_offline.SECOND_VALUE)}
    assert met == {"tdpo_offline_time_vs_online": True, "tdpo_offline_mem_vs_online": False}

    previous = {"sizes": {"name": "cpu"}, "command": "python -m bench.run", "train": {}, "ratios": {}, "targets": [],
                "machine": {"device": "cpu", "cpu_model": "x", "cpu_cores": 2, "ram_gib": 24, "python": "3.11",
                            "versions": dict.fromkeys(report.PACKAGES, "1"), "date_utc": "d",
                            "git": {"commit": "abc", "dirty": False}},
                "wall_s": 1.0, "host_load": {"others_cores": 0.0}}
    (tmp_path / "cpu.json").write_text(json.dumps({**previous, "sizes": None}))
    entry = {"command": "python -m bench.tdpo_offline", "date_utc": "d", "commit": "abc", "cpu_model": "x",
             "ratios": rat}
    assert report.merge_part("tdpo_offline", entry, tmp_path) == tmp_path / "cpu.json"
    merged = json.loads((tmp_path / "cpu.json").read_text())
    assert merged["ratios"]["tdpo_offline_time_vs_online"] == pytest.approx(10.5 / 21.0)
    assert {t["key"] for t in merged["targets"]} >= {"tdpo_offline_time_vs_online", "tdpo_offline_mem_vs_online"}
    md = (tmp_path / "cpu.md").read_text()
    assert "## Offline TDPO2 (cached top-M reference) vs online TDPO2" in md and "tdpo-offline-cpu.md" in md
    assert merge_previous({"command": "new"}, merged, ran_base=True, ran_realshape=True)["tdpo_offline"] == entry
    assert report.merge_part("tdpo_offline", entry, tmp_path / "nowhere") is None

    res = {"command": "python -m bench.tdpo_offline", "date_utc": "d", "commit": "abc", "cpu_model": "x",
           "wall_s": 1.0, "topm": 128, "ratios": rat, "sizes": {"rows": 12, "micro_batch": 1, "measure_steps": 3,
                                                              "warmup_steps": 1},
           "train": {"losses": losses}, "cache": {"topm_bytes_per_token": 600.0, "store_bytes_per_response_token": 650.0}}
    text = tdpo_offline.markdown(res)
    assert "| tdpo2-offline | 10.500 |" in text and "**met**" in text and "**missed**" in text
    assert "top-128" in text and "600 bytes per response token" in text
