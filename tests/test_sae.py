"""SAE helpers: loading, encode_selected vs sae-lens' encode, pooling, sparse export, column selection, and the
FPO gradient path from hidden states through the frozen SAE."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fpo_dist.losses import PooledCodes, SparseCodes, fpo_loss, prediction_mask
from fpo_dist.sae import encode_full, encode_selected, load_sae, pool_mean, select_columns, to_sparse
from fpo_dist.testing import build_sae

D_IN, D_SAE = 32, 128


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sae")
    build_sae(out, d_in=D_IN, d_sae=D_SAE, seed=0)
    return out


@pytest.fixture(scope="module")
def sae(sae_dir):
    return load_sae(str(sae_dir))


def hidden(*shape, seed=0, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_import_does_not_import_sae_lens():
    code = "import sys, fpo_dist.sae; assert 'sae_lens' not in sys.modules, 'sae_lens imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_sae_from_disk_is_frozen_and_matches_the_saved_sae(sae_dir, sae):
    built = build_sae(None, d_in=D_IN, d_sae=D_SAE, seed=0)  # same seed: same weights
    assert not sae.training
    assert all(not p.requires_grad for p in sae.parameters())
    h = hidden(5, D_IN)
    torch.testing.assert_close(encode_full(sae, h), built.encode(h))
    # A release-like directory: source/sae_id.
    assert load_sae(str(sae_dir.parent), sae_id=sae_dir.name).cfg.d_sae == D_SAE
    with pytest.raises(ValueError, match="not a sub-directory"):
        load_sae(str(sae_dir), sae_id="layer_9/width_16k")
    with pytest.raises(ValueError, match="needs an sae_id"):
        load_sae("gemma-scope-2b-pt-res", sae_id=None)


@pytest.mark.parametrize("apply_b_dec_to_input", [False, True])
def test_encode_selected_equals_encode_columns_with_gradients(apply_b_dec_to_input):
    sae = build_sae(None, d_in=D_IN, d_sae=D_SAE, seed=1, apply_b_dec_to_input=apply_b_dec_to_input)
    with torch.no_grad():
        sae.b_dec.mul_(10.0)  # make the b_dec term matter
    cols = torch.tensor([0, 3, 17, 18, 64, 100, 127])
    h_full = hidden(2, 6, D_IN, seed=2).requires_grad_(True)
    h_sel = h_full.detach().clone().requires_grad_(True)

    full = sae.encode(h_full)[..., cols]
    sel = encode_selected(sae, h_sel, cols)
    active = (full > 0).float().mean()
    assert 0.05 < active < 0.95, f"test needs a mix of active and inactive units, got {active:.2f}"
    torch.testing.assert_close(sel, full, rtol=1e-5, atol=1e-6)

    weights = hidden(*full.shape, seed=3)
    (full * weights).sum().backward()
    (sel * weights).sum().backward()
    torch.testing.assert_close(h_sel.grad, h_full.grad, rtol=1e-5, atol=1e-6)
    assert h_sel.grad.abs().sum() > 0


def test_encode_selected_standard_sae_and_refusals():
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    std = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=64))
    with torch.no_grad():
        std.b_enc.copy_(torch.randn(64) * 0.5)
    cols = torch.tensor([1, 2, 40])
    h = hidden(3, D_IN, seed=4)
    torch.testing.assert_close(encode_selected(std, h, cols), std.encode(h)[..., cols], rtol=1e-5, atol=1e-6)

    with pytest.raises(NotImplementedError, match="encode_full"):
        encode_selected(TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=64, k=4)), h, cols)
    normed = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=64, normalize_activations="layer_norm"))
    with pytest.raises(NotImplementedError, match="layer_norm.*encode_full"):
        encode_selected(normed, h, cols)


def test_no_gradient_reaches_sae_parameters():
    sae = build_sae(None, d_in=D_IN, d_sae=D_SAE, seed=5)  # unfrozen on purpose: encode_selected must not care
    h = hidden(4, D_IN, seed=6).requires_grad_(True)
    encode_selected(sae, h, torch.arange(0, D_SAE, 3)).sum().backward()
    assert all(p.grad is None for p in sae.parameters())
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_pool_mean_hand_derived():
    # Row 0: positions 0 and 2 are real: mean([1, 2], [5, 6]) = [3, 4].  Row 1: nothing real → zeros, not NaN.
    codes = torch.tensor([[[1.0, 2.0], [100.0, 100.0], [5.0, 6.0]], [[7.0, 7.0], [7.0, 7.0], [7.0, 7.0]]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    torch.testing.assert_close(pool_mean(codes, mask), torch.tensor([[3.0, 4.0], [0.0, 0.0]]))


def test_to_sparse_layout():
    pooled = torch.tensor([[0.0, 0.25, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    sc = to_sparse(pooled)
    assert sc.offsets.tolist() == [0, 2, 3]
    assert sc.indices.dtype == torch.int32 and sc.indices.tolist() == [1, 3, 0]
    assert sc.values.dtype == torch.float32 and sc.values.tolist() == [0.25, 2.0, 1.0]
    torch.testing.assert_close(sc.to_dense(4), pooled.float())


def test_select_columns_hand_derived():
    # k = 2.  Policy [0, 3, 1, 0, 2, 0] → top-2 {1, 4}; reference [0, 2, 0, 0, 0, 4] → top-2 {5, 1}.
    pol = torch.tensor([[0.0, 3.0, 1.0, 0.0, 2.0, 0.0]])
    ref = SparseCodes.from_dense(torch.tensor([[0.0, 2.0, 0.0, 0.0, 0.0, 4.0]]))
    assert select_columns(pol, ref, k=2).tolist() == [1, 4, 5]
    assert select_columns(pol, ref, k=2, topk_mode="policy").tolist() == [1, 4]
    # Several tensors (chosen and rejected): the union over all of them, ascending.
    pol2 = torch.tensor([[9.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    ref2 = SparseCodes.from_dense(torch.tensor([[0.0, 0.0, 7.0, 0.0, 0.0, 0.0]]))
    assert select_columns([pol, pol2], [ref, ref2], k=2).tolist() == [0, 1, 2, 4, 5]


def _pair_inputs(sae, seed, batch=3, seq=10):
    """Random hidden states and masks for chosen/rejected, with the cached reference codes of other states."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for side in ("chosen", "rejected"):
        h = torch.randn(batch, seq, D_IN, generator=g) * 2
        mask = torch.zeros(batch, seq, dtype=torch.bool)
        for b in range(batch):
            mask[b, 2 + b : seq - b] = True
        ref_h = h + 0.5 * torch.randn(h.shape, generator=g)
        with torch.no_grad():
            ref = to_sparse(pool_mean(encode_full(sae, ref_h), prediction_mask(mask)))
        out[side] = (h, prediction_mask(mask), ref)
    return out


@pytest.mark.parametrize("topk_mode", ["union", "policy"])
def test_selected_columns_path_equals_dense_path(sae, topk_mode):
    inputs = _pair_inputs(sae, seed=7)
    avg = torch.tensor([-1.0, -2.0, -1.5]), torch.tensor([-2.0, -1.0, -2.5])
    ref_avg = torch.tensor([-1.2, -1.8, -1.5]), torch.tensor([-1.9, -1.1, -2.0])
    k = 8

    def run(selected: bool):
        hs = {s: inputs[s][0].clone().requires_grad_(True) for s in inputs}
        if selected:
            with torch.no_grad():
                full = [pool_mean(encode_full(sae, hs[s]), inputs[s][1]) for s in inputs]
            cols = select_columns(full, [inputs[s][2] for s in inputs], k, topk_mode)
            assert cols.numel() < D_SAE
            codes = [PooledCodes(pool_mean(encode_selected(sae, hs[s], cols), inputs[s][1]), cols) for s in inputs]
        else:
            codes = [pool_mean(encode_full(sae, hs[s]), inputs[s][1]) for s in inputs]
        loss, m = fpo_loss(*avg, *ref_avg, *codes, inputs["chosen"][2], inputs["rejected"][2], k=k, topk_mode=topk_mode)
        loss.backward()
        return loss, m, hs

    loss_d, m_d, hs_d = run(selected=False)
    loss_s, m_s, hs_s = run(selected=True)
    torch.testing.assert_close(loss_s, loss_d)
    for key in m_d:
        torch.testing.assert_close(m_s[key], m_d[key])
    assert m_d["feature_mse_rejected"] > 0
    # Gradient reaches the rejected hidden states (through active units) identically; the chosen side is sg.
    torch.testing.assert_close(hs_s["rejected"].grad, hs_d["rejected"].grad, rtol=1e-5, atol=1e-8)
    assert hs_d["rejected"].grad.abs().sum() > 0
    for hs in (hs_s, hs_d):
        assert hs["chosen"].grad is None or (hs["chosen"].grad == 0).all()
    assert all(p.grad is None for p in sae.parameters())


def test_pooling_and_fpo_loss_independent_of_padding(sae):
    """One pair padded to lengths 7 and 12, alone or next to other pairs: same pooled codes, same FPO loss."""
    g = torch.Generator().manual_seed(11)
    n_real = 7  # positions 0..6: prompt 0..2, predicting positions 2..5 (token 6 is the last response token)
    real = {s: torch.randn(n_real, D_IN, generator=g) * 2 for s in ("chosen", "rejected")}
    resp = torch.zeros(n_real, dtype=torch.bool)
    resp[3:] = True
    ref = {s: SparseCodes.from_dense(torch.relu(torch.randn(1, D_SAE, generator=g)) * 0.3) for s in real}

    def padded(side: str, length: int, garbage: float):
        h = torch.full((length, D_IN), garbage)
        h[:n_real] = real[side]
        m = torch.zeros(length, dtype=torch.bool)
        m[:n_real] = resp
        return h, m

    def pooled(rows):
        hs = torch.stack([h for h, _ in rows])
        masks = torch.stack([m for _, m in rows])
        return pool_mean(encode_full(sae, hs), prediction_mask(masks))

    alone = {s: pooled([padded(s, n_real, 0.0)]) for s in real}
    assert alone["chosen"].abs().sum() > 0
    others = [(torch.randn(12, D_IN, generator=g), torch.arange(12) > 4) for _ in range(2)]
    for length, garbage in ((12, 50.0), (12, float("nan")), (9, -3.0)):
        batch = [(h[:length], m[:length]) for h, m in others]
        in_batch = pooled([batch[0], padded("chosen", length, garbage), batch[1]])[1:2]
        torch.testing.assert_close(in_batch, alone["chosen"], rtol=1e-6, atol=1e-7)

    def loss_of(length, garbages):
        codes = {s: pooled([padded(s, length, x) for x in garbages]) for s in real}
        b = len(garbages)
        refs = {s: SparseCodes.from_dense(ref[s].to_dense(D_SAE).expand(b, -1)) for s in real}
        avg = [torch.full((b,), v) for v in (-1.0, -2.0, -1.4, -1.6)]
        return fpo_loss(*avg, codes["chosen"], codes["rejected"], refs["chosen"], refs["rejected"], k=10)[0]

    reference_loss = loss_of(n_real, [0.0])
    assert reference_loss != torch.log(torch.tensor(2.0))
    torch.testing.assert_close(loss_of(12, [9.0]), reference_loss)
    # The same pair three times in one batch, with different padding contents: the mean loss is unchanged.
    torch.testing.assert_close(loss_of(12, [9.0, float("nan"), -50.0]), reference_loss)
