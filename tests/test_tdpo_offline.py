"""Offline TDPO: the sequential KL against the cache's top-M reference distributions plus one tail bucket.

Oracles: the exact KL of ``fpo_dist.logprobs.sequential_kl`` (itself checked against hand-derived numbers in
test_losses.py); the coarsened KL written out below in plain PyTorch from transformers' own logits, with autograd's
gradients; ``torch.topk`` of transformers' log-softmax for what the cache stores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fpo_dist.lm_head import RefTopM, row_sums, selected_forward
from fpo_dist.logprobs import prediction_mask, sequential_kl
from fpo_dist.testing import build_gemma3, build_llama

VOCAB = 300


def _models(kind: str, seed: int):
    if kind == "llama":
        return build_llama(vocab_size=VOCAB, seed=seed)
    return build_gemma3(vocab_size=VOCAB, softcap=3.0, tied=False, seed=seed)


def _batch(rows=3, seq=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, seq), generator=g)
    att = torch.ones(rows, seq, dtype=torch.long)
    att[1, 8:] = 0
    resp = torch.zeros(rows, seq, dtype=torch.bool)
    resp[:, 4:] = True
    return ids, att, resp & att.bool()


def _reference_topm(ref, ids, att, pm, m: int) -> RefTopM:
    """What the cache stores, from transformers' own logits: top-M of the log-softmax and the rest's log-mass."""
    with torch.no_grad():
        log_p = torch.log_softmax(ref(input_ids=ids, attention_mask=att).logits[pm].double(), -1)
    vals, top = torch.topk(log_p, m, dim=-1)
    rest = log_p.scatter(-1, top, float("-inf")).logsumexp(-1)
    return RefTopM(top, vals, rest)


def _coarsened_kl(log_q: torch.Tensor, t: RefTopM) -> torch.Tensor:
    """The oracle, written out: KL over the M tokens + one bucket, every term spelled (fp64)."""
    out = []
    for i in range(len(log_q)):
        inside = set(t.ids[i].tolist())
        q_tail = torch.logsumexp(torch.stack([log_q[i, v] for v in range(log_q.shape[1]) if v not in inside]), 0) \
            if len(inside) < log_q.shape[1] else torch.tensor(float("-inf"), dtype=log_q.dtype)
        k = sum(t.logps[i, j].exp() * (t.logps[i, j] - log_q[i, t.ids[i, j]]) for j in range(t.ids.shape[1]))
        if t.tail[i] > float("-inf"):
            k = k + t.tail[i].exp() * (t.tail[i] - q_tail)
        out.append(k)
    return torch.stack(out)


@pytest.mark.parametrize("weight_grad", ["auto", "vocab"])
@pytest.mark.parametrize("m", [1, 7, VOCAB])
@pytest.mark.parametrize("kind", ["llama", "gemma-softcap"])
def test_topm_kl_and_gradients_equal_plain_pytorch(kind, m, weight_grad):
    """fp64: the chunked head's per-position KL and every parameter gradient (its own backward, chunked over
    positions or over the vocabulary) equal autograd through transformers' logits and the KL written out term by
    term; with M = vocabulary it is the exact sequential KL."""
    model, ref = _models(kind, 0).double().requires_grad_(True), _models(kind, 1).double()
    ids, att, resp = _batch()
    pm = prediction_mask(resp)
    t = _reference_topm(ref, ids, att, pm, m)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    params = list(model.parameters())

    logits = model(input_ids=ids, attention_mask=att).logits
    log_q = torch.log_softmax(logits[pm].double(), -1)
    kl_a = _coarsened_kl(log_q, t)
    rows = pm.nonzero()[:, 0]
    lp_a = log_q.gather(-1, torch.cat([ids[:, 1:], ids[:, :1]], 1)[pm][:, None])[:, 0]
    g_a = torch.autograd.grad((row_sums(lp_a, rows, 3) * w).sum() + 0.7 * kl_a.sum(), params)

    out = selected_forward(model, ids, att, pm, ref=t, chunk_size=4, weight_grad=weight_grad)
    torch.testing.assert_close(out.kl, kl_a, rtol=1e-10, atol=1e-12)
    g_b = torch.autograd.grad((row_sums(out.logps, out.rows, 3) * w).sum() + 0.7 * out.kl.sum(), params)
    for (name, _), a, b in zip(model.named_parameters(), g_a, g_b):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=name)
    assert float(kl_a.detach().mean()) > 1e-2  # two different models: the term is exercised
    if m == VOCAB:  # every token known: the exact KL (and no tail)
        assert torch.isinf(t.tail).all()
        with torch.no_grad():
            exact = sequential_kl(ref(input_ids=ids, attention_mask=att).logits.double(), logits.detach(), resp)
        torch.testing.assert_close(row_sums(out.kl.detach(), out.rows, 3), exact, rtol=1e-10, atol=1e-12)
    else:  # the coarsened KL is below the exact one at every position (data-processing inequality)
        with torch.no_grad():
            log_p = torch.log_softmax(ref(input_ids=ids, attention_mask=att).logits[pm].double(), -1)
        exact = (log_p.exp() * (log_p - log_q.detach())).sum(-1)
        assert (out.kl.detach() <= exact + 1e-12).all() and (out.kl.detach() < exact).any()


def test_zero_mass_tail_gives_the_topm_kl():
    """A tail bucket of zero mass (log-mass -inf) leaves Σ_j p_j (log p_j − log q_j) over the M tokens alone, by
    hand: no tail term, however much mass the policy puts outside the M."""
    model = _models("llama", 0).double()
    ids, att, resp = _batch()
    pm = prediction_mask(resp)
    n = int(pm.sum())
    g = torch.Generator().manual_seed(3)
    top = torch.stack([torch.randperm(VOCAB, generator=g)[:5] for _ in range(n)])
    logps = torch.log_softmax(torch.randn(n, 5, generator=g, dtype=torch.float64), -1)  # the 5 hold all the mass
    t = RefTopM(top, logps, torch.full((n,), float("-inf"), dtype=torch.float64))
    with torch.no_grad():
        out = selected_forward(model, ids, att, pm, ref=t, chunk_size=5)
        log_q = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[pm].double(), -1)
    by_hand = (logps.exp() * (logps - log_q.gather(-1, top))).sum(-1)
    torch.testing.assert_close(out.kl, by_hand, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
def test_the_heads_topm_equals_topk_of_transformers_logits(layout):
    """What the cache stores (``topm=M`` of the chunked head, every layout, fp32): ids equal torch.topk of
    transformers' log-softmax (where the M-th and M+1-th are not tied to rounding), log-probs and the tail's
    log-mass to fp32 rounding; the M log-probs and the tail make a whole distribution."""
    from fpo_dist.data import TokenizedPair
    from fpo_dist.models import build_batch

    model = build_gemma3(vocab_size=VOCAB, softcap=3.0, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    pairs = [TokenizedPair(i, bytes(16), *(tuple(torch.randint(3, VOCAB, (k,), generator=g).tolist()) for k in ks))
             for i, ks in enumerate([(4, 5, 3), (6, 2, 7), (3, 4, 4)])]
    m = 16
    from fpo_dist.attention import enable_varlen

    if layout != "padded":
        enable_varlen(model, "sdpa")
    batch = build_batch(pairs, 0, layout)
    padded = build_batch(pairs, 0, "padded")
    with torch.no_grad():
        out = selected_forward(model, batch.input_ids, batch.attention_mask, batch.selection,
                               position_ids=batch.position_ids, topm=m, chunk_size=5)
        full = build_gemma3(vocab_size=VOCAB, softcap=3.0, seed=0).eval()(
            input_ids=padded.input_ids, attention_mask=padded.attention_mask).logits
    log_p = torch.log_softmax(full[padded.prediction_mask].float(), -1)  # padded rows: sequence order as well
    vals, top = torch.topk(log_p, m + 1, dim=-1)
    clear = (vals[:, m - 1] - vals[:, m]) > 1e-4  # the M-th is not tied with the next to rounding
    assert clear.float().mean() > 0.9
    assert torch.equal(out.topm.ids[clear], top[clear, :m])
    torch.testing.assert_close(out.topm.logps, vals[:, :m], rtol=0, atol=1e-5)
    rest = log_p.scatter(-1, out.topm.ids, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(out.topm.tail, rest, rtol=0, atol=1e-5)
    whole = torch.cat([out.topm.logps, out.topm.tail[:, None]], 1).double().logsumexp(-1)
    torch.testing.assert_close(whole, torch.zeros_like(whole), rtol=0, atol=1e-5)


def test_topm_larger_than_the_vocabulary_is_refused():
    model = build_llama(vocab_size=VOCAB)
    ids, att, resp = _batch()
    with pytest.raises(ValueError, match=f"M = {VOCAB + 1} but the model's vocabulary has {VOCAB} tokens"):
        selected_forward(model, ids, att, prediction_mask(resp), topm=VOCAB + 1)


def test_store_round_trip_and_format_versions(tmp_path):
    """A shard with top-M data reads back exactly (read_rows(ref_topm=True) reads only those extras); a store
    with them is format version 2 and says M in its options; one without stays format version 1."""
    from fpo_dist.data import TokenizedPair
    from fpo_dist.store import ShardResult, create_store, open_store

    rng = np.random.default_rng(0)
    pairs = [TokenizedPair(i, bytes([i]) * 16, (1, 2, 3), tuple(range(4, 4 + c)), tuple(range(9, 9 + r)))
             for i, (c, r) in enumerate([(2, 3), (1, 1), (4, 2)])]
    m = 4

    def tm(n):
        return (rng.integers(0, 50, (n, m)), rng.normal(size=(n, m)).astype(np.float32),
                rng.normal(size=n).astype(np.float32))

    n_tok = [(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    topm = [(tm(c), tm(r)) for c, r in n_tok]
    pooled = [((np.array([1], np.int32), np.array([0.5], np.float32)),) * 2 for _ in pairs]
    stores = {}
    for with_topm in (True, False):
        path = tmp_path / f"s{int(with_topm)}"
        store = create_store(str(path), {"x": 1}, 3, 3, 3, options={"ref_topm": m if with_topm else 0})
        res = ShardResult.build(0, 3, pairs, [], np.zeros((3, 2)), n_tok, pooled,
                                ref_topm=topm if with_topm else None, topm=m if with_topm else 0)
        store.commit_shard(0, store.write_shard(0, res))
        store.finalize()
        stores[with_topm] = open_store(str(path))
    assert stores[True].attrs["format_version"] == 2 and stores[True].options["ref_topm"] == m
    assert stores[False].attrs["format_version"] == 1 and "ref_topm" not in stores[False].attrs["options"]
    plain = stores[True].read_rows([2, 0, 1])
    assert plain.chosen_ref_topm is None
    got = stores[True].read_rows([2, 0, 1], ref_topm=True)
    assert got.chosen_token_logps is None  # only the top-M extras
    for j, i in enumerate([2, 0, 1]):
        for side, key in ((0, "chosen_ref_topm"), (1, "rejected_ref_topm")):
            t = getattr(got, key)[j]
            ids, lps, tail = topm[i][side]
            assert t.ids.shape == (n_tok[i][side], m) and np.array_equal(t.ids, ids)
            assert np.array_equal(t.logps, lps) and np.array_equal(t.tail, tail)
    assert stores[True].verify() == []
    assert stores[True].token_extras_info()["ref_topm"]["m"] == m
    from fpo_dist.cache.__main__ import _extras_lines  # what `python -m fpo_dist.cache info` prints about extras

    lines = _extras_lines(stores[True], stores[True].token_extras_info())
    assert any(x.startswith("reference top-4 distributions: 13 tokens") and "bytes per response token" in x
               for x in lines), lines
    with pytest.raises(ValueError, match=r"\(2, 4\) \(n_tokens, M\)"):
        ShardResult.build(0, 3, pairs, [], np.zeros((3, 2)), n_tok, pooled,
                          ref_topm=[(tm(c + 1), tm(r)) for c, r in n_tok], topm=m)


def test_a_cache_without_topm_refuses_offline_tdpo_in_one_line():
    from fpo_dist.losses import check_loss_requirements

    for name in ("tdpo1-offline", "tdpo2-offline"):
        with pytest.raises(ValueError) as e:
            check_loss_requirements(name, have_cache=True, have_reference_model=False, have_sae=False, cache_topm=0)
        assert "\n" not in str(e.value) and "--ref_topm" in str(e.value)
        assert check_loss_requirements(name, True, False, False, cache_topm=8).needs_ref_topm
    with pytest.raises(ValueError, match="tdpo2-offline trains on the cache's top-M"):
        check_loss_requirements("tdpo2", have_cache=True, have_reference_model=False, have_sae=False)


def test_the_approximation_study_folds_a_larger_topm_into_a_smaller_one():
    """``bench.topm_approx`` measures every M from one top-512: the first M entries and the rest folded into the
    tail equal what a cache built with that M stores (the head's own top-M)."""
    from bench.topm_approx import _fold

    model = build_gemma3(vocab_size=VOCAB, softcap=3.0, seed=2).eval()
    ids, att, resp = _batch()
    pm = prediction_mask(resp)
    with torch.no_grad():
        big = selected_forward(model, ids, att, pm, topm=40).topm
        small = selected_forward(model, ids, att, pm, topm=6).topm
    folded = _fold(big, 6)
    assert torch.equal(folded.ids, small.ids)
    torch.testing.assert_close(folded.logps, small.logps, rtol=0, atol=0)
    torch.testing.assert_close(folded.tail, small.tail, rtol=0, atol=2e-6)


def test_the_step0_comparison_fails_on_a_topm_kl_above_the_tolerance():
    """The step-0 check's top-M term: the KL of the cached distributions against the policy's is bounded by the
    largest log-prob difference, so it shares the log-prob tolerance; above it the check fails, and says it."""
    from fpo_dist.consistency import CacheComparison

    cmp = CacheComparison([0, 1], 0.0, 0.0, 0.0, 0.0, True, max_topm_kl=5e-4)
    assert cmp.ok(1e-3, 1e-4) and "max top-M KL = 0.0005" in cmp.describe()
    cmp.max_topm_kl = 2e-3
    assert not cmp.ok(1e-3, 1e-4)
    assert CacheComparison([0], 0.0, 0.0, 0.0, 0.0, True).ok(1e-3, 1e-4)  # no top-M term: as before


def test_a_topm_larger_than_the_vocabulary_stops_the_cache_job_before_any_work(tiny, tmp_path):
    """Checked with the model's config when the job resolves its inputs (before the store or Ray), naming both."""
    import json

    from fpo_dist.config import CacheConfig, load_config
    from fpo_dist.resolve import ResolveError, resolve_cache_config

    vocab = json.loads((tiny.model_dir / "config.json").read_text())["vocab_size"]
    args = ["--model.name_or_path", str(tiny.model_dir), "--sae.source", str(tiny.sae_dir), "--sae.layer",
            str(tiny.hook_layer), "--data.source", str(tmp_path / "x.jsonl"), "--output", str(tmp_path / "store")]
    with pytest.raises(ResolveError, match=f"'ref_topm' {vocab + 1} is more than the model's vocabulary "
                                           f"\\({vocab} tokens"):
        resolve_cache_config(load_config(CacheConfig, None, [*args, "--ref_topm", str(vocab + 1)]))
    assert resolve_cache_config(load_config(CacheConfig, None, [*args, "--ref_topm", str(vocab)])).ref_topm == vocab
    assert not (tmp_path / "store").exists()
