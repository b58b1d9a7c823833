"""Padding-free micro-batches: the packed layout ≡ the padded one it replaces.

Packed = a micro-batch's 2B sequences back to back in ONE row, ``attention_mask`` None and per-sequence
``position_ids`` (transformers 5 derives the block-diagonal causal mask from them).  The oracles:

- transformers' own forward of each sequence ALONE (batch 1, no padding, no mask) — for the hidden states at
  every position, on Llama and on Gemma 3 (sliding-window and global layers alternate; the window is 4 tokens, so
  most positions are outside it), with eager and sdpa attention (transformers' packed mask) and with
  ``fpo_dist.attention``'s varlen attention (each sequence on its own; bit-identical in bf16 whatever the pack);
- the padded layout, for every registered loss (loss, every metric, every gradient) and for the cache worker's
  reference pass (log-prob sums, token counts, pooled codes and the per-token extras).

The same on Gemma 3 270M (real weights) is in test_realshape.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fpo_dist.attention import VARLEN, enable_varlen
from fpo_dist.data import TokenizedPair
from fpo_dist.lm_head import backbone
from fpo_dist.loader import MicroBatch
from fpo_dist.losses import LOSSES, SparseCodes
from fpo_dist.models import build_batch
from fpo_dist.testing import assert_rounding_close, build_gemma3, build_llama, build_sae

VOCAB = 300


def _pairs(n: int = 3, seed: int = 0) -> list[TokenizedPair]:
    """Pairs of uneven lengths: prompts 2-7, responses 1-11 tokens (several-fold apart)."""
    g = np.random.default_rng(seed)
    ids = lambda k: tuple(int(x) for x in g.integers(3, VOCAB, k))  # noqa: E731
    return [TokenizedPair(i, bytes(16), ids(g.integers(2, 8)), ids(g.integers(1, 12)), ids(g.integers(1, 12)))
            for i in range(n)]


def _model(kind: str, attn: str = "sdpa", seed: int = 0, dtype=torch.float64):
    """``attn``: transformers' ``sdpa``/``eager`` (the packed mask built from position_ids), or ``varlen``
    (fpo_dist.attention: each sequence on its own)."""
    model = (build_llama(vocab_size=VOCAB, seed=seed) if kind == "llama"
             else build_gemma3(vocab_size=VOCAB, sliding_window=4, softcap=3.0, seed=seed))
    model.set_attn_implementation("sdpa" if attn == "varlen" else attn)
    if attn == "varlen":
        enable_varlen(model)
    return model.to(dtype)


def test_packed_layout_hand_checked():
    pairs = [TokenizedPair(0, bytes(16), (5, 6), (7,), (8, 9)), TokenizedPair(1, bytes(16), (10,), (11, 12), (13,))]
    b = build_batch(pairs, pad_id=0, layout="packed")
    # chosen 0, chosen 1, rejected 0, rejected 1
    assert b.input_ids.tolist() == [[5, 6, 7, 10, 11, 12, 5, 6, 8, 9, 10, 13]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 1]]
    assert b.sequence_ids.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3]]
    assert b.attention_mask is None and b.n_sequences == 4 and b.n_pairs == 2 and b.padding_tokens == 0
    assert b.response_mask.int().tolist() == [[0, 0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1]]
    # position s predicts token s+1: never across a boundary (every sequence starts with its prompt)
    assert b.prediction_mask.int().tolist() == [[0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 0]]
    padded = build_batch(pairs, pad_id=0, layout="padded")
    assert padded.input_ids.shape == (4, 4) and padded.padding_tokens == 4
    assert padded.sequence_ids.tolist() == [[0, 0, 0, -1], [1, 1, 1, -1], [2, 2, 2, 2], [3, 3, -1, -1]]
    for name in ("input_ids", "response_mask"):  # the same tokens, in the same order, once the padding is dropped
        assert torch.equal(getattr(b, name)[0], getattr(padded, name)[padded.sequence_ids >= 0])
    with pytest.raises(ValueError, match="layout"):
        build_batch(pairs, pad_id=0, layout="ragged")


@pytest.mark.parametrize("attn", ["eager", "sdpa", "varlen"])
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_packed_forward_equals_each_sequence_alone(kind, attn):
    """Packed, every position's final hidden state equals that sequence's forward on its own with transformers'
    sdpa: for sdpa/eager through the block-diagonal (and, on Gemma 3's sliding layers, windowed) mask transformers
    builds from the packed position_ids, for varlen through one attention call per sequence.  (Eager attention
    takes its softmax in fp32 whatever the model's dtype, so it agrees to fp32 rounding; the others to fp64's.)"""
    model = _model(kind, attn)
    alone_model = _model(kind, "sdpa")
    b = build_batch(_pairs(4, seed=1), pad_id=0, layout="packed")
    with torch.no_grad():
        packed = backbone(model)(**b.model_inputs()).last_hidden_state[0]
        naive = backbone(alone_model)(input_ids=b.input_ids, use_cache=False).last_hidden_state[0]  # attends across
        for s in range(b.n_sequences):
            at = b.sequence_ids[0] == s
            alone = backbone(alone_model)(input_ids=b.input_ids[:, at], use_cache=False).last_hidden_state[0]
            # up to rounding per position (fpo_dist.testing.rounding_tolerance, 2 blocks): eager's fp32 softmax
            # bounds it at 16·eps₃₂·max|x| ≈ 5·10⁻⁶ here (measured ≤ 1.6 eps₃₂·max|x| on a Xeon; the former fixed
            # 10⁻⁶ left 2×), fp64 elsewhere (≈ 10⁻¹⁴); without the packed mask positions move by O(max|x|) (below)
            assert_rounding_close(packed[at], alone, dtype=torch.float32 if attn == "eager" else torch.float64,
                                  depth=2, msg=f"{kind}/{attn}, sequence {s}")
    later = b.sequence_ids[0] > 0
    assert not torch.allclose(naive[later], packed[later])  # the check can fail: without the mask it does


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_varlen_bf16_sequence_is_bitwise_independent_of_its_pack(kind):
    """In bf16, a sequence's hidden states under varlen attention are bit-identical whatever it is packed with
    (alone, with other pairs, at another offset) and to the padded layout through the same attention: the cache
    job and the trainer pack different pairs together and still compute each sequence the same way."""
    model = _model(kind, "varlen", dtype=torch.bfloat16)
    pairs = _pairs(6, seed=4)
    with torch.no_grad():
        def hidden(batch_pairs, layout):
            b = build_batch(batch_pairs, 0, layout)
            h = backbone(model)(**b.model_inputs()).last_hidden_state
            return {(p.index, side): h[b.sequence_ids == s] for side in (0, 1)
                    for j, p in enumerate(batch_pairs) for s in [side * len(batch_pairs) + j]}

        big = hidden(pairs, "packed")
        for other in (hidden(pairs[:2], "packed"), hidden(pairs[3:][::-1], "packed"), hidden([pairs[4]], "packed"),
                      hidden(pairs, "padded")):
            for key, h in other.items():
                assert torch.equal(h, big[key]), key


def test_varlen_is_not_saved_with_the_model(tmp_path):
    """An export of a varlen model loads with transformers' default attention (the implementation is not saved)."""
    from transformers import AutoModelForCausalLM

    model = _model("llama", "varlen", dtype=torch.float32)
    assert model.config._attn_implementation == VARLEN
    model.save_pretrained(tmp_path)
    assert VARLEN not in (tmp_path / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def _micro_batch(batch, ref_logps: torch.Tensor, ref_codes: torch.Tensor) -> MicroBatch:
    n = batch.n_pairs
    return MicroBatch(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, response_mask=batch.response_mask,
        sequence_ids=batch.sequence_ids, position_ids=batch.position_ids, shared=batch.shared,
        ref_logp_sum=torch.stack([ref_logps[:n], ref_logps[n:]], 1).float(),
        ref_n_tokens=torch.zeros(n, 2, dtype=torch.long),  # replaced below
        ref_codes_chosen=SparseCodes.from_dense(ref_codes[:n]), ref_codes_rejected=SparseCodes.from_dense(ref_codes[n:]),
        uids=["0" * 32] * n, rows=np.arange(n), epoch=0, step_in_epoch=0, micro_step=0, sample_offset=0,
        is_step_end=True,
    )


@pytest.fixture(scope="module")
def loss_setup():
    """Policy (fp64 Llama), a reference with other weights, an SAE at block 1, and the reference side of 3
    uneven pairs computed once (padded) — the cached values every layout reads."""
    from dataclasses import replace

    from fpo_dist.scoring import score_batch

    policy, reference = _model("llama", seed=0), _model("llama", seed=1)
    models = {"sdpa": (policy, reference), "varlen": (enable_varlen(copy.deepcopy(policy)),
                                                      enable_varlen(copy.deepcopy(reference)))}
    sae = build_sae(d_in=32, d_sae=128, hook_layer=1, threshold=0.2)
    sae.to(torch.float64)
    pairs = _pairs(3, seed=2)
    # the reference's top-16 too (offline TDPO): one per response token in sequence order, as every layout selects
    ref = score_batch(reference, build_batch(pairs, 0, "padded"), sae, 1, topm=16)
    n = len(pairs)
    mbs = {}
    for layout in ("shared", "packed", "padded"):
        mb = _micro_batch(build_batch(pairs, 0, layout), ref.logp_sum, ref.pooled)
        mbs[layout] = replace(mb, ref_n_tokens=torch.stack([ref.n_tokens[:n], ref.n_tokens[n:]], 1), ref_topm=ref.topm)
    return models, sae, mbs


def _run(policy, reference, sae, mb, name, logits="selected"):
    from fpo_dist.forward import LossContext

    spec = LOSSES[name]
    params = {**spec.hyper_parameters, **({"k": 8} if name == "fpo" else {})}
    ctx = LossContext(spec, params, sae=sae, layer=1, reference=reference, logits=logits)
    loss, metrics = ctx(policy, mb)
    grads = torch.autograd.grad(loss, [p for p in policy.parameters()])
    return loss, metrics, grads


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_packed_equals_padded(loss_setup, name, attn):
    """Loss, every metric and every parameter gradient: packed ≡ padded (fp64 model, transformers' sdpa), for the
    selected-position head and for the materialized path on the packed layout, with transformers' packed mask and
    with varlen attention."""
    models, sae, mbs = loss_setup
    want = _run(*models["sdpa"], sae, mbs["padded"], name)
    for logits in ("selected", "materialized"):
        got = _run(*models[attn], sae, mbs["packed"], name, logits)
        assert_same_loss_and_metrics(got, want)
        for g, w in zip(got[2], want[2]):
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
    assert any(float(g.abs().max()) > 0 for g in want[2])


def assert_same_loss_and_metrics(got, want) -> None:
    """``_run``'s loss (to fp64 rounding) and every metric (to 1e-6 relative) agree between two layouts."""
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-10)
    assert set(got[1]) == set(want[1])
    for key in want[1]:
        torch.testing.assert_close(torch.as_tensor(got[1][key]).double(), torch.as_tensor(want[1][key]).double(),
                                   rtol=1e-6, atol=1e-8, msg=key)


@pytest.mark.parametrize("layout", ["packed", "shared"])
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_reference_pass_packed_equals_padded(kind, layout):
    """The cache worker's values (sums, counts, pooled codes, per-token log-probs and codes, top-M reference
    distributions): packed and shared
    (varlen; shared is what the cache job runs by default) ≡ padded (transformers' sdpa)."""
    from fpo_dist.cache.worker import reference_pass

    model = _model(kind, "varlen", dtype=torch.float32)
    hidden = model.config.hidden_size
    sae = build_sae(d_in=hidden, d_sae=96, hook_layer=1, threshold=0.1)
    pairs = _pairs(5, seed=3)
    padded_model = _model(kind, "sdpa", dtype=torch.float32)
    out = {lay: reference_pass(m, sae, 1, pairs, pad_id=0, batch_size=3, per_token_logps=True,
                               per_token_codes=True, layout=lay, topm=8)
           for lay, m in ((layout, model), ("padded", padded_model))}
    a, b = out[layout], out["padded"]
    assert a.n_tokens == b.n_tokens
    torch.testing.assert_close(torch.tensor(a.logp_sum), torch.tensor(b.logp_sum), rtol=1e-5, atol=1e-5)
    nnz = 0
    for pa, pb in zip(a.pooled, b.pooled):
        for (ia, va), (ib, vb) in zip(pa, pb):
            assert (ia == ib).all()
            # per vector, relative to its largest entry (2 blocks + the SAE: depth 3, 2.9·10⁻⁶ of it; measured
            # ≤ 1.9·10⁻⁶ absolute on a Xeon, where the former atol 10⁻⁶ held only through rtol)
            assert_rounding_close(va, vb, dtype=torch.float32, depth=3, dim=None, msg="pooled codes")
            nnz += len(ia)
    assert nnz > 0
    for ta, tb in zip(a.token_logps, b.token_logps):
        for x, y in zip(ta, tb):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    for ca, cb in zip(a.token_codes, b.token_codes):
        for (na, ia, va), (nb, ib, vb) in zip(ca, cb):
            assert (na == nb).all() and (ia == ib).all()
            assert_rounding_close(va, vb, dtype=torch.float32, depth=3, dim=None, msg="per-token codes")
    for ta, tb in zip(a.ref_topm, b.ref_topm):  # offline TDPO's top-8 per response token (ids, log-probs, tail)
        for (ia, la, tla), (ib, lb, tlb) in zip(ta, tb):
            assert ia.shape == ib.shape == la.shape == (len(tla), 8)
            np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(tla, tlb, rtol=1e-5, atol=1e-5)
            untied = np.abs(np.diff(lb, axis=1)).min(1) > 1e-4 if len(lb) else np.zeros(0, bool)
            assert (ia[untied] == ib[untied]).all()
