"""Losses: hand-derived values, log-prob numerics, the TDPO KL, FPO's feature term and gradients, the registry.

Hand-derived numbers write their arithmetic out; ``softplus(-u) = log(1 + e^{-u}) = −log σ(u)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from fpo_dist.losses import (
    LOSSES,
    PooledCodes,
    SparseCodes,
    auto_chunk_size,
    check_loss_requirements,
    dpo_loss,
    feature_distance,
    fpo_loss,
    prediction_mask,
    sequence_logps,
    sequential_kl,
    simpo_loss,
    tdpo_loss,
    token_logps,
)

LOG2 = math.log(2.0)


def nll(u: float) -> float:
    """−log σ(u) = log(1 + e^{−u})."""
    return math.log1p(math.exp(-u))


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def naive_token_logps(logits, input_ids, response_mask):
    """Reference implementation: full fp32 log_softmax, shift, gather, mask."""
    lp = torch.log_softmax(logits.float()[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    lp = lp * response_mask[:, 1:]
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)


def random_batch(batch=3, seq=9, vocab=17, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq, vocab, generator=g) * 3).to(dtype)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    for b in range(batch):  # prompts of different lengths; even rows end in padding
        start = 1 + (3 * b) % (seq - 2)
        mask[b, start : seq if b % 2 else max(start + 1, seq - 2)] = True
    return logits, ids, mask


# ---------------------------------------------------------------------------------------------------------
# Log-probs
# ---------------------------------------------------------------------------------------------------------


def test_token_logps_hand_derived():
    # V = 3.  logits at t=0: [0, ln 2, 0] → p(token 1) = 2/(1+2+1) = 1/2.
    #         logits at t=1: [0, 0, 0]    → p(token 2) = 1/3.   logits at t=2 predict nothing.
    logits = torch.tensor([[[0.0, math.log(2.0), 0.0], [0.0, 0.0, 0.0], [5.0, -5.0, 9.0]]])
    ids = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[False, True, True]])
    out = token_logps(logits, ids, mask)
    torch.testing.assert_close(out, torch.tensor([[0.0, math.log(0.5), math.log(1 / 3)]]))
    logp_sum, n_tokens, logp_avg = sequence_logps(logits, ids, mask)
    torch.testing.assert_close(logp_sum, torch.tensor([math.log(1 / 6)]))  # log(1/2) + log(1/3)
    assert n_tokens.tolist() == [2]
    torch.testing.assert_close(logp_avg, torch.tensor([math.log(1 / 6) / 2]))


def test_prediction_mask_shifts_left():
    mask = torch.tensor([[False, True, True, False], [False, False, True, True]])
    assert prediction_mask(mask).tolist() == [[True, True, False, False], [False, True, True, False]]


def test_token_logps_matches_naive_values_and_gradients():
    logits, ids, mask = random_batch()
    logits.requires_grad_(True)
    weights = torch.randn(ids.shape)
    out = token_logps(logits, ids, mask, chunk_size=2)
    (grad,) = torch.autograd.grad((out * weights).sum(), logits)

    ref_logits = logits.detach().clone().requires_grad_(True)
    expected = naive_token_logps(ref_logits, ids, mask)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), ref_logits)

    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert (out[~mask] == 0).all()
    assert grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_token_logps_gradcheck_fp64():
    logits, ids, mask = random_batch(batch=2, seq=5, vocab=6, dtype=torch.float64)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: token_logps(x, ids, mask, chunk_size=3), (logits,))


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 1000])
def test_chunked_equals_unchunked(chunk_size):
    logits, ids, mask = random_batch()
    whole = token_logps(logits, ids, mask, chunk_size=10_000)
    torch.testing.assert_close(token_logps(logits, ids, mask, chunk_size=chunk_size), whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(token_logps(logits, ids, mask), whole, rtol=0, atol=1e-6)  # auto chunk


def test_auto_chunk_size_budget():
    # Gemma vocab 256000, batch 4: one fp32 position row costs 4 * 256000 * 4 B = 4,096,000 B;
    # 256 MiB = 268,435,456 B → 65 positions per chunk.
    assert auto_chunk_size(4, 256_000) == 65
    assert auto_chunk_size(1, 10**12) == 1  # never below one position


def test_bf16_logits_give_fp32_results_without_fp32_copies():
    logits32, ids, mask = random_batch(batch=2, seq=33, vocab=50)
    logits16 = logits32.to(torch.bfloat16).requires_grad_(True)
    full = 2 * 32 * 50  # B * (T-1) * V
    saved = []

    def pack(x):
        saved.append((x.dtype, x.numel()))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = token_logps(logits16, ids, mask, chunk_size=4)
    assert out.dtype == torch.float32
    # Nothing saved for backward is a full-size fp32 tensor: only the bf16 logits themselves are that big.
    assert all(dtype == torch.bfloat16 for dtype, n in saved if n >= full), saved
    # Same values as the fp32 path on the same (bf16-rounded) logits; close to the unrounded fp32 logits.
    torch.testing.assert_close(out, token_logps(logits16.detach().float(), ids, mask), rtol=0, atol=1e-5)
    torch.testing.assert_close(out, token_logps(logits32, ids, mask), rtol=0, atol=0.1)
    out.sum().backward()
    assert logits16.grad.dtype == torch.bfloat16 and torch.isfinite(logits16.grad.float()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_and_long_sequences_are_finite(dtype):
    g = torch.Generator().manual_seed(1)
    seq, vocab = 4096, 8
    logits = (torch.randint(0, 2, (2, seq, vocab), generator=g) * 2.0 - 1.0) * 1e4
    logits = logits.to(dtype).requires_grad_(True)
    ids = torch.randint(0, vocab, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.bool)
    mask[:, :10] = False
    logp_sum, n_tokens, logp_avg = sequence_logps(logits, ids, mask, chunk_size=512)
    assert torch.isfinite(logp_sum).all() and torch.isfinite(logp_avg).all()
    assert n_tokens.tolist() == [seq - 10, seq - 10]
    assert (logp_sum <= 0).all()
    logp_avg.sum().backward()
    assert torch.isfinite(logits.grad.float()).all()
    kl = sequential_kl(logits.detach().flip(-1), logits, mask, chunk_size=512)
    assert torch.isfinite(kl).all() and (kl >= 0).all()


# ---------------------------------------------------------------------------------------------------------
# Sequential KL (TDPO)
# ---------------------------------------------------------------------------------------------------------


def test_sequential_kl_hand_derived():
    # V = 2.  Position 0: ref [0, 0] → p = (1/2, 1/2); pol [0, ln 3] → q = (1/4, 3/4).
    #   KL = 1/2 ln((1/2)/(1/4)) + 1/2 ln((1/2)/(3/4)) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).
    # Position 1: identical rows → 0.  Position 2 predicts no response token → excluded.
    ref = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [9.0, -9.0]]])
    pol = torch.tensor([[[0.0, math.log(3.0)], [1.0, 2.0], [-9.0, 9.0]]])
    mask = torch.tensor([[False, True, True]])
    torch.testing.assert_close(sequential_kl(ref, pol, mask), torch.tensor([0.5 * math.log(4 / 3)]))


def test_sequential_kl_matches_torch_distributions_with_gradients():
    ref, _, mask = random_batch(seed=2)
    pol, _, _ = random_batch(seed=3)
    ref.requires_grad_(True)
    pol.requires_grad_(True)
    out = sequential_kl(ref, pol, mask, chunk_size=2)
    grads = torch.autograd.grad(out.sum() * 1.0 + (out * torch.arange(3.0)).sum(), (ref, pol))

    ref2, pol2 = ref.detach().clone().requires_grad_(True), pol.detach().clone().requires_grad_(True)
    per_position = kl_divergence(Categorical(logits=ref2), Categorical(logits=pol2))  # [B, T]
    expected = (per_position * prediction_mask(mask)).sum(-1)
    expected_grads = torch.autograd.grad(expected.sum() + (expected * torch.arange(3.0)).sum(), (ref2, pol2))

    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(sequential_kl(ref, pol, mask), out)  # auto chunk == chunk 2


def test_sequential_kl_gradcheck_fp64():
    ref, _, mask = random_batch(batch=2, seq=5, vocab=6, seed=4, dtype=torch.float64)
    pol, _, _ = random_batch(batch=2, seq=5, vocab=6, seed=5, dtype=torch.float64)
    ref.requires_grad_(True)
    pol.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda r, p: sequential_kl(r, p, mask, chunk_size=2), (ref, pol))


# ---------------------------------------------------------------------------------------------------------
# DPO / SimPO / TDPO: hand-derived values
# ---------------------------------------------------------------------------------------------------------


def test_dpo_hand_derived():
    # β = 0.5.  Pair 0: r_w = 0.5(−2 − (−2.5)) = 0.25, r_l = 0.5(−3 − (−2.5)) = −0.25, u = 0.5.
    #           Pair 1: r_w = 0.5(−4 − (−3)) = −0.5,   r_l = 0.5(−4 − (−5)) = 0.5,    u = −1.0.
    loss, m = dpo_loss(t(-2.0, -4.0), t(-3.0, -4.0), t(-2.5, -3.0), t(-2.5, -5.0), beta=0.5)
    torch.testing.assert_close(loss, torch.tensor((nll(0.5) + nll(-1.0)) / 2))
    torch.testing.assert_close(m["rewards_chosen"], torch.tensor((0.25 - 0.5) / 2))
    torch.testing.assert_close(m["rewards_rejected"], torch.tensor((-0.25 + 0.5) / 2))
    torch.testing.assert_close(m["margin"], torch.tensor((0.5 - 1.0) / 2))
    torch.testing.assert_close(m["reward_margin"], torch.tensor((0.5 - 1.0) / 2))
    torch.testing.assert_close(m["reward_accuracy"], torch.tensor(0.5))
    torch.testing.assert_close(m["logps_chosen"], torch.tensor(-3.0))
    torch.testing.assert_close(m["logps_rejected"], torch.tensor(-3.5))
    assert all(not v.requires_grad for v in m.values())


def test_reward_accuracy_is_pairwise_and_ties_are_wrong():
    # Rewards (β = 1, ref = 0): pair 0 (1, 0) right; pair 1 (−5, −6) right — but a batch-flipped comparison
    # (chosen of pair 1 vs rejected of pair 0: −5 < 0) would call it wrong; pair 2 (2, 2) is a tie → wrong.
    zeros = torch.zeros(3)
    _, m = dpo_loss(t(1.0, -5.0, 2.0), t(0.0, -6.0, 2.0), zeros, zeros, beta=1.0)
    torch.testing.assert_close(m["reward_accuracy"], torch.tensor(2 / 3))


def test_simpo_hand_derived_and_gamma_conventions():
    # β = 2, γ = 1: u = 2(−1.0) − 2(−1.5) − 1 = −2 + 3 − 1 = 0 → loss = log 2.
    loss, m = simpo_loss(t(-1.0), t(-1.5), beta=2.0, gamma=1.0)
    torch.testing.assert_close(loss, torch.tensor(LOG2))
    torch.testing.assert_close(m["rewards_chosen"], torch.tensor(-2.0))
    torch.testing.assert_close(m["rewards_rejected"], torch.tensor(-3.0))
    torch.testing.assert_close(m["reward_accuracy"], torch.tensor(1.0))  # γ is not part of the rewards
    # SimPO code's γ/β = 0.5 with β = 2 is the same margin 0.5·2 = 1.
    loss_ratio, _ = simpo_loss(t(-1.0), t(-1.5), beta=2.0, gamma=0.5, gamma_is_ratio=True)
    torch.testing.assert_close(loss_ratio, loss)
    # γ = 0.5 absolute: u = 1 − 0.5 = 0.5.
    torch.testing.assert_close(simpo_loss(t(-1.0), t(-1.5), beta=2.0, gamma=0.5)[0], torch.tensor(nll(0.5)))


def _tdpo_inputs():
    # lr_w = −10 − (−12) = 2, lr_l = −15 − (−14) = −1, KL_w = 3, KL_l = 5.
    kl_w = t(3.0).requires_grad_(True)
    kl_l = t(5.0).requires_grad_(True)
    return (t(-10.0), t(-15.0), t(-12.0), t(-14.0), kl_w, kl_l)


def test_tdpo1_hand_derived():
    # u = β[(lr_w − lr_l) − (KL_l − KL_w)] = 0.1[(2 + 1) − (5 − 3)] = 0.1.
    pc, pr, rc, rr, kl_w, kl_l = _tdpo_inputs()
    loss, m = tdpo_loss(pc, pr, rc, rr, kl_w, kl_l, beta=0.1, variant=1)
    torch.testing.assert_close(loss, torch.tensor(nll(0.1)))
    # rewards (TDPO code): β(lr + KL): chosen 0.1(2 + 3) = 0.5, rejected 0.1(−1 + 5) = 0.4.
    torch.testing.assert_close(m["rewards_chosen"], torch.tensor(0.5))
    torch.testing.assert_close(m["rewards_rejected"], torch.tensor(0.4))
    # ∂L/∂KL_w = −σ(−u)·β = −0.1·σ(−0.1): TDPO1 pushes gradient through KL_w.
    (g_w,) = torch.autograd.grad(loss, kl_w)
    torch.testing.assert_close(g_w, t(-0.1 * torch.sigmoid(torch.tensor(-0.1)).item()))


def test_tdpo2_hand_derived_with_stop_gradient():
    # u = β[(lr_w − lr_l) − α(KL_l − sg(KL_w))] = 0.1[3 − 0.5(5 − 3)] = 0.2.
    pc, pr, rc, rr, kl_w, kl_l = _tdpo_inputs()
    loss, m = tdpo_loss(pc, pr, rc, rr, kl_w, kl_l, beta=0.1, alpha=0.5, variant=2)
    torch.testing.assert_close(loss, torch.tensor(nll(0.2)))
    torch.testing.assert_close(m["margin"], torch.tensor(0.2))
    g_w, g_l = torch.autograd.grad(loss, (kl_w, kl_l), allow_unused=True)
    assert g_w is None or (g_w == 0).all()
    # ∂L/∂KL_l = σ(−u)·αβ = 0.05·σ(−0.2)
    torch.testing.assert_close(g_l, t(0.05 * torch.sigmoid(torch.tensor(-0.2)).item()))
    with pytest.raises(ValueError, match="variant"):
        tdpo_loss(pc, pr, rc, rr, kl_w, kl_l, variant=3)


# ---------------------------------------------------------------------------------------------------------
# Sparse codes and FPO
# ---------------------------------------------------------------------------------------------------------


def test_sparse_codes_roundtrip_and_topk():
    dense = torch.tensor([[0.0, 2.0, 0.0, 0.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 3.0, 0.5, 0.0, 0.0]])
    sc = SparseCodes.from_dense(dense)
    assert sc.offsets.tolist() == [0, 2, 2, 5]
    assert sc.indices.dtype == torch.int32 and sc.indices.tolist() == [1, 5, 0, 2, 3]
    assert sc.values.dtype == torch.float32 and sc.values.tolist() == [2.0, 4.0, 1.0, 3.0, 0.5]
    torch.testing.assert_close(sc.to_dense(6), dense)
    ids, vals, valid = sc.topk(2)
    assert ids.tolist() == [[5, 1], [-1, -1], [2, 0]]
    assert vals.tolist() == [[4.0, 2.0], [0.0, 0.0], [3.0, 1.0]]
    assert valid.tolist() == [[True, True], [False, False], [True, True]]
    ids3, _, valid3 = sc.topk(3)  # row 0 has only two non-zeros: padded, never a zero feature
    assert ids3[0].tolist() == [5, 1, -1] and valid3[0].tolist() == [True, True, False]
    with pytest.raises(ValueError, match="offsets"):
        SparseCodes(torch.tensor([0, 3]), torch.tensor([1, 2]), torch.tensor([1.0, 2.0]))


# Hand example, d_sae = 6, k = 2 (indices 0..5):
#   chosen:   c̄θ_w = [0, 3, 1, 0, 2, 0], c̄ref_w = [0, 2, 0, 0, 0, 4]
#             policy top-2 {1, 4}, reference top-2 {5, 1}; union {1, 4, 5}
#             D_w(union)  = ((3−2)² + (2−0)² + (0−4)²)/2 = (1 + 4 + 16)/2 = 10.5
#             D_w(policy) = ((3−2)² + (2−0)²)/2 = 2.5;  overlap |{1,4} ∩ {1,5}|/2 = 1/2
#   rejected: c̄θ_l = [1, 0, 0, 2, 0, 0], c̄ref_l = [0, 0, 0, 2, 0.5, 0]
#             policy top-2 {3, 0}, reference top-2 {3, 4}; union {0, 3, 4}
#             D_l(union)  = ((1−0)² + (2−2)² + (0−0.5)²)/2 = 1.25/2 = 0.625
#             D_l(policy) = ((1−0)² + 0)/2 = 0.5;  overlap |{0,3} ∩ {3,4}|/2 = 1/2
#   avg log-probs: θ_w = −1.0, θ_l = −2.0, ref_w = ref_l = −1.5; β = 0.1, α = 0.5
#             β[(−1 + 2) − (−1.5 + 1.5)] = 0.1
#   union:  u = 0.1 − 0.5·0.1·(0.625 − 10.5) = 0.1 + 0.49375 = 0.59375
#   policy: u = 0.1 − 0.05·(0.5 − 2.5)       = 0.1 + 0.1     = 0.2
POL_W = [[0.0, 3.0, 1.0, 0.0, 2.0, 0.0]]
REF_W = [[0.0, 2.0, 0.0, 0.0, 0.0, 4.0]]
POL_L = [[1.0, 0.0, 0.0, 2.0, 0.0, 0.0]]
REF_L = [[0.0, 0.0, 0.0, 2.0, 0.5, 0.0]]


def _hand_fpo(topk_mode, pol_w=None, pol_l=None, **kwargs):
    pol_w = torch.tensor(POL_W) if pol_w is None else pol_w
    pol_l = torch.tensor(POL_L) if pol_l is None else pol_l
    return fpo_loss(
        t(-1.0), t(-2.0), t(-1.5), t(-1.5), pol_w, pol_l,
        SparseCodes.from_dense(torch.tensor(REF_W)), SparseCodes.from_dense(torch.tensor(REF_L)),
        beta=0.1, alpha=0.5, k=2, topk_mode=topk_mode, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    "mode, u, d_w, d_l",
    [("union", 0.59375, 10.5, 0.625), ("policy", 0.2, 2.5, 0.5)],
)
def test_fpo_hand_derived(mode, u, d_w, d_l):
    loss, m = _hand_fpo(mode)
    torch.testing.assert_close(loss, torch.tensor(nll(u)))
    torch.testing.assert_close(m["margin"], torch.tensor(u))
    torch.testing.assert_close(m["feature_mse_chosen"], torch.tensor(d_w))
    torch.testing.assert_close(m["feature_mse_rejected"], torch.tensor(d_l))
    torch.testing.assert_close(m["topk_overlap"], torch.tensor(0.5))
    torch.testing.assert_close(m["rewards_chosen"], torch.tensor(0.05))  # 0.1(−1 + 1.5)
    torch.testing.assert_close(m["rewards_rejected"], torch.tensor(-0.05))  # 0.1(−2 + 1.5)
    torch.testing.assert_close(m["reward_accuracy"], torch.tensor(1.0))


def test_feature_distance_never_selects_zero_features():
    # k = 3 but the policy has only two non-zeros ({1: 3, 4: 2}); the reference is 1 on every policy zero.
    # Policy mode: I = {1, 4} (no arbitrary zero index fills the third slot), still divided by k:
    #   D = ((3 − 0)² + (2 − 0)²)/3 = 13/3.   Overlap: reference top-3 ⊂ {0, 2, 3, 5}, disjoint → 0.
    pol = PooledCodes(torch.tensor([[0.0, 3.0, 0.0, 0.0, 2.0, 0.0]]))
    ref = SparseCodes.from_dense(torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0]]))
    d, overlap = feature_distance(pol, ref, k=3, topk_mode="policy")
    torch.testing.assert_close(d, torch.tensor([13 / 3]))
    torch.testing.assert_close(overlap, torch.tensor([0.0]))


def test_fpo_column_subset_equals_dense_and_refuses_missing_reference_columns():
    # Columns {0, 1, 3, 4, 5} hold both sides' union top-2 ({1, 4, 5} and {0, 3, 4}); feature 2 is dropped.
    cols = torch.tensor([0, 1, 3, 4, 5])
    sub_w = PooledCodes(torch.tensor(POL_W)[:, cols], cols)
    sub_l = PooledCodes(torch.tensor(POL_L)[:, cols], cols)
    for mode in ("union", "policy"):
        loss, m = _hand_fpo(mode, sub_w, sub_l)
        dense_loss, dense_m = _hand_fpo(mode)
        torch.testing.assert_close(loss, dense_loss)
        for key in dense_m:
            torch.testing.assert_close(m[key], dense_m[key])
    # Without column 5 the chosen reference top-2 {5, 1} is incomplete: union mode must refuse.
    cols = torch.tensor([0, 1, 3, 4])
    with pytest.raises(ValueError, match="select_columns"):
        _hand_fpo("union", PooledCodes(torch.tensor(POL_W)[:, cols], cols), PooledCodes(torch.tensor(POL_L)[:, cols], cols))
    with pytest.raises(ValueError, match="ascending"):
        PooledCodes(torch.zeros(1, 3), torch.tensor([4, 1, 5]))
    with pytest.raises(ValueError, match="different SAE"):  # dense codes narrower than the cached feature ids
        _hand_fpo("union", torch.tensor(POL_W)[:, :5], torch.tensor(POL_L)[:, :5])


def test_fpo_alpha_zero_is_length_normalised_dpo():
    g = torch.Generator().manual_seed(0)
    pol_w, pol_l, ref_w, ref_l = (-torch.rand(4, generator=g) * 3 for _ in range(4))
    codes = [torch.relu(torch.randn(4, 32, generator=g)) for _ in range(4)]
    loss, m = fpo_loss(
        pol_w, pol_l, ref_w, ref_l, codes[0], codes[1],
        SparseCodes.from_dense(codes[2]), SparseCodes.from_dense(codes[3]), beta=0.1, alpha=0.0, k=5,
    )  # fmt: skip
    dpo, dpo_m = dpo_loss(pol_w, pol_l, ref_w, ref_l, beta=0.1)  # the DPO formula on average log-probs
    torch.testing.assert_close(loss, dpo)
    for key in dpo_m:
        torch.testing.assert_close(m[key], dpo_m[key])
    assert m["feature_mse_rejected"] > 0  # the feature term exists, it is just weighted 0


def test_fpo_stop_gradient_on_chosen_codes():
    pol_w = torch.tensor(POL_W, requires_grad=True)
    pol_l = torch.tensor(POL_L, requires_grad=True)
    loss, _ = _hand_fpo("union", pol_w, pol_l, stop_grad_chosen=True)
    g_w, g_l = torch.autograd.grad(loss, (pol_w, pol_l), allow_unused=True)
    assert g_w is None or (g_w == 0).all()
    assert g_l.abs().sum() > 0

    loss, _ = _hand_fpo("union", pol_w, pol_l, stop_grad_chosen=False)
    (g_w,) = torch.autograd.grad(loss, pol_w)
    # Without sg: ∂L/∂c̄θ_w,i = −σ(−u)·αβ·(2/k)(c̄θ_w,i − c̄ref_w,i) on I = {1, 4, 5}, u = 0.59375:
    #   c̄θ − c̄ref on {1, 4, 5} = (1, 2, −4); zero elsewhere.
    s = torch.sigmoid(torch.tensor(-0.59375)).item()
    expected = torch.zeros(1, 6)
    expected[0, [1, 4, 5]] = torch.tensor([1.0, 2.0, -4.0]) * (-s * 0.05 * (2 / 2))
    torch.testing.assert_close(g_w, expected)


def test_fpo_gradient_step_moves_rejected_codes_toward_reference():
    pol_l = torch.tensor(POL_L, requires_grad=True)
    ref_l = SparseCodes.from_dense(torch.tensor(REF_L))
    loss, _ = _hand_fpo("union", pol_l=pol_l)
    (grad,) = torch.autograd.grad(loss, pol_l)
    # Descending L raises u = … − αβ·D_l, i.e. lowers D_l: the selected entries move toward the reference
    # (feature 0: 1 → toward 0; feature 3: already equal; feature 2, unselected: untouched).
    assert grad[0, 0] > 0 and grad[0, 3] == 0 and grad[0, 2] == 0
    stepped = pol_l.detach() - 0.5 * grad
    before, _ = feature_distance(PooledCodes(pol_l.detach()), ref_l, k=2)
    after, _ = feature_distance(PooledCodes(stepped), ref_l, k=2)
    assert after < before


def test_policy_equal_reference_gives_log2_and_zero_feature_mse():
    logits, ids, mask = random_batch(batch=4, seed=7)
    chosen, rejected = logits[:2], logits[2:]
    pol_w, n_w, avg_w = sequence_logps(chosen, ids[:2], mask[:2])
    pol_l, n_l, avg_l = sequence_logps(rejected, ids[2:], mask[2:])
    kl_w = sequential_kl(chosen, chosen.clone(), mask[:2])
    kl_l = sequential_kl(rejected, rejected.clone(), mask[2:])
    assert (kl_w == 0).all() and (kl_l == 0).all()
    log2 = torch.tensor(LOG2)
    torch.testing.assert_close(dpo_loss(pol_w, pol_l, pol_w.clone(), pol_l.clone())[0], log2)
    for variant in (1, 2):
        torch.testing.assert_close(tdpo_loss(pol_w, pol_l, pol_w, pol_l, kl_w, kl_l, variant=variant)[0], log2)
    g = torch.Generator().manual_seed(0)
    codes_w, codes_l = torch.relu(torch.randn(2, 64, generator=g)), torch.relu(torch.randn(2, 64, generator=g))
    loss, m = fpo_loss(
        avg_w, avg_l, avg_w.clone(), avg_l.clone(), codes_w, codes_l,
        SparseCodes.from_dense(codes_w), SparseCodes.from_dense(codes_l), k=5,
    )  # fmt: skip
    torch.testing.assert_close(loss, log2)
    assert m["feature_mse_chosen"] == 0 and m["feature_mse_rejected"] == 0
    torch.testing.assert_close(m["topk_overlap"], torch.tensor(1.0))


def test_fpo_margin_and_feature_terms_hand_derived():
    # Pair 0 is the hand example (union): margin term m = 0.1, feature term f = αβ(D_l − D_w) = 0.05·(0.625 − 10.5)
    #   = −0.49375, u = m − f = 0.59375.  Pair 1 swaps the sides (codes and log-probs): θ_w = −2, θ_l = −1 →
    #   m = 0.1[(−2 + 1) − 0] = −0.1; D_w = 0.625, D_l = 10.5 → f = 0.05·9.875 = 0.49375; u = −0.59375.
    # Signed batch means: m̄ = 0, f̄ = 0, ū = 0; magnitudes: mean|m| = 0.1, mean|f| = 0.49375.
    codes = torch.tensor(POL_W + POL_L), torch.tensor(POL_L + POL_W)
    refs = SparseCodes.from_dense(torch.tensor(REF_W + REF_L)), SparseCodes.from_dense(torch.tensor(REF_L + REF_W))
    for sg in (True, False):  # the stop-gradient changes gradients, not values
        loss, m = fpo_loss(t(-1.0, -2.0), t(-2.0, -1.0), t(-1.5, -1.5), t(-1.5, -1.5), *codes, *refs,
                           beta=0.1, alpha=0.5, k=2, stop_grad_chosen=sg)
        torch.testing.assert_close(loss, torch.tensor((nll(0.59375) + nll(-0.59375)) / 2))
        torch.testing.assert_close(m["reward_margin"], torch.tensor(0.0))
        torch.testing.assert_close(m["feature_term"], torch.tensor(0.0))
        torch.testing.assert_close(m["reward_margin_abs"], torch.tensor(0.1))
        torch.testing.assert_close(m["feature_term_abs"], torch.tensor(0.49375))
    loss, m = _hand_fpo("union")  # pair 0 alone: the signed terms
    torch.testing.assert_close(m["reward_margin"], torch.tensor(0.1))
    torch.testing.assert_close(m["feature_term"], torch.tensor(-0.49375))
    torch.testing.assert_close(m["feature_term_abs"], torch.tensor(0.49375))
    assert "feature_term" not in dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5))[1]  # FPO's alone


def test_fpo_mean_u_is_margin_term_minus_feature_term():
    # mean_b u_b = mean_b m_b − mean_b f_b: the logged "margin" equals reward_margin − feature_term.  fp32: each
    # side rounds at ~1.2e-7 of its magnitude (a few units here) per operation → atol 1e-5.
    g = torch.Generator().manual_seed(3)
    pol_w, pol_l, ref_w, ref_l = (-torch.rand(8, generator=g) * 3 for _ in range(4))
    codes = [torch.relu(torch.randn(8, 40, generator=g)) for _ in range(4)]
    _, m = fpo_loss(pol_w, pol_l, ref_w, ref_l, codes[0], codes[1], SparseCodes.from_dense(codes[2]),
                    SparseCodes.from_dense(codes[3]), beta=0.1, alpha=4.0, k=5)
    assert m["feature_term_abs"] > 0.1 and m["reward_margin_abs"] > 0.1  # both terms count
    torch.testing.assert_close(m["margin"], m["reward_margin"] - m["feature_term"], atol=1e-5, rtol=0)
    assert m["feature_term_abs"] >= m["feature_term"].abs() and m["reward_margin_abs"] >= m["reward_margin"].abs()


# ---------------------------------------------------------------------------------------------------------
# The feature-term warning (fpo_dist.diagnostics)
# ---------------------------------------------------------------------------------------------------------


def test_feature_term_warning_threshold_and_message():
    from fpo_dist.diagnostics import feature_term_warning

    # window means: |f| = (3 + 5)/2 = 4, |m| = (0.2 + 0.6)/2 = 0.4 → ratio exactly 10: not above, no warning
    assert feature_term_warning([3.0, 5.0], [0.2, 0.6], alpha=0.5, beta=0.1) is None
    # |f| = (3 + 5.2)/2 = 4.1 > 10 · 0.4 → warns, naming both means, the ratio (4.1/0.4 = 10.25), α, β, the remedy
    line = feature_term_warning([3.0, 5.2], [0.2, 0.6], alpha=0.5, beta=0.1)
    assert line is not None and "\n" not in line
    for part in ("last 2 optimizer steps", "is 4.1 ", "is 0.4 ", "10.2", "α 0.5", "β 0.1", "--loss.alpha",
                 "docs/method.md"):
        assert part in line, (part, line)
    assert feature_term_warning([], [], 0.5, 0.1) is None
    with pytest.raises(ValueError, match="margin_abs"):
        feature_term_warning([1.0], [1.0, 2.0], 0.5, 0.1)


def test_feature_term_warning_near_zero():
    from fpo_dist.diagnostics import FLOOR, feature_term_warning

    assert feature_term_warning([0.0] * 5, [0.0] * 5, 0.5, 0.1) is None  # policy = reference: 0 against 0
    assert feature_term_warning([FLOOR / 2] * 5, [0.0] * 5, 0.5, 0.1) is None  # negligible, however large the ratio
    line = feature_term_warning([1e-3] * 5, [0.0] * 5, 0.5, 0.1)  # a real feature term, no margin at all
    assert line is not None and "inf×" in line
    assert feature_term_warning([float("nan")] * 5, [1.0] * 5, 0.5, 0.1) is None


def test_feature_term_monitor_window_and_once():
    from fpo_dist.diagnostics import FeatureTermMonitor, window_size

    assert [window_size(n) for n in (1, 4, 5, 12, 20, 1000)] == [0, 0, 5, 12, 20, 20]
    # 100 steps → window 20.  |m| = 1 every step; |f| = 0 for 20 steps, then 30.  After j steps of 30 the window's
    # mean |f| is 30j/20 = 1.5j, above 10 · 1 first at j = 7 → the warning comes at step 27, and only then.
    mon = FeatureTermMonitor(100, alpha=2.0, beta=0.5)
    said = {}
    for step in range(1, 61):
        rec = {"feature_term_abs": 0.0 if step <= 20 else 30.0, "reward_margin_abs": 1.0, "loss": 0.7}
        if (line := mon.update(rec)) is not None:
            said[step] = line
    assert list(said) == [27] and "is 10.5 " in said[27] and "α 2, β 0.5" in said[27]
    # a run shorter than the window is judged over all its steps, but only from 5 steps on
    short = FeatureTermMonitor(6, 0.5, 0.1)
    assert [short.update({"feature_term_abs": 1.0, "reward_margin_abs": 0.0}) is not None for _ in range(6)] == \
        [False] * 5 + [True]
    tiny = FeatureTermMonitor(4, 0.5, 0.1)
    assert all(tiny.update({"feature_term_abs": 1.0, "reward_margin_abs": 0.0}) is None for _ in range(4))
    other = FeatureTermMonitor(100, 0.5, 0.1)  # a loss without the metric (DPO, TDPO2, ...): never
    assert all(other.update({"reward_margin_abs": 0.0, "loss": 0.7}) is None for _ in range(50))


# ---------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------


def test_registry_entries():
    assert set(LOSSES) == {"fpo", "dpo", "simpo", "dpo-online", "tdpo1", "tdpo2", "tdpo1-offline", "tdpo2-offline"}
    assert LOSSES["fpo"].needs == "cache" and LOSSES["fpo"].needs_sae
    assert LOSSES["dpo"].needs == "cache" and not LOSSES["dpo"].needs_sae
    assert LOSSES["simpo"].needs == "none" and LOSSES["simpo"].defaults["beta"] == 2.0
    assert LOSSES["dpo-online"].needs == "reference_model" and not LOSSES["dpo-online"].needs_ref_logits
    assert all(LOSSES[n].needs == "reference_model" and LOSSES[n].needs_ref_logits for n in ("tdpo1", "tdpo2"))
    assert all(LOSSES[n].needs == "cache" and LOSSES[n].needs_ref_topm and not LOSSES[n].needs_ref_logits
               for n in ("tdpo1-offline", "tdpo2-offline"))
    for name in ("tdpo1", "tdpo2"):  # the offline losses are the same functions with the same defaults
        assert LOSSES[f"{name}-offline"].fn.keywords == LOSSES[name].fn.keywords
        assert LOSSES[f"{name}-offline"].defaults == LOSSES[name].defaults
    assert LOSSES["fpo"].defaults["k"] == 50 and LOSSES["fpo"].defaults["topk_mode"] == "union"
    # The registered functions accept their defaults: TDPO2 with its defaults equals the hand value above.
    pc, pr, rc, rr, kl_w, kl_l = _tdpo_inputs()
    loss, _ = LOSSES["tdpo2"].fn(pc, pr, rc, rr, kl_w, kl_l, **LOSSES["tdpo2"].defaults)
    torch.testing.assert_close(loss, torch.tensor(nll(0.2)))
    loss1, _ = LOSSES["tdpo1"].fn(pc, pr, rc, rr, kl_w, kl_l, **LOSSES["tdpo1"].defaults)
    torch.testing.assert_close(loss1, torch.tensor(nll(0.1)))


def test_check_loss_requirements_messages():
    with pytest.raises(ValueError, match=r"'tdpo2' needs a resident reference model \(the cache holds no full-vocab"):
        check_loss_requirements("tdpo2", have_cache=True, have_reference_model=False, have_sae=False)
    with pytest.raises(ValueError, match=r"'dpo-online' needs a resident reference model.*--ref_model"):
        check_loss_requirements("dpo-online", have_cache=True, have_reference_model=False, have_sae=False)
    with pytest.raises(ValueError, match=r"'fpo' needs an offline reference cache.*--cache.*simpo"):
        check_loss_requirements("fpo", have_cache=False, have_reference_model=True, have_sae=True)
    with pytest.raises(ValueError, match=r"'fpo' needs the SAE.*--sae.source"):
        check_loss_requirements("fpo", have_cache=True, have_reference_model=False, have_sae=False)
    with pytest.raises(ValueError, match="unknown loss 'ipo'"):
        check_loss_requirements("ipo", have_cache=True, have_reference_model=True, have_sae=True)
    assert check_loss_requirements("fpo", True, False, True) is LOSSES["fpo"]
    assert check_loss_requirements("simpo", False, False, False) is LOSSES["simpo"]
    assert check_loss_requirements("tdpo2", False, True, False) is LOSSES["tdpo2"]
