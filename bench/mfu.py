"""Model FLOPs utilisation (MFU) of a training step, for the GPU targets (issue 22: the FPO step's MFU ≥ 35 %).

    MFU = model FLOPs per second / (ranks × the device's dense peak)

Model FLOPs of one step, forward and backward (6 per multiply-add weight and token, PaLM's count) — only what the
step's objective needs, so that it credits no work the step skips:

    6 · N_body · T  +  6 · d · V · S

``N_body``: the policy's parameters without the input embedding and the output layer (a lookup, and a matmul counted
on its own); ``T``: the tokens in the step's rows (no padding; a shared-prefix row's prompt once); ``d · V``: the
output layer's matmul, counted at the ``S`` positions that predict a response token (the ones the loss needs; a
materialized head computes more, and that is not credited).  Attention's scores (``QKᵀ``, ``PV``) are not counted:
the figure is a lower bound, by ``12 · layers · d · T̄`` per token for mean attended length ``T̄`` (a few % at
T̄ ≈ 1,000 and d ≥ 1,024).  The peak is the device's dense bf16 tensor throughput from its data sheet; MFU is not
computed for fp32 runs or unknown devices (None).
"""

from __future__ import annotations

# dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name() (first match wins)
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("L40S", 362.0))


def peak_flops(device_name: str | None, dtype: str) -> float | None:
    """The dense peak in FLOP/s of one device for ``dtype`` runs, None where unknown (CPU, fp32, other devices)."""
    if not device_name or dtype != "bfloat16":
        return None
    for part, tflops in PEAK_BF16_TFLOPS:
        if part in device_name:
            return tflops * 1e12
    return None


def step_model_flops(n_params: int, d_model: int, vocab: int, tied_head: bool, tokens: float, scored: float) -> float:
    """Model FLOPs of one training step (module docstring) from the policy's full parameter count."""
    n_body = n_params - d_model * vocab * (1 if tied_head else 2)
    if n_body <= 0:
        raise ValueError(f"{n_params} parameters cannot hold a {vocab} x {d_model} embedding and output layer")
    return 6.0 * n_body * tokens + 6.0 * d_model * vocab * scored


def mfu(n_params: int, shape: dict, tokens_per_s: float, scored_per_s: float, ranks: int, device_name: str | None,
        dtype: str) -> float | None:
    """MFU from the trainer's rates (summed over ranks) and ``shape`` (run_info's ``policy_shape``)."""
    peak = peak_flops(device_name, dtype)
    if peak is None:
        return None
    flops = step_model_flops(n_params, shape["d_model"], shape["vocab"], shape["tied_head"], tokens_per_s,
                             scored_per_s)
    return flops / (ranks * peak)
