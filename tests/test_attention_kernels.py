"""The fused varlen kernels ≡ the per-sequence path they replace (``fpo_dist.attention``: ``attention_kernel``).

``sdpa`` (one ``scaled_dot_product_attention`` call per segment) is the reference.  ``flex`` (one FlexAttention call
per layer, the segments and a continuation's shared prefix as a block mask, the sliding window on positions, the
soft-cap as a score_mod) runs here as a forward: PyTorch's CPU FlexAttention has no backward, so its gradients and
``flash`` (``varlen_attn``, CUDA only) are checked on a GPU (``-m gpu``, skipped elsewhere).  Every layout
(shared, packed, padded), on Llama (GQA off), Gemma 3 (GQA, sliding-window layers with a 4-token window) and
Gemma 2 (attention soft-cap that binds).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_packing import VOCAB, _pairs

from fpo_dist.attention import VARLEN_FLEX, enable_varlen
from fpo_dist.lm_head import backbone
from fpo_dist.models import build_batch
from fpo_dist.testing import assert_rounding_close, build_gemma2, build_gemma3, build_llama

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _model(kind: str, dtype=torch.float64, seed: int = 0):
    model = {"llama": lambda: build_llama(vocab_size=VOCAB, seed=seed),
             "gemma3": lambda: build_gemma3(vocab_size=VOCAB, sliding_window=4, seed=seed),
             "gemma2": lambda: build_gemma2(vocab_size=VOCAB, sliding_window=4, seed=seed)}[kind]()
    return enable_varlen(model.to(dtype), "sdpa")


def _hidden(model, batch):
    return backbone(model)(**batch.model_inputs()).last_hidden_state


@pytest.mark.parametrize("layout", ["shared", "packed", "padded"])
@pytest.mark.parametrize("kind", ["llama", "gemma3", "gemma2"])
def test_flex_forward_equals_per_sequence_sdpa(kind, layout):
    """Every real position's final hidden state: flex ≡ sdpa to fp64 rounding (fp64 model), and in fp32.  Gemma 2's
    reference is transformers' eager formula, whose softmax is fp32 whatever the model's dtype: fp32 rounding."""
    for dtype in (torch.float64, torch.float32):
        ref = _model(kind, dtype)
        flex = enable_varlen(copy.deepcopy(ref), "flex")
        assert flex.config._attn_implementation == VARLEN_FLEX
        b = build_batch(_pairs(4, seed=1), 0, layout)
        with torch.no_grad():
            want, got = _hidden(ref, b), _hidden(flex, b)
        real = b.sequence_ids >= 0
        assert_rounding_close(got[real], want[real], dtype=torch.float32 if kind == "gemma2" else dtype, depth=2,
                              msg=f"{kind}/{layout}/{dtype}")


def test_flex_mask_is_the_one_that_matters():
    """The check can fail: the same model with the shared prefix hidden from the rejected tokens (positions
    restarting at 0, i.e. the packed mask on a shared row) is far from the shared result."""
    flex = enable_varlen(_model("gemma3"), "flex")
    b = build_batch(_pairs(4, seed=1), 0, "shared")
    restarted = torch.cat([torch.arange(n) for n in
                           torch.unique_consecutive(b.sequence_ids[0], return_counts=True)[1].tolist()])[None]
    with torch.no_grad():
        h = _hidden(flex, b)
        wrong = backbone(flex)(input_ids=b.input_ids, position_ids=restarted, use_cache=False).last_hidden_state
    assert float((h - wrong).abs().max()) > 1e-2


def test_flex_refuses_a_cpu_backward_by_name():
    flex = enable_varlen(_model("llama", torch.float32), "flex")
    b = build_batch(_pairs(2), 0, "shared")
    with pytest.raises(NotImplementedError, match="no backward on CPU"):
        _hidden(flex, b)  # parameters require grad: a training forward


def test_flash_refuses_a_cpu_by_name():
    flash = enable_varlen(_model("llama", torch.float32), "flash")
    with torch.no_grad(), pytest.raises(NotImplementedError, match="CUDA in bf16/fp16"):
        _hidden(flash, build_batch(_pairs(2), 0, "shared"))


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="choose from sdpa, flex, flash"):
        enable_varlen(_model("llama"), "xformers")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernel", ["flex", "flash"])
@pytest.mark.parametrize("layout", ["shared", "packed"])
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_fused_kernels_equal_per_sequence_sdpa_on_gpu(kind, layout, kernel):
    """On a GPU, forward and every parameter gradient: the fused kernel ≡ sdpa per sequence, bf16 (and fp32 for
    flex), within rounding of each tensor's scale."""
    for dtype in ((torch.bfloat16, torch.float32) if kernel == "flex" else (torch.bfloat16,)):
        ref = _model(kind, dtype).cuda()
        fused = enable_varlen(copy.deepcopy(ref), kernel)
        b = build_batch(_pairs(6, seed=2), 0, layout).to("cuda")
        real = b.sequence_ids >= 0
        out = {}
        for name, m in (("sdpa", ref), (kernel, fused)):
            h = _hidden(m, b)
            loss = (h[real].float() ** 2).mean()
            out[name] = (h[real].detach(), torch.autograd.grad(loss, [p for p in m.parameters()]))
        (hr, gr), (hf, gf) = out["sdpa"], out[kernel]
        assert_rounding_close(hf, hr, dtype=dtype, depth=3, msg=f"{kind}/{layout}/{kernel}/{dtype} hidden")
        for a, w in zip(gf, gr):
            assert_rounding_close(a, w, dtype=dtype, depth=6, dim=None, msg=f"{kind}/{layout}/{kernel} gradient")


def test_flex_left_padded_rows_equal_per_sequence_sdpa():
    """A 2-D padding mask with left padding (rows whose real tokens start past 0): flex ≡ sdpa on the real tokens."""
    ref = _model("gemma3")
    flex = enable_varlen(copy.deepcopy(ref), "flex")
    b = build_batch(_pairs(3, seed=6), 0, "padded")
    real = b.attention_mask.bool()
    ids = torch.stack([torch.cat([r[~m], r[m]]) for r, m in zip(b.input_ids, real)])  # move the padding left
    mask = torch.stack([torch.cat([m[~m], m[m]]) for m in real]).long()
    with torch.no_grad():
        want = backbone(ref)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        got = backbone(flex)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    assert_rounding_close(got[mask.bool()], want[mask.bool()], dtype=torch.float64, depth=2, msg="left padded")
