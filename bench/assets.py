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


@dataclass(frozen=True)
class Assets:
    model_dir: Path
    sae_dir: Path
    data: Path
    hook_layer: int
    n_params: int
    sae_params: int
    calibrated_l0: float  # measured mean per-token L0 of the calibrated SAE

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
