"""Benchmark sizes: one preset per machine kind, chosen by ``--device`` and ``--quick``.

The model is a random-init Llama built from config (``fpo_dist.testing.build_llama``); the SAE is a sae-lens
JumpReLU with d_in = hidden size whose thresholds are calibrated to a per-token L0 (``target_l0``), like the
Gemma Scope SAEs the paper uses (L0 50-100).  The SAE is sized so that encoding it costs about what Gemma
Scope 16k costs relative to Gemma-2-2B's training step (a few % of the model's FLOPs), not 40 % of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Sizes:
    name: str
    # model (LlamaForCausalLM from config) and SAE
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    hook_layer: int
    d_sae: int
    target_l0: int  # per-token non-zeros the SAE thresholds are calibrated to
    dtype: str  # reference model dtype in the cache job and the bare forward (the trainer: auto)
    # data: synthetic preference rows; words ≈ tokens (1.1 tokens/word with the bench tokenizer)
    rows: int
    max_length: int
    max_prompt_length: int
    prompt_words: tuple[int, int]
    response_words: tuple[int, int]
    # 2. cache job
    cache_batch: int  # pairs per forward (CacheConfig.batch_size)
    rows_per_shard: int
    bare_rows: int  # pairs for reference_pass vs bare forward
    bare_rounds: int
    # 1. training
    micro_batch: int  # pairs per rank per micro-step (grad_accum 1)
    warmup_steps: int  # skipped
    measure_steps: int  # median over these; one more step is profiled
    # 3. loader
    loader_steps: int  # micro-batches per round (the first is a warm-up)
    loader_rounds: int
    train_timeout_s: int  # per training launch

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Sizes] = {
    # ~42.5M parameters, sequences of ~220-320 tokens: fp32, 1 thread per rank, 2 ranks (~10 min on 2 cores).
    "cpu": Sizes(
        name="cpu", hidden=512, layers=8, heads=8, intermediate=1408, vocab=16384, hook_layer=6,
        d_sae=4096, target_l0=64, dtype="float32",
        rows=32, max_length=320, max_prompt_length=96, prompt_words=(30, 70), response_words=(130, 200),
        cache_batch=8, rows_per_shard=8, bare_rows=8, bare_rounds=2,
        micro_batch=1, warmup_steps=2, measure_steps=4,
        loader_steps=4, loader_rounds=2, train_timeout_s=420,
    ),
    # ~0.47B parameters, sequences of ~600-1000 tokens, bf16, one H200 (under 8 minutes in all).
    "gpu": Sizes(
        name="gpu", hidden=1024, layers=24, heads=16, intermediate=4096, vocab=32768, hook_layer=20,
        d_sae=16384, target_l0=64, dtype="bfloat16",
        rows=256, max_length=1024, max_prompt_length=256, prompt_words=(120, 220), response_words=(450, 700),
        cache_batch=8, rows_per_shard=32, bare_rows=64, bare_rounds=3,
        micro_batch=4, warmup_steps=3, measure_steps=8,
        loader_steps=17, loader_rounds=2, train_timeout_s=300,
    ),
    # the smoke test's size: every code path, seconds of compute
    "quick": Sizes(
        name="quick", hidden=64, layers=2, heads=4, intermediate=128, vocab=1024, hook_layer=1,
        d_sae=256, target_l0=16, dtype="float32",
        rows=16, max_length=64, max_prompt_length=24, prompt_words=(5, 12), response_words=(10, 30),
        cache_batch=4, rows_per_shard=8, bare_rows=8, bare_rounds=1,
        micro_batch=1, warmup_steps=1, measure_steps=2,
        loader_steps=4, loader_rounds=1, train_timeout_s=240,
    ),
}


def preset_for(device: str, quick: bool) -> Sizes:
    sizes = PRESETS["quick" if quick else ("gpu" if device == "cuda" else "cpu")]
    if device == "cuda" and sizes.dtype != "bfloat16":
        from dataclasses import replace

        sizes = replace(sizes, dtype="bfloat16")  # the trainer runs bf16 on GPUs; the cache must match
    return sizes
