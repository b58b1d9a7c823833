"""One rank of a benchmark training run (launched by ``bench.train`` under torchrun, one launch per loss).

    python -m torch.distributed.run --nproc_per_node N -m bench.train_rank --bench_root DIR \
        --bench_loss fpo --bench_steps W+M --bench_profile 1 [TrainConfig overrides ...]

In ``DIR/train_{loss}``: runs the real trainer (``Trainer.setup`` → ``train`` → ``cleanup``; no checkpoint, no
export) for W+M steps, then one more step with a phase timer and ``torch.profiler`` on.  Writes
``rank{r}.json`` (memory at each stage) and, on rank 0, ``phases.json`` and ``profile.txt`` next to the
trainer's own ``metrics.jsonl``.  One process per loss: clean memory numbers, and the trainer's cleanup ends the
process group.

Fair memory: every run imports the same modules before the trainer (sae_lens too, which only FPO needs), and the
peak-memory high-water mark is reset after setup, so ``peak_memory_mb`` of a step is that step's peak (RSS on
CPU via /proc/self/clear_refs; ``max_memory_allocated`` on GPU via ``reset_peak_memory_stats``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path


def _rss_mb() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) / 1024
    return out


def _reset_peak(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (and so ru_maxrss) to the current RSS


def _memory(cuda: bool) -> dict:
    import torch

    rss = _rss_mb()
    out = {"rss_mb": rss["VmRSS"], "hwm_mb": rss["VmHWM"]}
    if cuda:
        out.update(allocated_mb=torch.cuda.memory_allocated() / 2**20,
                   max_allocated_mb=torch.cuda.max_memory_allocated() / 2**20)
    return out


class PhaseTimer:
    """Wall time per phase of a training step (synchronised on GPU), only while ``on``; and per phase the memory
    peak above the phase's start (the high-water mark is reset at each phase's start: use it only in a step whose
    own peak is not reported)."""

    def __init__(self, cuda: bool):
        self.on = False
        self.cuda = cuda
        self.seconds: dict = defaultdict(float)
        self.calls: dict = defaultdict(int)
        self.peak_above_start_mb: dict = defaultdict(float)

    def clear(self) -> None:
        for d in (self.seconds, self.calls, self.peak_above_start_mb):
            d.clear()

    def _current_mb(self) -> float:
        import torch

        return torch.cuda.memory_allocated() / 2**20 if self.cuda else _rss_mb()["VmRSS"]

    def _peak_mb(self) -> float:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if self.cuda else _rss_mb()["VmHWM"]

    def wrap(self, fn, name):
        import torch

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            label = name(args) if callable(name) else name
            if self.cuda:
                torch.cuda.synchronize()
            start_mb = self._current_mb()
            _reset_peak(self.cuda)
            t0 = time.perf_counter()
            try:
                with torch.profiler.record_function(f"bench::{label}"):
                    return fn(*args, **kwargs)
            finally:
                if self.cuda:
                    torch.cuda.synchronize()
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1
                self.peak_above_start_mb[label] = max(self.peak_above_start_mb[label], self._peak_mb() - start_mb)

        return inner


class StepClock:
    """CPU seconds of this process (all threads) per optimizer step: robust to other load on a shared host."""

    def __init__(self):
        self.last = None
        self.per_step: list[float] = []

    def start(self) -> None:
        self.last, self.per_step = time.process_time(), []

    def wrap(self, fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            now = time.process_time()  # _reduce runs once per optimizer step, right after step_time_s is taken
            if self.last is not None:
                self.per_step.append(now - self.last)
            self.last = now
            return fn(*args, **kwargs)

        return inner


class PaddingCount:
    """Padding positions / computed positions of the micro-batches the trainer is handed (and trains on): from
    each micro-batch itself, ``padding_tokens`` where it has one (packed rows: 0), else its attention mask."""

    def __init__(self):
        self.padding = self.computed = self.micro_batches = 0
        self.layouts: set = set()

    def wrap(self, fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            mb = fn(*args, **kwargs)
            pad = getattr(mb, "padding_tokens", None)
            self.padding += int(pad) if pad is not None else int((mb.attention_mask == 0).sum())
            self.computed += int(mb.input_ids.numel())
            self.micro_batches += 1
            self.layouts.add("shared" if getattr(mb, "shared", None) is not None else
                             "packed" if getattr(mb, "position_ids", None) is not None else "padded")
            return mb

        return inner

    def to_dict(self) -> dict:
        return {"padding_tokens": self.padding, "computed_tokens": self.computed, "micro_batches": self.micro_batches,
                "layouts": sorted(self.layouts), "share": self.padding / self.computed if self.computed else None}


def instrument(timer: PhaseTimer, clock: StepClock, padding: PaddingCount | None = None) -> None:
    """Wrap the trainer's building blocks (this process only) so the profiled step is split into phases."""
    from fpo_dist import engine, forward, lm_head, losses, trainer
    from fpo_dist.loader import CacheLoader

    eng = engine.Engine
    eng.__call__ = timer.wrap(eng.__call__, lambda a: "reference_forward" if a[0].optimizer is None else "policy_forward")
    eng.backward = timer.wrap(eng.backward, "backward")
    eng.step = timer.wrap(eng.step, "optimizer_step")
    CacheLoader.__next__ = timer.wrap(CacheLoader.__next__, "loader_next")
    if padding is not None:
        CacheLoader.__next__ = padding.wrap(CacheLoader.__next__)
    for name, phase in (("pooled_policy_codes", "sae_encode_pool"), ("predicted_token_logps", "logps"),
                        ("position_kl", "kl")):  # logps/kl: the materialized path (--logits materialized)
        setattr(forward, name, timer.wrap(getattr(forward, name), phase))
    # the selected-position head (the default) computes log-probs inside the policy forward; its KL term (the
    # reference's chunked log-softmax, forward pass) is timed on its own
    lm_head._kl = timer.wrap(lm_head._kl, "kl")
    for name, spec in list(losses.LOSSES.items()):
        losses.LOSSES[name] = dataclasses.replace(spec, fn=timer.wrap(spec.fn, "loss_fn"))
    trainer.Trainer._check_finite = timer.wrap(trainer.Trainer._check_finite, "finite_check")
    trainer.Trainer._reduce = clock.wrap(timer.wrap(trainer.Trainer._reduce, "metrics_reduce"))


def _profile_totals(averages) -> dict:
    """Self CPU seconds of what every loss pays alike: ZeRO-3's gradient hooks (they run inside autograd's
    AccumulateGrad), the collectives and the dense matmuls."""
    totals = {"zero3_accumulate_grad": 0.0, "collectives": 0.0, "matmul": 0.0, "all": 0.0}
    for evt in averages:
        sec = evt.self_cpu_time_total / 1e6
        totals["all"] += sec
        if evt.key == "torch::autograd::AccumulateGrad":
            totals["zero3_accumulate_grad"] += sec
        elif evt.key.startswith("c10d::"):
            totals["collectives"] += sec
        elif evt.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"):
            totals["matmul"] += sec
    return totals


def run_one(tr, out: Path, steps: int, profile: int, timer: PhaseTimer, clock: StepClock, mem: dict,
            cuda: bool, padding: PaddingCount | None = None) -> None:
    """Setup, ``steps`` training steps, then ``profile`` steps under the phase timer and torch.profiler."""
    import torch

    try:
        tr.setup()
        mem["after_setup"] = _memory(cuda)
        _reset_peak(cuda)
        tr.total_steps = steps
        clock.start()
        t0 = time.perf_counter()
        tr.train()
        train_s = time.perf_counter() - t0
        cpu_s = list(clock.per_step)
        mem["train_peak"] = _memory(cuda)
        if profile:
            tr.total_steps = steps + profile
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            timer.clear()
            timer.on = True
            with torch.profiler.profile(activities=activities) as prof:
                tr.train()
            timer.on = False
            if tr.rank == 0:
                averages = prof.key_averages()
                sort = "self_device_time_total" if cuda else "self_cpu_time_total"
                (out / "profile.txt").write_text(averages.table(sort_by=sort, row_limit=25))
                (out / "phases.json").write_text(json.dumps(
                    {"seconds": dict(timer.seconds), "calls": dict(timer.calls), "steps": profile,
                     "peak_above_start_mb": dict(timer.peak_above_start_mb),
                     "profile_cpu_s": _profile_totals(averages)}, indent=1))
        mem["end"] = _memory(cuda)
        (out / f"rank{tr.rank}.json").write_text(json.dumps(
            {"rank": tr.rank, "world": tr.world, "train_s": train_s, "cpu_s_per_step": cpu_s, "memory": mem,
             "reference_model_resident": tr.reference is not None, "sae_resident": tr.sae is not None,
             "padding": padding.to_dict() if padding is not None else None,
             "logits": tr.cfg.logits, "batch_layout": getattr(tr.cfg, "batch_layout", "padded")}, indent=1))
    finally:
        tr.cleanup()


def _split_args(argv: list[str]) -> tuple[dict, list[str]]:
    ours, rest, i = {}, [], 0
    while i < len(argv):
        if argv[i].startswith("--bench_"):
            ours[argv[i][len("--bench_"):]] = argv[i + 1]
            i += 2
        elif argv[i].startswith("--local_rank"):
            i += 1 if "=" in argv[i] else 2
        else:
            rest.append(argv[i])
            i += 1
    return ours, rest


def main(argv: list[str] | None = None) -> int:
    ours, overrides = _split_args(list(sys.argv[1:] if argv is None else argv))
    root = Path(ours["root"])
    steps, profile = int(ours["steps"]), int(ours.get("profile", "1"))
    # the same modules in every run (FPO needs sae_lens; importing it first also keeps it ahead of zero.Init)
    import sae_lens  # noqa: F401, I001  (first: ahead of deepspeed and zero.Init)
    import torch
    import deepspeed  # noqa: F401
    import transformers  # noqa: F401

    from fpo_dist.config import TrainConfig, load_config
    from fpo_dist.trainer import Trainer

    cuda = torch.cuda.is_available()
    timer, clock, padding = PhaseTimer(cuda), StepClock(), PaddingCount()
    instrument(timer, clock, padding)
    imports = _memory(cuda)
    loss = ours["loss"]
    out = root / f"train_{loss}"
    out.mkdir(parents=True, exist_ok=True)
    from bench.train import VARIANTS

    cfg = load_config(TrainConfig, None, overrides + ["--loss.name", VARIANTS.get(loss, (loss, []))[0],
                                                      "--output_dir", str(out),
                                                      "--max_steps", str(steps + profile)])
    run_one(Trainer(cfg), out, steps, profile, timer, clock, {"after_imports": imports}, cuda, padding)
    return 0


if __name__ == "__main__":
    sys.exit(main())
