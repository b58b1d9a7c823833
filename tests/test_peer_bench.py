"""The peer benchmark (``bench/peer.py``, ``bench/peer_rank.py``): TRL's DPOTrainer against fpo-dist's DPO.

- the ratios, targets and markdown on made-up numbers;
- the global order TRL is handed is the loader's (``Topology.micro_slice`` over ``SampleOrder.epoch_order``, across
  epochs);
- end to end on a tiny Llama (1 process; and 2 ranks under ZeRO-3 with TRL's two workarounds): TRL 1.16 and
  fpo-dist's DPO, fed the same cached token ids in the same order, produce the same per-step loss and reward margin
  (fp32: ~1e-6 apart), while the loss moves away from ln 2 by orders of magnitude more than the tolerance — so a
  different order, β, learning rate or reference would fail the comparison.  The store is built by the cache
  worker in this process (no Ray: what the bench's Ray job computes, without its start-up).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------- pure parts


def _fake(step, cpu, peak, after, losses=None, margins=None, **extra):
    mem = {"after_setup": {"rss_mb": after}, "train_peak": {"hwm_mb": peak, "rss_mb": peak}}
    return {"step_time_s": step, "min_step_time_s": step * 0.9, "cpu_s_per_step": cpu, "peak_memory_mb": peak,
            "peak_above_setup_mb": peak - after, "memory_by_rank": [mem], "zero_stage": extra.pop("zero_stage", 0),
            "losses": losses or [LN2, 0.69, 0.68], "margins": margins or [0.0, 0.006, 0.02], **extra}


def test_ratios_targets_and_markdown_on_made_up_numbers(tmp_path):
    from bench import peer

    trl1 = _fake(10.0, 20.0, 6000, 4000, losses=[LN2, 0.69001, 0.68], tokens_match_order=True)
    trl2 = _fake(20.0, 40.0, 5000, 3000, losses=[LN2, 0.69, 0.68], tokens_match_order=False, zero_stage=3)
    runs = {1: {"dpo": _fake(8.0, 15.0, 5500, 4000), "fpo": _fake(8.2, 15.5, 5600, 4000), "trl": trl1},
            2: {"dpo": _fake(13.0, 26.0, 4700, 3000, zero_stage=3), "fpo": _fake(14.0, 28.0, 4800, 3000, zero_stage=3),
                "trl": trl2}}
    rat = peer.ratios(runs)
    assert rat["peer_time_dpo_vs_trl_1proc"] == pytest.approx(0.8)
    assert rat["peer_cpu_dpo_vs_trl_1proc"] == pytest.approx(0.75)
    assert rat["peer_mem_dpo_vs_trl_1proc"] == pytest.approx(1500 / 2000)  # above the post-setup baseline
    assert rat["peer_mem_dpo_vs_trl_1proc_measured"] == pytest.approx(5500 / 6000)
    assert rat["peer_time_dpo_vs_trl_2ranks"] == pytest.approx(0.65)
    assert rat["peer_mem_dpo_vs_trl_2ranks"] == pytest.approx(1700 / 2000)
    assert rat["peer_time_fpo_vs_dpo_1proc"] == pytest.approx(8.2 / 8.0)
    assert rat["peer_time_fpo_vs_dpo_2ranks"] == pytest.approx(14.0 / 13.0)
    assert rat["peer_loss_max_abs_diff_1proc"] == pytest.approx(1e-5, rel=1e-3)
    assert rat["peer_loss_max_abs_diff_2ranks"] == pytest.approx(0.0, abs=1e-12)

    met = {t["key"]: t["met"] for t in peer.check_targets(rat)}
    assert met == {"peer_time_dpo_vs_trl_1proc": True, "peer_mem_dpo_vs_trl_1proc": True,
                   "peer_time_dpo_vs_trl_2ranks": True, "peer_mem_dpo_vs_trl_2ranks": True,
                   "peer_time_fpo_vs_dpo_1proc": True, "peer_time_fpo_vs_dpo_2ranks": False}
    # a missing run: its ratios are None and its targets "not run", the others unaffected
    partial = peer.ratios({1: {"dpo": runs[1]["dpo"], "trl": None}})
    assert partial["peer_time_dpo_vs_trl_1proc"] is None and partial["peer_time_fpo_vs_dpo_1proc"] is None
    assert all(t["met"] is None for t in peer.check_targets(partial))

    checks = {tag: peer.compare(runs[w]["dpo"], runs[w]["trl"]) for w, tag in peer.WORLD_NAME.items()}
    assert checks["1proc"]["ok"] and not checks["2ranks"]["ok"]  # 2 ranks: TRL's tokens were off the order
    assert checks["1proc"]["loss_max_abs_from_ln2"] == pytest.approx(LN2 - 0.68)
    assert not peer.compare(runs[1]["dpo"], _fake(10.0, 20.0, 6000, 4000, losses=[LN2, 0.69, 0.6802],
                                                  tokens_match_order=True))["ok"]  # 2e-4 off: fails

    res = {"command": "python -m bench.peer", "date_utc": "2026-12-06T00:00:00Z", "commit": "abc", "dirty": False,
           "cpu": {"model": "Some CPU", "cores": 2, "flags": {"avx512f": True, "amx_tile": False}},
           "versions": {"trl": "1.16.0", "torch": "2.13.0"}, "model": "a model", "data": "some data",
           "plan": {"warmup": 1, "steps": 2, "lr": 1e-5, "beta": 0.1, "grad_clip": 1.0, "fused": True, "seed": 0},
           "threads_note": "2 per process", "wall_s": 1.0, "runs": {str(w): v for w, v in runs.items()},
           "checks": checks, "targets": peer.check_targets(rat), "notes": ["a note"], "failed": {}, "epochs": {}}
    md = peer.markdown(res)
    assert "Some CPU" in md and "avx512f yes" in md and "amx_tile no" in md
    assert "| 2 ranks, ZeRO-3: fpo-dist FPO / fpo-dist DPO, step time | 1.077 | <= 1.05 | **missed** |" in md
    assert "| 1 process: fpo-dist DPO / TRL DPOTrainer, peak RSS above the post-setup baseline | 0.750 | <= 1.0 | " \
           "**met** | 0.917 |" in md
    assert "max |Δ loss| TRL vs fpo-dist DPO over 3 steps **1.00e-05**" in md and "**do not match**" in md
    assert "| 2 | 0.6900000 | 0.6900100 |" in md and "- a note" in md

    # per-step times (the same pair on both sides at each step): the judged time ratios get an interval
    timed = {w: {k: dict(v) for k, v in r.items()} for w, r in runs.items()}
    timed[2]["dpo"]["step_times_s"], timed[2]["fpo"]["step_times_s"] = [13.0, 26.0, 13.5], [14.0, 30.0, 13.0]
    timed[1]["dpo"]["step_times_s"], timed[1]["trl"]["step_times_s"] = [8.0, 16.0, 4.0], [10.0, 20.0, 5.0]
    rat = peer.ratios(timed)
    iv = rat["peer_time_fpo_vs_dpo_2ranks_interval"]
    logs = [math.log(14 / 13), math.log(30 / 26), math.log(13 / 13.5)]
    assert iv["n"] == 3 and iv["mean"] == pytest.approx(math.exp(sum(logs) / 3))
    assert iv["lo"] < 1.05 < iv["hi"]  # three steps this far apart do not separate the ratio from the threshold
    same = rat["peer_time_dpo_vs_trl_1proc_interval"]  # 0.8 at every step: a point
    assert same["lo"] == pytest.approx(0.8) and same["hi"] == pytest.approx(0.8)
    assert rat["peer_time_fpo_vs_dpo_1proc_interval"] is None  # no per-step times: none
    md = peer.markdown({**res, "runs": {str(w): v for w, v in timed.items()}, "ratios": rat,
                        "targets": peer.check_targets(rat)})
    assert (f"| 2 ranks, ZeRO-3: fpo-dist FPO / fpo-dist DPO, step time | 1.077 (per step {iv['mean']:.3f} "
            f"[{iv['lo']:.3f}, {iv['hi']:.3f}]) | <= 1.05 | **missed** (not separated: the per-step interval holds the "
            "threshold) |") in md
    assert "| 1 process: fpo-dist DPO (no DeepSpeed config) / TRL DPOTrainer (precomputed reference), step time | " \
           "0.800 (per step 0.800 [0.800, 0.800]) | <= 0.85 | **met** |" in md
    # the median's verdict and the per-step interval on opposite sides of the threshold: said
    timed[1]["fpo"]["step_times_s"], timed[1]["dpo"]["step_times_s"] = [9.0, 9.0, 9.0], [8.0, 8.0, 8.0]
    md = peer.markdown({**res, "ratios": peer.ratios(timed), "targets": peer.check_targets(peer.ratios(timed))})
    assert ("| 1 process: fpo-dist FPO / fpo-dist DPO, step time | 1.025 (per step 1.125 [1.125, 1.125]) | <= 1.05 | "
            "**met** (the per-step interval lies on the other side of the threshold) |") in md

    # --rederive: a results file's ratios, targets and markdown recomputed from its runs (made with older code here)
    path = tmp_path / "peer-cpu-quick.json"
    for w in timed:  # what notes() reads of a TRL run
        timed[w]["trl"].update(attn_implementation="sdpa", world_size=w, distributed_type="NO", optimizer="AdamW",
                               optim="adamw_torch_fused", threads=1, precompute_and_init_s=1.0)
    path.write_text(json.dumps({**res, "preset": "quick", "runs": {str(w): v for w, v in timed.items()}}))
    again = peer.rederive(path)
    assert again["ratios"] == json.loads(path.read_text())["ratios"] == peer.ratios(timed)
    assert "| 2 ranks, ZeRO-3: fpo-dist FPO / fpo-dist DPO, step time | 1.077 (per step " in \
        path.with_suffix(".md").read_text()  # the markdown rewritten beside it, with the intervals


def test_rounds_are_interleaved_and_pooled_round_by_round():
    """``--rounds``: ABC CBA (every two runs go first once in two rounds), and a run's launches pooled so that step
    i of round k stays paired with the other runs' step i of round k."""
    import itertools

    from bench import peer
    from bench.train import launch_order, pool_rounds

    names = ("dpo", "trl", "fpo")
    order = launch_order(names, 2)
    assert order == [(0, "dpo"), (0, "trl"), (0, "fpo"), (1, "fpo"), (1, "trl"), (1, "dpo")]
    for a, b in itertools.combinations(names, 2):
        first = [[n for k, n in order if k == rnd].index(a) < [n for k, n in order if k == rnd].index(b)
                 for rnd in range(2)]
        assert sorted(first) == [False, True], (a, b)
    assert launch_order(names, 1) == [(0, n) for n in names]

    def launch(times, cpu, peak, after, losses, others=0.01, **extra):
        return _fake(sorted(times)[len(times) // 2], cpu, peak, after, losses=losses, step_times_s=times,
                     host_load={"others_cores": others}, launch_s=10.0, **extra)

    one = launch([2.0, 4.0, 3.0], 5.0, 6000, 4000, [LN2, 0.69, 0.68])
    assert pool_rounds([one]) is one  # one round: as it is
    dpo = pool_rounds([one, launch([1.0, 2.0, 1.5], 3.0, 6400, 4200, [LN2, 0.69, 0.6801], others=0.2),
                            launch([3.0, 6.0, 4.5], 7.0, 6100, 4050, [LN2, 0.69, 0.68])])
    assert dpo["step_times_s"] == [2.0, 4.0, 3.0, 1.0, 2.0, 1.5, 3.0, 6.0, 4.5]  # round by round
    assert dpo["step_time_s"] == 3.0 and dpo["min_step_time_s"] == 1.0
    assert dpo["cpu_s_per_step"] == 5.0 and dpo["peak_memory_mb"] == 6100  # medians over the rounds
    assert dpo["peak_above_setup_mb"] == 2050 and dpo["after_setup_mb"] == 4050
    assert dpo["losses"] == [LN2, 0.69, 0.68] and dpo["rounds_loss_max_abs_diff"] == pytest.approx(1e-4)
    assert dpo["host_load"]["others_cores"] == 0.2 and dpo["launch_s"] == 30.0 and len(dpo["rounds"]) == 3
    # TRL's token check: one round off the order puts the pooled run off it
    trl = pool_rounds([launch([2.0, 4.0, 3.0], 5.0, 6000, 4000, [LN2], tokens_match_order=True,
                                   ranks_off_order=[]),
                            launch([2.0, 4.0, 3.0], 5.0, 6000, 4000, [LN2], tokens_match_order=False,
                                   ranks_off_order=[1])])
    assert trl["tokens_match_order"] is False and trl["ranks_off_order"] == [1]

    # the pooled steps pair round by round: a host twice as slow in round 1 for both runs leaves the ratio at 0.5
    fpo = pool_rounds([launch([1.0, 2.0, 1.5], 2.5, 6000, 4000, [LN2]),
                            launch([2.0, 4.0, 3.0], 5.0, 6000, 4000, [LN2])])
    slow = pool_rounds([launch([2.0, 4.0, 3.0], 5.0, 6000, 4000, [LN2]),
                             launch([4.0, 8.0, 6.0], 10.0, 6000, 4000, [LN2])])
    iv = peer.ratios({2: {"fpo": fpo, "dpo": slow}})["peer_time_fpo_vs_dpo_2ranks_interval"]
    assert iv["n"] == 6 and iv["lo"] == pytest.approx(0.5) and iv["hi"] == pytest.approx(0.5)

    res = {"command": "python -m bench.peer --rounds 3", "date_utc": "2026-12-07T00:00:00Z", "commit": "abc",
           "cpu": {"model": "Some CPU", "cores": 2}, "versions": {"trl": "1.16.0"}, "model": "m", "data": "d",
           "plan": {"warmup": 1, "steps": 3, "lr": 1e-5, "beta": 0.1, "grad_clip": 1.0, "fused": True, "seed": 0,
                    "rounds": 3},
           "order": ["dpo0", "dpo1", "dpo2"], "threads_note": "2", "wall_s": 1.0, "runs": {"1": {"dpo": dpo}},
           "checks": {}, "targets": [], "notes": [], "failed": {}, "epochs": {}}
    md = peer.markdown(res)
    assert "| 2.00, 4.00, 3.00 / 1.00, 2.00, 1.50 / 3.00, 6.00, 4.50 |" in md
    assert "3 launches per run" in md and "in the order dpo0 dpo1 dpo2" in md and "1proc dpo 1.0e-04" in md
    assert "| 4050 | 2050 |" in md  # after setup and above it: the rounds' medians


def test_launch_threads_split_the_cores_this_process_may_use():
    """The launches' OMP_NUM_THREADS come from the affinity mask (a cgroup or SLURM cpuset can allow fewer cores than
    the machine has), split evenly, never below one; the peer JSON names both counts."""
    import os

    from bench.peer import cpu_info
    from bench.train import threads_per_rank

    allowed = len(os.sched_getaffinity(0))
    assert threads_per_rank(1) == allowed
    assert threads_per_rank(2) == max(1, allowed // 2)
    assert threads_per_rank(allowed + 1) == 1
    info = cpu_info()
    assert info["usable_cores"] == allowed and info["cores"] == os.cpu_count()
    mask = os.sched_getaffinity(0)
    try:  # a process allowed one core gets one thread, whatever the machine has
        os.sched_setaffinity(0, {min(mask)})
        assert threads_per_rank(1) == 1 and cpu_info()["usable_cores"] == 1
    finally:
        os.sched_setaffinity(0, mask)


def test_the_global_order_is_the_loaders():
    from bench.peer import global_order
    from fpo_dist.loader import SampleOrder, Topology

    ok = np.array([0, 2, 3, 5, 7, 8, 11])  # 7 ok rows: 3 steps per epoch at 2 ranks, one row left over
    for world in (1, 2):
        rows, epochs = global_order(ok, seed=5, world=world, steps=5)
        order = SampleOrder(ok, 5)
        per_epoch = order.steps_per_epoch(world)
        assert epochs == -(-5 // per_epoch) and len(rows) == 5 * world
        for k in range(5):
            e, j = divmod(k, per_epoch)
            for r in range(world):
                sl = Topology(1, 1, world, r).micro_slice(j * world, 0)
                assert rows[k * world + r] == order.epoch_order(e)[sl][0]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        global_order(np.array([4]), seed=0, world=2, steps=1)


# --------------------------------------------------------------------------------------------- end to end


N_ROWS = 12
LR = 5e-4  # large enough that 4 steps move the loss far from ln 2 (the comparison must be able to fail)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A cache store of the tiny Llama built by the cache worker in this process (the bench runs the Ray job)."""
    from fpo_dist.cache import driver
    from fpo_dist.cache.worker import CacheWorker
    from fpo_dist.config import CacheConfig, load_config
    from fpo_dist.testing import build_tiny_artifacts, toy_pairs

    root = tmp_path_factory.mktemp("peer")
    tiny = build_tiny_artifacts(root / "tiny")
    rows = toy_pairs(N_ROWS, topics=5)
    data = root / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = load_config(CacheConfig, None, [
        "--model.name_or_path", str(tiny.model_dir), "--sae.source", str(tiny.sae_dir),
        "--sae.layer", str(tiny.hook_layer), "--data.source", str(data), "--output", str(root / "store"),
        "--rows_per_shard", "6", "--chunk_rows", "6", "--workers", "1", "--device", "cpu",
        "--data.max_length", "64", "--data.max_prompt_length", "32"])

    def in_process(work_cfg, st, pending, log, lease):
        worker, results = CacheWorker(work_cfg, 1), []
        for shard in pending:
            res = worker.process(shard)
            assert "error" not in res, res
            st.commit_shard(shard, res["checksum"])
            results.append(res)
        return results

    mp = pytest.MonkeyPatch()
    mp.setattr(driver, "_run_pool", in_process)
    try:
        driver.run_cache_job(cfg, log=lambda *_: None)
    finally:
        mp.undo()
    return {"store": str(root / "store"), "model_dir": str(tiny.model_dir), "root": root}


def _peer_pair(store: dict, world: int) -> tuple[dict, dict]:
    """fpo-dist's DPO and TRL's DPOTrainer, one launch each, 1 warm-up + 3 steps: their summaries."""
    from bench import peer
    from fpo_dist.store import open_store

    plan = peer.Plan(warmup=1, steps=3, lr=LR, beta=0.1, timeout_s=240)
    root = store["root"] / f"w{world}"
    rows, epochs = peer.global_order(open_store(store["store"]).ok_rows(), plan.seed, world, plan.total)
    pairs = peer.write_dataset(store["store"], rows, root / "dataset")
    peer.launch(peer.ours_args("dpo", store["store"], root / "dpo", world, plan, epochs), world, root / "dpo", "dpo",
                plan.timeout_s)
    peer.launch(peer.trl_args(root / "dataset", store["model_dir"], root / "trl", world, plan), world, root / "trl",
                "trl", plan.timeout_s)
    ours = peer.summarize_ours(root / "dpo" / "train_dpo", plan, "dpo")
    trl = peer.summarize_trl(root / "trl", plan, world, pairs)
    return ours, trl


def _check_same_training(ours: dict, trl: dict, world: int) -> None:
    from bench import peer

    assert trl["tokens_match_order"], trl["ranks_off_order"]
    assert trl["optimizer"] == "AdamW" and trl["optimizer_fused"] is True
    assert len(ours["losses"]) == len(trl["losses"]) == 4
    assert ours["losses"][0] == pytest.approx(LN2, abs=1e-6) and trl["losses"][0] == pytest.approx(LN2, abs=1e-6)
    c = peer.compare(ours, trl)
    # the check has teeth: the loss moved ≫ the tolerance, so training anything else would show
    assert c["loss_max_abs_from_ln2"] > 100 * peer.LOSS_CHECK_ATOL, ours["losses"]
    assert c["ok"] and c["loss_max_abs_diff"] <= peer.LOSS_CHECK_ATOL, (ours["losses"], trl["losses"])
    assert c["margin_max_abs_diff"] <= 10 * peer.LOSS_CHECK_ATOL, (ours["margins"], trl["margins"])
    for r in (ours, trl):
        assert r["step_time_s"] > 0 and r["peak_memory_mb"] > 0 and r["peak_above_setup_mb"] is not None
        assert len(r["memory_by_rank"]) == world


@pytest.mark.slow
def test_trl_and_fpo_dist_dpo_train_the_same_on_one_process(store):
    ours, trl = _peer_pair(store, 1)
    assert ours["zero_stage"] == 0 and trl["zero_stage"] == 0 and trl["distributed_type"] == "DistributedType.NO"
    _check_same_training(ours, trl, 1)


@pytest.mark.slow
def test_trl_under_zero3_on_two_ranks_trains_the_same(store):
    ours, trl = _peer_pair(store, 2)
    assert ours["zero_stage"] == 3 and trl["zero_stage"] == 3 and trl["distributed_type"] == "DistributedType.DEEPSPEED"
    _check_same_training(ours, trl, 2)
