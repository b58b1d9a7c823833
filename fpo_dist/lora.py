"""LoRA policies through peft: wrap the policy, and turn a (consolidated) state dict into the two exports.

- :func:`apply_lora` wraps the loaded policy with ``peft.get_peft_model`` (``lora_B`` starts at zero, so the
  policy equals the base model — the cache's reference — at step 0 and the step-0 check holds).  Only adapter
  parameters train; under ZeRO-3 DeepSpeed partitions the new adapter parameters like the base ones.  The adapters'
  random ``lora_A`` are drawn from a generator seeded by the run's seed (the same on every rank; the global RNG is
  left untouched).
- :func:`adapter_state` and :func:`merged_state` are pure functions of the PeftModel's full state dict (what
  ``engine.Engine.consolidated_state_dict`` gathers): the adapter alone (peft's key names, as
  ``PeftModel.save_pretrained`` writes them) and the base model's keys with every adapted weight merged,
  ``W + scaling · B A`` (``scaling = alpha / rank``; transposed for ``fan_in_fan_out`` layers) — what
  ``merge_and_unload`` computes, without building a second model.
- :func:`export` writes ``<out>/adapter`` (load with ``PeftModel.from_pretrained(base, dir)``) and ``<out>`` (a
  plain Hugging Face model with the adapters merged).
"""

from __future__ import annotations

from pathlib import Path

import torch

ADAPTER = "default"  # peft's adapter name
_PREFIX = "base_model.model."  # PeftModelForCausalLM → LoraModel → the base model


def apply_lora(model, cfg, seed: int):
    """``model`` wrapped in a peft ``PeftModel`` with LoRA adapters per ``cfg`` (a ``config.LoraConfig``)."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if list(cfg.target_modules) == ["all-linear"] else list(cfg.target_modules)
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            wrapped = get_peft_model(model, peft_cfg)
        except ValueError as e:  # e.g. target modules not found in the model
            from fpo_dist.config import ConfigError

            raise ConfigError(f"'policy.lora.target_modules' {list(cfg.target_modules)}: {e}") from None
    return wrapped


def lora_layers(peft_model) -> dict[str, dict]:
    """``{module name in the state dict: {"scaling": s, "fan_in_fan_out": bool}}`` of every adapted layer."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.scaling:
            out[name] = {"scaling": float(module.scaling[ADAPTER]),
                         "fan_in_fan_out": bool(getattr(module, "fan_in_fan_out", False))}
    return out


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights of a PeftModel state dict (keys as in the PeftModel)."""
    return {k: v for k, v in state.items() if ".lora_" in k}


def merged_state(state: dict[str, torch.Tensor], layers: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The base model's state dict with ``W + scaling · B A`` for every adapted layer (fp32 arithmetic)."""
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        module, _, leaf = key.rpartition(".base_layer.")
        if leaf and module in layers:
            if leaf == "weight":
                a = state[f"{module}.lora_A.{ADAPTER}.weight"].float()
                b = state[f"{module}.lora_B.{ADAPTER}.weight"].float()
                delta = layers[module]["scaling"] * (b @ a)
                if layers[module]["fan_in_fan_out"]:
                    delta = delta.T
                value = (value.float() + delta).to(value.dtype)
            key = f"{module}.{leaf}"
        if not key.startswith(_PREFIX):
            raise ValueError(f"unexpected key {key!r} in a PeftModel state dict (expected the prefix {_PREFIX!r})")
        merged[key[len(_PREFIX):]] = value
    return merged


def export(peft_model, state: dict[str, torch.Tensor], out_dir: str, tokenizer, dtype: torch.dtype) -> None:
    """``out_dir/adapter``: the adapter (peft format); ``out_dir``: the merged Hugging Face model (rank 0 only)."""
    state = {k: v.to(dtype) for k, v in state.items()}
    out = Path(out_dir)
    peft_model.save_pretrained(str(out / "adapter"), state_dict=adapter_state(state), safe_serialization=True)
    base = peft_model.get_base_model()
    base.save_pretrained(str(out), state_dict=merged_state(state, lora_layers(peft_model)), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
