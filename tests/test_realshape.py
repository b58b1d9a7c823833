"""Gemma 3 270M (real weights) with a Gemma-Scope-shaped SAE (d_in 640, d_sae 16,384, JumpReLU calibrated to
L0 ≈ 50–100 per token at block 9), end to end, in fp32 and in bf16: the Ray cache job → FPO under ZeRO-3 on 2 CPU
ranks (every large parameter partitioned; bf16 is DeepSpeed's bf16 mode, the path every GPU run takes) → HF
export → transformers reloads the export and generates.  Short sequences and 2 steps, to fit CI's budget.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from test_train import metrics, train  # the real launcher (torchrun, own process group)

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

LAYER = 9
ROWS = [
    {"prompt": "The capital of France is", "chosen": " Paris, a city on the Seine.", "rejected": " a banana."},
    {"prompt": "Two plus two equals", "chosen": " four.", "rejected": " twenty-two, said the cat."},
    {"prompt": "The sky on a clear day is", "chosen": " blue.", "rejected": " made of green cheese."},
    {"prompt": "Water boils at sea level at", "chosen": " 100 degrees Celsius.", "rejected": " midnight."},
]
CALIBRATION = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "In 1905 Albert Einstein published four papers that changed physics, including special relativity.",
    "To make bread, mix flour, water, salt and yeast, knead the dough and let it rise for an hour.",
    "The stock market fell sharply on Monday after the central bank raised interest rates again.",
    "She opened the old wooden door and found a garden full of roses, tulips and tall sunflowers.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
]


@pytest.fixture(scope="module")
def realshape(gemma_hf_dir, tmp_path_factory):
    """The calibrated SAE, the data file and a ZeRO-3 config (the project's template)."""
    from fpo_dist.models import ModelSpec, load_causal_lm, load_tokenizer
    from fpo_dist.testing import calibrate_jumprelu_sae

    root = tmp_path_factory.mktemp("realshape")
    spec = ModelSpec(str(gemma_hf_dir), dtype="float32")
    model, tok = load_causal_lm(spec), load_tokenizer(spec)
    # ~1,000 tokens: the six sentences in eight orders (other contexts, other activations)
    texts = [" ".join(CALIBRATION[(i + j) % 6] for j in range(6)) if i < 6 else " ".join(reversed(CALIBRATION[i - 6:] + CALIBRATION[:i - 6])) for i in range(8)]
    enc = tok(texts, return_tensors="pt", padding=True)
    _, l0 = calibrate_jumprelu_sae(model, enc.input_ids, enc.attention_mask, LAYER, d_sae=16384, target_l0=85,
                                   out_dir=root / "sae")
    del model
    assert 50 <= l0 <= 100, l0
    data = root / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    return {"root": root, "model": str(gemma_hf_dir), "sae": str(root / "sae"), "data": str(data),
            "ds": str(os.path.join(os.path.dirname(__file__), "..", "ds_configs", "zero3.json"))}


def _cache(rs: dict, dtype: str) -> str:
    import ray

    from fpo_dist.cache.driver import run_cache_job
    from fpo_dist.config import CacheConfig, load_config

    out = rs["root"] / f"store-{dtype}"
    if not (out / "zarr.json").exists():
        cfg = load_config(CacheConfig, None, [
            "--model.name_or_path", rs["model"], "--model.dtype", dtype, "--sae.source", rs["sae"],
            "--sae.layer", str(LAYER), "--data.source", rs["data"], "--output", str(out), "--rows_per_shard", "4",
            "--chunk_rows", "4", "--workers", "1", "--device", "cpu", "--batch_size", "4",
            "--data.max_length", "48", "--data.max_prompt_length", "24",
        ])
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            run_cache_job(cfg, log=lambda *_: None)
        finally:
            ray.shutdown()
    return str(out)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemma3_cache_zero3_fpo_export_generate(realshape, dtype):
    rs = realshape
    cache = {"store": _cache(rs, dtype), "ds": rs["ds"]}
    out = rs["root"] / f"run-{dtype}"
    rc, log = train(cache, out, "--dtype", dtype, "--micro_batch_size", "1", "--max_steps", "2", "--loss.k", "16", "--optim.lr", "1e-6",
                    "--step0_rows", "2", timeout=600)
    assert rc == 0, log[-6000:]
    assert "step-0 check:" in log and "resident models:" in log
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records), records
    info = json.loads((out / "run_info.json").read_text())
    assert info["dtype"] == dtype and info["zero_stage"] == 3 and info["reference_model_resident"] is False
    (policy,) = info["resident_models"]
    assert policy["local_numel"] < 0.6 * policy["numel"]  # really partitioned over the 2 ranks

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "hf")
    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=getattr(torch, dtype))
    assert model.dtype == getattr(torch, dtype)
    enc = tok("The capital of France is", return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == enc.input_ids.shape[1] + 4
    assert tok.decode(gen[0, enc.input_ids.shape[1]:]).strip()


def test_fp32_cache_for_a_bf16_run_names_both_dtypes(realshape):
    """The step-0 check refuses an fp32 cache for a bf16 run and says that the dtypes differ."""
    rs = realshape
    cache = {"store": _cache(rs, "float32"), "ds": rs["ds"]}
    rc, log = train(cache, rs["root"] / "mismatch", "--dtype", "bfloat16", "--micro_batch_size", "1",
                    "--max_steps", "1", "--step0_rows", "2", "--export", "false", nproc=1, timeout=300)
    assert rc != 0
    assert "step-0 check failed" in log
    assert "computed in float32 and this run computes in bfloat16" in log, log[-3000:]
