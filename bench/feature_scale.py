"""The feature term's scale (issue 21, part 2): FPO on Gemma 3 270M at the paper's settings, with the real SAE
(``docs/results/real-sae``, trained by ``make real-sae``) and a random JumpReLU SAE of the same width calibrated to
the same L0 beside it.

    python -m bench.feature_scale [--steps 50] [--out docs/results/feature-scale]      (make feature-scale)

Each run is FPO in one plain PyTorch process, fp32, from the pretrained weights: the project's own ``fpo_loss``
(β 0.1, α 0.5, k 50, union top-k, stop-gradient on the chosen side), AdamW at lr 5e-7 with a linear warm-up over
the first 10 % of the steps, 4 pairs per step; the reference is the frozen initial model, run online beside the
policy (the cached reference equals it: ``tests/test_train.py``'s step-0 check).  Pairs come from held-out text of
the SAE's corpus (``fpo_dist.sae_train``): the prompt is a document's first 24 tokens, the chosen response its next
24, the rejected response 24 tokens of another document — a preference the pretrained model already holds, so the
margin term is not degenerate at step 0.

Per step it records ``D_w``, ``D_l``, the feature term ``α·β·(D_l − sg D_w)``, the margin term of ``u`` (signed
batch means and mean magnitudes), the loss and the gradient norm, and splits each ``D`` exactly into what JumpReLU
units crossing their threshold contribute and what continuous change of active units contributes:
per token and feature, ``c_pol − c_ref = [pre_pol − pre_ref]·1{both active} + [c_pol·1{pol only} − c_ref·1{ref
only}]`` (continuous + crossing), pooled like the codes (mean over the positions that predict a response token,
as ``PairBatch.prediction_mask``), so ``D = D_cont + D_cross +
D_mixed`` over the selected features, ``D_mixed = (2/k) Σ cont·cross``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

PROMPT, RESPONSE = 24, 24
PAPER = {"beta": 0.1, "alpha": 0.5, "k": 50, "lr": 5e-7, "warmup_fraction": 0.1, "pairs_per_step": 4}


def make_pairs(tokenizer, docs: list[str], n: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """``n`` (prompt, chosen, rejected) token lists from ``docs`` (the held-out documents of the SAE corpus)."""
    rng = np.random.default_rng(seed)
    ids = [tokenizer(d, add_special_tokens=False).input_ids for d in docs]
    ids = [x for x in ids if len(x) >= PROMPT + 2 * RESPONSE]
    if len(ids) < n + 1:
        raise ValueError(f"only {len(ids)} held-out documents are long enough for {n} pairs")
    order = rng.permutation(len(ids))
    pairs = []
    for j in range(n):
        doc, other = ids[order[j]], ids[order[(j + 1) % len(ids)]]
        pairs.append(([tokenizer.bos_token_id] + doc[:PROMPT], doc[PROMPT:PROMPT + RESPONSE],
                      other[PROMPT + RESPONSE:PROMPT + 2 * RESPONSE]))
    return pairs


def _batch(pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2B, T]`` ids (chosen rows, then rejected rows; all of one length) and the response mask."""
    rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    ids = torch.tensor(rows)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, len(pairs[0][0]):] = True
    return ids, mask


def _forward(model, ids, mask, layer):
    """Average response log-prob per row ``[2B]`` and block ``layer``'s output ``[2B, T, D]``."""
    from fpo_dist.models import forward_with_hook

    logits, h = forward_with_hook(model, ids, torch.ones_like(ids), layer)
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    m = mask[:, 1:].float()
    return (logp * m).sum(1) / m.sum(1), h


def _pre(sae, h):
    """JumpReLU pre-activations (sae-lens's ``process_sae_in`` then the encoder)."""
    return sae.process_sae_in(h) @ sae.W_enc + sae.b_enc


def decompose(pre_p, pre_r, theta, mask, k: int) -> dict[str, torch.Tensor]:
    """Per row: ``D`` of :func:`fpo_dist.losses.feature_distance` (union top-k) and its exact split into the
    continuous, crossing and mixed parts (module docstring).  ``pre_*`` ``[B, T, F]``, ``mask`` ``[B, T]``."""
    from fpo_dist.losses import topk_mask

    act_p, act_r = pre_p > theta, pre_r > theta
    c_p, c_r = pre_p * act_p, pre_r * act_r
    m = mask[..., None].float()
    n = m.sum(1)

    def pool(x):
        return (x * m).sum(1) / n

    cont = pool((pre_p - pre_r) * (act_p & act_r))
    cross = pool(c_p * (act_p & ~act_r) - c_r * (act_r & ~act_p))
    pooled_p, pooled_r = pool(c_p), pool(c_r)
    sel = topk_mask(pooled_p, k) | topk_mask(pooled_r, k)

    def over(x):
        return torch.where(sel, x, 0.0).sum(-1) / k

    return {"D": over((pooled_p - pooled_r) ** 2), "D_cont": over(cont ** 2), "D_cross": over(cross ** 2),
            "D_mixed": over(2 * cont * cross), "pooled_p": pooled_p, "pooled_r": pooled_r}


def run_fpo(model_dir: Path, sae, layer: int, pairs, steps: int, log=print) -> list[dict]:
    """``steps`` FPO steps at :data:`PAPER`'s settings from the pretrained weights; one record per step."""
    from fpo_dist.losses import SparseCodes, fpo_loss
    from fpo_dist.models import ModelSpec, load_causal_lm

    spec = ModelSpec(str(model_dir), dtype="float32")
    torch.manual_seed(0)
    policy, reference = load_causal_lm(spec, requires_grad=True), load_causal_lm(spec)
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=PAPER["lr"], weight_decay=0.0)
    warmup = max(1, round(steps * PAPER["warmup_fraction"]))
    theta = sae.threshold.detach()
    b, records = PAPER["pairs_per_step"], []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = PAPER["lr"] * min(1.0, (step + 1) / warmup)
        start = time.time()
        ids, mask = _batch(pairs[step * b:(step + 1) * b])
        with torch.no_grad():
            ref_avg, h_ref = _forward(reference, ids, mask, layer)
            pre_r = _pre(sae, h_ref.float())
        pol_avg, h_pol = _forward(policy, ids, mask, layer)
        pre_p = _pre(sae, h_pol.float())
        pooled_at = torch.zeros_like(mask)  # the positions that predict a response token (as PairBatch pools)
        pooled_at[:, :-1] = mask[:, 1:]
        parts = decompose(pre_p, pre_r, theta, pooled_at, PAPER["k"])
        loss, metrics = fpo_loss(
            pol_avg[:b], pol_avg[b:], ref_avg[:b], ref_avg[b:], parts["pooled_p"][:b], parts["pooled_p"][b:],
            SparseCodes.from_dense(parts["pooled_r"][:b]), SparseCodes.from_dense(parts["pooled_r"][b:]),
            beta=PAPER["beta"], alpha=PAPER["alpha"], k=PAPER["k"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), float("inf")))
        opt.step()
        rec = {"step": step, "loss": float(loss.detach()), "grad_norm": grad_norm, "step_s": time.time() - start,
               **{k: float(v) for k, v in metrics.items()}}
        for side, rows in (("chosen", slice(0, b)), ("rejected", slice(b, 2 * b))):
            for key in ("D", "D_cont", "D_cross", "D_mixed"):
                rec[f"{key}_{side}"] = float(parts[key][rows].detach().mean())
        records.append(rec)
        if step % 10 == 0 or step == steps - 1:
            log(f"  step {step}: loss {rec['loss']:.4f}, margin term {rec['reward_margin']:+.3e} "
                f"(|·| {rec['reward_margin_abs']:.3e}), feature term {rec['feature_term']:+.3e} "
                f"(|·| {rec['feature_term_abs']:.3e}), D_w {rec['D_chosen']:.3e}, D_l {rec['D_rejected']:.3e}")
    return records


def summarize(records: list[dict]) -> dict:
    """Means over the run and over its last 10 steps; the crossing share of D (per side, over the run)."""
    def mean(key, recs):
        return float(np.mean([r[key] for r in recs]))

    out = {}
    for name, recs in (("all", records), ("last10", records[-10:])):
        out[name] = {k: mean(k, recs) for k in ("reward_margin_abs", "feature_term_abs", "reward_margin",
                                               "feature_term", "D_chosen", "D_rejected", "grad_norm", "loss")}
        out[name]["feature_over_margin"] = out[name]["feature_term_abs"] / max(out[name]["reward_margin_abs"], 1e-30)
    for side in ("chosen", "rejected"):
        tot = sum(r[f"D_cont_{side}"] + r[f"D_cross_{side}"] for r in records)
        out[f"crossing_share_{side}"] = sum(r[f"D_cross_{side}"] for r in records) / tot if tot > 0 else math.nan
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.feature_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sae", type=Path, default=Path("docs/results/real-sae/sae"))
    p.add_argument("--out", type=Path, default=Path("docs/results/feature-scale"))
    args = p.parse_args(argv)
    from fpo_dist.models import ModelSpec, load_causal_lm, load_tokenizer
    from fpo_dist.sae import load_sae
    from fpo_dist.sae_train import docstring_corpus, is_held_out, token_rows
    from fpo_dist.testing import calibrate_jumprelu_sae, gemma3_270m_hf_dir

    start = time.time()
    model_dir = gemma3_270m_hf_dir()
    real = load_sae(str(args.sae))
    layer = int(real.cfg.metadata.hook_name.split(".")[1])
    quality = json.loads((args.sae.parent / "quality.json").read_text())
    spec = ModelSpec(str(model_dir), dtype="float32")
    tok = load_tokenizer(spec)
    held_out = [d for d in docstring_corpus() if is_held_out(d)]  # parsed once (~40 s)
    pairs = make_pairs(tok, held_out, args.steps * PAPER["pairs_per_step"])
    # the random SAE: same width, thresholds calibrated to the real SAE's held-out L0 on ~8k held-out tokens
    calib = torch.from_numpy(token_rows(tok, held_out, 128, 64, seed=1))
    model = load_causal_lm(spec)
    rand, rand_l0 = calibrate_jumprelu_sae(model, calib, torch.ones_like(calib), layer, d_sae=real.cfg.d_sae,
                                           target_l0=quality["quality"]["l0"])
    del model
    runs = {}
    for name, sae in (("real", real), ("random", rand)):
        print(f"{name} SAE: FPO for {args.steps} steps", flush=True)
        sae.requires_grad_(False)
        records = run_fpo(model_dir, sae, layer, pairs, args.steps)
        runs[name] = {"records": records, "summary": summarize(records)}
    result = {"settings": {**PAPER, "steps": args.steps, "prompt_tokens": PROMPT, "response_tokens": RESPONSE,
                           "layer": layer, "d_sae": real.cfg.d_sae, "real_sae_l0": quality["quality"]["l0"],
                           "random_sae_calibrated_l0": rand_l0, "dtype": "float32"},
              "runs": runs, "wall_s": time.time() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "scale.md").write_text(report(result))
    print((args.out / "scale.md").read_text())
    return 0


def report(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# The feature term's scale: real vs random SAE (Gemma 3 270M, block "
        f"{s['layer']}, {s['d_sae']} latents)", "",
        f"`python -m bench.feature_scale --steps {s['steps']}` (`make feature-scale`; {result['wall_s'] / 60:.0f} min "
        f"on 2 CPU cores). FPO at the paper's settings (β {s['beta']}, α {s['alpha']}, k {s['k']}, lr {s['lr']} with "
        f"{s['warmup_fraction']:.0%} warm-up, {s['pairs_per_step']} pairs per step, fp32), from the pretrained "
        f"weights, same pairs and order for both SAEs. Real SAE: `docs/results/real-sae` (held-out L0 "
        f"{s['real_sae_l0']:.1f}); random SAE: `fpo_dist.testing.calibrate_jumprelu_sae`, same width, calibrated "
        f"to L0 {s['random_sae_calibrated_l0']:.1f}.", "",
        "| SAE | steps | mean \\|margin term\\| | mean \\|feature term\\| | feature / margin | D_w | D_l | "
        "crossing share of D_w | crossing share of D_l | grad norm |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in result["runs"].items():
        sm = run["summary"]
        for window, label in (("all", f"0–{s['steps'] - 1}"), ("last10", "last 10")):
            w = sm[window]
            lines.append(f"| {name} | {label} | {w['reward_margin_abs']:.3e} | {w['feature_term_abs']:.3e} | "
                         f"{w['feature_over_margin']:.3g} | {w['D_chosen']:.3e} | {w['D_rejected']:.3e} | "
                         + (f"{sm['crossing_share_chosen']:.2f} | {sm['crossing_share_rejected']:.2f}"
                            if window == "all" else "| ") + f" | {w['grad_norm']:.3g} |")
    lines += ["", "Per-step values: `scale.json` (`runs.<sae>.records`). Crossing share: Σ D_cross / Σ (D_cont + "
              "D_cross) over the run's steps (the mixed term is the remainder of D)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
