"""fpo_dist.drift and its use by fpo_dist.evaluate: the listed latents are the ones that were moved."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fpo_dist.drift import (
    drift_table,
    neuronpedia_url,
    overlap,
    plot_drift_comparison,
    read_drift,
    top_ids,
)

# ----------------------------------------------------------------------------------------- pure


def test_drift_table_ranks_by_absolute_change():
    ref = torch.tensor([1.0, 0.0, 2.0, 0.5, 3.0, 0.0])
    pol = torch.tensor([1.0, 0.75, 1.0, 0.5, 3.75, 0.0])  # latent 2: −1, latents 1 and 4: +0.75 (a tie), rest 0
    rows = drift_table(ref, pol, top=10)
    assert top_ids(rows) == [2, 1, 4]  # unmoved latents are never listed; the tie keeps id order
    assert rows[0] == {"id": 2, "reference_mean": 2.0, "policy_mean": 1.0, "change": -1.0}
    assert rows[2]["change"] == 0.75
    assert top_ids(drift_table(ref, pol, top=1)) == [2]
    with pytest.raises(ValueError, match="same latents"):
        drift_table(ref, pol[:3])


def test_overlap_and_neuronpedia_url():
    assert overlap([1, 2, 3, 4], [3, 4, 5, 6]) == 0.5
    assert overlap([9], [1, 2]) == 0.0 and overlap([2, 1], [1, 2]) == 1.0
    assert neuronpedia_url("gemma-2-2b/25-gemmascope-res-16k", 1234) == (
        "https://www.neuronpedia.org/gemma-2-2b/25-gemmascope-res-16k/1234"
    )
    assert neuronpedia_url(None, 3) is None


def test_comparison_plot(tmp_path):
    tables = {"fpo": [{"id": 1, "change": 0.5}, {"id": 2, "change": -0.2}], "dpo": [{"id": 2, "change": 0.3}]}
    assert plot_drift_comparison(tables, tmp_path / "cmp.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------- constructed drift

MOVES = {5: 8.0, 11: -5.0, 2: 3.0}  # latent -> the shift of its pre-activation in the policy


@pytest.fixture(scope="module")
def constructed(tmp_path_factory):
    """A reference Llama whose hooked block's MLP has a (zero) output bias, a policy equal to it except that bias
    is ``v`` — so at every position the policy's block-ℓ output is the reference's plus ``v`` exactly — and a
    ReLU SAE with orthonormal encoder columns, ``v = Σ_j a_j W_enc[:, j]`` over the latents ``j`` of ``MOVES``.
    Then exactly those latents' pre-activations shift by ``a_j``; their large encoder bias keeps them active, so
    their mean pooled activation changes by exactly ``a_j``; every other latent is unchanged."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from fpo_dist.testing import build_tokenizer

    root = tmp_path_factory.mktemp("drift")
    tok = build_tokenizer()
    d, layer = 32, 1
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, mlp_bias=True, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for block in reference.model.layers:
            for lin in (block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
                lin.bias.zero_()
    sae_cfg = StandardSAEConfig(d_in=d, d_sae=16)
    sae_cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    sae_cfg.metadata.neuronpedia_id = "tiny/1-res-16"
    sae = StandardSAE(sae_cfg)
    g = torch.Generator().manual_seed(1)
    w_enc = torch.linalg.qr(torch.randn(d, 16, generator=g)).Q  # orthonormal columns
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_enc.T)
        sae.b_dec.zero_()
        sae.b_enc.zero_()
        for j in MOVES:
            sae.b_enc[j] = 1e3  # always active, so the pooled mean moves by exactly a_j
    policy = copy.deepcopy(reference)
    v = sum(a * w_enc[:, j] for j, a in MOVES.items())
    with torch.no_grad():
        policy.model.layers[layer].mlp.down_proj.bias.copy_(v)
    for name, model in (("reference", reference), ("policy", policy)):
        model.save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
    sae.save_model(str(root / "sae"))
    rows = [{"prompt": "Name three fruits.", "chosen": "pear, mango, plum.", "rejected": "carrot, leek."},
            {"prompt": "Say hello.", "chosen": "Hello! How are you?", "rejected": "no"},
            {"prompt": "Name three fruits.", "chosen": "apple, kiwi, lemon.", "rejected": "beet."}]
    data = root / "heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, layer


def test_evaluate_lists_the_moved_latents(constructed, tmp_path):
    from fpo_dist.config import DataConfig
    from fpo_dist.evaluate import evaluate

    torch.set_num_threads(1)
    root, layer = constructed
    data = DataConfig(source=str(root / "heldout.jsonl"), max_length=64, max_prompt_length=32)
    m = evaluate(str(root / "policy"), data, reference_dir=str(root / "reference"), sae_source=str(root / "sae"),
                 sae_layer=layer, generation=None, out_dir=tmp_path, batch_size=2, drift_top=5)
    assert m["feature_mse"] > 0
    doc = json.loads((tmp_path / "drift.json").read_text())
    listed = doc["top"]
    # the moved latents, largest |a_j| first, and nothing else (the rest moved by float noise at most)
    assert top_ids(listed[:3]) == sorted(MOVES, key=lambda j: -abs(MOVES[j]))
    for row in listed[:3]:
        assert row["change"] == pytest.approx(MOVES[row["id"]], abs=1e-3)
        assert row["policy_mean"] - row["reference_mean"] == pytest.approx(row["change"])
        assert row["neuronpedia"] == f"https://www.neuronpedia.org/tiny/1-res-16/{row['id']}"
    assert all(abs(r["change"]) < 1e-3 for r in listed[3:])
    assert doc["n_responses"] == 6 and doc["d_sae"] == 16 and doc["sae"]["layer"] == layer
    assert read_drift(tmp_path / "drift.json") == listed
    assert (tmp_path / "drift.png").stat().st_size > 1000
    units = json.loads((tmp_path / "units.json").read_text())["pairs"]
    assert units["prompt"] == [0, 1, 0] and len(units["feature_mse"]) == 3


def test_policy_equal_to_reference_lists_nothing(constructed, tmp_path):
    from fpo_dist.config import DataConfig
    from fpo_dist.evaluate import evaluate

    root, layer = constructed
    data = DataConfig(source=str(root / "heldout.jsonl"), max_length=64, max_prompt_length=32)
    evaluate(str(root / "reference"), data, reference_dir=str(root / "reference"), sae_source=str(root / "sae"),
             sae_layer=layer, generation=None, out_dir=tmp_path)
    assert json.loads((tmp_path / "drift.json").read_text())["top"] == []
