"""What machine a figure was measured on: the CPU (model and the ISA extensions that move CPU kernels' speed and
rounding), its cores, and the GPU where one is used.  Recorded beside the step times and memory figures of the
trainer's ``run_info.json``, the studies' reports (``fpo_dist.demo.study``, ``real_study``, ``tdpo_offline``) and
``bench/``: the same code's step times, and even its ratios, differ between an AMD EPYC and an Intel Xeon with AMX."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# ISA extensions named with every CPU figure: /proc/cpuinfo flag → name
ISA_FLAGS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512 BF16"), ("amx_tile", "AMX"))


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name and the ISA extensions of :data:`ISA_FLAGS` it has, e.g. ``… (AVX2, AVX-512, AMX)``;
    ``cpuinfo``: the text of ``/proc/cpuinfo`` (read when not given)."""
    name, flags = None, set()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.startswith("model name") and name is None:
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    name = name or platform.processor() or platform.machine()
    isa = [label for flag, label in ISA_FLAGS if flag in flags]
    return f"{name} ({', '.join(isa)})" if isa else name


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask; a container's or a SLURM step's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def describe(device: str | None = None) -> dict:
    """``{"cpu", "cpu_cores", "cpu_cores_usable", "torch", "gpu"}``; ``gpu`` is the CUDA device's name when
    ``device`` is a CUDA device, else None; ``device`` None: CUDA where available (where the trainer runs by
    default), else the CPU."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable_cores(),
            "torch": torch.__version__, "gpu": gpu}


def label(info: dict) -> str:
    """One line for a report: ``<gpu> on <cpu>, N cores`` (the GPU only where one was used)."""
    cores = info.get("cpu_cores_usable") or info.get("cpu_cores")
    cpu = f"{info.get('cpu') or '?'}, {cores} cores" if cores else f"{info.get('cpu') or '?'}"
    return f"{info['gpu']} on {cpu}" if info.get("gpu") else cpu
