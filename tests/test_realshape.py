"""Gemma 3 270M (real weights) with the real SAE (``docs/results/real-sae``: a JumpReLU SAE 640×4,096 on block 9
trained with sae-lens's trainer, ``make real-sae``), end to end, in fp32 and in bf16: the Ray cache job → FPO under ZeRO-3 on 2 CPU
ranks (every large parameter partitioned; bf16 is DeepSpeed's bf16 mode, the path every GPU run takes) → HF
export → transformers reloads the export and generates.

Sized for CI (2 cores): 4 short pairs, 1 pair per rank, 2 steps; both caches (fp32, bf16;
one Ray session) are built once for the module; the runs write no optimizer checkpoint (``--save_final false``:
~3 GB at this size), step torch's fused AdamW (``--optim.fused``: the default per-tensor loop spends 14-23 s creating
each rank's optimizer state here, bench/optimizer.py) and only the bf16 run exports (the fp32 run proves the rest
of the path in fp32).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from test_train import metrics, train  # the real launcher (torchrun, own process group)

from fpo_dist.testing import assert_codes_close

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

LAYER = 9
LR = 1e-6  # a pretrained model: the suite's tiny-model learning rate would blow it up
ROWS = [
    {"prompt": "The capital of France is", "chosen": " Paris, a city on the Seine.", "rejected": " a banana."},
    {"prompt": "Two plus two equals", "chosen": " four.", "rejected": " twenty-two, said the cat."},
    {"prompt": "The sky on a clear day is", "chosen": " blue.", "rejected": " made of green cheese."},
    {"prompt": "Water boils at sea level at", "chosen": " 100 degrees Celsius.", "rejected": " midnight."},
]
REAL_SAE = os.path.join(os.path.dirname(__file__), "..", "docs", "results", "real-sae", "sae")


def _pairs(tok):
    from fpo_dist.data import TokenizedPair

    def ids(text, special=False):
        return tuple(tok(text, add_special_tokens=special).input_ids)

    eos = (tok.eos_token_id,)
    return [TokenizedPair(i, bytes(16), ids(r["prompt"], True), ids(r["chosen"]) + eos, ids(r["rejected"]) + eos)
            for i, r in enumerate(ROWS)]


def _attention(model, impl: str):
    """Switch the loaded model between transformers' sdpa (padded rows) and varlen (packed rows, as the cache job
    and the trainer run them) without a second copy of it in memory."""
    from fpo_dist.attention import enable_varlen

    if impl == "varlen":
        enable_varlen(model)
    else:
        model.set_attn_implementation(impl)
    return model


def _reference_pass_both_ways(model, tok, sae) -> dict:
    """The cache worker's computation on ROWS: the output layer at selected positions and full logits (padded,
    transformers' sdpa), and the selected head on the packed layout with varlen attention (what the cache job runs)."""
    from fpo_dist.cache.worker import reference_pass

    pairs = _pairs(tok)
    _attention(model, "sdpa")
    out = {mode: reference_pass(model, sae, LAYER, pairs, tok.pad_token_id, batch_size=4, logits=mode, layout="padded")
           for mode in ("selected", "materialized")}
    for layout in ("packed", "shared"):
        out[layout] = reference_pass(_attention(model, "varlen"), sae, LAYER, pairs, tok.pad_token_id, batch_size=4,
                                     layout=layout)
    with torch.no_grad():  # the scale of the log-prob comparisons: the largest |logit| at a predicting position
        out["max_logit"] = max(float(model(input_ids=torch.tensor([p.prompt_ids + r]), use_cache=False)
                                     .logits[0, len(p.prompt_ids) - 1 : -1].abs().max())
                               for p in pairs for r in (p.chosen_ids, p.rejected_ids))
    return out


def _assert_logps_close(a, b, n_tokens, max_logit: float, depth: int, msg: str) -> None:
    """Summed response log-probs equal up to rounding (fpo_dist.testing.rounding_tolerance): a token's
    ``z_y − logsumexp(z)`` moves by at most 2·max|Δz|, so the scale is 2·max|logit|·tokens."""
    from fpo_dist.testing import assert_rounding_close

    assert_rounding_close(torch.tensor(a), torch.tensor(b), dtype=torch.float32, depth=depth,
                          scale=2 * max_logit * torch.tensor(n_tokens, dtype=torch.float64), msg=msg)


# continuous metrics only: reward_accuracy and topk_overlap jump when a margin or a rank crosses a tie, and at
# policy == reference (here) every reward margin sits at 0 ± rounding
_CONTINUOUS = ("loss", "rewards_chosen", "rewards_rejected", "margin", "reward_margin", "logps_chosen", "logps_rejected",
               "feature_mse_chosen", "feature_mse_rejected", "kl_chosen", "kl_rejected")


def _every_loss_both_layouts(model, tok, sae, cached) -> dict:
    """For every registered loss, on 2 of ROWS: loss, metrics and gradients with the packed and shared layouts
    (varlen) and the padded one (sdpa), kept as summaries (the gradients of 9 blocks would hold GBs).  Gradients w.r.t. the blocks
    from LAYER on and the final norm: the 262k-row embedding/head is frozen here, so the backward stays cheap; it
    still runs through the selected-position head, the SAE hook and 9 blocks."""
    from dataclasses import replace

    from test_packing import _micro_batch

    from fpo_dist.forward import LossContext
    from fpo_dist.losses import LOSSES
    from fpo_dist.models import build_batch

    pairs = _pairs(tok)[:2]
    params = [p for n, p in model.named_parameters()
              if n.startswith("model.norm") or any(n.startswith(f"model.layers.{i}.") for i in range(LAYER, 18))]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    ref_logps = torch.tensor([p[0] for p in cached.logp_sum[:2]] + [p[1] for p in cached.logp_sum[:2]])
    dense = torch.zeros(4, sae.cfg.d_sae)
    for j, pair in enumerate(cached.pooled[:2]):
        for side, (idx, val) in enumerate(pair):
            # 0.99 × the cached codes: at c̄ref = c̄θ FPO's feature term has zero gradient up to rounding, and comparing
            # it between layouts compares noise with noise (measured 4.1·10⁻⁴ of the gradient scale on a Xeon); 1 %
            # off, its gradient is real and the layouts agree to 1.8·10⁻⁵ of it, as the other losses do
            dense[side * 2 + j, torch.as_tensor(idx).long()] = 0.99 * torch.as_tensor(val)
    ntok = torch.tensor(cached.n_tokens[:2])
    out = {}
    for name, spec in LOSSES.items():
        if spec.needs_ref_topm:  # offline TDPO: the same layouts and head as tdpo1/tdpo2 (test_packing.py, tiny model)
            continue
        runs = {}
        for layout, impl in (("packed", "varlen"), ("shared", "varlen"), ("padded", "sdpa")):
            mb = replace(_micro_batch(build_batch(pairs, tok.pad_token_id, layout), ref_logps, dense), ref_n_tokens=ntok)
            ctx = LossContext(spec, {**spec.hyper_parameters, **({"k": 16} if name == "fpo" else {})}, sae=sae,
                              layer=LAYER, reference=_attention(model, impl))
            loss, metrics = ctx(model, mb)
            runs[layout] = (float(loss.detach()), {k: float(v) for k, v in metrics.items() if k in _CONTINUOUS},
                            torch.autograd.grad(loss, params))
        l_pd, m_pd, g_pd = runs["padded"]
        out[name] = {layout: {"loss": (runs[layout][0], l_pd), "metrics": (runs[layout][1], m_pd),
                              "grad_scale": max(float(g.abs().max()) for g in g_pd),
                              "grad_diff": max(float((a - b).abs().max()) for a, b in zip(runs[layout][2], g_pd))}
                     for layout in ("packed", "shared")}
        del runs
    for p in model.parameters():
        p.requires_grad_(False)
    return out


@pytest.fixture(scope="module")
def realshape(gemma_hf_dir, tmp_path_factory):
    """The real SAE, the data file, a ZeRO-3 config (the project's template), and the cache worker's reference pass
    on ROWS both ways (computed here, while the model is loaded)."""
    from fpo_dist.models import ModelSpec, load_causal_lm, load_tokenizer
    from fpo_dist.sae import load_sae

    root = tmp_path_factory.mktemp("realshape")
    spec = ModelSpec(str(gemma_hf_dir), dtype="float32")
    model, tok = load_causal_lm(spec), load_tokenizer(spec)
    sae = load_sae(REAL_SAE)
    both_ways = _reference_pass_both_ways(model, tok, sae)
    layouts = _every_loss_both_layouts(model, tok, sae, both_ways["packed"])
    del model, sae
    data = root / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    return {"root": root, "model": str(gemma_hf_dir), "sae": REAL_SAE, "data": str(data),
            "ds": str(os.path.join(os.path.dirname(__file__), "..", "ds_configs", "zero3.json")),
            "both_ways": both_ways, "layouts": layouts}


@pytest.fixture(scope="module")
def caches(realshape) -> dict[str, str]:
    """Both caches (fp32 and bf16), built by the Ray cache job in one Ray session."""
    import ray

    from fpo_dist.cache.driver import run_cache_job
    from fpo_dist.config import CacheConfig, load_config

    rs, out = realshape, {}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        for dtype in ("float32", "bfloat16"):
            out[dtype] = str(rs["root"] / f"store-{dtype}")
            cfg = load_config(CacheConfig, None, [
                "--model.name_or_path", rs["model"], "--model.dtype", dtype, "--sae.source", rs["sae"],
                "--sae.layer", str(LAYER), "--data.source", rs["data"], "--output", out[dtype], "--rows_per_shard",
                "4", "--chunk_rows", "4", "--workers", "1", "--device", "cpu", "--batch_size", "4",
                "--data.max_length", "48", "--data.max_prompt_length", "24",
            ])
            run_cache_job(cfg, log=lambda *_: None)
    finally:
        ray.shutdown()
    return out


def test_gemma3_cache_selected_equals_materialized(realshape):
    """The cache worker's reference pass with the output layer at selected positions ≡ full logits, on Gemma 3
    270M (262k vocabulary, tied head) and the real 4k SAE: log-prob sums within fp32 tolerance, the same
    token counts and pooled codes (the same block output feeds both)."""
    sel, mat = realshape["both_ways"]["selected"], realshape["both_ways"]["materialized"]
    assert sel.n_tokens == mat.n_tokens
    # the same padded batch through the same blocks: only the output layer (matmul, log-softmax) differs → depth 2;
    # bound 2·8·eps·2·max|logit| ≈ 1·10⁻⁴ per token (max|logit| ≈ 24; measured 0 on a Xeon): a wrong position or
    # token in the selected head moves a log-prob by ≫ 10⁻² and fails it
    _assert_logps_close(sel.logp_sum, mat.logp_sum, sel.n_tokens, realshape["both_ways"]["max_logit"], 2,
                        "selected vs materialized log-prob sums")
    assert all(-200 < v < -1 for pair in mat.logp_sum for v in pair), mat.logp_sum  # real log-probs
    for a, b in zip(sel.pooled, mat.pooled):
        for (ia, va), (ib, vb) in zip(a, b):
            assert len(ia) > 50 and (ia == ib).all()
            # the one block output feeds both: the same ops on the same shapes, deterministic on any CPU
            torch.testing.assert_close(torch.as_tensor(va), torch.as_tensor(vb), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_gemma3_cache_packed_equals_padded(realshape, layout):
    """The cache worker on the packed and the shared layout (the cache job's default; Gemma 3's sliding-window and
    global layers get their mask from the position_ids, the rejected tokens' windows reaching into the one shared
    prompt) ≡ the padded layout."""
    pk, pd = realshape["both_ways"][layout], realshape["both_ways"]["selected"]
    assert pk.n_tokens == pd.n_tokens
    # other attention kernels and shapes through all 18 blocks and the head → depth 19: bound 8·19·eps·2·max|logit|
    # ≈ 9·10⁻⁴ per token (measured sums within 1.7·10⁻⁵ on a Xeon with AMX); one token attending to the other
    # sequence of its pack moves its log-prob by ≫ 10⁻²
    _assert_logps_close(pk.logp_sum, pd.logp_sum, pk.n_tokens, realshape["both_ways"]["max_logit"], 19,
                        f"{layout} vs padded log-prob sums")
    # blocks 0-9 and the SAE encoder → depth 11, per vector 1.0·10⁻⁵ of its largest entry (~100-320: ≤ 3·10⁻³;
    # measured ≤ 1.8·10⁻⁴), threshold flips aside
    assert_codes_close(pk.pooled, pd.pooled, dtype=torch.float32, depth=LAYER + 2, min_support=51,
                       msg=f"{layout} vs padded pooled codes")


@pytest.mark.parametrize("layout", ["packed", "shared"])
@pytest.mark.parametrize("name", ["fpo", "dpo", "simpo", "dpo-online", "tdpo1", "tdpo2"])
def test_gemma3_every_loss_packed_equals_padded(realshape, name, layout):
    """Loss, continuous metrics and gradients (blocks 9-17 and the final norm) of every loss on Gemma 3 270M:
    packed and shared (varlen attention) ≡ padded (transformers' sdpa), fp32."""
    r = realshape["layouts"][name][layout]
    # Losses and metrics are scale-free values of order 10⁻⁶-30 computed from the log-probs and codes above: rel/abs
    # 10⁻⁴ / 10⁻³ (measured ≤ 2·10⁻⁵ relative on a Xeon with AMX).  Gradients: ≤ 10⁻³ of the largest entry, relative
    # to the magnitude but wider than rounding_tolerance's rule (8·29·eps ≈ 3·10⁻⁵ for 18 blocks forward, head and 9
    # blocks back), which does not cover the cancelling 262k-term sums of the head's backward; measured ≤ 1.8·10⁻⁵
    # of the scale for every loss (FPO with reference codes 1 % off: see _every_loss_both_layouts).  A gradient
    # through a wrong mask, a wrong block or another sequence differs by O(1) of the scale.
    (l_pk, l_pd), (m_pk, m_pd) = r["loss"], r["metrics"]
    assert math.isfinite(l_pd) and l_pk == pytest.approx(l_pd, rel=1e-4, abs=1e-4)
    assert m_pk.keys() == m_pd.keys() and m_pd
    for key in m_pd:
        assert m_pk[key] == pytest.approx(m_pd[key], rel=1e-3, abs=1e-3), key
    assert r["grad_scale"] > 0 and r["grad_diff"] <= 1e-3 * r["grad_scale"], r


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemma3_cache_zero3_fpo_export_generate(realshape, caches, dtype):
    rs = realshape
    export = dtype == "bfloat16"  # one export is enough: the fp32 run proves the rest of the path in fp32
    out = rs["root"] / f"run-{dtype}"
    rc, log = train({"store": caches[dtype], "ds": rs["ds"]}, out, "--dtype", dtype, "--micro_batch_size", "1",
                    "--max_steps", "2", "--loss.k", "16", "--optim.lr", str(LR), "--step0_rows", "2",
                    "--save_final", "false", "--export", str(export).lower(), "--optim.fused", "true", timeout=600)
    assert rc == 0, log[-6000:]
    assert "step-0 check:" in log and "resident models:" in log
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records), records
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == LR  # the later --optim.lr wins
    assert LR / 10 < records[0]["lr"] <= LR, records[0]["lr"]  # and is the one applied
    info = json.loads((out / "run_info.json").read_text())
    assert info["dtype"] == dtype and info["zero_stage"] == 3 and info["reference_model_resident"] is False
    assert info["policy_shape"] == {"d_model": 640, "vocab": 262144, "tied_head": True}  # read under ZeRO-3
    (policy,) = info["resident_models"]
    assert policy["local_numel"] < 0.6 * policy["numel"]  # really partitioned over the 2 ranks
    assert not (out / "checkpoints").exists()  # --save_final false: no optimizer checkpoint written
    if not export:
        assert not (out / "hf").exists()
        return

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "hf")
    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=getattr(torch, dtype))
    assert model.dtype == getattr(torch, dtype)
    enc = tok("The capital of France is", return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == enc.input_ids.shape[1] + 4
    assert tok.decode(gen[0, enc.input_ids.shape[1]:]).strip()


def test_fp32_cache_for_a_bf16_run_names_both_dtypes(realshape, caches):
    """The step-0 check refuses an fp32 cache for a bf16 run and says that the dtypes differ."""
    rs = realshape
    rc, log = train({"store": caches["float32"], "ds": rs["ds"]}, rs["root"] / "mismatch", "--dtype", "bfloat16",
                    "--micro_batch_size", "1", "--max_steps", "1", "--step0_rows", "2", "--export", "false",
                    nproc=1, timeout=300)
    assert rc != 0
    assert "step-0 check failed" in log
    assert "computed in float32 and this run computes in bfloat16" in log, log[-3000:]
