"""Smoke test of the benchmark: ``python -m bench.run --quick`` runs every part at tiny sizes (real Ray cache job,
the real ZeRO-3 trainer for fpo and tdpo2 — one loss per launch, as in the full run — and the loader) and writes
its JSON and markdown.  ~1 min on 2 cores.  The numbers are not checked: at these sizes they measure start-up
overheads, not FPO."""

from __future__ import annotations

import json
import math
import os
import signal
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
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--device", "cpu", "--out", str(out), "--workdir", str(tmp_path)]
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
    assert set(train) == QUICK_LOSSES
    for name, r in train.items():
        assert r["step_time_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0, name
        assert r["cpu_s_per_step"] > 0 and r["zero_stage"] == 3 and r["world_size"] == 1, name
        assert r["phases"]["seconds"]["policy_forward"] > 0 and r["phases"]["seconds"]["backward"] > 0, name
        assert len(r["steps_measured"]) == res["sizes"]["measure_steps"], name
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
