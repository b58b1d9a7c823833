"""The demo's preference-phase hyper-parameters: one place, read by ``preference_check`` and the demo run.

Checked with ``python -m fpo_dist.demo.preference_check`` (single process, plain PyTorch) on the bundled
assets: all four losses lift the held-out rule-follow rate from ~0.35 to 0.7-0.9 within 150 steps and hold it.

Why β is ~10x the paper's: the paper trains a 2B model at lr 5e-7, where the loss never gets near saturation.
A 350K-parameter model at lr 5e-4 does, and with the paper's β = 0.1 the loss keeps pushing the rejected
responses' log-probs down long after the topic is right, which wrecks the model's formatting within ~100 steps
(measured: FPO and DPO at β = 0.1 collapse to <10% follow rate by step 150).  With these β each loss saturates
once the topic is right (a plateau, robust to the exact step count).  Length-normalised losses (FPO, SimPO) take
~10x the β of the summed-log-prob ones (DPO, TDPO2): the responses have ~10 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class Recipe:
    # optimisation (AdamW, linear warm-up then constant)
    lr: float = 5e-4
    steps: int = 150
    batch_pairs: int = 8  # global batch: pairs per optimizer step (e.g. 2 ranks x 4 pairs x 1 accumulation)
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # losses
    beta: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType({"fpo": 10.0, "simpo": 10.0, "dpo": 1.0, "tdpo2": 1.0})
    )
    alpha: float = 0.5  # FPO feature weight; TDPO2 KL weight
    k: int = 50  # FPO top-k (of the SAE's 256 features)
    topk_mode: str = "union"
    simpo_gamma: float = 1.0  # absolute margin
    # data (fpo_dist.demo.task.write_preference_data) and its tokenization
    n_train_pairs: int = 2048
    n_heldout_pairs: int = 256
    data_seed: int = 0
    max_length: int = 64
    max_prompt_length: int = 32
    # evaluation during training on the held-out pairs' cache (every N steps and at the end), in forwards of the
    # training micro-batch's size: a larger one would raise the peak memory the report shows
    eval_every: int = 25
    # evaluation (fpo_dist.evaluate.GenerationConfig)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 24
    samples_per_prompt: int = 4

    def beta_for(self, loss: str) -> float:
        """β of ``loss``; an offline TDPO loss takes its online counterpart's (the same loss, another KL source)."""
        base = loss.removesuffix("-offline")
        if base not in self.beta:
            raise ValueError(f"the demo recipe has no β for loss {loss!r}; known: {sorted(self.beta)}")
        return self.beta[base]


RECIPE = Recipe()
