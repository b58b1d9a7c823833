"""The optimizer step alone: torch's default per-tensor Adam(W) loop vs its fused kernel (``optim.fused``).

    python -m bench.optimizer [--numel 134049088] [--device cpu|cuda] [--steps 3] [--out bench/results]

Under ZeRO-3 each rank's optimizer steps one flat fp32 partition; the default size is Gemma 3 270M's per-rank
partition on 2 ranks (134,049,088 elements).  The per-tensor loop allocates temporaries the size of the partition
(``exp_avg_sq.sqrt()``, the division) on every step; the fused kernel makes one pass in place.  Both run side by
side in one process on the same weights and gradients; the first step (optimizer-state creation) is reported
separately from the steady-state steps.  Writes ``OUT/optimizer-{device}.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _time_steps(numel: int, device: str, fused: bool, steps: int) -> dict:
    from fpo_dist.config import TrainConfig, load_config
    from fpo_dist.trainer import build_optimizer

    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(numel, generator=g).to(device))
    p.grad = torch.randn(numel, generator=g).to(device)
    cfg = load_config(TrainConfig, None, ["--cache", "-", "--optim.fused", str(fused).lower()])
    opt = build_optimizer([p], cfg)
    times = []
    for _ in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"first_step_s": times[0], "step_s": statistics.median(times[1:]), "steps_s": times[1:]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=134_049_088)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    runs = {name: _time_steps(args.numel, args.device, fused, args.steps)
            for name, fused in (("per_tensor", False), ("fused", True))}
    ratio = runs["fused"]["step_s"] / runs["per_tensor"]["step_s"]
    result = {"command": " ".join(["python -m bench.optimizer", *(argv or [])]), "device": args.device,
              "numel": args.numel, "threads": torch.get_num_threads(), "torch": torch.__version__, "runs": runs,
              "ratios": {"optimizer_fused_vs_per_tensor": ratio}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"optimizer-{args.device}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {n} | {r['first_step_s']:.3f} | {r['step_s']:.3f} |" for n, r in runs.items())
    (out / f"optimizer-{args.device}.md").write_text(
        f"# Optimizer step, {args.numel:,} fp32 elements (one ZeRO-3 partition), {args.device}, "
        f"{result['threads']} thread(s)\n\n`{result['command']}`\n\n"
        f"| AdamW | first step (state creation), s | step, s (median of {args.steps}) |\n|---|---:|---:|\n{rows}\n\n"
        f"`optimizer_fused_vs_per_tensor` (step time): **{ratio:.3f}**\n")
    print(json.dumps(result["ratios"]))
    return result


if __name__ == "__main__":
    main()
