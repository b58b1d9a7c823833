"""How good is offline TDPO's top-M reference (issue 23): Gemma 3 270M at the real shape, M ∈ {8, 32, 128, 512}.

    python -m bench.topm_approx [--ms 8,32,128,512] [--pairs 8] [--drift-steps 4] [--out docs/results/tdpo-offline]
                                                                                        (make tdpo-topm-approx)

The reference is the pretrained Gemma 3 270M (fp32, real weights); the policy is the same model after
``--drift-steps`` AdamW steps of exact (online) TDPO2 at lr 1e-5 on other pairs — a policy that has moved from the
reference as training moves it, so the KL is not 0.  Pairs: the real-shape preset's rows (``bench/presets.py``
``realshape``: UltraFeedback-like prompt and response lengths, scaled ~4× down for the CPU).

On the measured pairs (shared-prefix rows, the defaults), per M, against the exact computation (the reference's whole
262,144-token distribution, ``tdpo2``'s resident-reference path):

- the sequential KL per response (``Σ_t KL_t``): mean relative error and the largest, and the top-M's missing
  reference mass (mean ``p_tail``);
- the TDPO2 loss (β 0.1, α 0.5) of each batch: absolute error;
- gradients, over every policy parameter: the cosine and relative norm error of the TDPO2 loss's gradient and of the
  sequential KL's alone (``∂ Σ KL_rejected``, the term the approximation changes);
- the cache's bytes per response token for the top-M arrays: the real store writer (``ShardResult``, zstd), on the
  reference's actual top-M of these pairs.

The top-M of a smaller M is the first M of the top-512 (``torch.topk`` is sorted) with the rest folded into the
tail: ``tail_M = log(Σ_{j ≥ M} p_j + p_tail)`` — exactly what a cache built with that M holds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

BETA, ALPHA, DRIFT_LR = 0.1, 0.5, 1e-5


def _forward(model, batch, ref=None, topm: int = 0):
    from fpo_dist.lm_head import selected_forward

    return selected_forward(model, batch.input_ids, batch.attention_mask, batch.selection,
                            position_ids=batch.position_ids, ref=ref, topm=topm)


def _sums(values: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    from fpo_dist.lm_head import row_sums

    s = row_sums(values, batch.selection.sequences, batch.n_sequences)
    n = batch.n_sequences // 2
    return s[:n], s[n:]


def _tdpo2(pol, ref_lp, kl):
    from fpo_dist.losses import tdpo_loss

    return tdpo_loss(*pol, *ref_lp, *kl, beta=BETA, alpha=ALPHA, variant=2)[0]


def _fold(top, m: int):
    """The top-``m`` of a sorted top-``M`` (M ≥ m): its first m entries, the rest folded into the tail."""
    from fpo_dist.lm_head import RefTopM

    tail = torch.logsumexp(torch.cat([top.logps[:, m:], top.tail[:, None]], 1), 1)
    return RefTopM(top.ids[:, :m].contiguous(), top.logps[:, :m].contiguous(), tail)


def _grads(out, params, *objectives):
    return [torch.autograd.grad(o, params, retain_graph=True) for o in objectives]


def _cos(a, b) -> tuple[float, float]:
    """cosine and ‖a − b‖ / ‖b‖ of two gradients given as per-parameter lists."""
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    na = math.sqrt(sum(float(x.double().pow(2).sum()) for x in a))
    nb = math.sqrt(sum(float(y.double().pow(2).sum()) for y in b))
    diff = math.sqrt(sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b)))
    return dot / (na * nb), diff / nb


def drift(policy, reference, batches, log) -> list[float]:
    """Exact TDPO2 steps (AdamW, lr DRIFT_LR) on ``batches``: the losses."""
    from fpo_dist.lm_head import ref_head

    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=DRIFT_LR, weight_decay=0.0)
    losses = []
    for i, b in enumerate(batches):
        with torch.no_grad():
            r = _forward(reference, b)
        out = _forward(policy, b, ref=ref_head(reference, r.hidden))
        loss = _tdpo2(_sums(out.logps, b), _sums(r.logps, b), _sums(out.kl, b))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
        log(f"drift step {i}: TDPO2 loss {losses[-1]:.5f}")
    return losses


def bytes_per_token(pairs, tops: dict[int, list], root: Path) -> dict[int, dict]:
    """Per M, what the store writer stores for the top-M arrays (ids, log-probs, tail) per response token."""
    from fpo_dist.store import ShardResult, create_store

    out = {}
    n = len(pairs)
    n_tok = [(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    pooled = [((np.zeros(0, np.int32), np.zeros(0, np.float32)),) * 2 for _ in pairs]
    for m, per_pair in tops.items():
        store = create_store(str(root / f"m{m}"), {"bench": "topm_approx"}, n, n, n, options={"ref_topm": m},
                             overwrite=True)
        res = ShardResult.build(0, n, pairs, [], np.zeros((n, 2), np.float32), n_tok, pooled, ref_topm=per_pair,
                                topm=m)
        store.commit_shard(0, store.write_shard(0, res))
        info = store.token_extras_info()["ref_topm"]
        out[m] = {"bytes": info["bytes"], "tokens": info["tokens"], "bytes_per_token": info["bytes"] / info["tokens"],
                  "raw_bytes_per_token": 8 * m + 4}
    return out


def run(ms: list[int], n_pairs: int, drift_steps: int, batch_pairs: int, root: Path, log=print) -> dict:
    from bench.assets import gemma_hf_dir, tokenized_pairs, write_realshape_rows
    from bench.presets import preset_named
    from fpo_dist.attention import enable_varlen
    from fpo_dist.lm_head import ref_head
    from fpo_dist.models import ModelSpec, build_batch, load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    sizes = preset_named("realshape", "cpu")
    model_dir = gemma_hf_dir(log)
    spec = ModelSpec(str(model_dir), dtype="float32")
    data = root / "pairs.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    write_realshape_rows(data, load_tokenizer(spec), sizes, n_pairs + drift_steps * batch_pairs, seed=3)
    pairs, pad_id = tokenized_pairs(model_dir, data, sizes, n_pairs + drift_steps * batch_pairs)
    drift_pairs, pairs = pairs[n_pairs:], pairs[:n_pairs]
    reference = enable_varlen(load_causal_lm(spec), "sdpa").eval().requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True)  # eval mode: Gemma has no dropout either way
    t0 = time.time()
    b = batch_pairs
    drift_losses = drift(policy, reference, [build_batch(drift_pairs[i:i + b], pad_id, "shared")
                                             for i in range(0, len(drift_pairs), b)], log)
    params = [p for p in policy.parameters() if p.requires_grad]
    m_max = max(ms)
    rows = {m: {"seq_kl_rel_err": [], "seq_kl_abs_err": [], "p_tail": [], "loss_abs_err": [], "grad_loss_cos": [],
                "grad_loss_rel": [], "grad_kl_cos": [], "grad_kl_rel": []} for m in ms}
    exact_kl, tops = [], {m: [] for m in ms}
    losses = []
    for i in range(0, n_pairs, b):
        batch = build_batch(pairs[i:i + b], pad_id, "shared")
        with torch.no_grad():
            r = _forward(reference, batch, topm=m_max)
        ref_lp = _sums(r.logps, batch)
        out = _forward(policy, batch, ref=ref_head(reference, r.hidden))
        pol, kl = _sums(out.logps, batch), _sums(out.kl, batch)
        loss = _tdpo2(pol, ref_lp, kl)
        g_loss, g_kl = _grads(out, params, loss, kl[1].sum())
        kl_seq = torch.cat(kl).detach().double()
        exact_kl.append(kl_seq)
        losses.append(float(loss))
        counts = torch.bincount(batch.selection.sequences, minlength=batch.n_sequences).tolist()
        for m in ms:
            t = _fold(r.topm, m)
            per_seq = [x.numpy() for x in (t.ids.int(), t.logps.float(), t.tail.float())]
            split = [np.split(x, np.cumsum(counts)[:-1]) for x in per_seq]
            n = batch.n_sequences // 2
            tops[m] += [tuple(tuple(s[j] for s in split) for j in (k, n + k)) for k in range(n)]
            o = _forward(policy, batch, ref=t)
            kl_m = _sums(o.kl, batch)
            loss_m = _tdpo2(_sums(o.logps, batch), ref_lp, kl_m)
            gl, gk = _grads(o, params, loss_m, kl_m[1].sum())
            km = torch.cat(kl_m).detach().double()
            rows[m]["seq_kl_rel_err"] += ((kl_seq - km).abs() / kl_seq).tolist()
            rows[m]["seq_kl_abs_err"] += (kl_seq - km).abs().tolist()
            rows[m]["p_tail"] += t.tail.exp().tolist()
            rows[m]["loss_abs_err"].append(abs(float(loss_m) - float(loss)))
            for key, g, ref_g in (("loss", gl, g_loss), ("kl", gk, g_kl)):
                c, rel = _cos(g, ref_g)
                rows[m][f"grad_{key}_cos"].append(c)
                rows[m][f"grad_{key}_rel"].append(rel)
            del o, gl, gk
        log(f"pairs {i}-{i + b - 1}: exact sequential KL per response {[f'{x:.3f}' for x in kl_seq.tolist()]}, "
            f"TDPO2 loss {float(loss):.5f}; M {ms}: loss errors "
            f"{[format(rows[m]['loss_abs_err'][-1], '.2e') for m in ms]}, KL-gradient cosines "
            f"{[format(rows[m]['grad_kl_cos'][-1], '.6f') for m in ms]}")
        del out, g_loss, g_kl
    sizes_by_m = bytes_per_token(pairs, tops, root / "stores")
    kl_all = torch.cat(exact_kl)
    n_tokens = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    summary = {}
    for m in ms:
        r_ = rows[m]
        summary[m] = {
            "seq_kl_rel_err_mean": float(np.mean(r_["seq_kl_rel_err"])),
            "seq_kl_rel_err_max": float(np.max(r_["seq_kl_rel_err"])),
            "seq_kl_abs_err_mean": float(np.mean(r_["seq_kl_abs_err"])),
            "p_tail_mean": float(np.mean(r_["p_tail"])), "p_tail_max": float(np.max(r_["p_tail"])),
            "loss_abs_err_max": float(np.max(r_["loss_abs_err"])),
            "grad_loss_cos_min": float(np.min(r_["grad_loss_cos"])),
            "grad_loss_rel_max": float(np.max(r_["grad_loss_rel"])),
            "grad_kl_cos_min": float(np.min(r_["grad_kl_cos"])),
            "grad_kl_rel_max": float(np.max(r_["grad_kl_rel"])),
            **sizes_by_m[m], "per_batch": r_,
        }
    return {
        "model": "Gemma 3 270M (pretrained, fp32)", "vocab": 262144, "pairs": n_pairs, "batch_pairs": b,
        "response_tokens": n_tokens, "drift": {"steps": drift_steps, "lr": DRIFT_LR, "losses": drift_losses},
        "tdpo2": {"beta": BETA, "alpha": ALPHA}, "layout": "shared",
        "exact": {"seq_kl_mean": float(kl_all.mean()), "seq_kl_per_token": float(kl_all.sum()) / n_tokens,
                  "loss": losses},
        "ms": {str(m): v for m, v in summary.items()}, "wall_s": time.time() - t0,
    }


def markdown(res: dict, command: str, cpu: str) -> str:
    ex = res["exact"]
    lines = [
        "# Offline TDPO: how good is the top-M reference",
        "",
        f"`{command}` — {res['model']}, vocabulary {res['vocab']:,}; {res['pairs']} real-shape pairs "
        f"({res['response_tokens']} response tokens, shared-prefix rows, {res['batch_pairs']} pairs per batch); the "
        f"policy is the reference after {res['drift']['steps']} steps of exact TDPO2 (AdamW, lr {res['drift']['lr']:g}) "
        f"on other pairs. Exact: mean sequential KL per response {ex['seq_kl_mean']:.4f} "
        f"({ex['seq_kl_per_token']:.2e} per token). TDPO2 β {res['tdpo2']['beta']}, α {res['tdpo2']['alpha']}. "
        f"CPU: {cpu}; {res['wall_s'] / 60:.1f} min.",
        "",
        "Errors against the exact computation (the whole vocabulary). Gradients over every policy parameter: of the "
        "TDPO2 loss, and of the rejected responses' sequential KL alone (the term the approximation changes). "
        "Bytes: what the cache's store writer keeps per response token for the top-M arrays (int32 ids, fp32 "
        "log-probs, fp32 tail; zstd), against 8·M + 4 raw.",
        "",
        "| M | seq. KL rel. error mean / max | missing ref. mass mean / max | TDPO2 loss abs. error max | "
        "loss grad cos min (rel. err max) | KL grad cos min (rel. err max) | bytes / response token (raw) |",
        "|---:|---|---|---:|---|---|---:|",
    ]
    for m, v in res["ms"].items():
        lines.append(
            f"| {m} | {v['seq_kl_rel_err_mean']:.2e} / {v['seq_kl_rel_err_max']:.2e} | {v['p_tail_mean']:.2e} / "
            f"{v['p_tail_max']:.2e} | {v['loss_abs_err_max']:.2e} | {v['grad_loss_cos_min']:.8f} "
            f"({v['grad_loss_rel_max']:.2e}) | {v['grad_kl_cos_min']:.6f} ({v['grad_kl_rel_max']:.2e}) | "
            f"{v['bytes_per_token']:.0f} ({v['raw_bytes_per_token']}) |")
    lines += ["", "Per-batch and per-response values: `approx.json`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.topm_approx", description=__doc__.split("\n\n")[0])
    p.add_argument("--ms", default="8,32,128,512")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--batch-pairs", type=int, default=2)
    p.add_argument("--drift-steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/fpo-topm-approx")
    p.add_argument("--out", default="docs/results/tdpo-offline")
    a = p.parse_args(argv)
    from fpo_dist.machine import cpu_model

    torch.set_num_threads(a.threads)
    ms = sorted(int(x) for x in a.ms.split(","))
    res = run(ms, a.pairs, a.drift_steps, a.batch_pairs, Path(a.work), log=lambda s: print(s, flush=True))
    res["cpu"], res["python"], res["torch"] = cpu_model(), platform.python_version(), torch.__version__
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "approx.json").write_text(json.dumps(res, indent=1))
    md = markdown(res, "python -m bench.topm_approx " + " ".join(argv or []), res["cpu"])
    (out / "approx.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
