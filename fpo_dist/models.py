"""Hugging Face models: loading, the block-ℓ residual hook, and the chosen/rejected batch layout.

The hook point is the raw residual-stream output of decoder block ℓ — TransformerLens's
``blocks.ℓ.hook_resid_post``, what Gemma Scope residual SAEs were trained on.  It is captured with a plain
forward hook on the block module, so it carries gradients, works with Hugging Face gradient checkpointing
(transformers checkpoints ``forward``, module hooks stay outside) and with DeepSpeed ZeRO-3 (whose own
hooks gather the block's parameters around the same call).

Do not use ``output_hidden_states``: ``hidden_states[ℓ + 1]`` equals the hook for every block except the
last, whose entry is taken AFTER the final norm.

Heavy imports (transformers) happen inside the loading functions; this module never imports sae_lens,
ray, deepspeed or zarr.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fpo_dist.logprobs import Selection
from fpo_dist.logprobs import prediction_mask as _prediction_mask

if TYPE_CHECKING:  # pragma: no cover
    from fpo_dist.config import ModelConfig
    from fpo_dist.data import TokenizedPair

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how to load it (also the model part of a cache's provenance).

    ``name_or_path`` is a hub id (``google/gemma-2-2b``) or a local directory.  ``gguf_file`` names a GGUF
    checkpoint inside that directory (or repo); transformers dequantises it to ``dtype``.
    ``trust_remote_code`` is passed to transformers only when set.
    """

    name_or_path: str
    revision: str | None = None
    dtype: str = "float32"
    gguf_file: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ValueError("ModelSpec.name_or_path is empty: give a hub id or a local model directory")
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelSpec.dtype={self.dtype!r} is not one of {sorted(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_local(self) -> bool:
        return Path(os.path.expanduser(self.name_or_path)).is_dir()


def model_spec(cfg: ModelConfig, dtype: str | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of a model config (``dtype`` overrides the config's)."""
    return ModelSpec(name_or_path=cfg.name_or_path, revision=cfg.revision, dtype=dtype or cfg.dtype,
                     gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code)


def tokenizer_spec(cfg: ModelConfig) -> ModelSpec:
    """Where the tokenizer of a model config comes from: ``cfg.tokenizer`` when set, else the model's."""
    if cfg.tokenizer:
        return ModelSpec(name_or_path=cfg.tokenizer, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    return model_spec(cfg)


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS (padding is masked out everywhere)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _source_kwargs(spec: ModelSpec) -> tuple[str, dict]:
    """Resolve ``spec`` to the first argument and the shared keyword arguments of ``from_pretrained``."""
    path = os.path.expanduser(spec.name_or_path)
    looks_like_path = spec.name_or_path.startswith(("/", "./", "../", "~"))
    if looks_like_path and not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {spec.name_or_path!r} does not exist")
    kwargs: dict = {}
    if spec.revision is not None:
        kwargs["revision"] = spec.revision
    if spec.gguf_file is not None:
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, spec.gguf_file)):
            raise FileNotFoundError(f"GGUF file {spec.gguf_file!r} not found in {path!r}")
        kwargs["gguf_file"] = spec.gguf_file
    if spec.trust_remote_code:
        kwargs["trust_remote_code"] = True
    return (path if os.path.isdir(path) else spec.name_or_path), kwargs


@contextlib.contextmanager
def _explain_hub_errors(spec: ModelSpec, what: str) -> Iterator[None]:
    """Re-raise a failed hub load with the id in the message and what to do offline."""
    try:
        yield
    except OSError as e:  # transformers/huggingface_hub raise OSError subclasses for missing/offline repos
        if spec.is_local:
            raise
        rev = f" (revision {spec.revision!r})" if spec.revision else ""
        raise OSError(
            f"could not load the {what} for hub id {spec.name_or_path!r}{rev}: {e}\n"
            "If this machine cannot reach the Hugging Face Hub, download the model elsewhere and pass its "
            "local directory as the model path, or pre-fill the HF cache and set HF_HUB_OFFLINE=1."
        ) from e


def load_tokenizer(spec: ModelSpec):
    """The tokenizer for ``spec`` (``AutoTokenizer``; from the GGUF file when ``spec.gguf_file`` is set)."""
    from transformers import AutoTokenizer

    source, kwargs = _source_kwargs(spec)
    with _explain_hub_errors(spec, "tokenizer"):
        return AutoTokenizer.from_pretrained(source, **kwargs)


def load_causal_lm(spec: ModelSpec, *, requires_grad: bool = False, device: str | torch.device | None = None,
                   varlen: bool | str = False):
    """``AutoModelForCausalLM`` for ``spec`` in ``spec.dtype``, in eval mode.

    ``requires_grad=False`` freezes every parameter (reference model); the policy passes True.
    ``varlen``: attention through :mod:`fpo_dist.attention`'s varlen attention (each sequence of a packed or shared
    row on its own; what ``batch_layout: shared/packed`` runs) — True: its per-sequence ``sdpa`` kernel; a kernel
    name (:data:`fpo_dist.attention.KERNELS`: ``sdpa``, ``flex``, ``flash``): that one.
    ``device=None`` leaves placement to the caller (under ZeRO-3 DeepSpeed places the partitions: create
    ``HfDeepSpeedConfig`` before calling this).
    A model with an attention-logit soft-cap (Gemma 2) runs its padded forwards and generation through
    transformers' eager attention (:func:`use_softcap_attention`), the formula the packed path applies per sequence.
    """
    from transformers import AutoModelForCausalLM

    source, kwargs = _source_kwargs(spec)
    with _explain_hub_errors(spec, "model"):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=spec.torch_dtype, **kwargs)
    if device is not None:
        model.to(device)
    use_softcap_attention(model)
    if varlen:
        from fpo_dist.attention import enable_varlen

        enable_varlen(model, "sdpa" if varlen is True else varlen)
    model.eval()
    model.requires_grad_(requires_grad)
    return model


# The attention implementation that applies a config's ``attn_logit_softcapping``, ``softcap · tanh(s / softcap)`` on
# the scaled scores ``s`` before the mask and softmax: transformers' eager one.
SOFTCAP_ATTENTION = "eager"


def attention_softcap(model: nn.Module) -> float | None:
    """The attention-logit soft-cap of ``model`` (``attn_logit_softcapping`` of any config in it: the model's, a
    multimodal wrapper's text config), or None."""
    for m in model.modules():
        cap = getattr(getattr(m, "config", None), "attn_logit_softcapping", None)
        if cap is not None:
            return float(cap)
    return None


def use_softcap_attention(model: nn.Module) -> bool:
    """Run a soft-capped model's attention (Gemma 2: ``attn_logit_softcapping``) through :data:`SOFTCAP_ATTENTION`
    on every config in it; True when the model has a soft-cap.

    transformers' sdpa function has no soft-cap argument: older versions drop it silently (padded batches,
    evaluation and generation would compute another function than the packed path, which applies the cap), 5.24
    refuses it, and which implementation ``from_pretrained`` picks by default differs between versions.  Naming
    the implementation here makes every path that loads through :func:`load_causal_lm` — cache worker, trainer,
    step-0 check, ``cache verify --recompute``, evaluation and generation — apply the cap with the eager formula;
    the packed path (:func:`fpo_dist.attention.varlen_attention`) applies the same formula per sequence.  Models
    without a soft-cap keep transformers' default (sdpa)."""
    if attention_softcap(model) is None:
        return False
    from fpo_dist.attention import set_attention_implementation

    set_attention_implementation(model, SOFTCAP_ATTENTION)
    return True


# ---------------------------------------------------------------------------------------------------------
# Decoder blocks and the residual hook
# ---------------------------------------------------------------------------------------------------------

# Attribute paths to the decoder block list, most specific first.
_LAYER_PATHS: tuple[tuple[str, ...], ...] = (
    ("model", "language_model", "layers"),  # Gemma3ForConditionalGeneration (and other multimodal wrappers)
    ("model", "layers"),  # *ForCausalLM: Llama, Gemma, Gemma2, Gemma3, Mistral, Qwen2
    ("language_model", "layers"),  # a bare multimodal base model (Gemma3Model)
    ("layers",),  # a bare decoder (LlamaModel, Gemma3TextModel)
    ("transformer", "h"),  # GPT-2
    ("h",),  # bare GPT2Model
)


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip wrappers that hold the model in ``.module`` (DeepSpeedEngine, DistributedDataParallel) and peft's
    ``PeftModel`` (``get_base_model()``: LoRA policies)."""
    while not any(hasattr(model, p[0]) for p in _LAYER_PATHS) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks of a causal LM (see ``_LAYER_PATHS`` for what is recognised)."""
    inner = _unwrap(model)
    for path in _LAYER_PATHS:
        obj = inner
        for name in path:
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    tried = ", ".join(".".join(p) for p in _LAYER_PATHS)
    raise TypeError(f"cannot find the decoder blocks of {type(inner).__name__}: none of {tried} is an nn.ModuleList")


class BlockCapture:
    """What ``capture_block_output`` yields: ``.output`` is the last forward's block output [B, T, D]."""

    def __init__(self, layer: int) -> None:
        self.layer = layer
        self._output: torch.Tensor | None = None

    @property
    def output(self) -> torch.Tensor:
        if self._output is None:
            raise RuntimeError(f"block {self.layer} has not run yet: call the model inside capture_block_output")
        return self._output

    def _hook(self, module: nn.Module, args, output) -> None:
        self._output = output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def capture_block_output(model: nn.Module, layer: int) -> Iterator[BlockCapture]:
    """Capture the residual output of decoder block ``layer`` (``blocks.{layer}.hook_resid_post``).

    The tensor is stored as the block returned it — no detach, no copy — so gradients flow through it.
    Each forward inside the context overwrites ``.output``; it stays readable after the context exits.
    """
    layers = decoder_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range: the model has {len(layers)} blocks (0..{len(layers) - 1})")
    capture = BlockCapture(layer)
    handle = layers[layer].register_forward_hook(capture._hook)
    try:
        yield capture
    finally:
        handle.remove()


def forward_with_hook(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: ``(logits [B, T, V], block-``layer`` residual output [B, T, D])``."""
    with capture_block_output(model, layer) as capture:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits, capture.output


# ---------------------------------------------------------------------------------------------------------
# Batch layout
# ---------------------------------------------------------------------------------------------------------


# "shared": each pair as one [prompt, chosen, rejected] segment group (the prompt computed once); "packed": its
# two sequences back to back; "padded": one right-padded row per sequence.
LAYOUTS = ("shared", "packed", "padded")


@dataclass(frozen=True)
class PairBatch:
    """``B`` preference pairs as ``2B`` sequences: sequences ``[0, B)`` are ``prompt + chosen``, ``[B, 2B)`` are
    ``prompt + rejected`` of the same pairs, in one of three layouts (:func:`build_batch`):

    - ``padded``: one right-padded row per sequence (``[2B, T]``, T = the longest), with an ``attention_mask``;
    - ``packed``: all ``2B`` sequences back to back in ONE row (``[1, Σ len]``), no padding, ``attention_mask``
      None and ``position_ids`` restarting at 0 for each sequence;
    - ``shared``: ONE row of ``[prompt, chosen, rejected]`` per pair, back to back: the prompt once, positions
      ``0 … P+C−1`` over prompt and chosen, ``P … P+R−1`` over rejected, so the rejected tokens continue from the
      prompt.  :func:`fpo_dist.attention.varlen_attention` reads the layout from the positions: a segment whose
      positions start at ``k > 0`` attends to the first ``k`` tokens of the last segment that started at 0 (the
      prompt) and to itself, causally — each sequence's attention is that of the sequence run alone.

    ``response_mask[r, t]`` is True iff ``input_ids[r, t]`` is a response token; ``sequence_ids[r, t]`` is the
    sequence that position belongs to (−1 on padding; a shared prompt counts as its chosen sequence's).  The
    hidden state and the logits that PREDICT a response token sit one position earlier (``prediction_mask``;
    shared: the prompt's last position predicts both first response tokens).  :attr:`selection` lists them — the
    positions, the tokens they predict and their sequences — and everything per sequence is a segment sum over it.
    """

    input_ids: torch.Tensor  # [R, T] int64, pad_id after the end (padded)
    attention_mask: torch.Tensor | None  # [R, T] int64, 1 on real tokens (padded); None (packed, shared)
    response_mask: torch.Tensor  # [R, T] bool
    sequence_ids: torch.Tensor  # [R, T] int64 in [0, 2B), −1 on padding
    n_sequences: int  # 2B
    position_ids: torch.Tensor | None = None  # [R, T] int64 (packed, shared): each segment's positions
    shared: Selection | None = None  # the explicit selection of a shared-prefix row (None: from prediction_mask)

    @property
    def n_pairs(self) -> int:
        return self.n_sequences // 2

    @property
    def prediction_mask(self) -> torch.Tensor:
        """[R, T] bool: True at positions ``t`` whose next token ``t + 1`` is a response token (shared: True at
        every predicting position, the prompt's last once).

        These are the positions whose logits give ``log π(y_t | ·)`` and whose hidden states are pooled.
        """
        if self.shared is not None:
            return torch.zeros(self.input_ids.numel(), dtype=torch.bool, device=self.input_ids.device).index_fill(
                0, self.shared.positions, True).view_as(self.input_ids)
        return _prediction_mask(self.response_mask)

    @property
    def selection(self) -> Selection:
        """The scored positions, their targets and sequences (chosen sequences' first, each contiguous)."""
        if self.shared is not None:
            return self.shared
        return Selection.of_mask(self.input_ids, self.prediction_mask, self.sequence_ids)

    @property
    def padding_tokens(self) -> int:
        """Positions computed for no sequence (0 when packed or shared)."""
        return int((self.sequence_ids < 0).sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of the model's forward for this layout.  ``use_cache`` is False: transformers
        derives the packed mask from ``position_ids`` only when no KV cache is passed (or created)."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "use_cache": False}
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        return out

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PairBatch":
        from dataclasses import fields, replace

        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)
                 if isinstance(getattr(self, f.name), (torch.Tensor, Selection))}
        return replace(self, **moved)


def pairs_from_batch(batch) -> list[TokenizedPair]:
    """The tokenized pairs stored in a :class:`fpo_dist.store.RowBatch` (training never re-tokenizes)."""
    from fpo_dist.data import TokenizedPair

    return [
        TokenizedPair(int(i), bytes(u), tuple(p.tolist()), tuple(c.tolist()), tuple(r.tolist()))
        for i, u, p, c, r in zip(batch.index, batch.uid, batch.prompt_ids, batch.chosen_ids, batch.rejected_ids)
    ]


def build_batch(pairs: Sequence[TokenizedPair], pad_id: int, layout: str = "padded") -> PairBatch:
    """Lay out ``pairs`` as a :class:`PairBatch` (chosen sequences first) in ``layout`` (:data:`LAYOUTS`)."""
    if not pairs:
        raise ValueError("build_batch needs at least one pair")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    for p in pairs:
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if not getattr(p, name):
                # An empty prompt would leave the first response token without a predicting position (and, packed,
                # would let the previous sequence's last position predict it).
                raise ValueError(f"pair for source row {p.index} has an empty {name}")
    if layout == "shared":
        return _shared_batch(pairs)
    seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    lengths = [len(prompt) + len(resp) for prompt, resp in seqs]
    packed = layout == "packed"
    R, T = (1, sum(lengths)) if packed else (len(seqs), max(lengths))
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    response_mask = torch.zeros((R, T), dtype=torch.bool)
    sequence_ids = torch.full((R, T), -1, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long) if packed else None
    offset = 0
    for i, (prompt, resp) in enumerate(seqs):
        r, a = (0, offset) if packed else (i, 0)
        n_p, n = len(prompt), lengths[i]
        input_ids[r, a : a + n] = torch.tensor(tuple(prompt) + tuple(resp), dtype=torch.long)
        response_mask[r, a + n_p : a + n] = True
        sequence_ids[r, a : a + n] = i
        if packed:
            position_ids[0, a : a + n] = torch.arange(n)
        offset += n
    attention_mask = None if packed else (sequence_ids >= 0).long()
    return PairBatch(input_ids, attention_mask, response_mask, sequence_ids, len(seqs), position_ids)


def _shared_batch(pairs: Sequence[TokenizedPair]) -> PairBatch:
    """The ``shared`` layout: per pair ``[prompt P, chosen C, rejected R]`` at positions ``0…P+C−1, P…P+R−1``."""
    B = len(pairs)
    ids, pos, resp, seq = [], [], [], []
    sel: list[list[tuple[list[int], list[int]]]] = [[], []]  # [chosen, rejected] → per pair (positions, targets)
    offset = 0
    for i, p in enumerate(pairs):
        P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        ids += [*p.prompt_ids, *p.chosen_ids, *p.rejected_ids]
        pos += [*range(P + C), *range(P, P + R)]
        resp += [False] * P + [True] * (C + R)
        seq += [i] * (P + C) + [B + i] * R
        last = offset + P - 1  # the prompt's last position predicts both first response tokens
        sel[0].append(([last, *range(offset + P, offset + P + C - 1)], list(p.chosen_ids)))
        sel[1].append(([last, *range(offset + P + C, offset + P + C + R - 1)], list(p.rejected_ids)))
        offset += P + C + R
    entries = sel[0] + sel[1]
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    selection = Selection(as_long([x for e in entries for x in e[0]]), as_long([y for e in entries for y in e[1]]),
                          as_long([j for j, e in enumerate(entries) for _ in e[0]]))
    row = lambda xs, dtype=torch.long: torch.tensor(xs, dtype=dtype)[None]  # noqa: E731
    return PairBatch(row(ids), None, row(resp, torch.bool), row(seq), 2 * B, row(pos), selection)
