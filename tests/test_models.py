"""fpo_dist.models: loading, the block-ℓ residual hook (against TransformerLens), and the batch layout."""

from __future__ import annotations

import pytest
import torch

from fpo_dist.data import TokenizedPair
from fpo_dist.models import (
    ModelSpec,
    build_batch,
    capture_block_output,
    decoder_layers,
    forward_with_hook,
    load_causal_lm,
    load_tokenizer,
)
from fpo_dist.testing import assert_rounding_close


def _pair(index: int, prompt, chosen, rejected) -> TokenizedPair:
    return TokenizedPair(index=index, uid=bytes(16), prompt_ids=tuple(prompt), chosen_ids=tuple(chosen), rejected_ids=tuple(rejected))


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return load_causal_lm(ModelSpec(str(tiny.model_dir)))


@pytest.fixture(scope="module")
def tiny3_dir(tmp_path_factory):
    """A 3-block tiny Llama, so that block 1 is a true middle block and block 2 the last."""
    from fpo_dist.testing import build_llama, build_tokenizer

    out = tmp_path_factory.mktemp("tiny3") / "model"
    tok = build_tokenizer()
    build_llama(out, vocab_size=len(tok), num_layers=3, tokenizer=tok, seed=1)
    return out


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def test_load_causal_lm_local_dir(tiny):
    model = load_causal_lm(ModelSpec(str(tiny.model_dir), dtype="bfloat16"))
    assert not model.training
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    policy = load_causal_lm(ModelSpec(str(tiny.model_dir)), requires_grad=True)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in policy.parameters())
    tok = load_tokenizer(ModelSpec(str(tiny.model_dir)))
    assert tok.pad_token_id is not None and tok.chat_template


def test_model_spec_validation(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        ModelSpec("x", dtype="fp32")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(ModelSpec(str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match="model.gguf"):
        load_causal_lm(ModelSpec(str(tmp_path), gguf_file="model.gguf"))


def test_from_pretrained_kwargs_pass_through(monkeypatch):
    """revision / gguf_file / trust_remote_code reach transformers only when set; dtype always does."""
    import transformers

    calls = []

    def fake(source, **kwargs):
        calls.append((source, kwargs))
        return torch.nn.Linear(2, 2)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    load_causal_lm(ModelSpec("org/model"))
    user_opts_in = True  # the user's explicit choice (as --model.trust_remote_code true): passed through, never defaulted
    load_causal_lm(ModelSpec("org/model", revision="abc", dtype="float16", gguf_file="m.gguf",
                             trust_remote_code=user_opts_in))
    assert calls[0] == ("org/model", {"dtype": torch.float32})
    assert calls[1] == (
        "org/model",
        {"dtype": torch.float16, "revision": "abc", "gguf_file": "m.gguf", "trust_remote_code": True},
    )


def test_hub_id_offline_error_names_the_id():
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (set by conftest unless overridden)")
    with pytest.raises(OSError, match=r"(?s)fpo-dist-test/no-such-model.*HF_HUB_OFFLINE"):
        load_tokenizer(ModelSpec("fpo-dist-test/no-such-model"))


# ---------------------------------------------------------------------------------------------------------
# Decoder blocks across architectures
# ---------------------------------------------------------------------------------------------------------


def _tiny_arch_models():
    import transformers as tf

    c = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    vision = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    torch.manual_seed(0)
    return {
        "gemma": (tf.GemmaForCausalLM(tf.GemmaConfig(**c)), "model.layers"),
        "gemma2": (tf.Gemma2ForCausalLM(tf.Gemma2Config(**c)), "model.layers"),
        "gemma3": (tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**c)), "model.layers"),
        "gemma3-multimodal": (
            tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(text_config=tf.Gemma3TextConfig(**c), vision_config=vision, mm_tokens_per_image=4)),
            "model.language_model.layers",
        ),
        "mistral": (tf.MistralForCausalLM(tf.MistralConfig(**c)), "model.layers"),
        "qwen2": (tf.Qwen2ForCausalLM(tf.Qwen2Config(**c)), "model.layers"),
        "gpt2": (tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=2, bos_token_id=0, eos_token_id=0)), "transformer.h"),
    }


def test_decoder_layers_and_hook_across_architectures():
    from operator import attrgetter

    ids = torch.randint(0, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for name, (model, path) in _tiny_arch_models().items():
        model.eval()
        layers = decoder_layers(model)
        assert layers is attrgetter(path)(model), name
        assert len(layers) == 3, name
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            logits, hidden = forward_with_hook(model, ids, mask, 1)
        assert torch.equal(logits, ref.logits), name
        assert hidden.shape == (2, 5, 16), name
        assert torch.allclose(hidden, ref.hidden_states[2], atol=1e-6), name


def test_decoder_layers_unwraps_module_attribute_and_rejects_unknown(tiny_model):
    class Wrapper(torch.nn.Module):  # like DistributedDataParallel / DeepSpeedEngine: the model is in .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert decoder_layers(Wrapper(tiny_model)) is tiny_model.model.layers
    with pytest.raises(TypeError, match="Linear"):
        decoder_layers(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------------------
# The hook is blocks.ℓ.hook_resid_post
# ---------------------------------------------------------------------------------------------------------


def _transformer_lens_oracle(model_dir, hf_model, tokenizer):
    """TransformerLens's own Llama implementation, loaded with the same weights, unprocessed.

    ``HookedTransformer.from_pretrained*`` resolves the name through TL's official-model table first and
    rejects local paths, so this does the same steps by hand: TL builds its config from the local
    ``config.json`` and converts the HF state dict with its Llama converter.  Its residual stream is
    TL's own code (RMSNorm, rotary attention, gated MLP), not the HF modules, so it is an independent oracle.
    """
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    # TL picks the architecture from the name for paths containing these words; ours must use config.json.
    assert not any(w in str(model_dir).lower() for w in ("llama", "gemma")), model_dir
    cfg = loading.get_pretrained_model_config(str(model_dir), hf_cfg=hf_model.config.to_dict(), fold_ln=False, device="cpu", dtype=torch.float32)
    state_dict = loading.get_pretrained_state_dict(str(model_dir), cfg, hf_model, dtype=torch.float32)
    tl = HookedTransformer(cfg, tokenizer, move_to_device=False)
    tl.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False
    )
    return tl.eval()


@pytest.fixture(scope="module")
def tiny3_with_oracle(tiny3_dir):
    spec = ModelSpec(str(tiny3_dir))
    model, tok = load_causal_lm(spec), load_tokenizer(spec)
    return model, tok, _transformer_lens_oracle(tiny3_dir, model, tok)


@pytest.mark.parametrize("layer", [1, 2], ids=["middle", "last"])
def test_hook_equals_transformer_lens_resid_post(tiny3_with_oracle, layer):
    model, tok, tl = tiny3_with_oracle
    ids = tok(["What is the capital of France? The capital of France is Paris."], return_tensors="pt").input_ids
    with torch.no_grad():
        tl_logits, cache = tl.run_with_cache(ids, names_filter=f"blocks.{layer}.hook_resid_post")
        logits, hidden = forward_with_hook(model, ids, torch.ones_like(ids), layer)
    # Two implementations of one model: equal up to rounding, per position relative to its largest entry
    # (fpo_dist.testing.rounding_tolerance; depth = blocks up to the hook, plus the head for logits).  Bound
    # 8·depth·eps·max|x|: ≈ 3·10⁻⁶-4·10⁻⁶ of the position's scale; a hook one block off moves it by O(1) of it.
    assert_rounding_close(tl_logits, logits, dtype=torch.float32, depth=len(decoder_layers(model)) + 1,
                          msg="TransformerLens vs transformers logits")
    expected = cache[f"blocks.{layer}.hook_resid_post"]
    assert hidden.shape == expected.shape == (1, ids.shape[1], 32)
    assert_rounding_close(hidden, expected, dtype=torch.float32, depth=layer + 1,
                          msg=f"hook vs TransformerLens blocks.{layer}.hook_resid_post")


def test_hf_hidden_states_trap(tiny3_with_oracle):
    """HF ``hidden_states[ℓ+1]`` is the hook for ℓ < L-1, but for the last block it is AFTER the final norm."""
    model, tok, _ = tiny3_with_oracle
    ids = tok(["Hello! How are you today?"], return_tensors="pt").input_ids
    n = len(decoder_layers(model))
    with torch.no_grad(), capture_block_output(model, 1) as mid, capture_block_output(model, n - 1) as last:
        hs = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    assert len(hs) == n + 1
    torch.testing.assert_close(hs[2], mid.output, atol=0, rtol=0)
    assert (hs[n] - last.output).abs().max() > 0.1  # the trap: hidden_states[-1] is not resid_post
    torch.testing.assert_close(hs[n], model.model.norm(last.output), atol=1e-6, rtol=1e-6)


def test_hook_layer_validation_and_lifecycle(tiny_model):
    for bad in (-1, 2, 10):
        with pytest.raises(ValueError, match="2 blocks"):
            with capture_block_output(tiny_model, bad):
                pass
    block = decoder_layers(tiny_model)[0]
    n_hooks = len(block._forward_hooks)
    ids = torch.tensor([[1, 5, 6, 7]])
    with capture_block_output(tiny_model, 0) as cap:
        with pytest.raises(RuntimeError, match="not run yet"):
            _ = cap.output
        assert len(block._forward_hooks) == n_hooks + 1
        with torch.no_grad():
            tiny_model(input_ids=ids, use_cache=False)
    assert len(block._forward_hooks) == n_hooks  # removed on exit
    assert cap.output.shape == (1, 4, 32)  # still readable after exit


# ---------------------------------------------------------------------------------------------------------
# Gradients through the captured hidden state
# ---------------------------------------------------------------------------------------------------------


def _grads_from_block(model, layer, ids):
    model.zero_grad(set_to_none=True)
    _, hidden = forward_with_hook(model, ids, torch.ones_like(ids), layer)
    assert hidden.requires_grad
    (hidden.float() ** 2).mean().backward()
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def test_gradients_flow_through_captured_hidden(tiny):
    model = load_causal_lm(ModelSpec(str(tiny.model_dir)), requires_grad=True)
    ids = torch.tensor([[1, 10, 20, 30, 40, 50], [1, 11, 21, 31, 41, 51]])
    grads = _grads_from_block(model, 0, ids)
    # Everything up to block 0 gets gradient; nothing after it does (the hook is not at the output).
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    for name, g in grads.items():
        if name.startswith(("model.layers.1.", "model.norm", "lm_head")):
            assert g is None, name

    # Same gradients with HF gradient checkpointing in training mode (the hook sits outside the checkpoint).
    plain = _grads_from_block(model, 1, ids)
    model.activation_checkpointing_enable()
    model.train()
    calls = []
    handle = decoder_layers(model)[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        ckpt = _grads_from_block(model, 1, ids)
    finally:
        handle.remove()
    assert len(calls) == 1  # not re-fired by the backward recompute
    for name, g in plain.items():
        if g is None:
            assert ckpt[name] is None, name
        else:
            torch.testing.assert_close(ckpt[name], g, atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------------
# build_batch
# ---------------------------------------------------------------------------------------------------------


PAIRS = [
    _pair(0, [1, 5, 6], [7, 8, 2], [9, 2]),
    _pair(3, [1, 5], [10, 11, 12, 13, 2], [14, 15, 16, 2]),
    _pair(7, [1, 17, 18, 19], [20, 2], [21, 22, 23, 2]),
]


def test_build_batch_layout_and_masks():
    pad = 0
    b = build_batch(PAIRS, pad_id=pad)
    B = len(PAIRS)
    assert b.n_pairs == B
    assert b.input_ids.shape == b.attention_mask.shape == b.response_mask.shape == (2 * B, 8)  # 4 + 4 is longest
    assert b.input_ids.dtype == torch.long and b.response_mask.dtype == torch.bool
    for i, p in enumerate(PAIRS):
        for row, resp in ((i, p.chosen_ids), (B + i, p.rejected_ids)):
            seq = list(p.prompt_ids) + list(resp)
            n = len(seq)
            assert b.input_ids[row, :n].tolist() == seq
            assert (b.input_ids[row, n:] == pad).all()
            assert b.attention_mask[row].tolist() == [1] * n + [0] * (8 - n)
            # response positions cover exactly the response tokens, in order
            assert b.response_mask[row].nonzero().flatten().tolist() == list(range(len(p.prompt_ids), n))
            assert b.input_ids[row][b.response_mask[row]].tolist() == list(resp)
            # predicting positions: one earlier, same count
            assert b.prediction_mask[row].nonzero().flatten().tolist() == list(range(len(p.prompt_ids) - 1, n - 1))


def test_build_batch_rejects_empty():
    with pytest.raises(ValueError, match="at least one"):
        build_batch([], pad_id=0)
    with pytest.raises(ValueError, match="row 4 has an empty rejected_ids"):
        build_batch([PAIRS[0], _pair(4, [1], [2], [])], pad_id=0)
    with pytest.raises(ValueError, match="empty prompt_ids"):
        build_batch([_pair(5, [], [2], [3])], pad_id=0)


def test_padding_does_not_change_real_token_outputs(tiny_model):
    b = build_batch(PAIRS, pad_id=0)
    with torch.no_grad():
        logits, hidden = forward_with_hook(tiny_model, b.input_ids, b.attention_mask, 1)
        for row in range(b.input_ids.shape[0]):
            n = int(b.attention_mask[row].sum())
            alone_ids = b.input_ids[row : row + 1, :n]
            alone_logits, alone_hidden = forward_with_hook(tiny_model, alone_ids, torch.ones_like(alone_ids), 1)
            # up to rounding, relative to each position's largest entry (2 blocks; logits: + the head)
            assert_rounding_close(logits[row, :n], alone_logits[0], dtype=torch.float32, depth=3, msg=f"row {row}")
            assert_rounding_close(hidden[row, :n], alone_hidden[0], dtype=torch.float32, depth=2, msg=f"row {row}")
    assert b.attention_mask.sum(1).min() < b.input_ids.shape[1]  # some rows really are padded


def test_rounding_tolerance_fails_a_real_difference_and_refuses_vacuous_bounds():
    """The rule (fpo_dist.testing.rounding_tolerance): 8·depth·eps·scale per row; a row whose largest entry is 3·10⁴
    tolerates 0.02 on a small entry at depth 18 (the Xeon's padded-vs-alone case), a relative 10⁻⁴ change of that
    entry's row does not pass, and bf16 through 18 blocks (a bound above half the scale) is refused."""
    from fpo_dist.testing import rounding_tolerance

    row = torch.tensor([[3.0e4, 5.0, -2.0]])
    bound = rounding_tolerance(3.0e4, torch.float32, 18)
    assert bound == pytest.approx(8 * 18 * torch.finfo(torch.float32).eps * 3.0e4)
    assert assert_rounding_close(row + torch.tensor([[0.0, 0.02, 0.0]]), row, dtype=torch.float32, depth=18) < 1
    with pytest.raises(AssertionError, match="exceeds the rounding bound"):
        assert_rounding_close(row + torch.tensor([[3.0, 0.0, 0.0]]), row, dtype=torch.float32, depth=18)
    with pytest.raises(ValueError, match="cannot fail a wrong result"):
        rounding_tolerance(1.0, torch.bfloat16, 18)


# ---------------------------------------------------------------------------------------------------------
# Real model: Gemma 3 270M
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.realmodel
def test_gemma3_270m_last_block_hook(gemma):
    model, tok = gemma
    layers = decoder_layers(model)
    assert len(layers) == 18
    prompts = ["The capital of France is the city of", "Two plus two equals"]
    responses = [" Paris.", " four."]
    pairs = [
        _pair(i, tok(p).input_ids, tok(r, add_special_tokens=False).input_ids, tok(" no", add_special_tokens=False).input_ids)
        for i, (p, r) in enumerate(zip(prompts, responses))
    ]
    assert pairs[0].prompt_ids[0] == tok.bos_token_id
    b = build_batch(pairs, pad_id=tok.pad_token_id)
    with torch.no_grad(), capture_block_output(model, 16) as h16, capture_block_output(model, 17) as h17:
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False, output_hidden_states=True)
        with pytest.raises(ValueError, match="18 blocks"):
            with capture_block_output(model, 18):
                pass
    hs = out.hidden_states
    assert h17.output.shape == (4, b.input_ids.shape[1], 640)
    torch.testing.assert_close(hs[17], h16.output, atol=0, rtol=0)
    real = b.attention_mask.bool()
    assert (hs[18][real] - h17.output[real]).abs().max() > 1.0  # hidden_states[-1] is after the final norm
    torch.testing.assert_close(hs[18], model.model.norm(h17.output), atol=1e-4, rtol=1e-4)

    # The real model predicts the first response token (" Paris", " four") at the first predicting
    # position of each chosen row, and padding leaves a real row unchanged.
    for row, p in enumerate(pairs):
        first = b.prediction_mask[row].nonzero()[0].item()
        assert out.logits[row, first].argmax().item() == p.chosen_ids[0]
    n = int(b.attention_mask[2].sum())
    with torch.no_grad():
        alone_logits, alone_hidden = forward_with_hook(model, b.input_ids[2:3, :n], b.attention_mask[2:3, :n], 17)
    # Up to rounding, bounded per position by the position's own magnitude (fpo_dist.testing.rounding_tolerance:
    # 144·eps·max|x| for 18 blocks; 0.4-1.1 here, where max|x| is 2.4·10⁴-6.6·10⁴, measured |Δ| ≤ 0.024 on a Xeon
    # with AMX): it still fails on any element moved by 1.7·10⁻⁵ of its position's scale, far below what attending
    # to a padding position or a shifted position id does.  The logits (max ~25): bound ≈ 4·10⁻⁴, measured 5·10⁻⁵.
    assert_rounding_close(h17.output[2, :n], alone_hidden[0], dtype=torch.float32, depth=18,
                          msg="block 17, padded row vs the sequence alone")
    assert_rounding_close(out.logits[2, :n], alone_logits[0], dtype=torch.float32, depth=19,
                          msg="logits, padded row vs the sequence alone")
