"""Gemma 2's attention-logit soft-cap: one attention function on every path.

A tiny Gemma 2 whose soft-cap binds (:func:`fpo_dist.testing.build_gemma2`: ``attn_logit_softcapping`` 5 on
scaled scores that reach ~12; the same weights without the cap give other log-probs, codes and generations) is
run through every path that loads it with :func:`fpo_dist.models.load_causal_lm` — padded rows, packed rows
(:func:`fpo_dist.attention.varlen_attention`), generation with a KV cache, the cache worker in both layouts, the
trainer's step-0 check (the real launcher, the other layout) and ``evaluate`` — against an independent oracle:
transformers' eager Gemma 2 forward of each sequence alone, in float64, loaded directly with
``attn_implementation="eager"``.  Every comparison also checks that the uncapped oracle is far outside the bound,
so a path that dropped the cap would fail it.  Tolerances: :func:`fpo_dist.testing.rounding_tolerance`.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from fpo_dist.testing import assert_rounding_close, rounding_tolerance

LAYER = 1  # the hook layer: the last of the 2 blocks
DEPTH = 3  # rounding stages in sequence: 2 blocks, then the head (log-probs) or the SAE encoder (codes)
SOFTCAP = 5.0
ROWS = [
    {"prompt": "What is the capital of France?", "chosen": "The capital of France is Paris.",
     "rejected": "I like apples, bananas and cherries."},
    {"prompt": "Please write a short poem about the sea.", "chosen": "The sea and the sky, blue and wide.",
     "rejected": "No."},
    {"prompt": "Explain gradient descent in one sentence.", "chosen": "Follow the slope downhill.",
     "rejected": "The quick brown fox jumps over the lazy dog."},
    {"prompt": "Hello! How are you today?", "chosen": "I am fine, thank you.", "rejected": "Numbers: 0 1 2 3"},
]


@pytest.fixture(scope="module")
def g2(tmp_path_factory):
    """The capped model, the same weights without the cap, an SAE on block 1, the data, and the float64 eager
    oracles of both models."""
    from transformers import Gemma2ForCausalLM

    from fpo_dist.testing import build_gemma2, build_sae, build_tokenizer

    root = tmp_path_factory.mktemp("gemma2")
    tok = build_tokenizer()
    build_gemma2(root / "capped", vocab_size=len(tok), tokenizer=tok, attn_softcap=SOFTCAP)
    build_gemma2(root / "nocap", vocab_size=len(tok), tokenizer=tok, attn_softcap=None)
    build_sae(root / "sae", d_in=32, hook_layer=LAYER)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    oracles = {name: Gemma2ForCausalLM.from_pretrained(root / name, attn_implementation="eager",
                                                       dtype=torch.float64).eval() for name in ("capped", "nocap")}
    return {"root": root, "tok": tok, "data": str(data), "oracles": oracles}


def _pairs(g2):
    from fpo_dist.config import DataConfig
    from fpo_dist.evaluate import load_heldout

    pairs, prompts = load_heldout(DataConfig(source=g2["data"], max_length=64, max_prompt_length=32), g2["tok"])
    assert len(pairs) == len(ROWS)
    return pairs, prompts


def _sae(g2):
    from fpo_dist.sae import load_sae

    return load_sae(str(g2["root"] / "sae"))


@torch.no_grad()
def _oracle(model, pairs, sae):
    """Per pair (chosen, rejected), each sequence alone through transformers' eager forward (float64): summed
    response log-probs, pooled SAE codes of block 1 (mean over the predicting positions), and the largest |logit|."""
    from fpo_dist.models import capture_block_output

    sae64 = type(sae)(sae.cfg)
    sae64.load_state_dict(sae.state_dict())
    sae64 = sae64.double()
    logps, pooled, top = np.zeros((len(pairs), 2)), np.zeros((len(pairs), 2, sae.cfg.d_sae)), 0.0
    for i, p in enumerate(pairs):
        for side, resp in enumerate((p.chosen_ids, p.rejected_ids)):
            ids = torch.tensor([p.prompt_ids + resp])
            with capture_block_output(model, LAYER) as cap:
                logits = model(input_ids=ids, use_cache=False).logits[0]
            pred = slice(len(p.prompt_ids) - 1, ids.shape[1] - 1)  # positions that predict a response token
            lp = logits[pred].log_softmax(-1).gather(-1, ids[0, pred.start + 1 :, None])
            logps[i, side] = float(lp.sum())
            pooled[i, side] = sae64.encode(cap.output[0, pred]).mean(0).numpy()
            top = max(top, float(logits[pred].abs().max()))
    return logps, pooled, top


def _assert_logps(got, want, n_tokens, top, msg):
    """Summed log-probs: a token's ``z_y − logsumexp(z)`` moves by ≤ 2·max|Δz|, so the scale is 2·max|logit|·n."""
    return assert_rounding_close(got, want, dtype=torch.float32, depth=DEPTH, scale=2 * top * np.asarray(n_tokens),
                                 msg=msg)


def _assert_not_close(got, uncapped, scale, what):
    """The uncapped computation is far outside the bound: the comparison can fail on a dropped cap."""
    bound = rounding_tolerance(np.asarray(scale, dtype=np.float64), torch.float32, DEPTH)
    excess = float((np.abs(np.asarray(got) - np.asarray(uncapped)) / bound).max())
    assert excess > 20, f"{what}: the uncapped model is only {excess:.2f} × the bound away: the cap does not bind"


# ----------------------------------------------------------------------------------------- loading


def test_softcapped_models_load_with_the_attention_that_applies_the_cap(g2, tiny):
    from fpo_dist.attention import VARLEN
    from fpo_dist.models import ModelSpec, attention_softcap, load_causal_lm

    model = load_causal_lm(ModelSpec(str(g2["root"] / "capped")))
    assert attention_softcap(model) == SOFTCAP and model.config._attn_implementation == "eager"
    assert load_causal_lm(ModelSpec(str(g2["root"] / "capped")), varlen=True).config._attn_implementation == VARLEN
    # whatever a model was set to (transformers' default differs between versions; an sdpa that ignores the cap
    # is what older ones picked), a soft-capped one is switched to eager on every config in it
    from fpo_dist.models import use_softcap_attention

    model.config._attn_implementation = "sdpa"
    assert use_softcap_attention(model) and model.config._attn_implementation == "eager"
    llama = load_causal_lm(ModelSpec(str(tiny.model_dir)))  # no soft-cap: transformers' default stays
    assert not use_softcap_attention(llama)
    assert attention_softcap(llama) is None and llama.config._attn_implementation == "sdpa"
    # the saved config names no implementation: an export loads with whatever its loader picks
    assert "_attn_implementation" not in json.loads((g2["root"] / "capped" / "config.json").read_text())


# ----------------------------------------------------------------------------------------- scoring paths


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_score_batch_equals_the_eager_oracle_in_both_layouts(g2, layout):
    """score_batch (what the cache worker, the step-0 check and evaluate run) on a soft-capped model: the
    float64 eager oracle's log-probs and pooled codes, padded rows (eager) and packed rows (varlen) alike."""
    from fpo_dist.models import ModelSpec, build_batch, load_causal_lm, pad_token_id
    from fpo_dist.scoring import score_batch

    pairs, _ = _pairs(g2)
    sae = _sae(g2)
    model = load_causal_lm(ModelSpec(str(g2["root"] / "capped")), varlen=layout == "packed")
    out = score_batch(model, build_batch(pairs, pad_token_id(g2["tok"]), layout), sae, LAYER)
    n = len(pairs)
    got_lp = torch.stack([out.logp_sum[:n], out.logp_sum[n:]], 1).double().numpy()
    n_tok = torch.stack([out.n_tokens[:n], out.n_tokens[n:]], 1).numpy()
    got_codes = torch.stack([out.pooled[:n], out.pooled[n:]], 1).double().numpy()
    want_lp, want_codes, top = _oracle(g2["oracles"]["capped"], pairs, sae)
    nocap_lp, nocap_codes, _ = _oracle(g2["oracles"]["nocap"], pairs, sae)
    _assert_logps(got_lp, want_lp, n_tok, top, f"{layout} log-prob sums vs the eager oracle")
    # codes: the scale is each pooled vector's largest entry (the SAE encodes the block-1 row, then a mean)
    assert_rounding_close(got_codes, want_codes, dtype=torch.float32, depth=DEPTH, dim=-1,
                          msg=f"{layout} pooled codes vs the eager oracle")
    _assert_not_close(got_lp, nocap_lp, 2 * top * n_tok, f"{layout} log-probs")
    _assert_not_close(got_codes, nocap_codes, np.abs(want_codes).max(-1, keepdims=True), f"{layout} codes")


def test_generation_with_a_kv_cache_applies_the_cap(g2):
    """transformers' generate (what evaluate samples with: left padding, KV cache) on the loaded capped model:
    every step's logits equal the eager oracle's full forward over the generated sequence, and evaluate's greedy
    samples equal the oracle's greedy decoding; the uncapped model's logits are far off."""
    from fpo_dist.data import encode_prompt
    from fpo_dist.evaluate import GenerationConfig, generate
    from fpo_dist.models import ModelSpec, load_causal_lm, pad_token_id

    tok = g2["tok"]
    _, prompts = _pairs(g2)
    prompts = prompts[:3]
    model = load_causal_lm(ModelSpec(str(g2["root"] / "capped")))
    encoded = [encode_prompt(tok, m, True) for m in prompts]
    width, steps = max(map(len, encoded)), 6
    ids = torch.full((len(encoded), width), pad_token_id(tok))
    attn = torch.zeros_like(ids)
    for r, e in enumerate(encoded):  # left padding, as evaluate does
        ids[r, width - len(e):], attn[r, width - len(e):] = torch.tensor(e), 1
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=steps,
                             min_new_tokens=steps, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=pad_token_id(tok))
    step_logits = torch.stack(gen.logits, 1)  # [rows, steps, vocab], before any logits processor
    for r, e in enumerate(encoded):
        seq = torch.tensor([e + gen.sequences[r, width:].tolist()])
        with torch.no_grad():
            want = g2["oracles"]["capped"](input_ids=seq, use_cache=False).logits[0, len(e) - 1 : -1]
            nocap = g2["oracles"]["nocap"](input_ids=seq, use_cache=False).logits[0, len(e) - 1 : -1]
        # scale: the largest |logit| of each step (the head is the last stage)
        assert_rounding_close(step_logits[r], want, dtype=torch.float32, depth=DEPTH, msg=f"generation row {r}")
        _assert_not_close(step_logits[r], nocap, want.abs().amax(-1, keepdim=True), f"generation row {r}")
    # evaluate's sampler at temperature 0 ≡ the oracle's greedy decoding, token for token
    outs, _ = generate(model, tok, prompts, GenerationConfig(max_new_tokens=steps, temperature=0.0, batch_size=2),
                       chat=True)
    for (out,), e in zip(outs, encoded):
        seq = list(e)
        for _ in range(steps):
            with torch.no_grad():
                nxt = int(g2["oracles"]["capped"](input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            seq.append(nxt)
        assert out == tok.decode(seq[len(e):], skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------------------- cache, step-0, evaluate


def _cache(g2, layout: str):
    """The cache worker in-process (as the Ray actor runs it) on the capped model, in ``layout``."""
    from fpo_dist.cache.driver import build_provenance
    from fpo_dist.cache.worker import CacheWorker, tokenizer_spec
    from fpo_dist.config import CacheConfig, load_config
    from fpo_dist.data import load_source
    from fpo_dist.models import load_tokenizer
    from fpo_dist.store import create_store, open_store

    out = g2["root"] / f"store-{layout}"
    if not out.exists():
        cfg = load_config(CacheConfig, None, [
            "--model.name_or_path", str(g2["root"] / "capped"), "--sae.source", str(g2["root"] / "sae"),
            "--sae.layer", str(LAYER), "--data.source", g2["data"], "--output", str(out), "--rows_per_shard", "4",
            "--chunk_rows", "4", "--batch_size", "3", "--device", "cpu", "--batch_layout", layout,
            "--data.max_length", "64", "--data.max_prompt_length", "32",
        ])
        src = load_source(cfg.data)
        store = create_store(cfg.output, build_provenance(cfg, src, load_tokenizer(tokenizer_spec(cfg.model))),
                             len(src), 4, 4)
        res = CacheWorker(cfg, threads=1).process(0)
        store.commit_shard(0, res["checksum"])
        store.finalize()
    return open_store(str(out))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_cache_step0_check_and_evaluate_agree(g2, layout, tmp_path):
    """A cache of the capped model (built in ``layout``) holds the eager oracle's values; the trainer's step-0 check
    (the real launcher, single process, the OTHER layout) reproduces it; ``evaluate`` on the same pairs gives the
    oracle's length-normalised margin.  The same check with the uncapped model as policy fails."""
    from test_train import ROOT, train

    from fpo_dist.config import DataConfig
    from fpo_dist.evaluate import evaluate
    from fpo_dist.models import pairs_from_batch

    store = _cache(g2, layout)
    batch = store.read_rows(store.ok_rows())
    pairs, _ = _pairs(g2)
    assert pairs_from_batch(batch) == pairs  # the cache tokenized the pairs as evaluate does
    sae = _sae(g2)
    want_lp, want_codes, top = _oracle(g2["oracles"]["capped"], pairs, sae)
    nocap_lp, _, _ = _oracle(g2["oracles"]["nocap"], pairs, sae)
    _assert_logps(batch.logp_sum, want_lp, batch.n_tokens, top, f"{layout} cache log-probs vs the eager oracle")
    _assert_not_close(batch.logp_sum, nocap_lp, 2 * top * batch.n_tokens, f"{layout} cache log-probs")
    for b in range(len(pairs)):
        for side, csr in enumerate((batch.chosen_codes, batch.rejected_codes)):
            dense = np.zeros(sae.cfg.d_sae)
            idx, val = csr.row(b)
            dense[np.asarray(idx, np.int64)] = val
            assert_rounding_close(dense, want_codes[b, side], dtype=torch.float32, depth=DEPTH, dim=None,
                                  msg=f"{layout} cache codes, pair {b} side {side}")

    # the trainer's step-0 check, under the real launcher, in the other layout: it passes, and its printed
    # per-token difference is within the rounding bound (per token: 2·max|logit|)
    other = "packed" if layout == "padded" else "padded"
    run = {"store": str(g2["root"] / f"store-{layout}"), "ds": str(ROOT / "ds_configs" / "zero3.json")}
    rc, log = train(run, tmp_path / "run", "--batch_layout", other, "--max_steps", "1", "--step0_rows", "4",
                    "--save_final", "false", "--export", "false", nproc=1, timeout=300)
    assert rc == 0 and "step-0 check: rows" in log, log[-4000:]
    d_avg = float(re.search(r"max \|Δ avg logp\| = ([0-9.e+-]+)", log).group(1))
    assert d_avg <= rounding_tolerance(2 * top, torch.float32, DEPTH), log[-2000:]
    if layout == "padded":  # fault: the same weights without the cap as policy → the step-0 check stops the run
        rc, log = train(run, tmp_path / "nocap", "--policy.name_or_path", str(g2["root"] / "nocap"),
                        "--batch_layout", other, "--max_steps", "1", "--step0_rows", "4", "--save_final", "false",
                        "--export", "false", nproc=1, timeout=300)
        assert rc != 0 and "step-0 check failed" in log, log[-4000:]

    # evaluate (loads through load_causal_lm, scores padded batches): the oracle's mean length-normalised margin
    m = evaluate(str(g2["root"] / "capped"), DataConfig(source=g2["data"], max_length=64, max_prompt_length=32),
                 reference_dir=str(g2["root"] / "capped"), sae_source=str(g2["root"] / "sae"), sae_layer=LAYER,
                 generation=None, out_dir=tmp_path / "eval")
    n = np.asarray(batch.n_tokens, np.float64)
    margin = ((want_lp / n)[:, 0] - (want_lp / n)[:, 1]).mean()
    nocap_margin = ((nocap_lp / n)[:, 0] - (nocap_lp / n)[:, 1]).mean()
    bound = rounding_tolerance(2 * 2 * top, torch.float32, DEPTH)  # two averages per pair, each ≤ 2·max|Δz|
    assert abs(m["margin_ln"] - margin) <= bound, (m["margin_ln"], margin, bound)
    assert abs(nocap_margin - margin) > 20 * bound, (nocap_margin, margin, bound)
    assert m["feature_mse"] == 0.0 and m["reward_margin"] == 0.0  # policy ≡ reference: one function, same batches
