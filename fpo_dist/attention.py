"""Variable-length attention for packed rows: each sequence attends to itself only, computed on its own.

A packed row holds several sequences back to back, each with its own ``position_ids`` (0, 1, …).  transformers can
attend over it with sdpa/eager and a block-diagonal ``[N, N]`` mask, but then every sequence's attention runs over
all ``N`` keys of the row (``N²`` work instead of ``Σ Lᵢ²``), and its rounding depends on where in the row it sits
and what else is packed with it — in bf16 that alone moves a sequence's log-probs and SAE features by more than a
cache check tolerates.  flash-attention's varlen kernels avoid both on GPUs with the ``flash-attn`` package; this
module does the same with PyTorch's ``scaled_dot_product_attention`` on any device: one call per sequence, causal
(plus the model's sliding window where a layer has one), so a sequence's attention is exactly that of the sequence
run alone — whatever it is packed with, in the cache job, the trainer and the step-0 check.

Shared prefixes (``batch_layout: shared``, :func:`fpo_dist.models.build_batch`): a segment whose positions start at
``k > 0`` continues the first ``k`` tokens of the last segment that started at 0 — a pair's rejected tokens after
its ``prompt + chosen`` — and attends to those ``k`` keys and its own, lower-right causal: the rejected sequence's
attention without computing its prompt a second time.

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

VARLEN = "fpo_varlen_sdpa"  # one scaled_dot_product_attention call per segment (any device; the reference)
VARLEN_FLEX = "fpo_varlen_flex"  # one FlexAttention call per layer, segments as a block mask
VARLEN_FLASH = "fpo_varlen_flash"  # one varlen_attn (flash) call per layer: CUDA, bf16/fp16
KERNELS = {"sdpa": VARLEN, "flex": VARLEN_FLEX, "flash": VARLEN_FLASH}  # what ``attention_kernel`` names
_registered = False
# True while a packed forward runs (see ``expect_packed``): the attention must then receive position_ids
_expect_packed: contextvars.ContextVar[bool] = contextvars.ContextVar("fpo_expect_packed", default=False)
_spans_memo: list = [None, None]  # (weakref to the last position_ids tensor, its spans): every layer gets the same one
# (weakref to the spans list the tables were built from, {key: tables}): the fused kernels' per-forward index tensors
_tables_memo: list = [None, {}]


def register() -> None:
    """Register :data:`KERNELS` with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    for name, fn in ((VARLEN, varlen_attention), (VARLEN_FLEX, flex_varlen_attention),
                     (VARLEN_FLASH, flash_varlen_attention)):
        AttentionInterface.register(name, fn)
        # like flash-attention: no [N, N] mask; None, or the 2-D padding mask when a row is padded
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, flash_attention_mask)
    _registered = True


def enable_varlen(model: nn.Module, kernel: str = "sdpa") -> nn.Module:
    """Switch ``model``'s attention to the varlen attention of ``kernel`` (:data:`KERNELS`: ``sdpa`` →
    :func:`varlen_attention`, ``flex`` → :func:`flex_varlen_attention`, ``flash`` → :func:`flash_varlen_attention`)
    in every config in it that names an attention implementation (the model's and, for multimodal wrappers, its
    text config's).  Not saved with the model: transformers drops the implementation from ``config.json``, so an
    export loads with its usual default."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r}: choose from {', '.join(KERNELS)}")
    register()
    set_attention_implementation(model, KERNELS[kernel])
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


class _SpanList(list):
    """A list that can be weakly referenced (the spans of one forward, keying the kernels' tables)."""


def sequence_spans(position_ids: Tensor | None, mask: Tensor | None, batch: int,
                   length: int) -> list[list[tuple[int, int, int, int]]]:
    """Per row, its segments as ``(start, end, prefix_start, k)``: a new segment wherever ``position_ids`` does not
    continue (``p[t] != p[t−1] + 1``).  A segment whose positions start at ``k > 0`` continues a shared prefix: it
    also attends to the first ``k`` tokens of the last segment that started at 0, which starts at ``prefix_start``
    (``k = 0``: no prefix, ``prefix_start`` the segment's own start).  With a 2-D padding mask, the row's real tokens
    as one segment (right or left padding); with neither, the whole row."""
    if mask is not None:
        spans = []
        for row in mask.bool():
            idx = row.nonzero().squeeze(-1)
            if len(idx) and int(idx[-1] - idx[0]) + 1 != len(idx):
                raise ValueError(f"{VARLEN} needs each row's real tokens to be contiguous")
            spans.append([(int(idx[0]), int(idx[-1]) + 1, int(idx[0]), 0)] if len(idx) else [])
        return spans
    if position_ids is None:
        return [[(0, length, 0, 0)]] * batch
    ref, spans = _spans_memo
    if ref is not None and ref() is position_ids:
        return spans
    spans = _SpanList()
    for row in position_ids.expand(batch, -1):
        cut = torch.cat([torch.zeros(1, dtype=torch.long, device=row.device),
                         torch.nonzero(row[1:] != row[:-1] + 1).squeeze(-1) + 1])
        both = torch.stack([cut, row[cut]]).tolist()  # one device sync per row: starts and their first positions
        starts, first = both[0], both[1]
        ends = starts[1:] + [length]
        segments, root = [], None
        for a, e, k in zip(starts, ends, first):
            if k == 0:
                root = (a, e)
                segments.append((a, e, a, 0))
            elif root is None or root[1] - root[0] < k:
                raise ValueError(f"{VARLEN}: a packed segment starts at position {k} without a preceding segment of "
                                 f"at least {k} tokens starting at 0 to continue (row tokens {a}..{e})")
            else:
                segments.append((a, e, root[0], k))
        spans.append(segments)
    _spans_memo[:] = [weakref.ref(position_ids), spans]
    return spans


def _checked_spans(module: nn.Module, query: Tensor, key: Tensor, attention_mask: Tensor | None,
                   position_ids: Tensor | None, name: str) -> list[list[tuple[int, int, int, int]]]:
    """The checks every varlen kernel makes, then :func:`sequence_spans`."""
    batch, _, n, _ = query.shape
    if key.shape[2] != n:
        raise NotImplementedError(f"{name} does not support a KV cache (query length {n}, key length "
                                  f"{key.shape[2]}): generate with the model's own attention implementation")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"{name} expects no mask or a 2-D padding mask, got shape {tuple(attention_mask.shape)}")
    if position_ids is None and attention_mask is None and _expect_packed.get():
        raise RuntimeError(f"{type(module).__name__} does not pass position_ids to its attention function, so a "
                           "packed row cannot be split into its sequences: use --batch_layout padded for this model")
    return sequence_spans(position_ids, attention_mask, batch, n)


def varlen_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
                     softcap: float | None = None, position_ids: Tensor | None = None, **kwargs: Any):
    """transformers' attention-interface signature: ``query [B, H, N, d]``, ``key``/``value [B, Hkv, N, d]`` →
    ``([B, N, H, d], None)``.  Positions outside every span (padding) get zeros."""
    batch, heads, n, dim = query.shape
    spans = _checked_spans(module, query, key, attention_mask, position_ids, VARLEN)
    scale = scaling if scaling is not None else dim**-0.5
    p = dropout if module.training else 0.0
    out = query.new_zeros(batch, n, heads, value.shape[-1])
    for b, row in enumerate(spans):
        for a, e, root, shared in row:
            q, k, v = query[b : b + 1, :, a:e], key[b : b + 1, :, a:e], value[b : b + 1, :, a:e]
            if shared:  # behind the first ``shared`` tokens of the segment at ``root`` (the prompt): the sequence
                # ``prompt + this segment`` as one causal call, its last ``e − a`` rows kept — the call the packed
                # layout makes for it, on sdpa's causal kernels; the segment's queries alone against the prompt's
                # keys would need an explicit lower-right boolean mask, which rules those kernels out
                pre = slice(root, root + shared)
                q = torch.cat([query[b : b + 1, :, pre], q], dim=2)
                k = torch.cat([key[b : b + 1, :, pre], k], dim=2)
                v = torch.cat([value[b : b + 1, :, pre], v], dim=2)
            out[b, a:e] = _attend(q, k, v, scale, p, sliding_window, softcap)[0, :, shared:].transpose(0, 1)
    return out, None


def _tables(spans: list, key: str, build) -> Any:
    """``build(spans)``, memoised for the spans of the current forward (every layer gets the same spans object)."""
    ref, tables = _tables_memo
    if ref is None or ref() is not spans:
        tables = {}
        _tables_memo[:] = [_weak(spans), tables]
    if key not in tables:
        tables[key] = build(spans)
    return tables[key]


def _weak(spans: list):
    try:
        return weakref.ref(spans)
    except TypeError:  # a plain list (the 2-D mask path builds a fresh one per call): no memo across layers
        return lambda: None


def _segment_tables(spans: list, n: int, device: torch.device) -> dict[str, Tensor]:
    """Per row and token ``[B, N]``: its segment (−1: padding), the segment whose first ``shared`` tokens it may
    also attend to (its own for a segment starting at 0), that ``shared``, and its position in the sequence."""
    batch = len(spans)
    doc = torch.full((batch, n), -1, dtype=torch.long)
    root = torch.full((batch, n), -1, dtype=torch.long)
    shared = torch.zeros((batch, n), dtype=torch.long)
    pos = torch.zeros((batch, n), dtype=torch.long)
    for b, row in enumerate(spans):
        seg_of = {}
        for i, (a, e, r, k) in enumerate(row):
            seg_of[a] = i
            doc[b, a:e] = i
            root[b, a:e] = seg_of[r]
            shared[b, a:e] = k
            pos[b, a:e] = torch.arange(k, k + e - a)
    return {name: t.to(device) for name, t in (("doc", doc), ("root", root), ("shared", shared), ("pos", pos))}


_flex_compiled = None


def _flex():
    """FlexAttention: compiled on CUDA (what makes it one fused kernel; ``dynamic`` for the packed rows' varying
    length), eager elsewhere (a CPU forward runs it without a backward: PyTorch's CPU FlexAttention has none)."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=True) if torch.cuda.is_available() else flex_attention
    return _flex_compiled


def flex_varlen_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          sliding_window: int | None = None, softcap: float | None = None,
                          position_ids: Tensor | None = None, **kwargs: Any):
    """:func:`varlen_attention`'s result from ONE FlexAttention call per layer: the segments (and a continuation's
    shared prefix) as a document mask, the sliding window on the positions, the soft-cap as a ``score_mod``."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, heads, n, dim = query.shape
    spans = _checked_spans(module, query, key, attention_mask, position_ids, VARLEN_FLEX)
    if dropout and module.training:
        raise NotImplementedError(f"{VARLEN_FLEX} has no attention dropout: use attention_kernel sdpa")
    if query.device.type == "cpu" and torch.is_grad_enabled() and query.requires_grad:
        raise NotImplementedError(f"{VARLEN_FLEX}: PyTorch's FlexAttention has no backward on CPU (training): use "
                                  "attention_kernel sdpa there; flex serves CPU forwards (the cache job) and GPUs")
    t = _tables(spans, "segments", lambda s: _segment_tables(s, n, query.device))
    doc, root, shared, pos = t["doc"], t["root"], t["shared"], t["pos"]

    def mask_mod(b, h, qi, ki):
        own = (doc[b, qi] == doc[b, ki]) & (ki <= qi)
        prefix = (doc[b, ki] == root[b, qi]) & (pos[b, ki] < shared[b, qi])
        ok = (own | prefix) & (doc[b, qi] >= 0)
        if sliding_window is not None:
            ok = ok & (pos[b, qi] - pos[b, ki] < sliding_window)
        return ok

    block_mask = _tables(spans, f"block_mask/{sliding_window}",
                         lambda _: create_block_mask(mask_mod, batch, None, n, n, device=query.device))
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, qi, ki):
            return torch.tanh(score / softcap) * softcap

    out = _flex()(query, key, value, score_mod=score_mod, block_mask=block_mask,
                  scale=scaling if scaling is not None else dim**-0.5, enable_gqa=heads != key.shape[1])
    valid = (doc >= 0)[:, :, None, None]
    return torch.where(valid, out.transpose(1, 2), 0.0), None


def _flash_index(spans: list, n: int, device: torch.device) -> dict[str, Any]:
    """Gather indices for :func:`flash_varlen_attention`: the queries of every segment in order, the keys of each
    (a continuation's shared prefix, then its own), and the cumulative lengths of both."""
    q_idx, k_idx, cu_q, cu_k = [], [], [0], [0]
    for b, row in enumerate(spans):
        for a, e, r, k in row:
            q_idx += range(b * n + a, b * n + e)
            k_idx += [*range(b * n + r, b * n + r + k), *range(b * n + a, b * n + e)]
            cu_q.append(cu_q[-1] + e - a)
            cu_k.append(cu_k[-1] + k + e - a)
    as_t = lambda xs, dtype=torch.long: torch.tensor(xs, dtype=dtype, device=device)  # noqa: E731
    lengths_q = [y - x for x, y in zip(cu_q, cu_q[1:])] or [0]
    lengths_k = [y - x for x, y in zip(cu_k, cu_k[1:])] or [0]
    return {"q": as_t(q_idx), "k": as_t(k_idx), "cu_q": as_t(cu_q, torch.int32), "cu_k": as_t(cu_k, torch.int32),
            "max_q": max(lengths_q), "max_k": max(lengths_k)}


def flash_varlen_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           sliding_window: int | None = None, softcap: float | None = None,
                           position_ids: Tensor | None = None, **kwargs: Any):
    """:func:`varlen_attention`'s result from ONE ``torch.nn.attention.varlen.varlen_attn`` call per layer (flash;
    CUDA, bf16/fp16): every segment's queries, and its keys gathered behind its shared prefix, with a bottom-right
    causal mask and the sliding window as ``window_size``; ``num_splits=1`` where offered, so a sequence's result
    does not depend on what it is packed with.  No soft-cap (Gemma 2: use ``sdpa`` or ``flex``)."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    batch, heads, n, dim = query.shape
    spans = _checked_spans(module, query, key, attention_mask, position_ids, VARLEN_FLASH)
    if not query.is_cuda or query.dtype not in (torch.bfloat16, torch.float16):
        raise NotImplementedError(f"{VARLEN_FLASH} runs on CUDA in bf16/fp16 (got {query.device.type}, "
                                  f"{query.dtype}): use attention_kernel sdpa (any device) or flex")
    if softcap is not None:
        raise NotImplementedError(f"{VARLEN_FLASH} has no attention soft-cap: use attention_kernel sdpa or flex")
    if dropout and module.training:
        raise NotImplementedError(f"{VARLEN_FLASH} has no attention dropout: use attention_kernel sdpa")
    ix = _tables(spans, "flash", lambda s: _flash_index(s, n, query.device))
    hkv, dv = key.shape[1], value.shape[-1]
    q = query.transpose(1, 2).reshape(batch * n, heads, dim)[ix["q"]]
    k = key.transpose(1, 2).reshape(batch * n, hkv, dim)[ix["k"]]
    v = value.transpose(1, 2).reshape(batch * n, hkv, dv)[ix["k"]]
    params = inspect.signature(varlen_attn).parameters
    kw: dict[str, Any] = {"scale": scaling if scaling is not None else dim**-0.5}
    if "window_size" in params:
        kw["window_size"] = (sliding_window - 1 if sliding_window is not None else -1, 0)
    elif sliding_window is None or ix["max_k"] <= sliding_window:
        kw["is_causal"] = True
    else:
        raise NotImplementedError("this PyTorch's varlen_attn has no window_size: use attention_kernel sdpa or flex "
                                  "for sliding-window layers")
    if "num_splits" in params:
        kw["num_splits"] = 1
    if hkv != heads:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(heads // hkv, dim=1), v.repeat_interleave(heads // hkv, dim=1)
    o = varlen_attn(q, k, v, ix["cu_q"], ix["cu_k"], ix["max_q"], ix["max_k"], **kw)
    out = query.new_zeros(batch * n, heads, dv).index_copy(0, ix["q"], o)
    return out.view(batch, n, heads, dv), None


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
