"""fpo_dist.demo.study: every arm's flags reach the loss it names (config plumbing), and one tiny training step
per arm runs through the project's loss seam (``fpo_dist.forward.LossContext``) on the tiny model."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fpo_dist.demo.recipe import RECIPE
from fpo_dist.demo.study import ARMS, D_SAE, arm_train_args

ROWS = [
    {"prompt": "Name three fruits.", "chosen": "Fruits: apple, kiwi, pear.", "rejected": "Vegetables: beet, leek, onion."},
    {"prompt": "List two tools.", "chosen": "Tools: axe, saw.", "rejected": "Instruments: drum, harp."},
    {"prompt": "Name two colors.", "chosen": "Colors: blue, red.", "rejected": "Countries: peru, spain."},
    {"prompt": "Tell me four animals.", "chosen": "Animals: cat, cow, dog, fox.",
     "rejected": "Sports: golf, judo, rugby, tennis."},
]


def _config(arm, tmp_path):
    from fpo_dist.config import TrainConfig, load_config

    return load_config(TrainConfig, None, arm_train_args(arm, tmp_path / "cache", tmp_path / arm.name, 1, 0))


def test_the_arms_cover_the_issue():
    names = {a.name for a in ARMS}
    assert len(names) == len(ARMS) == 10
    fpo = [a for a in ARMS if a.loss == "fpo"]
    assert {tuple(sorted(a.params.items())) for a in fpo} == {
        (), (("alpha", 0.0),), (("topk_mode", "policy"),), (("stop_grad_chosen", False),), (("k", 10),),
        (("k", D_SAE),), (("beta", 0.3 * RECIPE.beta_for("fpo")),), (("beta", 3 * RECIPE.beta_for("fpo")),)}
    assert {a.loss for a in ARMS} == {"fpo", "simpo", "dpo"}


@pytest.mark.parametrize("arm", ARMS, ids=[a.name for a in ARMS])
def test_arm_flags_reach_the_loss(arm, tmp_path):
    cfg = _config(arm, tmp_path)
    assert cfg.loss.name == arm.loss and cfg.max_steps == 1
    assert cfg.micro_batch_size * cfg.grad_accum == RECIPE.batch_pairs  # one process carries the global batch
    expected = {"beta": RECIPE.beta_for(arm.loss)}
    if arm.loss == "fpo":
        expected.update(alpha=RECIPE.alpha, k=RECIPE.k, topk_mode=RECIPE.topk_mode, stop_grad_chosen=True)
    if arm.loss == "simpo":
        expected.update(gamma=RECIPE.simpo_gamma)
    expected.update(arm.params)
    for key, value in expected.items():
        assert cfg.loss.params[key] == value, key


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    """The tiny reference, a perturbed policy (so feature distances are non-zero) and a micro-batch whose cached
    reference values are the reference's own (as the cache job computes them)."""
    from fpo_dist.demo.preference_check import tokenized_pairs
    from fpo_dist.evaluate import response_stats
    from fpo_dist.loader import MicroBatch
    from fpo_dist.losses import SparseCodes
    from fpo_dist.models import ModelSpec, build_batch, load_causal_lm, load_tokenizer
    from fpo_dist.sae import load_sae

    torch.set_num_threads(1)
    spec = ModelSpec(str(tiny.model_dir))
    reference, tok, sae = load_causal_lm(spec), load_tokenizer(spec), load_sae(str(tiny.sae_dir))
    pairs = tokenized_pairs(tok, ROWS)
    layout = build_batch(pairs, tok.pad_token_id)
    logp, n_tok, pooled = response_stats(reference, layout, tiny.hook_layer, sae)
    b = len(pairs)
    mb = MicroBatch(
        input_ids=layout.input_ids, attention_mask=layout.attention_mask, response_mask=layout.response_mask,
        ref_logp_sum=torch.stack([logp[:b], logp[b:]], 1), ref_n_tokens=torch.stack([n_tok[:b], n_tok[b:]], 1),
        ref_codes_chosen=SparseCodes.from_dense(pooled[:b]), ref_codes_rejected=SparseCodes.from_dense(pooled[b:]),
        uids=[f"{i:032x}" for i in range(b)], rows=np.arange(b), epoch=0, step_in_epoch=0, micro_step=0,
        sample_offset=0, is_step_end=True)
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the hooked block's output well away from the reference's
        w = policy.model.layers[tiny.hook_layer].mlp.down_proj.weight
        w.add_(torch.randn(w.shape, generator=g) * 3 * w.std())
    return policy, sae, tiny.hook_layer, mb


def _step(arm, setup, tmp_path):
    """One optimizer step of ``arm`` (AdamW at the recipe's lr): the loss, its metrics, the gradients."""
    from fpo_dist.forward import LossContext

    policy, sae, layer, mb = setup
    cfg = _config(arm, tmp_path)
    model = copy.deepcopy(policy).train()
    model.requires_grad_(True)
    ctx = LossContext(cfg.loss.spec(), cfg.loss.params, sae=sae, layer=layer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    before = [p.detach().clone() for p in model.parameters()]
    loss, metrics = ctx(model, mb)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    opt.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return loss.detach(), metrics, grads


def _logps(setup):
    from fpo_dist.losses import sequence_logps

    policy, _, _, mb = setup
    with torch.no_grad():
        logits = policy(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
    lp, n, _ = sequence_logps(logits, mb.input_ids, mb.response_mask)
    b = mb.n_pairs
    return lp[:b].double(), lp[b:].double(), n[:b].double(), n[b:].double()


def test_one_step_per_arm(setup, tmp_path):
    """Every arm trains one step; the arms differ where they should, checked against hand-written losses."""
    arms = {a.name: a for a in ARMS}
    out = {name: _step(arm, setup, tmp_path) for name, arm in arms.items()}
    lw, ll, nw, nl = _logps(setup)
    mb = setup[3]
    rw, rl = mb.ref_logp_sum[:, 0].double(), mb.ref_logp_sum[:, 1].double()
    # α = 0: length-normalised DPO with the offline reference (the SAE term is gone)
    beta = RECIPE.beta_for("fpo")
    ln_dpo = -F.logsigmoid(beta * ((lw / nw - ll / nl) - (rw / nw - rl / nl))).mean()
    assert out["fpo-alpha0"][0].double().item() == pytest.approx(ln_dpo.item(), rel=1e-5)
    assert out["fpo"][0].item() != pytest.approx(out["fpo-alpha0"][0].item(), rel=1e-5)  # the SAE term counts
    # DPO anchor: summed log-probs
    dpo = -F.logsigmoid(RECIPE.beta_for("dpo") * ((lw - rw) - (ll - rl))).mean()
    assert out["dpo"][0].double().item() == pytest.approx(dpo.item(), rel=1e-5)
    # stop-gradient changes the gradient, not the loss
    assert out["fpo-no-sg"][0].item() == pytest.approx(out["fpo"][0].item(), rel=1e-6)
    assert not torch.allclose(out["fpo-no-sg"][2], out["fpo"][2])
    # k and the top-k set change the feature distance D (divided by k)
    d = {n: out[n][1]["feature_mse_rejected"].item() for n in ("fpo", "fpo-k10", "fpo-kall", "fpo-topk-policy")}
    assert all(v > 0 for v in d.values())
    assert d["fpo-k10"] != pytest.approx(d["fpo"], rel=1e-3) and d["fpo-kall"] != pytest.approx(d["fpo"], rel=1e-3)
    assert d["fpo"] > d["fpo-topk-policy"]  # the union's set contains the policy's top-k, and more here
    # β scales the margin u linearly (same policy, same features): 3× / 0.3× = 10
    assert out["fpo-beta-hi"][1]["margin"].item() == pytest.approx(10 * out["fpo-beta-lo"][1]["margin"].item(),
                                                                   rel=1e-4)
    assert "feature_mse_rejected" not in out["simpo"][1]


def test_job_command_is_the_study_module():
    from fpo_dist.demo.study import _job_cmd

    cmd = _job_cmd(Path("/x/job.json"))
    assert cmd[1:] == ["-m", "fpo_dist.demo.study", "--job", "/x/job.json"]
