"""LoRA policies (``fpo_dist.lora``) in one process: the wrapped policy equals the base model at init, the block-ℓ
hook and every registered loss run through it with gradients on the adapters only, and the merged state equals
peft's own ``merge_and_unload``.  The DeepSpeed runs (ZeRO-3 and ZeRO-2, export, resume) are in ``test_train.py``."""

from __future__ import annotations

import pytest
import torch

from fpo_dist.config import ConfigError, LoraConfig, TrainConfig, load_config

peft = pytest.importorskip("peft", reason="LoRA needs the lora extra (peft)")


def _base(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny.model_dir), dtype=torch.float32).eval()


def _batch(tiny):
    """A micro-batch of 3 pairs with arbitrary cached reference values (the loader's layout)."""
    from fpo_dist.data import TokenizedPair
    from fpo_dist.lm_head import RefTopM
    from fpo_dist.loader import MicroBatch
    from fpo_dist.losses import SparseCodes
    from fpo_dist.models import build_batch

    g = torch.Generator().manual_seed(0)
    pairs = [TokenizedPair(i, bytes(16), tuple(torch.randint(5, 400, (3 + i,), generator=g).tolist()),
                        tuple(torch.randint(5, 400, (4,), generator=g).tolist()),
                        tuple(torch.randint(5, 400, (2 + i,), generator=g).tolist())) for i in range(3)]
    pb = build_batch(pairs, pad_id=0)
    codes = SparseCodes.from_dense(torch.rand(3, 128) * (torch.rand(3, 128) < 0.1))
    n = int(pb.response_mask.sum())  # offline TDPO's cached top-8 (+ tail) per response token
    dist = torch.log_softmax(torch.randn(n, 9, generator=g), -1)
    topm = RefTopM(torch.stack([torch.randperm(400, generator=g)[:8] for _ in range(n)]), dist[:, :8], dist[:, 8])
    return MicroBatch(pb.input_ids, pb.attention_mask, pb.response_mask, -torch.rand(3, 2) * 20 - 5,
                      torch.tensor([[4, 3], [4, 4], [4, 5]]), codes, codes, ["x"] * 3, torch.arange(3).numpy(),
                      0, 0, 0, 0, True, ref_topm=topm)


def test_lora_config_from_the_command_line():
    cfg = load_config(TrainConfig, None, ["--cache", "x", "--policy.lora.rank", "8", "--policy.lora.alpha", "16",
                                          "--policy.lora.target_modules", "q_proj,v_proj", "--policy.lora.dropout", "0.05"])
    assert cfg.policy.lora == LoraConfig(rank=8, alpha=16.0, dropout=0.05, target_modules=["q_proj", "v_proj"])
    assert load_config(TrainConfig, None, ["--cache", "x"]).policy.lora.rank == 0  # off by default
    with pytest.raises(ConfigError, match="policy.lora.dropout"):
        load_config(TrainConfig, None, ["--cache", "x", "--policy.lora.rank", "4", "--policy.lora.dropout", "1.5"])
    with pytest.raises(ConfigError, match="policy.lora.rank"):
        load_config(TrainConfig, None, ["--cache", "x", "--policy.lora.rank", "-1"])


def test_unknown_target_modules_are_refused(tiny):
    from fpo_dist.lora import apply_lora

    with pytest.raises(ConfigError, match="policy.lora.target_modules"):
        apply_lora(_base(tiny), LoraConfig(rank=4, target_modules=["no_such_proj"]), seed=0)


def test_adapters_start_at_the_base_model_and_are_seeded(tiny):
    from fpo_dist.lora import apply_lora

    batch = _batch(tiny)
    base_logits = _base(tiny)(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rng = torch.get_rng_state()
    a = apply_lora(_base(tiny), LoraConfig(rank=4), seed=1)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    b = apply_lora(_base(tiny), LoraConfig(rank=4), seed=1)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # same adapters on every rank
    with torch.no_grad():
        logits = a(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(logits, base_logits, rtol=0, atol=0)  # lora_B = 0: the step-0 check holds
    trainable = {n for n, p in a.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # all-linear


@pytest.mark.parametrize("loss_name", ["fpo", "dpo", "simpo", "dpo-online", "tdpo1", "tdpo2", "tdpo2-offline"])
def test_every_loss_trains_only_the_adapters(tiny, loss_name):
    from sae_lens import SAE

    from fpo_dist.forward import LossContext
    from fpo_dist.lora import apply_lora
    from fpo_dist.losses import LOSSES

    spec = LOSSES[loss_name]
    sae = SAE.load_from_disk(str(tiny.sae_dir))
    sae.requires_grad_(False)
    policy = apply_lora(_base(tiny), LoraConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]), seed=0)
    policy.train()
    with torch.no_grad():  # move off the zero init so every adapter gets a gradient
        for n, p in policy.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    ctx = LossContext(spec, dict(spec.hyper_parameters), sae=sae, layer=tiny.hook_layer,
                      reference=_base(tiny).requires_grad_(False) if spec.needs == "reference_model" else None)
    loss, metrics = ctx(policy, _batch(tiny))
    assert torch.isfinite(loss) and "reward_accuracy" in metrics
    loss.backward()
    grads = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads.values())
    if spec.needs_sae:  # the block-ℓ hook reads the adapted model: the feature term reaches the adapters below ℓ
        assert metrics["feature_mse_rejected"] > 0


def test_merged_state_equals_peft_merge_and_unload(tiny):
    from fpo_dist.lora import adapter_state, apply_lora, lora_layers, merged_state

    policy = apply_lora(_base(tiny), LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "o_proj", "up_proj"]),
                        seed=0)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    state = {k: v.clone() for k, v in policy.state_dict().items()}
    assert set(adapter_state(state)) == {k for k in state if ".lora_A." in k or ".lora_B." in k}
    merged = merged_state(state, lora_layers(policy))
    want = policy.merge_and_unload().state_dict()
    assert merged.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(merged[key], want[key], rtol=1e-6, atol=1e-6, msg=key)
    base = _base(tiny).state_dict()
    changed = {k for k in want if not torch.equal(merged[k], base[k])}
    assert changed == {k for k in want if any(f"{m}.weight" in k for m in ("q_proj", "o_proj", "up_proj"))}
