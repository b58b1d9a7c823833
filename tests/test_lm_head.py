"""The output layer at selected positions (fpo_dist.lm_head) ≡ the materialized path it replaces, and ≡ TRL's fused
LM head (an independent implementation, test-only oracle); no [positions × vocab] tensor beyond one chunk.

The materialized path: ``model(...).logits`` (transformers' own forward, soft-cap included) + the chunked fp32
log-softmax of ``fpo_dist.logprobs`` — itself tested against hand-derived numbers in test_losses.py.
Under ZeRO-3 (2 ranks, every parameter partitioned) the path is held to plain PyTorch by
test_train.py::test_two_rank_zero3_equals_plain_pytorch (policy) and ::test_dpo_cached_equals_dpo_online
(frozen reference engine).
"""

from __future__ import annotations

import pytest
import torch

from fpo_dist.lm_head import HeadTransform, ref_head, row_sums, selected_forward
from fpo_dist.logprobs import prediction_mask, sequential_kl, token_logps
from fpo_dist.testing import build_gemma3, build_llama

VOCAB = 300  # distinct from every other dimension, so vocab-sized tensors are recognisable


def _models(kind: str, seed: int):
    if kind == "llama-untied":
        return build_llama(vocab_size=VOCAB, seed=seed)
    softcap = 3.0 if "softcap" in kind else None
    return build_gemma3(vocab_size=VOCAB, softcap=softcap, tied="untied" not in kind, seed=seed)


def _batch(rows=4, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, seq), generator=g)
    att = torch.ones(rows, seq, dtype=torch.long)
    att[1, 9:] = 0  # a padded row
    resp = torch.zeros(rows, seq, dtype=torch.bool)
    resp[:, 5:] = True
    resp[2, 5:7] = False  # a longer prompt
    return ids, att, resp & att.bool()


def _materialized(model, ref, ids, att, resp, weights):
    logits = model(input_ids=ids, attention_mask=att).logits
    with torch.no_grad():
        ref_logits = ref(input_ids=ids, attention_mask=att).logits
    lp = token_logps(logits, ids, resp).sum(-1)
    kl = sequential_kl(ref_logits, logits, resp)
    params = [p for p in model.parameters()]
    return lp, kl, torch.autograd.grad((lp * weights).sum() + 0.7 * kl.sum(), params)


def _selected(model, ref, ids, att, resp, weights, chunk, weight_grad="auto"):
    pm = prediction_mask(resp)
    with torch.no_grad():
        r = selected_forward(ref, ids, att, pm, chunk_size=chunk)
    out = selected_forward(model, ids, att, pm, ref=ref_head(ref, r.hidden), chunk_size=chunk, weight_grad=weight_grad)
    lp, kl = row_sums(out.logps, out.rows, len(ids)), row_sums(out.kl, out.rows, len(ids))
    params = [p for p in model.parameters()]
    return lp, kl, torch.autograd.grad((lp * weights).sum() + 0.7 * kl.sum(), params), r


@pytest.mark.parametrize("weight_grad", ["auto", "vocab"])
@pytest.mark.parametrize("kind", ["llama-untied", "gemma-tied", "gemma-tied-softcap", "gemma-untied-softcap"])
def test_selected_equals_materialized_values_and_gradients(kind, weight_grad):
    """fp64: log-prob sums, TDPO KL and every parameter gradient agree to rounding, with 3-position chunks
    (several chunks per batch), tied and untied heads, soft-capping on and off; the weight gradient chunked over
    positions (auto, for an fp64 weight) and over the vocabulary (36-token blocks here)."""
    model, ref = _models(kind, 0).double().requires_grad_(True), _models(kind, 1).double()
    assert (HeadTransform.of(model).softcap is not None) == ("softcap" in kind)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == ("-tied" in kind)
    ids, att, resp = _batch()
    w = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    lp_a, kl_a, g_a = _materialized(model, ref, ids, att, resp, w)
    lp_b, kl_b, g_b, r = _selected(model, ref, ids, att, resp, w, chunk=3, weight_grad=weight_grad)
    torch.testing.assert_close(lp_b, lp_a, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(kl_b, kl_a, rtol=1e-12, atol=1e-10)
    assert float(kl_a.detach().abs().min()) > 1e-3  # two different models: the KL term is really exercised
    for (name, _), a, b in zip(model.named_parameters(), g_a, g_b):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10, msg=name)
    # the reference's own log-probs from its selected forward
    with torch.no_grad():
        ref_lp = token_logps(ref(input_ids=ids, attention_mask=att).logits, ids, resp).sum(-1)
    torch.testing.assert_close(row_sums(r.logps, r.rows, len(ids)), ref_lp, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 5e-2)])
def test_selected_equals_materialized_in_model_dtypes(dtype, tol):
    """fp32 and bf16 (the model's matmul and soft-cap in its dtype, the log-softmax in fp32, as in the
    materialized path): per-sequence log-prob sums within ``tol`` per token."""
    model = build_gemma3(vocab_size=VOCAB, softcap=3.0).to(dtype)
    ids, att, resp = _batch()
    with torch.no_grad():
        a = token_logps(model(input_ids=ids, attention_mask=att).logits, ids, resp).sum(-1)
        out = selected_forward(model, ids, att, prediction_mask(resp))
    b = row_sums(out.logps, out.rows, len(ids))
    assert b.dtype == torch.float32
    torch.testing.assert_close(b, a, rtol=0, atol=tol * float(resp.sum(-1).max()))


def test_bf16_weight_gradient_by_vocab_equals_by_positions_without_an_fp32_weight_copy():
    """A bf16 model (soft-cap, untied head, TDPO's KL): the weight gradient chunked over the vocabulary (auto's
    choice for a bf16 weight) equals the one chunked over positions, which sums into an fp32 [vocab, d] buffer, to
    bf16 rounding of each gradient's magnitude — and is no further from the fp64 gradient than it; only the
    positions path creates an fp32 tensor of the weight's shape (the control)."""
    kind = "gemma-untied-softcap"
    ids, att, resp = _batch()
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    grads = {}
    for name, dtype in (("vocab", torch.bfloat16), ("positions", torch.bfloat16), ("fp64", torch.float64)):
        model, ref = _models(kind, 0).to(dtype).requires_grad_(True), _models(kind, 1).to(dtype)
        mode = "auto" if name == "vocab" else "positions"
        with _Shapes([], record_dtype=True) as seen:
            grads[name] = _selected(model, ref, ids, att, resp, w.to(dtype), chunk=3, weight_grad=mode)[2]
        head = model.get_output_embeddings().weight
        fp32_copies = [s for s, dt in seen.shapes if s == tuple(head.shape) and dt == torch.float32]
        if name != "fp64":
            assert bool(fp32_copies) == (name == "positions"), name
    eps = torch.finfo(torch.bfloat16).eps
    for i, (a, b, exact) in enumerate(zip(grads["vocab"], grads["positions"], grads["fp64"])):
        scale = float(exact.abs().max())
        assert a.dtype == torch.bfloat16
        # a bf16 gradient is the fp32 result rounded once; through the decoder's bf16 layers the two paths
        # differ by a few roundings of the largest entry
        assert float((a.double() - b.double()).abs().max()) <= 8 * eps * scale, i
        err_v, err_p = (float((g.double() - exact).abs().max()) for g in (a, b))
        assert err_v <= 1.5 * err_p + 2 * eps * scale, (i, err_v, err_p)


class _Shapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every tensor an op returns, except views of the model's parameters (W transposed)."""

    def __init__(self, params, record_dtype: bool = False):
        super().__init__()
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.record_dtype = record_dtype
        self.shapes: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.skip:
                self.shapes.append((tuple(t.shape), t.dtype) if self.record_dtype else tuple(t.shape))
        return out


def _largest_vocab_block(fn, model) -> int:
    """The most positions × vocab any tensor created by ``fn`` (forward and backward) holds."""
    with _Shapes(model.parameters()) as mode:
        fn()
    return max((int(torch.tensor(s[:-1]).prod()) for s in mode.shapes if s and s[-1] == VOCAB), default=0)


def test_no_positions_by_vocab_tensor_beyond_one_chunk():
    """Forward + backward create no ``[…, vocab]`` tensor of more than ``chunk`` positions; the materialized path
    (the control, so this test can fail) creates one of every position."""
    model = build_gemma3(vocab_size=VOCAB, softcap=3.0, tied=False).requires_grad_(True)
    ids, att, resp = _batch(rows=4, seq=16)
    chunk = 5

    def selected():
        out = selected_forward(model, ids, att, prediction_mask(resp), chunk_size=chunk)
        out.logps.sum().backward()

    def materialized():
        token_logps(model(input_ids=ids, attention_mask=att).logits, ids, resp, chunk_size=chunk).sum().backward()

    assert _largest_vocab_block(selected, model) <= chunk
    assert _largest_vocab_block(materialized, model) >= ids.numel()


def test_matches_trl_fused_lm_head():
    """TRL 1.16's ``add_fused_lm_head`` (chunked, soft-cap aware, its own backward) as an independent oracle:
    per-token log-probs and parameter gradients on a tied, soft-capped Gemma 3."""
    trl_utils = pytest.importorskip("trl.trainer.utils", reason="dev extra trl not installed")
    ours = build_gemma3(vocab_size=VOCAB, softcap=3.0).requires_grad_(True)  # TRL computes in fp32
    theirs = build_gemma3(vocab_size=VOCAB, softcap=3.0).requires_grad_(True)
    trl_utils.add_fused_lm_head(theirs)
    ids, att, resp = _batch()
    labels = ids.masked_fill(~resp, -100)
    t_out = theirs(input_ids=ids, attention_mask=att, labels=labels, fused_lm_head=True)
    t_tok = t_out.log_probs  # [R, T-1]: log-prob of token t+1, 0 where the label is -100
    pm = prediction_mask(resp)
    o = selected_forward(ours, ids, att, pm)
    o_tok = torch.zeros_like(t_tok).masked_scatter(pm[:, :-1], o.logps)
    torch.testing.assert_close(o_tok, t_tok, rtol=1e-5, atol=1e-5)
    w = torch.linspace(-1, 2, t_tok.numel()).view_as(t_tok)
    g_t = torch.autograd.grad((t_tok * w).sum(), list(theirs.parameters()))
    g_o = torch.autograd.grad((o_tok * w).sum(), list(ours.parameters()))
    for (name, _), a, b in zip(ours.named_parameters(), g_t, g_o):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=name)


def test_unknown_logit_scaling_is_refused():
    model = build_gemma3(vocab_size=VOCAB)
    model.config.logits_scaling = 4.0
    with pytest.raises(NotImplementedError, match="logits_scaling"):
        HeadTransform.of(model)


@pytest.mark.parametrize("kind", ["llama-untied", "gemma-tied-softcap"])
def test_cache_reference_pass_selected_equals_materialized(kind):
    """A cache built with the output layer at selected positions (what the cache job runs) equals one built from
    the model's full logits: per-token and summed reference log-probs within fp tolerance, token counts and
    pooled SAE codes identical (the same block output feeds both); batches with padding and several lengths."""
    from fpo_dist.cache.worker import reference_pass
    from fpo_dist.data import TokenizedPair
    from fpo_dist.testing import build_sae

    model = _models(kind, seed=3).eval()
    sae = build_sae(d_in=32, d_sae=96, hook_layer=1, threshold=0.05)
    g = torch.Generator().manual_seed(5)

    def ids(n):
        return tuple(torch.randint(3, VOCAB, (n,), generator=g).tolist())

    pairs = [TokenizedPair(i, bytes(16), ids(2 + i % 4), ids(1 + (3 * i) % 7), ids(2 + (5 * i) % 6)) for i in range(7)]
    out = {mode: reference_pass(model, sae, 1, pairs, pad_id=0, batch_size=3, per_token_logps=True, logits=mode,
                                layout="packed")
           for mode in ("selected", "materialized")}
    sel, mat = out["selected"], out["materialized"]
    assert sel.n_tokens == mat.n_tokens == [(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    torch.testing.assert_close(torch.tensor(sel.logp_sum), torch.tensor(mat.logp_sum), rtol=1e-5, atol=1e-5)
    assert max(abs(v) for pair in mat.logp_sum for v in pair) > 1.0  # real log-probs, not zeros
    n_codes = 0
    for a, b in zip(sel.pooled + sel.token_logps, mat.pooled + mat.token_logps):
        for x, y in zip(a, b):
            if isinstance(x, tuple):  # pooled codes: (indices, values)
                assert (x[0] == y[0]).all() and (x[1] == y[1]).all()
                n_codes += len(x[0])
            else:
                torch.testing.assert_close(torch.as_tensor(x), torch.as_tensor(y), rtol=1e-5, atol=1e-5)
    assert n_codes > 0  # the SAE fired
    with pytest.raises(ValueError, match="logits must be"):
        reference_pass(model, sae, 1, pairs, pad_id=0, batch_size=3, logits="full")


def test_the_vocab_blocks_hold_no_more_than_one_position_chunk():
    """Chunked over the vocabulary, every ``[positions, block]`` tensor of the backward holds at most what one
    ``[chunk, vocab]`` position chunk holds; the blocks really split the vocabulary (the control: more than one)."""
    model = build_gemma3(vocab_size=VOCAB, softcap=3.0, tied=False).requires_grad_(True)
    ids, att, resp = _batch(rows=4, seq=16)
    pm, chunk = prediction_mask(resp), 5
    n, d = int(pm.sum()), model.config.hidden_size
    with _Shapes(model.parameters()) as mode:
        out = selected_forward(model, ids, att, pm, chunk_size=chunk, weight_grad="vocab")
        out.logps.sum().backward()
    blocks = [s for s in mode.shapes if len(s) == 2 and s[0] == n and s[1] not in (d, VOCAB)]
    assert blocks and max(s[1] for s in blocks) < VOCAB
    assert max(s[0] * s[1] for s in blocks) <= chunk * VOCAB


class _FreshTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that return a new tensor of ``shape`` (not one of their inputs written in place)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape
                    and t.untyped_storage().data_ptr() not in inputs):
                self.count += 1
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama-tied", "gemma-tied-softcap"])
def test_tied_embedding_gradient_in_one_buffer(kind, dtype, monkeypatch):
    """A head tied to the input embedding (a plain ``nn.Embedding``: Llama; Gemma 3's scaled one): the output
    layer's weight gradient and the input embedding's go into one ``[vocab, d]`` buffer.  Every parameter gradient
    equals autograd's own (the embedding's dense gradient added to the head's: ``_tied_embedding`` switched off,
    the control) within a few roundings of its magnitude, with repeated tokens and the padding index in the batch
    (no embedding gradient for it, as ``nn.Embedding``); the backward creates one tensor of the weight's shape,
    autograd's two or more."""
    check_tied_gradient_in_one_buffer(kind, dtype, "cpu", monkeypatch)


def check_tied_gradient_in_one_buffer(kind: str, dtype: torch.dtype, device: str, monkeypatch) -> None:
    from fpo_dist import lm_head

    if kind == "llama-tied":
        model = build_llama(vocab_size=VOCAB, tied=True)
    else:
        model = build_gemma3(vocab_size=VOCAB, softcap=3.0)
    model = model.to(device, dtype).requires_grad_(True)
    head = model.get_output_embeddings().weight
    assert head is model.get_input_embeddings().weight
    assert model.get_input_embeddings().padding_idx == 0
    ids, att, resp = _batch()
    ids[0, 2] = ids[3, 6] = 0  # the padding index inside sequences
    ids[1, 3] = ids[2, 4] = ids[2, 8] = 7  # one token three times
    ids, att, resp = ids.to(device), att.to(device), resp.to(device)
    pm = prediction_mask(resp)
    w = torch.linspace(-1, 2, int(pm.sum()), dtype=torch.float32, device=device)
    grads, fresh = {}, {}
    with monkeypatch.context() as patch:
        for name in ("one buffer", "autograd"):
            if name == "autograd":
                patch.setattr(lm_head, "_tied_embedding", lambda *_: None)
            with _FreshTensors(head.shape) as mode:
                out = selected_forward(model, ids, att, pm, chunk_size=3)
                grads[name] = torch.autograd.grad((out.logps * w).sum(), list(model.parameters()))
            fresh[name] = mode.count
    assert fresh["one buffer"] == 1 and fresh["autograd"] >= 2, fresh
    eps = torch.finfo(dtype).eps
    for (pname, _), a, b in zip(model.named_parameters(), grads["one buffer"], grads["autograd"]):
        assert a.dtype == dtype
        assert float((a.double() - b.double()).abs().max()) <= 4 * eps * float(b.double().abs().max()), pname
    emb_rows = grads["autograd"][0].double().abs().sum(-1)
    assert float(emb_rows[7]) > 0 and float(emb_rows[0]) > 0  # the head's share reaches every row


def test_tied_embedding_gradient_not_used_without_a_trained_tied_weight():
    """Only where the shared weight gets a gradient: not for an untied head, a frozen one or without grad mode."""
    from fpo_dist.lm_head import _tied_embedding, output_layer

    tied = build_gemma3(vocab_size=VOCAB).requires_grad_(True)
    assert _tied_embedding(tied, output_layer(tied)) is tied.get_input_embeddings()
    with torch.no_grad():
        assert _tied_embedding(tied, output_layer(tied)) is None
    untied = build_gemma3(vocab_size=VOCAB, tied=False).requires_grad_(True)
    assert _tied_embedding(untied, output_layer(untied)) is None
    frozen = build_llama(vocab_size=VOCAB, tied=True).requires_grad_(False)
    assert _tied_embedding(frozen, output_layer(frozen)) is None
