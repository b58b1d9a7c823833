"""The DeepSpeed trainer: real multi-process ZeRO-3 runs on CPU (gloo), partitioning really on.

Invariances: 2-rank ZeRO-3 ≡ a plain single-process PyTorch loop; cached DPO ≡ online DPO; resumed ≡
uninterrupted; resuming on another world size sees every sample exactly once per epoch.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fpo_dist.machine import cpu_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
N_ROWS = 20  # all ok: G = 4 → 5 steps per epoch
N_EVAL = 5  # held-out pairs: odd, so the 2 ranks hold 3 and 2 (eval batch 2: rank 1 runs one filler forward)
LR = 5e-3
BETA, ALPHA, K = 0.5, 2.0, 8


# --------------------------------------------------------------------------------------------- a loss of our own
# Registered by each training rank through ``--plugins test_train:register_toy_loss`` (not in pytest's process):
# the toy loss lives in this test file alone, with a hyper-parameter no built-in loss has.


def toy_margin_loss(avg_chosen, avg_rejected, margin: float = 1.0):
    """``L = margin − mean_b(avg logπθ(y_w) − avg logπθ(y_l))`` (linear, so its value is checkable from metrics)."""
    gap = avg_chosen - avg_rejected
    return margin - gap.mean(), {"toy_gap": gap.detach().mean(), "logps_chosen": avg_chosen.detach().mean(),
                                 "logps_rejected": avg_rejected.detach().mean()}


def register_toy_loss():
    from fpo_dist.domains import NON_NEGATIVE
    from fpo_dist.losses import LOSSES, LossSpec, register_loss

    if "toy-margin" not in LOSSES:
        register_loss(LossSpec("toy-margin", toy_margin_loss, "none", inputs=lambda q: q.avg_logps,
                               defaults={"margin": 1.0}, domains={"margin": NON_NEGATIVE}))



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory):
    """A cache built by the real cache job (local Ray, 2 workers)."""
    import ray

    from fpo_dist.cache.driver import run_cache_job
    from fpo_dist.testing import tiny_cache_config, toy_pairs

    root = tmp_path_factory.mktemp("train")
    rows = toy_pairs(N_ROWS)
    data = root / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    # --ref_topm: the whole vocabulary, so offline TDPO's KL is then the exact one
    cfg = tiny_cache_config(tiny, data, root / "store", workers=2, extra=["--ref_topm", str(_vocab(tiny))])
    # a held-out cache: the same config, other pairs (as another data.split of a hub dataset would be)
    held_out = root / "held_out.jsonl"
    held_out.write_text("\n".join(json.dumps({"prompt": f"Held-out question {i}?", "chosen": f"A careful reply {i}.",
                                              "rejected": f"No {i}." + " Meh" * i}) for i in range(N_EVAL)))
    eval_cfg = tiny_cache_config(tiny, held_out, root / "eval_store", workers=2)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        run_cache_job(cfg, log=lambda *_: None)
        run_cache_job(eval_cfg, log=lambda *_: None)
    finally:
        ray.shutdown()
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every parameter
    (root / "zero3_test.json").write_text(json.dumps(ds))
    return {"store": str(root / "store"), "eval_store": str(root / "eval_store"), "ds": str(root / "zero3_test.json"),
            "root": root, "tiny": tiny}


def _vocab(tiny) -> int:
    return json.loads((tiny.model_dir / "config.json").read_text())["vocab_size"]


def train(cache, out: Path, *extra: str, nproc: int = 2, launcher: str = "torchrun", timeout: int = 420,
          prefix: tuple[str, ...] = ()):
    """Run launchers/train.py under a real launcher in its own process group; return (rc, output).  ``prefix``: a
    command the one-process run is started under (strace)."""
    args = ["--cache", cache["store"], "--deepspeed", cache["ds"], "--output_dir", str(out),
            "--micro_batch_size", "2", "--optim.lr", str(LR), "--optim.warmup_steps", "0", "--seed", "3",
            "--loss.beta", str(BETA), "--loss.alpha", str(ALPHA), "--loss.k", str(K), "--log_samples",
            "--dist_timeout_s", "120", *extra]
    port = str(_free_port())
    if launcher == "deepspeed":
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port,
               str(ROOT / "launchers" / "train.py"), *args]
    elif nproc == 1:
        cmd = [*prefix, sys.executable, str(ROOT / "launchers" / "train.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port,
               "--log-dir", str(out.parent / f"{out.name}-torchelastic"),  # not a new /tmp/torchelastic_* per run
               str(ROOT / "launchers" / "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)}
    env.pop("MASTER_PORT", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"training timed out after {timeout} s:\n{output[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of the run may outlive it
        except ProcessLookupError:
            pass
    return proc.returncode, output


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run_a(cache):
    """2 ranks, ZeRO-3, the deepspeed launcher: 3 steps, checkpoints at steps 2 and 3."""
    out = cache["root"] / "run_a"
    rc, log = train(cache, out, "--max_steps", "3", "--save_every", "2", "--epochs", "2", launcher="deepspeed")
    assert rc == 0, log[-6000:]
    return out, log


# --------------------------------------------------------------------------------------------- FPO run


def test_fpo_two_rank_zero3_run(run_a, tiny):
    out, log = run_a
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3]
    assert abs(m[0]["loss"] - math.log(2)) < 1e-5  # policy == reference at the first forward
    assert m[0]["feature_mse_chosen"] < 1e-10 and m[0]["feature_mse_rejected"] < 1e-10
    assert abs(m[-1]["loss"] - math.log(2)) > 1e-3 and m[-1]["feature_mse_rejected"] > 1e-8  # both move
    for key in ("lr", "grad_norm", "tokens_per_s", "step_time_s", "peak_memory_mb", "reward_accuracy",
                "topk_overlap", "margin"):
        assert key in m[0], key
    assert m[0]["peak_memory_mb"] > 0
    assert all(r["padding_share"] == 0 for r in m)  # shared-prefix micro-batches (the default): no padding
    assert "step-0 check: rows" in log
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["zero_stage"] == 3
    assert info["machine"]["cpu"] == cpu_model() and info["machine"]["torch"] == torch.__version__  # the timings' CPU
    assert info["ds_config"]["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert info["reference_model_resident"] is False
    assert [x["class"] for x in info["resident_models"]] == ["LlamaForCausalLM"]  # the policy, nothing else
    total = sum(p.numel() for p in torch.nn.Module.parameters(_load(tiny.model_dir)))
    model = info["resident_models"][0]
    assert model["numel"] == total and 0 < model["local_numel"] <= total // 2 + 64  # ZeRO-3: rank 0 holds its half

    exported = _load(out / "hf")  # the export loads with plain transformers
    initial = _load(tiny.model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(exported.state_dict().values(), initial.state_dict().values()))


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_two_rank_zero3_equals_plain_pytorch(run_a, cache, tiny):
    """The first 3 steps of the ZeRO-3 run equal a plain single-process loop: same global batches (the
    documented order), AdamW, clipping at 1.0.  Tolerance: 2e-5 on losses, 1e-5 on weights (fp32)."""
    from sae_lens import SAE

    from fpo_dist.losses import fpo_loss, prediction_mask, sequence_logps
    from fpo_dist.models import build_batch, pairs_from_batch
    from fpo_dist.store import open_store

    out, _ = run_a
    store = open_store(cache["store"])
    sae = SAE.load_from_disk(str(tiny.sae_dir))
    sae.requires_grad_(False)
    model = _load(tiny.model_dir).train()
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    order = np.random.default_rng([3, 0]).permutation(store.ok_rows())  # documented: rng([seed, epoch])
    losses = []
    for step in range(3):
        rows = order[step * 4 : (step + 1) * 4]
        batch = store.read_rows(rows)
        pb = build_batch(pairs_from_batch(batch), pad_id=0)
        captured = {}
        h = model.model.layers[tiny.hook_layer].register_forward_hook(lambda m, i, o: captured.update(x=o))
        logits = model(input_ids=pb.input_ids, attention_mask=pb.attention_mask).logits
        h.remove()
        hidden = captured["x"][0] if isinstance(captured["x"], tuple) else captured["x"]
        _, _, avg = sequence_logps(logits, pb.input_ids, pb.response_mask)
        pm = prediction_mask(pb.response_mask)
        pooled = (sae.encode(hidden) * pm[..., None]).sum(1) / pm.sum(1, keepdim=True)
        ref_avg = torch.tensor(batch.logp_sum / batch.n_tokens)
        from fpo_dist.losses import SparseCodes

        refs = [SparseCodes(torch.tensor(c.offsets), torch.tensor(c.indices), torch.tensor(c.values))
                for c in (batch.chosen_codes, batch.rejected_codes)]
        n = len(rows)
        loss, _ = fpo_loss(avg[:n], avg[n:], ref_avg[:, 0], ref_avg[:, 1], pooled[:n], pooled[n:], refs[0], refs[1],
                           beta=BETA, alpha=ALPHA, k=K)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    got = [r["loss"] for r in metrics(out)]
    np.testing.assert_allclose(got, losses, rtol=0, atol=2e-5)
    exported = _load(out / "hf").state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=1e-5, msg=name)


def test_resume_same_world_size_equals_uninterrupted(run_a, cache):
    out_a, _ = run_a
    out = cache["root"] / "run_d"
    (out / "checkpoints").mkdir(parents=True)  # a run that stopped after step 2: resume it with --resume auto
    shutil.copytree(out_a / "checkpoints" / "step_2", out / "checkpoints" / "step_2")
    (out / "checkpoints" / "latest").write_text("step_2")
    rc, log = train(cache, out, "--max_steps", "3", "--epochs", "2", "--resume", "auto")
    assert rc == 0, log[-6000:]
    assert "resumed from" in log and "step 2" in log
    a3, d3 = metrics(out_a)[2], metrics(out)[0]
    assert d3["step"] == 3
    for key in ("loss", "reward_accuracy", "feature_mse_rejected", "grad_norm"):
        assert abs(a3[key] - d3[key]) <= 1e-6 * max(1.0, abs(a3[key])), key
    assert samples(out)[0]["rows"] == samples(out_a)[2]["rows"]


def test_resume_on_other_world_sizes_sees_every_sample_once_per_epoch(run_a, cache):
    """2 ranks (steps 1-3) → 1 rank (steps 4-7, across the epoch boundary) → 2 ranks (steps 8-10)."""
    out_a, _ = run_a
    out_b, out_c = cache["root"] / "run_b", cache["root"] / "run_c"
    rc, log = train(cache, out_b, "--max_steps", "7", "--epochs", "2", "--grad_accum", "2", "--resume",
                    str(out_a / "checkpoints" / "step_3"), nproc=1)
    assert rc == 0, log[-6000:]
    rc, log = train(cache, out_c, "--max_steps", "10", "--epochs", "2", "--resume",
                    str(out_b / "checkpoints" / "step_7"))
    assert rc == 0, log[-6000:]
    steps = samples(out_a) + samples(out_b) + samples(out_c)
    assert [s["step"] for s in steps] == list(range(1, 11))
    ok = set(range(N_ROWS))
    for epoch in (0, 1):
        seen = [r for s in steps if s["epoch"] == epoch for r in s["rows"]]
        assert sorted(seen) == sorted(ok), f"epoch {epoch}: every sample exactly once"
    assert metrics(out_c)[-1]["step"] == 10 and (out_c / "hf" / "config.json").exists()


# --------------------------------------------------------------------------------------------- baselines


def test_dpo_cached_equals_dpo_online(cache):
    """Cached ≡ online reference, and padded ≡ shared: the cached run pads its micro-batches, the online one shares
    each pair's prompt (the default), against a cache built with the default layout."""
    out_c, out_o = cache["root"] / "dpo", cache["root"] / "dpo_online"
    common = ("--max_steps", "3", "--loss.alpha", "0.5", "--loss.k", "50", "--export", "false")
    rc, log = train(cache, out_c, "--loss.name", "dpo", "--batch_layout", "padded", *common)
    assert rc == 0, log[-6000:]
    rc, log = train(cache, out_o, "--loss.name", "dpo-online", *common)
    assert rc == 0, log[-6000:]
    assert "reference model: yes" in log
    mc, mo = metrics(out_c), metrics(out_o)
    assert abs(mc[0]["loss"] - math.log(2)) < 1e-5  # fp32; cache and policy lay out batches differently
    assert all(r["padding_share"] > 0 for r in mc) and all(r["padding_share"] == 0 for r in mo)
    for a, b in zip(mc, mo):
        for key in ("loss", "rewards_chosen", "rewards_rejected", "reward_accuracy", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    info = json.loads((out_o / "run_info.json").read_text())
    assert info["reference_model_resident"] is True and len(info["resident_models"]) == 2


def test_the_store_records_its_layout_and_kernel(cache):
    """The cache job writes the batch layout and attention kernel it ran with into the store's provenance (the
    defaults here: shared rows, sdpa); the runs in this file read that store padded, packed and shared."""
    from fpo_dist.store import open_store

    prov = open_store(cache["store"]).provenance
    assert (prov["batch_layout"], prov["attention_kernel"]) == ("shared", "sdpa")


def test_tdpo2_selected_head_equals_materialized_under_zero3(cache):
    """TDPO2 (policy + frozen ZeRO-3 reference, sequential KL over the vocabulary) on 2 ranks, every parameter
    partitioned: the output layer at selected positions on shared-prefix rows (the defaults; the reference head
    gathered explicitly) gives the losses and gradient norms of the materialized full-logits path on packed rows."""
    runs = {}
    for mode, layout in (("selected", "shared"), ("materialized", "packed")):
        out = cache["root"] / f"tdpo2-{mode}"
        rc, log = train(cache, out, "--loss.name", "tdpo2", "--logits", mode, "--batch_layout", layout, "--max_steps",
                        "2", "--export", "false")
        assert rc == 0, log[-6000:]
        runs[mode] = metrics(out)
    for a, b in zip(runs["selected"], runs["materialized"]):
        for key in ("loss", "kl_chosen", "kl_rejected", "grad_norm"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (a["step"], key, a[key], b[key])
    assert runs["selected"][1]["loss"] != runs["selected"][0]["loss"]  # it trained


def test_offline_tdpo_at_full_vocabulary_equals_online_tdpo(cache):
    """tdpo1/tdpo2-offline on a cache whose top-M is the whole vocabulary (no tail) ≡ tdpo1/tdpo2 with a resident
    reference, 2 ranks under ZeRO-3 for 3 steps: losses, both KLs, rewards and gradient norms, without a reference
    model; its step-0 check compares the cached distributions with the policy's."""
    for variant in ("tdpo1", "tdpo2"):
        runs = {}
        for name in (variant, f"{variant}-offline"):
            out = cache["root"] / name
            rc, log = train(cache, out, "--loss.name", name, "--max_steps", "3", "--export", "false")
            assert rc == 0, log[-6000:]
            runs[name] = metrics(out)
        assert "reference model: none" in log and "max top-M KL = " in log
        step0 = next(line for line in log.splitlines() if line.startswith("step-0 check:"))
        assert float(step0.split("max top-M KL = ")[1].split()[0].rstrip(",")) < 1e-5, step0
        info = json.loads((cache["root"] / f"{variant}-offline" / "run_info.json").read_text())
        assert info["reference_model_resident"] is False and len(info["resident_models"]) == 1
        for a, b in zip(runs[variant], runs[f"{variant}-offline"]):
            for key in ("loss", "kl_chosen", "kl_rejected", "rewards_chosen", "rewards_rejected", "grad_norm"):
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (variant, a["step"], key, a[key], b[key])
        assert runs[variant][-1]["kl_rejected"] > 1e-6  # the policy moved: the KL term is exercised


def test_cache_verify_recomputes_the_topm_distributions(cache):
    """``cache verify --recompute`` on a store with top-M arrays also compares them with the recomputed reference's
    (their KL: 0 up to rounding here, where the store's M is the whole vocabulary)."""
    res = subprocess.run([sys.executable, "-m", "fpo_dist.cache", "verify", cache["store"], "--recompute", "3",
                          "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0 and "verify: OK" in res.stdout, res.stdout + res.stderr
    line = next(x for x in res.stdout.splitlines() if x.startswith("recomputed "))
    assert float(line.split("max top-M KL = ")[1].split()[0]) < 1e-5, line


def test_offline_tdpo_on_a_cache_without_topm_is_refused_in_one_line(cache, tmp_path):
    rc, log = train(cache, tmp_path / "no-topm", "--cache", cache["eval_store"], "--loss.name", "tdpo2-offline",
                    "--max_steps", "1", nproc=1)
    assert rc == 2, log[-3000:]
    err = [line for line in log.splitlines() if "--ref_topm" in line]
    assert len(err) == 1 and "tdpo2-offline" in err[0] and "top-M" in err[0], log[-3000:]
    # an eval cache without them, beside a training cache with them: refused for the offline losses only (FPO's runs
    # in this file evaluate on that cache)
    rc, log = train(cache, tmp_path / "no-topm-eval", "--eval_cache", cache["eval_store"], "--loss.name",
                    "tdpo2-offline", "--max_steps", "1", nproc=1)
    assert rc == 2, log[-3000:]
    err = [line for line in log.splitlines() if "holds no top-M reference distributions" in line]
    assert len(err) == 1 and f"--ref_topm {_vocab(cache['tiny'])}" in err[0], log[-3000:]


def test_a_loss_registered_in_a_test_file_trains(cache, tmp_path):
    """The loss seam: a loss defined here alone (with its own hyper-parameter) trains through the real trainer."""
    out = tmp_path / "toy"
    rc, log = train(cache, out, "--plugins", "test_train:register_toy_loss", "--loss.name", "toy-margin", "--loss.margin", "0.25",
                    "--max_steps", "2", "--export", "false", "--save_final", "false", nproc=1, timeout=240)
    assert rc == 0, log[-6000:]
    assert not (out / "checkpoints").exists()  # --save_final false and no save_every: no checkpoint at all
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2]
    assert abs(m[0]["loss"] - (0.25 - m[0]["toy_gap"])) < 1e-6
    assert abs(m[0]["toy_gap"] - (m[0]["logps_chosen"] - m[0]["logps_rejected"])) < 1e-6
    assert m[1]["toy_gap"] != m[0]["toy_gap"]  # the step moved the policy
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())["loss"]
    assert saved["name"] == "toy-margin" and saved["params"] == {"margin": 0.25}
    assert set(saved["ignored"]) == {"alpha", "beta", "k"}  # the shared flags of train(), unused by this loss


def test_a_dominant_feature_term_is_warned_about(cache, tmp_path):
    """FPO at a huge α on one process, 5 steps (the shortest run the warning judges, over all its steps): every
    metrics.jsonl row carries the margin and the feature term of u (margin = reward_margin − feature_term), and the
    run prints one warning line whose numbers are the window means recomputed here from metrics.jsonl; run_info.json
    keeps the line."""
    out = tmp_path / "loud"
    rc, log = train(cache, out, "--loss.alpha", "1e6", "--max_steps", "5", "--export", "false", "--save_final", "false",
                    nproc=1, timeout=240)
    assert rc == 0, log[-6000:]
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5]
    for r in m:
        assert abs(r["margin"] - (r["reward_margin"] - r["feature_term"])) <= 1e-5 * max(1.0, abs(r["feature_term"]))
        assert r["feature_term_abs"] >= abs(r["feature_term"]) and r["reward_margin_abs"] >= abs(r["reward_margin"])
    lines = [x[x.index("warning: FPO"):] for x in log.splitlines() if "feature term dominates u" in x]  # past tqdm's \r
    assert len(lines) == 1, log[-6000:]
    f = sum(r["feature_term_abs"] for r in m) / 5
    margin = sum(r["reward_margin_abs"] for r in m) / 5
    assert f > 10 * margin
    assert f"is {f:.4g} and the mean |margin term| is {margin:.4g}" in lines[0] and "α 1e+06, β 0.5" in lines[0]
    assert json.loads((out / "run_info.json").read_text())["warnings"] == lines


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to watch the system calls from outside")
def test_every_checkpoint_file_is_fsynced_before_latest_names_it(cache, tmp_path):
    """The trainer's own save path, watched from outside (strace of the training process): before each rename that
    moves ``latest``, every file of the checkpoint it names (DeepSpeed's model and optimizer states, the RNG state,
    fpo_state.json) has been fsynced; with ``--keep_last 1`` only the last checkpoint is left."""
    out, trace = tmp_path / "durable", tmp_path / "trace.txt"
    rc, log = train(cache, out, "--max_steps", "2", "--save_every", "1", "--keep_last", "1", "--export", "false",
                    nproc=1, timeout=300, prefix=("strace", "-f", "-y", "--seccomp-bpf", "-o", str(trace), "-e",
                                                  "trace=fsync,fdatasync,rename,renameat,renameat2"))
    assert rc == 0, log[-6000:]
    calls = [ln for ln in trace.read_text().splitlines() if "fsync(" in ln or "rename" in ln]
    root = out / "checkpoints"
    moves = [i for i, ln in enumerate(calls) if "rename" in ln and f"{root}/latest.tmp" in ln and "= 0" in ln]
    assert len(moves) == 2, calls[-20:]  # step_1, step_2
    for tag, move in zip(("step_1", "step_2"), moves):
        synced = {m.removesuffix(".tmp") for ln in calls[:move]  # fpo_state.json: fsynced as .tmp, then renamed
                  for m in re.findall(rf"fsync\(\d+<({re.escape(str(root / tag))}/[^>]+)>", ln)}
        if tag == "step_2":  # the one kept: all of its files on disk now
            files = {str(p) for p in (root / tag).rglob("*") if p.is_file()}
            assert files and files <= synced, sorted(files - synced)
        assert any("rng_rank0.pt" in f for f in synced) and any("model_states" in f for f in synced), sorted(synced)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_2"] and (root / "latest").read_text() == "step_2"


# --------------------------------------------------------------------------------------------- refusals


def test_non_finite_loss_stops_the_run(cache, tmp_path):
    rc, log = train(cache, tmp_path / "out", "--loss.name", "simpo", "--optim.lr", "1e30", "--optim.grad_clip", "0",
                    "--max_steps", "5", "--export", "false", nproc=1, timeout=240)
    assert rc != 0 and "non-finite loss at optimizer step" in log
    assert "batch uids [" in log and "metrics {" in log


def test_mismatched_cache_is_refused(cache, tmp_path):
    from fpo_dist.testing import build_llama, build_tokenizer

    other = tmp_path / "other"
    tok = build_tokenizer(vocab_size=400)  # a different tokenizer
    build_llama(other, vocab_size=len(tok), tokenizer=tok)
    rc, log = train(cache, tmp_path / "out", "--policy.name_or_path", str(other), nproc=1, timeout=240)
    assert rc == 2 and "does not match this run" in log and "tokenizer.tokenizer_sha256" in log


def test_step0_check_catches_a_wrong_model(cache, tmp_path):
    from transformers import AutoTokenizer

    from fpo_dist.testing import build_llama

    tok = AutoTokenizer.from_pretrained(cache["tiny"].model_dir)
    wrong = tmp_path / "wrong"
    build_llama(wrong, vocab_size=len(tok), tokenizer=tok, seed=123)  # same tokenizer, other weights
    rc, log = train(cache, tmp_path / "out", "--policy.name_or_path", str(wrong), nproc=1, timeout=240)
    assert rc != 0 and "step-0 check failed" in log and "max |Δ avg logp|" in log


def test_step0_check_catches_a_wrong_hook_layer(cache, tmp_path):
    """A cache whose features came from block 1 but whose provenance says block 0 (a mislabelled cache).  The SAE's
    own hook metadata would give it away before any work (``fpo_dist.resolve``, tested in test_resolve.py), so the
    SAE here is a copy without it, as third-party SAEs often are: the step-0 check is what catches it then."""
    import zarr

    sae = tmp_path / "sae-without-hook"
    shutil.copytree(cache["tiny"].sae_dir, sae)
    sae_cfg = json.loads((sae / "cfg.json").read_text())
    assert sae_cfg["metadata"].pop("hook_name") == "blocks.1.hook_resid_post"
    (sae / "cfg.json").write_text(json.dumps(sae_cfg))
    store = tmp_path / "relabelled"
    shutil.copytree(cache["store"], store)
    group = zarr.open_group(str(store), mode="r+")
    prov = dict(group.attrs["provenance"])
    assert prov["sae"]["layer"] == 1
    prov["sae"] = {**prov["sae"], "layer": 0, "source": str(sae)}
    group.attrs["provenance"] = prov
    rc, log = train({**cache, "store": str(store)}, tmp_path / "out", nproc=1, timeout=240)
    assert rc != 0 and "step-0 check failed" in log and "relative" in log
    assert "max |Δ avg logp| = 0" in log  # the log-probs agree: only the features betray the layer


# --------------------------------------------------------------------------------------------- evaluation


def _eval_records(out: Path) -> list[dict]:
    return [r for r in metrics(out) if "eval/loss" in r]


def _train_records(out: Path) -> list[dict]:
    return [r for r in metrics(out) if "loss" in r]


def test_eval_during_training_two_ranks_equal_one_and_a_single_process_computation(run_a, cache, monkeypatch):
    """--eval_cache/--eval_every on 2 ZeRO-3 ranks: evaluations at step 2 and at the end (3) over all 5 held-out
    pairs; training is unchanged (≡ run_a, which has no evaluation); 1 rank ≡ 2 ranks; the final evaluation equals
    one plain-PyTorch computation over all held-out pairs with the exported policy.  The 1-rank run also reports to
    W&B (offline): its run holds the same train and eval records as metrics.jsonl, the config and run_info."""
    from test_evaluation_loop import _oracle
    from test_tracking import wandb_records

    from fpo_dist.store import open_store
    from fpo_dist.tracking import scalars

    out_a, _ = run_a
    common = ("--max_steps", "3", "--epochs", "2", "--eval_cache", cache["eval_store"], "--eval_every", "2",
              "--eval_batch_size", "2")
    out2, out1 = cache["root"] / "eval_2ranks", cache["root"] / "eval_1rank"
    rc, log = train(cache, out2, *common)
    assert rc == 0, log[-6000:]
    assert "eval at step 2: loss" in log
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rc, log = train(cache, out1, *common, "--grad_accum", "2", "--report_to", "tensorboard,wandb", nproc=1)
    assert rc == 0, log[-6000:]

    for a, b in zip(_train_records(out_a), _train_records(out2), strict=True):  # evaluation changes nothing
        for key in ("loss", "reward_accuracy", "feature_mse_rejected", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (a["step"], key)
    e2, e1 = _eval_records(out2), _eval_records(out1)
    assert [r["step"] for r in e2] == [r["step"] for r in e1] == [2, 3]
    for a, b in zip(e2, e1):
        assert a["eval/n_pairs"] == b["eval/n_pairs"] == N_EVAL
        for key in a:
            if key.startswith("eval/") and key != "eval/time_s":
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    assert abs(e2[0]["eval/loss"] - e2[1]["eval/loss"]) > 1e-6  # the policy moved between the evaluations

    want = _oracle(_load(out2 / "hf"), _sae(cache), open_store(cache["eval_store"]), cache["tiny"].hook_layer, "fpo",
                   {"beta": BETA, "alpha": ALPHA, "k": K})
    for key, value in want.items():
        assert e2[-1][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key

    info = json.loads((out2 / "run_info.json").read_text())["eval"]
    assert info["steps"] == [2, 3] and info["last"] == e2[-1]
    assert info["best"] == min(e2, key=lambda r: r["eval/loss"])
    tags = _tensorboard_tags(out2)
    assert {"train/loss", "eval/loss", "eval/reward_accuracy", "eval/feature_mse_rejected", "eval/topk_overlap"} <= tags

    assert not (out2 / "wandb").exists()  # only where asked for
    wb = wandb_records(out1)
    expected: dict[int, dict] = {}
    for record in metrics(out1):
        expected.setdefault(record["step"], {}).update(scalars(record))
    history = {row["_step"]: {k: v for k, v in row.items() if not k.startswith("_")} for row in wb["history"]}
    assert history.keys() == expected.keys() == {1, 2, 3}
    for step, values in expected.items():
        assert history[step] == pytest.approx(values, rel=1e-9), step
    assert wb["config"]["loss"]["name"] == "fpo" and wb["config"]["eval_cache"] == cache["eval_store"]
    assert wb["summary"]["run_info"]["eval"]["last"]["step"] == 3


def _sae(cache):
    from sae_lens import SAE

    return SAE.load_from_disk(str(cache["tiny"].sae_dir))


def _tensorboard_tags(out: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_an_eval_cache_built_differently_is_refused(cache, tmp_path):
    import zarr

    store = tmp_path / "other_eval"
    shutil.copytree(cache["eval_store"], store)
    group = zarr.open_group(str(store), mode="r+")
    prov = dict(group.attrs["provenance"])
    prov["data"] = {**prov["data"], "max_length": 128}
    group.attrs["provenance"] = prov
    rc, log = train(cache, tmp_path / "out", "--eval_cache", str(store), nproc=1, timeout=240)
    assert rc == 2 and "was not built like the training cache" in log
    assert "data.max_length: training cache 64, eval cache 128" in log


# --------------------------------------------------------------------------------------------- LoRA


LORA = ("--policy.lora.rank", "4", "--policy.lora.alpha", "8", "--policy.lora.target_modules", "q_proj,v_proj,down_proj")


def test_lora_under_zero3_and_zero2_export_and_resume(cache, tiny):
    """A LoRA policy on 2 ZeRO-3 ranks: the step-0 check holds on the unchanged cache (zero-initialised adapters),
    only adapter parameters train, the merged export equals base + adapter merged by peft itself; ZeRO-2 ≡ ZeRO-3;
    a run resumed from step 2 continues exactly."""
    from peft import PeftModel

    root = cache["root"]
    out3 = root / "lora_zero3"
    rc, log = train(cache, out3, *LORA, "--max_steps", "3", "--save_every", "2")
    assert rc == 0, log[-6000:]
    assert "step-0 check: rows" in log and "LoRA adapter" in log
    m3 = metrics(out3)
    assert abs(m3[0]["loss"] - math.log(2)) < 1e-5 and abs(m3[-1]["loss"] - math.log(2)) > 1e-4

    base = _load(tiny.model_dir)
    expected = dict(PeftModel.from_pretrained(_load(tiny.model_dir), str(out3 / "hf" / "adapter")).merge_and_unload()
                    .state_dict())
    merged = _load(out3 / "hf").state_dict()
    assert merged.keys() == expected.keys()
    adapted = ("q_proj.weight", "v_proj.weight", "down_proj.weight")
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6, msg=key)
        if key.endswith(adapted):
            assert not torch.equal(merged[key], base.state_dict()[key]), key  # the adapters moved
        else:
            assert torch.equal(merged[key], base.state_dict()[key]), key  # nothing else did
    info = json.loads((out3 / "run_info.json").read_text())
    n_lora = sum(4 * (m.in_features + m.out_features) for n, m in base.named_modules()
                 if n.endswith(("q_proj", "v_proj", "down_proj")))  # rank × (in + out) per adapted layer
    assert info["lora"]["rank"] == 4 and info["trainable_numel"] == n_lora

    ds2 = root / "zero2_test.json"
    ds2.write_text((ROOT / "ds_configs" / "zero2.json").read_text())
    out2 = root / "lora_zero2"
    rc, log = train({**cache, "ds": str(ds2)}, out2, *LORA, "--max_steps", "3", "--export", "false")
    assert rc == 0, log[-6000:]
    for a, b in zip(m3, metrics(out2), strict=True):
        for key in ("loss", "reward_accuracy", "feature_mse_rejected", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])

    outr = root / "lora_resumed"
    (outr / "checkpoints").mkdir(parents=True)
    shutil.copytree(out3 / "checkpoints" / "step_2", outr / "checkpoints" / "step_2")
    (outr / "checkpoints" / "latest").write_text("step_2")
    rc, log = train(cache, outr, *LORA, "--max_steps", "3", "--resume", "auto", "--export", "false")
    assert rc == 0, log[-6000:]
    assert "resumed from" in log
    a3, r3 = m3[2], metrics(outr)[0]
    assert r3["step"] == 3
    for key in ("loss", "reward_accuracy", "feature_mse_rejected", "grad_norm"):
        assert abs(a3[key] - r3[key]) <= 1e-6 * max(1.0, abs(a3[key])), key


# --------------------------------------------------------------------------------------------- integrity (issue 13)


def test_a_flipped_byte_in_the_cache_stops_training(cache, tmp_path):
    """A byte flipped from outside in a data chunk of shard 1 (one that still decodes: before verify on read, such a
    run trained a whole epoch and exited 0): the run stops before any row of that shard reaches a
    loss, with one line naming the shard, the array and the rows and pointing at ``verify`` (exit 2, no traceback)."""
    store = tmp_path / "flipped"
    shutil.copytree(cache["store"], store)
    from fpo_dist.testing import flip_byte_silently

    flip_byte_silently(store, store / "shards" / "000001" / "token_ids" / "c" / "0", list(range(8, 16)))
    out = tmp_path / "out"
    rc, log = train({**cache, "store": str(store)}, out, "--max_steps", "10", "--export", "false", nproc=1,
                    timeout=240)
    assert rc == 2, log[-4000:]
    line = next(x for x in log.splitlines() if "cache error" in x)
    assert "shard 1 (rows 8..15)" in line and "token_ids" in line and "rows " in line, line
    assert f"python -m fpo_dist.cache verify {store}" in line
    assert "Traceback" not in log
    logged = metrics(out) if (out / "metrics.jsonl").exists() else []
    used = {r for s in (samples(out) if (out / "samples.jsonl").exists() else []) for r in s["rows"]}
    assert not used & set(range(8, 16)) and len(logged) < 10


def test_trainer_resolves_the_sae_before_any_work(cache, tmp_path):
    """A cache whose SAE is a Gemma Scope 2 release this machine has never resolved (no hub: HF_HUB_OFFLINE=1): the
    trainer stops at setup with one line naming the SAE and what to do (exit 2), before loading any model."""
    import zarr

    store = tmp_path / "release-sae"
    shutil.copytree(cache["store"], store)
    group = zarr.open_group(str(store), mode="r+")
    prov = dict(group.attrs["provenance"])
    prov["sae"] = {**prov["sae"], "source": "gemma-scope-2-270m-pt-res", "sae_id": "layer_12_width_16k_l0_medium"}
    group.attrs["provenance"] = prov
    old_home = os.environ.get("HF_HOME")
    os.environ["HF_HOME"] = str(tmp_path / "hf")  # nothing resolved there
    try:
        rc, log = train({**cache, "store": str(store)}, tmp_path / "out", nproc=1, timeout=240)
    finally:
        os.environ.pop("HF_HOME") if old_home is None else os.environ.__setitem__("HF_HOME", old_home)
    assert rc == 2, log[-4000:]
    line = next(x for x in log.splitlines() if "configuration error" in x)
    assert "SAE gemma-scope-2-270m-pt-res / layer_12_width_16k_l0_medium" in line and "HF_HUB_OFFLINE=1" in line
    assert "Traceback" not in log and "step-0 check" not in log


def test_kill_inside_save_checkpoint_resumes_from_the_last_complete_one(run_a, cache, tmp_path):
    """SIGKILL a rank (from outside) while it is inside ``save_checkpoint`` of step 2 (a test-only plugin holds it
    there after the engine files are written): ``--resume auto`` takes step 1, the last complete checkpoint, and
    steps 2-3 equal those of the uninterrupted run_a."""
    import time

    out = tmp_path / "killed"
    marker = tmp_path / "in-save"
    cmd_env = {"FPO_TEST_SLOW_SAVE_TAG": "step_2", "FPO_TEST_SLOW_SAVE_MARKER": str(marker)}
    args = ["--max_steps", "3", "--epochs", "2", "--save_every", "1", "--plugins", "slow_save_plugin"]
    os.environ.update(cmd_env)
    try:
        proc_box = {}

        def watch():  # the kill comes from outside the ranks, once one of them is inside the save
            deadline = time.time() + 400
            while time.time() < deadline and not list(tmp_path.glob("in-save.*")):
                time.sleep(0.1)
            for m in tmp_path.glob("in-save.*"):
                proc_box["killed"] = int(m.read_text())
                os.kill(int(m.read_text()), signal.SIGKILL)
                break

        import threading

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        rc, log = train(cache, out, *args, timeout=420)
        t.join(5)
    finally:
        for k in cmd_env:
            os.environ.pop(k, None)
    assert "killed" in proc_box and rc != 0, log[-4000:]
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_1"  # the half-written step_2 was never named
    assert (ckpt / "step_2").is_dir() and not (ckpt / "step_2" / "fpo_state.json").exists()

    rc, log = train(cache, out, "--max_steps", "3", "--epochs", "2", "--resume", "auto")
    assert rc == 0, log[-6000:]
    assert "resumed from" in log and "step_1: step 1" in log
    resumed = [r for r in metrics(out) if r["step"] >= 2][-2:]
    assert [r["step"] for r in resumed] == [2, 3]
    for a, d in zip(metrics(run_a[0])[1:], resumed):
        for key in ("loss", "reward_accuracy", "feature_mse_rejected", "grad_norm"):
            assert abs(a[key] - d[key]) <= 1e-6 * max(1.0, abs(a[key])), (a["step"], key, a[key], d[key])
    assert (ckpt / "latest").read_text() == "step_3"


def test_a_dead_rank_does_not_leave_the_other_hanging(cache, tmp_path):
    """The launcher and rank 1 are SIGKILLed (by PID, from outside) mid-run, so nothing supervises rank 0 any more:
    rank 0 exits on its own within the dist timeout (``--dist_timeout_s 30``) instead of hanging in a collective."""
    import threading
    import time

    from fpo_dist.cache.reaper import _descendants as walk
    from fpo_dist.cache.reaper import _stat

    out = tmp_path / "orphan"
    result = {}

    def run():
        result["rc"], result["log"] = train(cache, out, "--max_steps", "200", "--epochs", "50", "--export", "false",
                                            "--dist_timeout_s", "30", timeout=400)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and metrics(out)):
        time.sleep(0.2)
    assert (out / "metrics.jsonl").exists(), "training never started"
    # the launcher is the one python child of this process running torch.distributed.run; its children are the ranks
    launcher = next(p for p in walk({os.getpid(): _stat(os.getpid())[1]})
                    if "torch.distributed.run" in Path(f"/proc/{p}/cmdline").read_text(errors="ignore"))
    ranks = {}
    for p in walk({launcher: _stat(launcher)[1]}):
        env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
        rank = next((int(e.split(b"=")[1]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None and "train.py" in Path(f"/proc/{p}/cmdline").read_text(errors="ignore"):
            ranks[rank] = (p, _stat(p)[1])
    assert set(ranks) == {0, 1}, ranks
    os.kill(launcher, signal.SIGKILL)
    os.kill(ranks[1][0], signal.SIGKILL)
    t0 = time.time()
    while time.time() - t0 < 30 + 30 and (st := _stat(ranks[0][0])) is not None and st[1] == ranks[0][1]:
        time.sleep(0.2)
    gone = (st := _stat(ranks[0][0])) is None or st[1] != ranks[0][1]
    t.join(60)
    assert gone, f"rank 0 still running {time.time() - t0:.0f} s after rank 1 died"
    assert len(metrics(out)) < 200



def test_resume_across_zero_and_no_zero_equals_uninterrupted(cache):
    """A run without ZeRO (no --deepspeed: what the README's one-GPU command runs) resumes under ZeRO-3 on 2 ranks,
    and that run's ZeRO-3 checkpoint resumes without ZeRO on 1 process — both through DeepSpeed's universal format
    (fpo-dist writes it for a no-ZeRO checkpoint, which DeepSpeed's converter cannot read) — and a no-ZeRO checkpoint
    resumes as it is on 2 ranks.  Every resumed step equals the uninterrupted run's: the first one checks the
    weights, the second (after an Adam step from the loaded moments) the optimizer state."""
    root = cache["root"]
    one = ("--deepspeed", "", "--grad_accum", "2")  # 1 process × 2 micro-batches = 2 ranks × 1: the same batch
    rc, log = train(cache, root / "plain", "--max_steps", "5", "--save_every", "2", "--keep_last", "3", "--epochs", "2",
                    *one, nproc=1)
    assert rc == 0, log[-6000:]
    plain = root / "plain" / "checkpoints" / "step_2"
    state = json.loads((plain / "fpo_state.json").read_text())
    assert state["zero_stage"] == 0 and state["layout"] == "plain"
    assert "model.embed_tokens.weight" in state["optimizer_params"]
    whole = {r["step"]: r for r in metrics(root / "plain")}
    # a no-ZeRO checkpoint from before the parameter names were recorded cannot be converted: one clear line
    old = root / "old" / "step_2"
    shutil.copytree(plain, old)
    (old / "fpo_state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "optimizer_params"}))
    rc, log = train(cache, root / "from_old", "--max_steps", "3", "--epochs", "2", "--resume", str(old), nproc=1)
    assert rc != 0 and "did not record its optimizer's parameters: resume it without --deepspeed" in log, log[-3000:]
    rows = {s["step"]: s["rows"] for s in samples(root / "plain")}

    cases = [  # (run, checkpoint, extra args, nproc, converted): two steps each
        ("plain_to_zero3", plain, ("--save_every", "3"), 2, True),
        ("zero3_to_plain", root / "plain_to_zero3" / "checkpoints" / "step_3", one, 1, True),
        ("plain_to_plain_2", plain, ("--deepspeed", ""), 2, False),
    ]
    for name, source, extra, nproc, converted in cases:
        last = int(source.name.split("_")[1]) + 2
        rc, log = train(cache, root / name, "--max_steps", str(last), "--epochs", "2", "--resume", str(source),
                        *extra, nproc=nproc)
        assert rc == 0, f"{name}:\n{log[-6000:]}"
        assert ("universal format" in log) == converted, name
        assert "resumed from" in log, name
        resumed = metrics(root / name)
        assert [r["step"] for r in resumed] == [last - 1, last], name
        assert all(s["rows"] == rows[s["step"]] for s in samples(root / name)), name
        # the same pairs, weights and Adam moments; only the summation order of the gradient over ranks / micro-
        # batches differs (fp32): a few ulps of each quantity, far below what one Adam step of lr 5e-3 moves
        for r in resumed:
            for key in ("loss", "reward_accuracy", "feature_mse_rejected", "grad_norm", "lr"):
                want = whole[r["step"]][key]
                assert abs(r[key] - want) <= 1e-5 * max(1.0, abs(want)), (name, r["step"], key, r[key], want)


def test_bf16_resume_across_zero_and_no_zero(cache):
    """bf16 (what a GPU run trains in): a run without ZeRO — DeepSpeed's bf16 wrapper holds the fp32 master weights —
    resumes under ZeRO-3 on 2 ranks and back, through DeepSpeed's universal format, and every resumed step follows
    the uninterrupted bf16 run.  (The masters' exact round trip: test_engine.py.)"""
    root = cache["root"]
    bf16 = ("--dtype", "bfloat16", "--step0_check", "false")  # the cache is fp32; the check refuses it for bf16
    one = ("--deepspeed", "", "--grad_accum", "2", *bf16)
    rc, log = train(cache, root / "bf16_plain", "--max_steps", "5", "--save_every", "2", "--keep_last", "3",
                    "--epochs", "2", *one, nproc=1)
    assert rc == 0, log[-6000:]
    plain = root / "bf16_plain" / "checkpoints" / "step_2"
    state = json.loads((plain / "fpo_state.json").read_text())
    # DeepSpeed's bf16 wrapper takes one optimizer step with zero gradients at set-up: Adam's t runs one ahead of the
    # engine's step, and the conversion must carry t, not the engine's count, for the next update to match
    assert state["layout"] == "plain-bf16" and state["optimizer_step"] == 3, state
    whole = {r["step"]: r for r in metrics(root / "bf16_plain")}
    moved = max(abs(whole[s]["loss"] - whole[1]["loss"]) for s in whole)
    for name, source, extra, nproc in (
        ("bf16_plain_to_zero3", plain, ("--save_every", "3", *bf16), 2),
        ("bf16_zero3_to_plain", root / "bf16_plain_to_zero3" / "checkpoints" / "step_3", one, 1),
    ):
        last = int(source.name.split("_")[1]) + 2
        rc, log = train(cache, root / name, "--max_steps", str(last), "--epochs", "2", "--resume", str(source),
                        *extra, nproc=nproc)
        assert rc == 0, f"{name}:\n{log[-6000:]}"
        assert "universal format" in log and "resumed from" in log, name
        resumed = metrics(root / name)
        assert [r["step"] for r in resumed] == [last - 1, last], name
        # the same pairs, bf16 weights, fp32 masters, moments and t: only the gradient's sum over ranks / micro-
        # batches may round differently, by at most a bf16 ulp (2⁻⁸ relative) of a few weights after a step, which
        # moves these values by far less than 2·10⁻³ (measured on a Xeon: bit-equal losses, grad_norm within 2.2·10⁻⁷
        # relative).  Carrying the engine's step count instead of Adam's t moved the last loss by 5.6·10⁻³ (0.2382
        # → 0.2327), and the loss moves by ~0.45 over the run.
        assert moved > 0.1, whole
        for r in resumed:
            for key in ("loss", "reward_accuracy", "feature_mse_rejected", "grad_norm", "lr"):
                want = whole[r["step"]][key]
                assert abs(r[key] - want) <= 2e-3 * max(1.0, abs(want)), (name, r["step"], key, r[key], want)
