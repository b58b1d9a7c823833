"""The varlen attention kernels side by side on one layer's packed row (``fpo_dist.attention.KERNELS``): the data
that picks ``attention_kernel`` per device (issue 22).

    python -m bench.attention [--device cpu|cuda] [--pairs 4] [--rounds 5] [--out bench/results]

Shape: one Gemma 3 270M attention layer (4 query heads, 1 key/value head, head dim 256), a micro-batch of
``--pairs`` pairs with UltraFeedback-like lengths (prompt 150, responses 230 and 270 tokens, alternating), in the
shared and the packed layout, for a global layer and a sliding-window (512) one.  Per kernel and case: the
attention call's forward (and, where the kernel has one on the device, forward + backward) wall time, median over
interleaved rounds, and the largest difference of its output from ``sdpa`` (one call per sequence, the reference).
On CPU ``flex`` runs forward only (PyTorch's CPU FlexAttention has no backward) and ``flash`` not at all.  Writes
``OUT/attention-{device}.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HEADS, KV_HEADS, HEAD_DIM, WINDOW = 4, 1, 256, 512
LENGTHS = (150, 230, 270)  # prompt, chosen, rejected


class _Layer(torch.nn.Module):
    """What transformers hands the attention function as ``module`` (only ``.training`` is read)."""


def _row(pairs: int, layout: str):
    from fpo_dist.data import TokenizedPair
    from fpo_dist.models import build_batch

    p, c, r = LENGTHS
    pairs_ = [TokenizedPair(i, bytes(16), (5,) * p, (6,) * (c if i % 2 else r), (7,) * (r if i % 2 else c))
              for i in range(pairs)]
    return build_batch(pairs_, 0, layout)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _call(fn, q, k, v, pos, window, backward: bool):
    from fpo_dist.attention import _spans_memo, _tables_memo

    _spans_memo[:] = [None, None]  # every call pays what a forward's first layer pays (spans, masks, indices)
    _tables_memo[:] = [None, {}]
    module = _Layer().train(backward)
    if backward:
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out, _ = fn(module, q, k, v, None, scaling=HEAD_DIM**-0.5, sliding_window=window, position_ids=pos)
    if backward:
        out.float().square().mean().backward()
    return out.detach()


def run(device: str, pairs: int, rounds: int, dtype: torch.dtype) -> dict:
    from fpo_dist.attention import KERNELS, flash_varlen_attention, flex_varlen_attention, varlen_attention

    fns = {"sdpa": varlen_attention, "flex": flex_varlen_attention, "flash": flash_varlen_attention}
    assert set(fns) == set(KERNELS)
    cases = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for layout in ("shared", "packed"):
        batch = _row(pairs, layout)
        n = batch.input_ids.shape[1]
        pos = batch.position_ids.to(device)
        q = torch.randn(1, HEADS, n, HEAD_DIM, generator=g).to(device, dtype)
        k = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g).to(device, dtype)
        v = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g).to(device, dtype)
        for window in (None, WINDOW):
            for backward in ((False, True) if device == "cuda" else (False,)):
                kernels = [x for x in fns if device == "cuda" or x != "flash"]
                if device != "cuda" and backward:
                    kernels = ["sdpa"]
                times: dict[str, list[float]] = {x: [] for x in kernels}
                outs, errors = {}, {}
                for r in range(rounds + 1):  # round 0: warm-up (compilation, caches)
                    for x in list(kernels):
                        try:
                            _sync(device)
                            t0 = time.perf_counter()
                            out = _call(fns[x], q, k, v, pos, window, backward)
                            _sync(device)
                            if r:
                                times[x].append(time.perf_counter() - t0)
                            outs[x] = out
                        except Exception as e:  # a kernel this device/version cannot run: recorded, not fatal
                            errors[x] = f"{type(e).__name__}: {e}"[:300]
                            kernels.remove(x)
                            times.pop(x, None)
                ref = outs.get("sdpa")
                cases.append({
                    "layout": layout, "tokens": n, "window": window, "backward": backward,
                    "median_s": {x: statistics.median(t) for x, t in times.items() if t},
                    "vs_sdpa": {x: statistics.median(t) / statistics.median(times["sdpa"])
                                for x, t in times.items() if t and times.get("sdpa")},
                    "max_abs_diff_vs_sdpa": {x: float((o.float() - ref.float()).abs().max())
                                             for x, o in outs.items() if ref is not None},
                    "errors": errors,
                })
    return {"device": device, "dtype": str(dtype).replace("torch.", ""), "pairs": pairs, "rounds": rounds,
            "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "lengths": LENGTHS,
                      "window": WINDOW},
            "torch": torch.__version__, "cases": cases}


def markdown(res: dict, cpu: str) -> str:
    lines = [f"# Varlen attention kernels, one layer ({res['device']}, {res['dtype']})", "",
             f"`python -m bench.attention --device {res['device']} --pairs {res['pairs']} --rounds {res['rounds']}`; "
             f"torch {res['torch']}; {cpu}. One Gemma 3 270M attention layer ({HEADS} heads, {KV_HEADS} key/value "
             f"head, head dim {HEAD_DIM}), {res['pairs']} pairs of prompt {LENGTHS[0]} + responses {LENGTHS[1]}/"
             f"{LENGTHS[2]} tokens in one row; median of {res['rounds']} interleaved rounds after a warm-up.", "",
             "| layout | tokens | window | pass | kernel | median (ms) | / sdpa | max abs diff vs sdpa |",
             "|---|---:|---:|---|---|---:|---:|---:|"]
    for c in res["cases"]:
        for x, t in c["median_s"].items():
            lines.append(f"| {c['layout']} | {c['tokens']} | {c['window'] or 'global'} | "
                         f"{'fwd+bwd' if c['backward'] else 'fwd'} | {x} | {1000 * t:.2f} | {c['vs_sdpa'].get(x, 0):.3f} "
                         f"| {c['max_abs_diff_vs_sdpa'].get(x, float('nan')):.3g} |")
        for x, e in c["errors"].items():
            lines.append(f"| {c['layout']} | {c['tokens']} | {c['window'] or 'global'} | "
                         f"{'fwd+bwd' if c['backward'] else 'fwd'} | {x} | failed | | {e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from fpo_dist.machine import cpu_model

    p = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    res = run(a.device, a.pairs, a.rounds, dtype)
    cpu = cpu_model()
    res["cpu_model"] = cpu
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"attention-{a.device}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"attention-{a.device}.md").write_text(markdown(res, cpu))
    print(markdown(res, cpu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
