"""The committed real SAE (``docs/results/real-sae``, built by ``make real-sae`` = ``python -m fpo_dist.sae_train``):
what it is, and that it reconstructs Gemma 3 270M's block output on held-out text where the calibrated random SAE
of the same width does not (sae-lens's own ``encode``/``decode``, the model's own forward)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

REAL_SAE = Path(__file__).resolve().parent.parent / "docs" / "results" / "real-sae"


def _fve(sae, x: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        codes = sae.encode(x)
        err = float(((x - sae.decode(codes)) ** 2).sum())
    return 1 - err / float(((x - x.mean(0)) ** 2).sum()), float((codes != 0).sum(-1).float().mean())


def test_the_real_sae_is_what_its_record_says():
    from fpo_dist.sae import load_sae

    record = json.loads((REAL_SAE / "quality.json").read_text())
    sae = load_sae(str(REAL_SAE / "sae"))
    assert type(sae).__name__ == "JumpReLUSAE" and sae.cfg.d_sae >= 4096 and sae.cfg.d_in == 640
    assert sae.cfg.metadata.hook_name == record["sae"]["hook_name"] == "blocks.9.hook_resid_post"
    assert sae.W_enc.dtype == torch.float32  # stored fp16, upcast exactly on load
    assert record["corpus"]["train_tokens"] >= 1_000_000
    q = record["quality"]
    assert q["eval_tokens"] >= 5000 and 0 < q["l0"] < 200 and q["fraction_variance_explained"] > 0.6
    assert q["ce_increase"] < q["ce_zero_ablation"] - q["ce_clean"]


@pytest.mark.realmodel
def test_the_real_sae_reconstructs_held_out_text_and_a_random_one_does_not(gemma_hf_dir):
    """Held-out rows (the build's own split, from one corpus package): the real SAE explains most of the block
    output's variance at its recorded L0; the random SAE calibrated to the same L0 (the contrast the real-shape
    runs used before) explains little of it."""
    from fpo_dist.models import ModelSpec, load_causal_lm, load_tokenizer
    from fpo_dist.sae import load_sae
    from fpo_dist.sae_train import block_outputs, docstring_corpus, is_held_out, token_rows
    from fpo_dist.testing import calibrate_jumprelu_sae

    record = json.loads((REAL_SAE / "quality.json").read_text())
    spec = ModelSpec(str(gemma_hf_dir), dtype="float32")
    model, tok = load_causal_lm(spec), load_tokenizer(spec)
    docs = [d for d in docstring_corpus(("numpy",)) if is_held_out(d)]
    rows = torch.from_numpy(token_rows(tok, docs, 128, 8, seed=0))
    assert rows.shape == (8, 128) and bool((rows[:, 0] == tok.bos_token_id).all())
    x = block_outputs(model, rows, 9)[:, 1:].reshape(-1, 640).float()  # BOS excluded, as in training

    real = load_sae(str(REAL_SAE / "sae"))
    fve, l0 = _fve(real, x)
    assert fve > 0.6, fve
    assert 0.5 * record["quality"]["l0"] < l0 < 2 * record["quality"]["l0"], (l0, record["quality"]["l0"])

    random_sae, _ = calibrate_jumprelu_sae(model, rows, torch.ones_like(rows), 9, d_sae=real.cfg.d_sae,
                                           target_l0=record["quality"]["l0"])
    random_fve, _ = _fve(random_sae, x)
    assert random_fve < fve - 0.3, (random_fve, fve)
    assert np.isfinite(random_fve)
