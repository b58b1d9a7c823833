"""On a GPU: what the CPU suite checks of the selected-position output layer, prefix sharing, the cache worker and the
step-0 check, on CUDA (``-m gpu``; skipped without CUDA; ``bench/gpu_session.sh`` runs them on a lent GPU with the
kit).  The fused attention kernels on CUDA: test_attention_kernels.py.

- the selected head ≡ the materialized logits (fp64 to 1e-10 with every gradient; fp32 with every gradient and bf16
  values within rounding), as test_lm_head.py on the CPU; a tied head's gradient in one buffer ≡ autograd's;
- the shared-prefix layout ≡ the packed one (fp32 and bf16, within rounding), as test_prefix_sharing.py;
- the cache worker's reference pass on the GPU ≡ on the CPU (fp32: log-prob sums, per-token log-probs and pooled
  codes within rounding, threshold flips aside);
- the trainer on the GPU passes its step-0 check against a cache the cache job computed on the CPU (fp32), and
  trains two steps (``slow``: the GPU session runs it last, after the bench).

Their logic was rehearsed on the CPU (the device swapped to ``cpu``): all pass; on CUDA they have not run yet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_lm_head import _batch, _materialized, _models, _selected, check_tied_gradient_in_one_buffer
from test_packing import VOCAB, _model, _pairs

from fpo_dist.models import build_batch
from fpo_dist.testing import assert_codes_close, assert_rounding_close, build_sae

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("kind", ["llama-untied", "gemma-tied-softcap", "gemma-untied-softcap"])
def test_selected_head_equals_materialized_on_gpu_fp64(kind):
    """fp64 on CUDA: log-prob sums, TDPO's KL and every parameter gradient to rounding (the CPU test's bounds): the
    positions, targets and scatter of the chunked head are right on the device."""
    model = _models(kind, 0).double().cuda().requires_grad_(True)
    ref = _models(kind, 1).double().cuda()
    ids, att, resp = (t.cuda() for t in _batch())
    w = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64, device="cuda")
    lp_a, kl_a, g_a = _materialized(model, ref, ids, att, resp, w)
    lp_b, kl_b, g_b, _ = _selected(model, ref, ids, att, resp, w, chunk=3)
    torch.testing.assert_close(lp_b, lp_a, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(kl_b, kl_a, rtol=1e-12, atol=1e-10)
    assert float(kl_a.detach().abs().min()) > 1e-3
    for (name, _), a, b in zip(model.named_parameters(), g_a, g_b):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama-untied", "gemma-tied-softcap"])
def test_selected_head_equals_materialized_on_gpu(kind, dtype):
    """fp32 and bf16 on CUDA (the model's matmuls in its dtype, the log-softmax in fp32): per-sequence log-prob sums
    within rounding of the materialized logits (the CPU test's per-token bounds: 2e-4 fp32, 5e-2 bf16); in fp32 also
    every parameter gradient within rounding of its tensor's scale."""
    model = _models(kind, 0).to("cuda", dtype).requires_grad_(True)
    ref = _models(kind, 1).to("cuda", dtype)
    ids, att, resp = (t.cuda() for t in _batch())
    w = torch.tensor([1.0, -2.0, 0.5, 3.0], device="cuda")
    lp_a, kl_a, g_a = _materialized(model, ref, ids, att, resp, w)
    lp_b, kl_b, g_b, _ = _selected(model, ref, ids, att, resp, w, chunk=3)
    per_token = 2e-4 if dtype == torch.float32 else 5e-2
    tokens = float(resp.sum(-1).max())
    torch.testing.assert_close(lp_b.float(), lp_a.float(), rtol=0, atol=per_token * tokens)
    torch.testing.assert_close(kl_b.float(), kl_a.float(), rtol=0, atol=per_token * tokens)
    if dtype == torch.float32:  # 2 blocks, the head and the loss, forward and back
        for (name, _), a, b in zip(model.named_parameters(), g_a, g_b):
            assert_rounding_close(b, a, dtype=dtype, depth=8, dim=None, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama-tied", "gemma-tied-softcap"])
def test_tied_embedding_gradient_in_one_buffer_on_gpu(kind, dtype, monkeypatch):
    """The tied head's weight gradient in one buffer on CUDA (the embedding's rows added with ``index_add_``, atomics
    there): every gradient within a few roundings of autograd's own, one ``[vocab, d]`` tensor created."""
    check_tied_gradient_in_one_buffer(kind, dtype, "cuda", monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_shared_equals_packed_on_gpu(kind, dtype):
    """The cache worker's values (log-prob sums, per-token log-probs, pooled codes) under the shared-prefix layout
    within rounding of the packed layout's, on CUDA; prompt + chosen is one causal segment in both: equal sums."""
    from fpo_dist.scoring import score_batch

    model = _model(kind, "varlen", dtype=dtype).cuda()
    sae = build_sae(d_in=model.config.hidden_size, d_sae=96, hook_layer=1, threshold=0.1).to("cuda", dtype)
    pairs = _pairs(6, seed=5)
    with torch.no_grad():
        out = {layout: score_batch(model, build_batch(pairs, 0, layout).to("cuda"), sae, 1)
               for layout in ("shared", "packed")}
    a, b = out["shared"], out["packed"]
    assert torch.equal(a.n_tokens, b.n_tokens) and torch.equal(a.sequences, b.sequences)
    assert_rounding_close(a.token_logps, b.token_logps, dtype=dtype, depth=3, dim=None, msg="token logps")
    assert_rounding_close(a.pooled, b.pooled, dtype=dtype, depth=3, dim=None, msg="pooled codes")
    chosen = slice(0, len(pairs))
    assert_rounding_close(a.logp_sum[chosen], b.logp_sum[chosen], dtype=dtype, depth=3, dim=None, msg="chosen sums")


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_cache_reference_pass_on_gpu_equals_on_cpu(kind):
    """The cache worker's reference pass (shared-prefix rows, the cache job's default) on CUDA ≡ on the CPU, fp32:
    the same token counts, log-prob sums and per-token log-probs within rounding of 2·max|logit| through the
    blocks and the head, pooled SAE codes within rounding of each vector's largest entry (threshold flips aside)."""
    from fpo_dist.cache.worker import reference_pass
    from fpo_dist.data import TokenizedPair

    g = torch.Generator().manual_seed(5)

    def ids(n):
        return tuple(torch.randint(3, VOCAB, (n,), generator=g).tolist())

    pairs = [TokenizedPair(i, bytes(16), ids(2 + i % 4), ids(1 + (3 * i) % 7), ids(2 + (5 * i) % 6)) for i in range(9)]
    out = {}
    for device in ("cpu", "cuda"):
        model = _model(kind, "varlen", dtype=torch.float32).to(device).eval()
        sae = build_sae(d_in=model.config.hidden_size, d_sae=96, hook_layer=1, threshold=0.05).to(device)
        out[device] = reference_pass(model, sae, 1, pairs, pad_id=0, batch_size=4, per_token_logps=True,
                                     layout="shared")
    with torch.no_grad():  # the same weights (same seed) with transformers' own attention, one pair at a time
        plain = _model(kind, "sdpa", dtype=torch.float32).eval()
        max_logit = max(float(plain(input_ids=torch.tensor([p.prompt_ids + r])).logits.abs().max())
                        for p in pairs for r in (p.chosen_ids, p.rejected_ids))
    cpu, gpu = out["cpu"], out["cuda"]
    assert cpu.n_tokens == gpu.n_tokens == [(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    depth = model.config.num_hidden_layers + 2
    tokens = max(n for pair in cpu.n_tokens for n in pair)
    assert_rounding_close(gpu.logp_sum, cpu.logp_sum, dtype=torch.float32, depth=depth, dim=None,
                          scale=2 * max_logit * tokens, msg="log-prob sums")
    for a, b in zip(gpu.token_logps, cpu.token_logps):
        for x, y in zip(a, b):
            assert_rounding_close(x, y, dtype=torch.float32, depth=depth, dim=None, scale=2 * max_logit,
                                  msg="per-token log-probs")
    assert_codes_close(gpu.pooled, cpu.pooled, dtype=torch.float32, depth=3, msg="pooled codes")
    assert sum(len(i) for pair in cpu.pooled for i, _ in pair) > 0  # the SAE fired


@pytest.mark.slow
def test_step0_check_and_a_step_on_gpu_against_a_cpu_cache(tiny, tmp_path):
    """The cache job on the CPU (Ray, 1 worker, fp32), then the trainer on the GPU without ZeRO: its step-0 check
    reproduces the cached log-probs and pooled codes on CUDA, and it trains two finite steps."""
    import ray

    from fpo_dist.cache.driver import run_cache_job
    from fpo_dist.testing import tiny_cache_config, toy_pairs

    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in toy_pairs(8)))
    cfg = tiny_cache_config(tiny, data, tmp_path / "store", workers=1)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        run_cache_job(cfg, log=lambda *_: None)
    finally:
        ray.shutdown()
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "DS_ACCELERATOR"):
        env.pop(var, None)
    p = subprocess.run([sys.executable, str(ROOT / "launchers" / "train.py"), "--cache", str(tmp_path / "store"),
                        "--deepspeed", "", "--output_dir", str(out), "--dtype", "float32", "--micro_batch_size", "2",
                        "--max_steps", "2", "--loss.name", "fpo", "--loss.k", "8", "--export", "false",
                        "--save_final", "false"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-6000:]
    assert "step-0 check:" in log and "step-0 check failed" not in log, log[-3000:]
    info = json.loads((out / "run_info.json").read_text())
    assert info["device"].startswith("cuda") and info["dtype"] == "float32", info  # on the GPU, as the cache's dtype
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
