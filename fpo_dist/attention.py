"""Variable-length attention for packed rows: each sequence attends to itself only, computed on its own.

A packed row holds several sequences back to back, each with its own ``position_ids`` (0, 1, …).  transformers can
attend over it with sdpa/eager and a block-diagonal ``[N, N]`` mask, but then every sequence's attention runs over
all ``N`` keys of the row (``N²`` work instead of ``Σ Lᵢ²``), and its rounding depends on where in the row it sits
and what else is packed with it — in bf16 that alone moves a sequence's log-probs and SAE features by more than a
cache check tolerates.  flash-attention's varlen kernels avoid both on GPUs with the ``flash-attn`` package; this
module does the same with PyTorch's ``scaled_dot_product_attention`` on any device: one call per sequence, causal
(plus the model's sliding window where a layer has one), so a sequence's attention is exactly that of the sequence
run alone — whatever it is packed with, in the cache job, the trainer and the step-0 check.

:func:`varlen_attention` is registered with transformers as the attention implementation :data:`VARLEN` (with a
mask function that builds no ``[N, N]`` mask); :func:`enable_varlen` switches a loaded model to it — the cache
worker, the trainer's policy and reference, and the step-0 check run packed batches through it (``batch_layout:
packed``).  It is not saved with the model.  Sequence boundaries come from the ``position_ids`` transformers passes
to the attention function (a new sequence wherever the position does not continue; the same in a gradient-
checkpointing recompute); a 2-D padding mask, when transformers passes one, restricts each row to its real tokens.  Models whose attention uses a logit soft-cap (Gemma 2) are
computed with the same per-sequence loop in plain PyTorch: the formula of transformers' eager attention, which
:func:`fpo_dist.models.load_causal_lm` selects for such models' padded batches, evaluation and generation, so every
path applies the cap (``tests/test_gemma2.py`` holds all of them to a float64 eager oracle).  A KV cache (generation) is not
supported: generation uses the model's own implementation.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import Any, Iterator

import torch
from torch import Tensor, nn

VARLEN = "fpo_varlen_sdpa"
_registered = False
# True while a packed forward runs (see ``expect_packed``): the attention must then receive position_ids
_expect_packed: contextvars.ContextVar[bool] = contextvars.ContextVar("fpo_expect_packed", default=False)
_spans_memo: list = [None, None]  # (weakref to the last position_ids tensor, its spans): every layer gets the same one


def register() -> None:
    """Register :data:`VARLEN` with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    # like flash-attention: no [N, N] mask; None, or the 2-D padding mask when a row is padded
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, flash_attention_mask)
    _registered = True


def enable_varlen(model: nn.Module) -> nn.Module:
    """Switch ``model``'s attention to :func:`varlen_attention` (every config in it that names an attention
    implementation: the model's and, for multimodal wrappers, its text config's).  Not saved with the model:
    transformers drops the implementation from ``config.json``, so an export loads with its usual default."""
    register()
    set_attention_implementation(model, VARLEN)
    return model


def set_attention_implementation(model: nn.Module, name: str) -> None:
    """Name ``name`` (a transformers attention implementation: ``eager``, ``sdpa``, or one registered with
    ``AttentionInterface``) in every config in ``model`` that names one — the model's and, for multimodal wrappers,
    its text config's."""
    seen = set()
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and id(c) not in seen and hasattr(c, "_attn_implementation"):
            seen.add(id(c))
            c._attn_implementation = name


@contextlib.contextmanager
def expect_packed(packed: bool = True) -> Iterator[None]:
    """Inside, a forward's attention must receive ``position_ids`` (a packed row without them would be one
    causal sequence): a model whose layers do not pass them on fails loudly instead of attending across."""
    token = _expect_packed.set(packed)
    try:
        yield
    finally:
        _expect_packed.reset(token)


def sequence_spans(position_ids: Tensor | None, mask: Tensor | None, batch: int, length: int) -> list[list[tuple[int, int]]]:
    """Per row, the ``[start, end)`` spans of its sequences: a new one wherever ``position_ids`` does not continue
    (``p[t] != p[t−1] + 1``); with a 2-D padding mask, the row's real tokens as one span (right or left padding);
    with neither, the whole row."""
    if mask is not None:
        spans = []
        for row in mask.bool():
            idx = row.nonzero().squeeze(-1)
            if len(idx) and int(idx[-1] - idx[0]) + 1 != len(idx):
                raise ValueError(f"{VARLEN} needs each row's real tokens to be contiguous")
            spans.append([(int(idx[0]), int(idx[-1]) + 1)] if len(idx) else [])
        return spans
    if position_ids is None:
        return [[(0, length)]] * batch
    ref, spans = _spans_memo
    if ref is not None and ref() is position_ids:
        return spans
    spans = []
    for row in position_ids.expand(batch, -1):
        starts = [0] + (torch.nonzero(row[1:] != row[:-1] + 1).squeeze(-1) + 1).tolist()
        spans.append(list(zip(starts, starts[1:] + [length])))
    _spans_memo[:] = [weakref.ref(position_ids), spans]
    return spans


def varlen_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
                     softcap: float | None = None, position_ids: Tensor | None = None, **kwargs: Any):
    """transformers' attention-interface signature: ``query [B, H, N, d]``, ``key``/``value [B, Hkv, N, d]`` →
    ``([B, N, H, d], None)``.  Positions outside every span (padding) get zeros."""
    batch, heads, n, dim = query.shape
    if key.shape[2] != n:
        raise NotImplementedError(f"{VARLEN} does not support a KV cache (query length {n}, key length "
                                  f"{key.shape[2]}): generate with the model's own attention implementation")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"{VARLEN} expects no mask or a 2-D padding mask, got shape {tuple(attention_mask.shape)}")
    if position_ids is None and attention_mask is None and _expect_packed.get():
        raise RuntimeError(f"{type(module).__name__} does not pass position_ids to its attention function, so a "
                           "packed row cannot be split into its sequences: use --batch_layout padded for this model")
    spans = sequence_spans(position_ids, attention_mask, batch, n)
    scale = scaling if scaling is not None else dim**-0.5
    p = dropout if module.training else 0.0
    out = query.new_zeros(batch, n, heads, value.shape[-1])
    for b, row in enumerate(spans):
        for a, e in row:
            q, k, v = query[b : b + 1, :, a:e], key[b : b + 1, :, a:e], value[b : b + 1, :, a:e]
            out[b, a:e] = _attend(q, k, v, scale, p, sliding_window, softcap)[0].transpose(0, 1)
    return out, None


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout: float, window: int | None,
            softcap: float | None) -> Tensor:
    """Causal attention of one sequence ``[1, H, L, d]`` (keys within ``window`` positions when given)."""
    length = q.shape[2]
    groups = q.shape[1] // k.shape[1]
    mask = None
    if window is not None and length > window:
        i = torch.arange(length, device=q.device)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)  # transformers' sliding overlay
    if softcap is None:
        return nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scale, enable_gqa=groups > 1)
    # the eager formula with the attention-logit soft-cap (Gemma 2), for this sequence only
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh(torch.matmul(q, k.transpose(2, 3)) * scale / softcap) * softcap
    if mask is None:
        mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(nn.functional.dropout(weights, p=dropout), v)
