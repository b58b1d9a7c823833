"""The output layer's weight gradient for a bf16 weight: chunked over the vocabulary (``weight_grad`` "vocab", the
default for a bf16 weight) vs chunked over positions into an fp32 ``[vocab, d]`` buffer ("positions", the path it
replaces), ``fpo_dist.lm_head.WEIGHT_GRAD``.

    python -m bench.head_grad [--vocab 262144] [--d 640] [--positions 256] [--device cpu|cuda] [--rounds 3]

Default shape: Gemma 3 270M's output layer (262,144 × 640, bf16) and a micro-batch's selected positions.  Per path,
one selected-head forward and backward (the chunk from the default budget, ``auto_head_chunk``) on the same
hidden states, targets and weight, paths interleaved round by round: the backward's peak memory above its start
(CPU: the process's RSS high-water mark, reset before each backward; GPU: ``max_memory_allocated``, reset), its wall
time (median over rounds), and the two weight gradients compared.  Writes ``OUT/head-grad-{device}.json`` and
``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("positions", "vocab")


def _backward(h, weight, targets, mode: str, device: str) -> dict:
    from bench.train_rank import _memory, _reset_peak
    from fpo_dist.lm_head import HeadTransform, _Cfg, _SelectedHead, auto_head_chunk

    cuda = device == "cuda"
    cfg = _Cfg(HeadTransform(), None, auto_head_chunk(weight.shape[0]), mode)
    h = h.detach().requires_grad_(True)
    weight.grad = None
    logp = _SelectedHead.apply(h, weight, None, targets, None, None, None, cfg, None)[0]  # (logp, kl, top-M ids, ...)
    loss = (logp * torch.linspace(-1, 1, len(logp), device=device)).sum()
    if cuda:
        torch.cuda.synchronize()
    _reset_peak(cuda)
    start = _memory(cuda)
    t0 = time.perf_counter()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    end = _memory(cuda)
    peak = (end["max_allocated_mb"] - start["allocated_mb"]) if cuda else (end["hwm_mb"] - start["rss_mb"])
    return {"backward_s": seconds, "peak_above_start_mb": peak, "grad": weight.grad.detach().clone()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=262_144)
    ap.add_argument("--d", type=int, default=640)
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter((torch.randn(a.vocab, a.d, generator=g) * a.d ** -0.5).to(a.device, torch.bfloat16))
    h = torch.randn(a.positions, a.d, generator=g).to(a.device, torch.bfloat16)
    targets = torch.randint(0, a.vocab, (a.positions,), generator=g).to(a.device)
    runs: dict = {p: [] for p in PATHS}
    grads = {}
    for _ in range(a.rounds):
        for p in PATHS:
            r = _backward(h, weight, targets, p, a.device)
            grads[p] = r.pop("grad")
            runs[p].append(r)
    summary = {p: {"backward_s": statistics.median(r["backward_s"] for r in runs[p]),
                   "peak_above_start_mb": max(r["peak_above_start_mb"] for r in runs[p]), "rounds": runs[p]}
               for p in PATHS}
    diff = (grads["vocab"].double() - grads["positions"].double()).abs().max().item()
    scale = grads["positions"].double().abs().max().item()
    fp32_buffer_mb = a.vocab * a.d * 4 / 2**20
    result = {
        "command": " ".join(["python -m bench.head_grad", *(argv or [])]), "device": a.device,
        "shape": {"vocab": a.vocab, "d": a.d, "positions": a.positions, "dtype": "bfloat16"},
        "threads": torch.get_num_threads(), "torch": torch.__version__, "paths": summary,
        "weight_grad_max_abs_diff": diff, "weight_grad_max_abs": scale, "fp32_buffer_mb": fp32_buffer_mb,
        "ratios": {
            "head_grad_mem_vocab_vs_positions": summary["vocab"]["peak_above_start_mb"]
            / summary["positions"]["peak_above_start_mb"],
            "head_grad_time_vocab_vs_positions": summary["vocab"]["backward_s"] / summary["positions"]["backward_s"],
        },
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"head-grad-{a.device}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Output-layer weight gradient, bf16 {a.vocab:,} × {a.d}, {a.positions} positions, {a.device}, "
             f"{result['threads']} thread(s)", "", f"`{result['command']}`", "",
             "| weight gradient chunked over | backward, s (median of %d) | peak above the backward's start, MB |"
             % a.rounds, "|---|---:|---:|"]
    lines += [f"| {p} | {summary[p]['backward_s']:.3f} | {summary[p]['peak_above_start_mb']:.0f} |" for p in PATHS]
    lines += ["", f"`head_grad_mem_vocab_vs_positions`: **{result['ratios']['head_grad_mem_vocab_vs_positions']:.3f}**; "
                  f"`head_grad_time_vocab_vs_positions`: **{result['ratios']['head_grad_time_vocab_vs_positions']:.3f}**. "
                  f"The positions path's fp32 buffer alone is {fp32_buffer_mb:.0f} MB. The two weight gradients: max "
                  f"|difference| {diff:.3g} of a max |gradient| {scale:.3g} (bf16 ε = {torch.finfo(torch.bfloat16).eps:.3g})."]
    (out / f"head-grad-{a.device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
