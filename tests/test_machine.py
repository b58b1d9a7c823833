"""The machine named beside every timing (``fpo_dist.machine``): read from /proc/cpuinfo text written here by hand."""

from __future__ import annotations

import torch

from fpo_dist.machine import cpu_model, describe, label

XEON = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags		: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8

processor	: 1
model name	: some other name
flags		: fpu
"""

EPYC = """processor	: 0
model name	: AMD EPYC 7B13 64-Core Processor
flags		: fpu sse2 avx avx2 fma
"""


def test_cpu_model_names_the_first_cpu_and_its_isa_extensions():
    assert cpu_model(XEON) == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (AVX2, AVX-512, AVX-512 BF16, AMX)"
    assert cpu_model(EPYC) == "AMD EPYC 7B13 64-Core Processor (AVX2)"
    assert cpu_model("model name\t: Plain CPU\nflags\t: fpu\n") == "Plain CPU"  # no listed extension: the name only


def test_label_puts_the_gpu_first_where_one_was_used():
    cpu = {"cpu": "AMD EPYC 7B13 64-Core Processor (AVX2)", "cpu_cores": 16, "cpu_cores_usable": 2, "gpu": None}
    assert label(cpu) == "AMD EPYC 7B13 64-Core Processor (AVX2), 2 cores"  # the cores this process could use
    assert label({**cpu, "gpu": "NVIDIA H100 80GB HBM3"}) == (
        "NVIDIA H100 80GB HBM3 on AMD EPYC 7B13 64-Core Processor (AVX2), 2 cores")


def test_describe_this_machine():
    info = describe("cpu")
    assert info["cpu"] == cpu_model() and info["torch"] == torch.__version__ and info["gpu"] is None
    assert 1 <= info["cpu_cores_usable"] <= info["cpu_cores"]
