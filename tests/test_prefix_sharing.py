"""Prefix sharing: the ``shared`` layout (one ``[prompt, chosen, rejected]`` segment group per pair, the prompt
computed once) ≡ the unshared layouts it replaces.

The oracles: transformers' own forward of each sequence ALONE (sdpa, batch 1) for the hidden states at every
position of both sequences of a pair, on Llama and on Gemma 3 (sliding-window layers with a 4-token window, so the
rejected tokens' windows reach into the prompt; a final-logit soft-cap); the padded layout for every registered loss
(loss, metrics, every gradient — the prompt's last position counts for both sequences, so its gradient is the sum of
both).  bf16: within bf16 rounding of the packed layout.  The cache worker's values:
``test_packing.py::test_reference_pass_packed_equals_padded[shared]``; Gemma 3 270M: ``test_realshape.py``;
2 ranks under ZeRO-3: ``test_train.py::test_tdpo2_selected_head_equals_materialized_under_zero3``.
"""

from __future__ import annotations

import pytest
import torch
from test_packing import _micro_batch, _model, _pairs, _run, assert_same_loss_and_metrics, loss_setup  # noqa: F401

from fpo_dist.attention import sequence_spans
from fpo_dist.data import TokenizedPair
from fpo_dist.lm_head import backbone
from fpo_dist.losses import LOSSES
from fpo_dist.models import build_batch
from fpo_dist.testing import assert_rounding_close


def test_shared_layout_hand_checked():
    pairs = [TokenizedPair(0, bytes(16), (5, 6), (7,), (8, 9)), TokenizedPair(1, bytes(16), (10,), (11, 12), (13,))]
    b = build_batch(pairs, pad_id=0, layout="shared")
    # pair 0: prompt 5 6, chosen 7, rejected 8 9; pair 1: prompt 10, chosen 11 12, rejected 13
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert b.position_ids.tolist() == [[0, 1, 2, 2, 3, 0, 1, 2, 1]]  # rejected continues from the prompt
    assert b.sequence_ids.tolist() == [[0, 0, 0, 2, 2, 1, 1, 1, 3]]
    assert b.response_mask.int().tolist() == [[0, 0, 1, 1, 1, 0, 1, 1, 1]]
    assert b.attention_mask is None and b.n_sequences == 4 and b.padding_tokens == 0
    sel = b.selection
    # position 1 (the prompt's last token) predicts 7 (chosen 0) and 8 (rejected 0); 5 predicts 11 and 13
    assert sel.positions.tolist() == [1, 5, 6, 1, 3, 5]
    assert sel.targets.tolist() == [7, 11, 12, 8, 9, 13]
    assert sel.sequences.tolist() == [0, 1, 1, 2, 2, 3]
    assert b.prediction_mask.int().tolist() == [[0, 1, 0, 1, 0, 1, 1, 0, 0]]
    # the attention's segments: a segment starting at position k > 0 reads the first k tokens of the prompt's
    assert sequence_spans(b.position_ids, None, 1, 9) == [[(0, 3, 0, 0), (3, 5, 0, 2), (5, 8, 5, 0), (8, 9, 5, 1)]]
    # tokens computed per pair fall by the prompt: 9 here against the packed layout's 12
    assert build_batch(pairs, pad_id=0, layout="packed").input_ids.shape[1] == 12


def test_a_continuation_without_its_prompt_is_refused():
    with pytest.raises(ValueError, match="starts at position 3"):
        sequence_spans(torch.tensor([[0, 1, 3, 4]]), None, 1, 4)  # needs a 3-token segment from 0 before it
    with pytest.raises(ValueError, match="starts at position 2"):
        sequence_spans(torch.tensor([[2, 3, 4]]), None, 1, 3)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_shared_forward_equals_each_sequence_alone(kind):
    """Every position of both sequences of every pair: the shared row's final hidden states (the prompt's from the
    one copy) equal transformers' forward of ``prompt + chosen`` and of ``prompt + rejected`` alone, to fp64
    rounding; without the prefix (positions restarting at 0) the rejected tokens move by O(max|x|)."""
    model, alone_model = _model(kind, "varlen"), _model(kind, "sdpa")
    pairs = _pairs(4, seed=1)
    b = build_batch(pairs, pad_id=0, layout="shared")
    with torch.no_grad():
        h = backbone(model)(**b.model_inputs()).last_hidden_state[0]
        broken = backbone(model)(input_ids=b.input_ids, position_ids=torch.cat(
            [torch.arange(n) for n in torch.unique_consecutive(b.sequence_ids[0], return_counts=True)[1].tolist()])[None],
            use_cache=False).last_hidden_state[0]
        offset, moved = 0, 0.0
        for p in pairs:
            P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
            for resp, own in ((p.chosen_ids, slice(offset + P, offset + P + C)),
                              (p.rejected_ids, slice(offset + P + C, offset + P + C + R))):
                ids = torch.tensor([*p.prompt_ids, *resp])[None]
                alone = backbone(alone_model)(input_ids=ids, use_cache=False).last_hidden_state[0]
                got = torch.cat([h[offset : offset + P], h[own]])
                assert_rounding_close(got, alone, dtype=torch.float64, depth=2, msg=f"{kind}, pair {p.index}")
            rej = slice(offset + P + C, offset + P + C + R)
            moved = max(moved, float((broken[rej] - h[rej]).abs().max()))
            offset += P + C + R
    assert moved > 1e-3  # the check can fail: a rejected segment that does not read the prompt is far off


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_shared_bf16_within_rounding_of_packed(kind):
    """bf16: the cache worker's values (log-prob sums, per-token log-probs, pooled codes) under the shared layout
    are within bf16 rounding of the packed layout's (the rejected tokens' attention is one call over prompt +
    rejected keys instead of a causal one over the whole sequence: another summation order, not another sum)."""
    from fpo_dist.scoring import score_batch
    from fpo_dist.testing import build_sae

    model = _model(kind, "varlen", dtype=torch.bfloat16)
    sae = build_sae(d_in=model.config.hidden_size, d_sae=96, hook_layer=1, threshold=0.1).to(torch.bfloat16)
    pairs = _pairs(6, seed=5)
    out = {layout: score_batch(model, build_batch(pairs, 0, layout), sae, 1) for layout in ("shared", "packed")}
    a, b = out["shared"], out["packed"]
    assert torch.equal(a.n_tokens, b.n_tokens) and torch.equal(a.sequences, b.sequences)
    assert_rounding_close(a.token_logps, b.token_logps, dtype=torch.bfloat16, depth=3, dim=None, msg="token logps")
    assert_rounding_close(a.pooled, b.pooled, dtype=torch.bfloat16, depth=3, dim=None, msg="pooled codes")
    chosen = slice(0, len(pairs))  # prompt + chosen is one causal segment in both layouts: bit-identical
    assert torch.equal(a.logp_sum[chosen], b.logp_sum[chosen])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_shared_equals_padded(loss_setup, name):  # noqa: F811
    """Loss, every metric and every parameter gradient: shared (varlen) ≡ padded (transformers' sdpa), fp64 model.

    The gradients agree to fp32 rounding, not fp64's: Llama's RMSNorm computes in fp32 whatever the model's dtype,
    so every gradient passes through fp32 casts, and a shared prompt position's gradient is rounded there once, as
    the sum of both sequences', where the unshared layouts round each copy's (measured ≤ 0.4·eps₃₂ of each
    tensor's largest entry; a dropped or doubled contribution is a sizeable fraction of it)."""
    models, sae, mbs = loss_setup
    want = _run(*models["sdpa"], sae, mbs["padded"], name)
    got = _run(*models["varlen"], sae, mbs["shared"], name)
    assert_same_loss_and_metrics(got, want)
    for g, w in zip(got[2], want[2]):
        assert_rounding_close(g, w, dtype=torch.float32, depth=3, dim=None, msg=f"{name} gradient")
    assert any(float(g.abs().max()) > 0 for g in want[2])
    with pytest.raises(ValueError, match="materialized"):
        _run(*models["varlen"], sae, mbs["shared"], name, "materialized")


def test_shared_micro_batch_moves_its_selection():
    """A MicroBatch carries the shared layout's selection through ``.to`` and back out as a PairBatch."""
    b = build_batch(_pairs(2), 0, "shared")
    mb = _micro_batch(b, torch.zeros(4), torch.zeros(4, 8)).to("cpu")
    assert mb.layout.shared is not None and torch.equal(mb.layout.selection.positions, b.selection.positions)
