"""Log-probs only where a response token is predicted: the output layer on selected positions, chunk by chunk.

Contract.  For a causal LM ``model`` and rows ``input_ids [R, T]`` with a prediction mask ``pm [R, T]``
(:func:`fpo_dist.logprobs.prediction_mask`: ``pm[r, s]`` is True iff token ``s + 1`` is a response token), or
an explicit :class:`~fpo_dist.logprobs.Selection` of positions and the tokens they predict (a shared-prefix row,
whose prompt's last position predicts two tokens), :func:`selected_forward` runs the decoder to its final norm,
takes the ``N`` selected hidden states ``h = H[pm]`` (row-major order; a Selection's order) and returns, per
selected position ``i``::

    z_i      = c · tanh(a · (W h_i + b) / c)        (c: the config's final_logit_softcapping, a: its logit scale;
                                                      without soft-capping z_i = a · (W h_i + b))
    logp_i   = log_softmax(fp32(z_i))[y_i]           (y_i = input_ids at the predicted position)
    kl_i     = KL(softmax(z_i^ref) ‖ softmax(z_i))   (TDPO, when the reference's selected hidden states are given)
    kl_i     = Σ_j p_ij (log p_ij − log q_ij) + p_i,tail (log p_i,tail − log q_i,tail)
                                                     (offline TDPO, given the reference's cached top-M tokens
                                                      ids_ij, their log-probs log p_ij and tail log-mass: the KL of
                                                      the two distributions coarsened to M tokens + one bucket)
    top-M    = the model's M most probable tokens, their log-probs and the log of the rest's mass (``topm=M``,
               no gradient: what the cache job stores for offline TDPO)

exactly the model's own logits at those positions (``W h + b`` in the model's dtype, the soft-cap in the model's
dtype, the log-softmax in fp32 — what the materialized path ``model(...).logits`` + :mod:`fpo_dist.logprobs`
computes), but the output layer runs over chunks of ``chunk`` positions and the backward pass recomputes each
chunk's logits, so no ``[positions × vocab]`` tensor larger than one chunk exists in the forward or backward pass,
and prompt positions are never projected.  Gradients flow to ``h`` (hence the decoder) and to ``W``/``b``.

ZeRO-3.  The model is called through its own ``__call__`` (a DeepSpeed engine's too), with its ``forward`` and its
output layer's ``forward`` replaced for that one call: DeepSpeed's module hooks gather the head's weight around
the output layer's call and its backward, exactly as for an ordinary ``nn.Linear``, tied or not.  The reference
head's weight (frozen, another engine) is gathered explicitly through :func:`fpo_dist.engine.gathered`.

Tied weights.  Where the output layer shares its weight with the input embedding and that weight is trained, the
embedding module's ``forward`` is replaced for the call too (:class:`TiedGrad`): both halves of the weight's gradient
go into one ``[vocab, d]`` buffer instead of autograd's three (the head's, the embedding's dense one, their sum).

Why ours and not TRL's ``add_fused_lm_head`` (TRL 1.16, used as a test oracle in ``tests/test_lm_head.py``): TRL
scores every position off-GPU (its compact selection is for Triton devices only), patches ``model.forward``
permanently, has no KL against a second model's head, and gathers a ZeRO-3 head in a context that, by its own
note, must run inside the model's forward.  Ours selects positions on every device, shares the selected hidden
states with the SAE/TDPO paths, and leaves the model unpatched outside the call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from fpo_dist.attention import expect_packed
from fpo_dist.logprobs import Selection, logsumexp_outside, topm_kl

# fp32 bytes one chunk of [chunk, vocab] logits may take (Gemma's 262k vocabulary: 64 positions).
HEAD_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class HeadTransform:
    """What the model applies to ``W h + b`` to get its logits: ``c · tanh(scale · x / c)`` or ``scale · x``."""

    softcap: float | None = None
    scale: float = 1.0

    @classmethod
    def of(cls, model: nn.Module) -> "HeadTransform":
        """The transform of a transformers causal LM, from its (text) config; refuses what it does not know."""
        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        for unknown in ("logits_scaling", "output_multiplier", "lm_head_multiplier"):
            if getattr(text, unknown, None) not in (None, 1, 1.0):
                raise NotImplementedError(
                    f"{type(model).__name__} scales its logits by config.{unknown}; the selected-position head does "
                    "not model that: add it to fpo_dist.lm_head.HeadTransform")
        scale = getattr(text, "logit_scale", None)
        return cls(softcap=getattr(text, "final_logit_softcapping", None), scale=1.0 if scale is None else float(scale))

    def __call__(self, x: Tensor) -> Tensor:
        """As the model does it, in ``x``'s dtype."""
        if self.scale != 1.0:
            x = x * self.scale
        if self.softcap is not None:
            x = torch.tanh(x / self.softcap) * self.softcap
        return x

    def backward(self, z: Tensor, grad_z: Tensor) -> Tensor:
        """``∂L/∂x`` from ``∂L/∂z`` and the output ``z``: ``(1 − (z/c)²) · scale``."""
        if self.softcap is not None:
            grad_z = grad_z * (1 - (z / self.softcap) ** 2)
        return grad_z * self.scale if self.scale != 1.0 else grad_z


@dataclass
class RefHead:
    """The reference model's side of TDPO's KL: its hidden states at the same selected positions and its head."""

    hidden: Tensor  # [N, D], no grad
    weight: Tensor
    bias: Tensor | None
    transform: HeadTransform


@dataclass
class RefTopM:
    """The reference's side of offline TDPO's KL: per selected position, its M most probable next tokens, their
    log-probs and the log of every other token's mass (the cache's ``ref_topm`` arrays)."""

    ids: Tensor  # [N, M] int64
    logps: Tensor  # [N, M]
    tail: Tensor  # [N] (-inf: no mass outside the M)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "RefTopM":
        return RefTopM(*(t.to(device, non_blocking=non_blocking) for t in (self.ids, self.logps, self.tail)))


@dataclass
class SelectedOutput:
    logps: Tensor  # [N] fp32 (fp64 for an fp64 model): log-prob of each predicted response token
    kl: Tensor | None  # [N] per-position KL(ref ‖ model), when a RefHead or a RefTopM was given
    hidden: Tensor  # [N, D] final-normed hidden states at the selected positions
    rows: Tensor  # [N] int64: the row of each selected position
    topm: RefTopM | None = None  # the model's own top-M (``topm=M``)


def output_layer(model: nn.Module) -> nn.Module:
    layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if layer is None or not hasattr(layer, "weight"):
        raise TypeError(f"{type(model).__name__} has no output layer with a weight (get_output_embeddings())")
    return layer


def backbone(model: nn.Module) -> nn.Module:
    """The decoder up to its final norm (``model.model`` for transformers' *ForCausalLM)."""
    body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if not isinstance(body, nn.Module) or body is model:
        raise TypeError(f"cannot find the decoder of {type(model).__name__} (its base_model_prefix attribute)")
    return body


def unwrap(model: Any) -> nn.Module:
    """The transformers model inside an :class:`fpo_dist.engine.Engine` / DeepSpeed engine / peft model / plain
    module."""
    while not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):
        model = model.module
    if callable(getattr(model, "get_base_model", None)):  # peft (LoRA policies): the model with adapters injected
        model = model.get_base_model()
    return model


def ref_head(model: Any, hidden: Tensor) -> RefHead:
    """The :class:`RefHead` of a (frozen) reference model whose selected hidden states are ``hidden``."""
    inner = unwrap(model)
    layer = output_layer(inner)
    return RefHead(hidden.detach(), layer.weight, getattr(layer, "bias", None), HeadTransform.of(inner))


def auto_head_chunk(vocab: int, budget_bytes: int = HEAD_CHUNK_BYTES) -> int:
    return max(1, budget_bytes // max(1, vocab * 4))


def selected_forward(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    select: "Tensor | Selection",
    *,
    position_ids: Tensor | None = None,
    ref: RefHead | RefTopM | None = None,
    chunk_size: int | None = None,
    weight_grad: str = "auto",
    topm: int = 0,
) -> SelectedOutput:
    """One forward of ``model`` (a transformers causal LM or an engine around one) scoring only the selected
    positions — ``select``: a prediction mask ``[R, T]`` (each position predicts the next token of its row) or a
    :class:`~fpo_dist.logprobs.Selection` (explicit positions and targets: a shared-prefix row); see the module
    docstring.  Gradients follow torch's grad mode; ``weight_grad``: how the backward
    chunks the output layer's weight gradient (:data:`WEIGHT_GRAD`); ``topm=M``: also the model's own top-M
    next-token distributions (without gradient)."""
    if weight_grad not in WEIGHT_GRAD:
        raise ValueError(f"weight_grad {weight_grad!r}: choose from {', '.join(WEIGHT_GRAD)}")
    inner = unwrap(model)
    layer = output_layer(inner)
    vocab = layer.weight.shape[0] if layer.weight.ndim == 2 and layer.weight.numel() else None  # None: partitioned
    if topm and vocab is not None and topm > vocab:
        raise ValueError(f"top-M with M = {topm} but the model's vocabulary has {vocab} tokens: choose M <= {vocab}")
    transform = HeadTransform.of(inner)
    sel = select if isinstance(select, Selection) else Selection.of_mask(input_ids, select)
    targets = sel.targets
    rows = sel.positions // input_ids.shape[1]
    box: dict[str, Any] = {}
    embedding = _tied_embedding(inner, layer)
    tied = TiedGrad() if embedding is not None else None

    def head_forward(h: Tensor):
        w, b = layer.weight, getattr(layer, "bias", None)
        chunk = chunk_size or auto_head_chunk(w.shape[0])
        if isinstance(ref, RefTopM):
            kl_args, ref_kind = (ref.ids, ref.logps, ref.tail), "topm"
        elif ref is not None:
            kl_args, ref_kind = (ref.hidden, ref.weight, ref.bias), "model"
        else:
            kl_args, ref_kind = (None, None, None), None
        return _SelectedHead.apply(h, w, b, targets, *kl_args,
                                   _Cfg(transform, getattr(ref, "transform", None), chunk, weight_grad, ref_kind,
                                        topm), tied)

    def embedding_forward(ids: Tensor) -> Tensor:
        return _TiedEmbedding.apply(ids, embedding.weight, getattr(embedding, "embed_scale", None),
                                    embedding.padding_idx, tied)

    def model_forward(*args, **kwargs):
        kwargs["use_cache"] = False
        kwargs.pop("labels", None)  # peft passes labels=None through
        hidden = backbone(inner)(*args, **kwargs).last_hidden_state
        h = sel.gather(hidden)
        box["hidden"] = h
        with _instance_forward(layer, head_forward):
            return layer(h)

    call_kwargs = dict(input_ids=input_ids, attention_mask=attention_mask)
    if position_ids is not None:
        call_kwargs["position_ids"] = position_ids
    with contextlib.ExitStack() as stack:
        stack.enter_context(_instance_forward(inner, model_forward))
        stack.enter_context(expect_packed(position_ids is not None))
        if embedding is not None:
            stack.enter_context(_instance_forward(embedding, embedding_forward))
        logps, kl, top_ids, top_logps, top_tail = model(**call_kwargs)
    return SelectedOutput(logps, kl if ref is not None else None, box["hidden"], rows,
                          RefTopM(top_ids, top_logps, top_tail) if topm else None)


def row_sums(values: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """``out[r] = Σ_{i: rows[i] = r} values[i]`` (differentiable)."""
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)


@contextlib.contextmanager
def _instance_forward(module: nn.Module, fn: Callable) -> Iterator[None]:
    """Call ``fn`` instead of ``module.forward`` for the duration (module hooks still run around it)."""
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield
    finally:
        if had:
            module.forward = old
        else:
            del module.forward


# ---------------------------------------------------------------------------------------------------------
# The chunked output layer with recompute in backward
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cfg:
    transform: HeadTransform
    ref_transform: HeadTransform | None
    chunk: int
    weight_grad: str = "auto"  # see WEIGHT_GRAD
    ref_kind: str | None = None  # the KL's reference: None, "model" (RefHead) or "topm" (RefTopM)
    topm: int = 0  # M > 0: also return the model's own top-M (no gradient)


# How the backward pass computes the output layer's weight gradient:
# - "positions": chunk over positions, each chunk's ``∂xᵀ h`` added into one ``[vocab, d]`` buffer of ≥ fp32;
# - "vocab": chunk over the vocabulary, each block of rows ``∂W[v0:v1] = ∂x[:, v0:v1]ᵀ h`` summed over all positions
#   in one fp32 product and written once, in the weight's dtype — no fp32 copy of a bf16 weight (Gemma-2-2B:
#   2.4 GB; Gemma 3 270M: 0.67 GB), the same fp32 summation, rounded once to the weight's dtype, as "positions";
#   each block holds ``[positions, v1 − v0]`` elements, as many as one position chunk's ``[chunk, vocab]``;
# - "auto": "vocab" where the weight is in a narrower dtype than fp32 and gets a gradient, else "positions" (an
#   fp32 weight's gradient buffer is the gradient itself).
WEIGHT_GRAD = ("auto", "positions", "vocab")


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


def _logits(h: Tensor, w: Tensor, b: Tensor | None, transform: HeadTransform) -> tuple[Tensor, Tensor]:
    """``(z in the model's dtype, fp32 z)`` for a chunk: the model's own op order."""
    z = transform(nn.functional.linear(h, w, b))
    return z, z.to(torch.promote_types(z.dtype, torch.float32))


def _gather_ref(weight: Tensor | None, bias: Tensor | None):
    if weight is None:
        return contextlib.nullcontext()
    from fpo_dist.engine import gathered

    return gathered([p for p in (weight, bias) if p is not None])


class _SelectedHead(torch.autograd.Function):
    """``(logp [N], kl [N], top-M ids, log-probs, tail)`` of the selected hidden states; saves only ``h``, the
    targets, fp32 ``lse`` and one more value per position for the KL (the reference's log-sum-exp, or the model's
    over the tokens outside the cached top-M).

    Backward per chunk: ``∂/∂z = g_logp · (onehot(y) − q) + g_kl · (q · m − p̃)`` (``q`` the model's softmax; ``p̃``
    the reference's softmax and ``m = 1``, or for a cached top-M ``p̃`` its ``p_j`` at the M ids and
    ``p_tail · q_v / q_tail`` elsewhere, ``m = Σ_j p_j + p_tail``), then through the soft-cap to ``x = W h + b``:
    ``∂h = ∂x W``, ``∂W = ∂xᵀ h``, ``∂b = Σ ∂x``.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, ref_a, ref_b_, ref_c, cfg: _Cfg, tied: "TiedGrad | None"):
        n = h.shape[0]
        acc = torch.promote_types(h.dtype, torch.float32)
        logp = torch.empty(n, dtype=acc, device=h.device)
        lse = torch.empty_like(logp)
        kl = torch.zeros_like(logp)
        # the reference's log-sum-exp ("model", for a by-vocab backward) or the model's outside the top-M ("topm")
        ref_stat = torch.empty_like(logp) if cfg.ref_kind else None
        top_ids = torch.empty(n, cfg.topm, dtype=torch.long, device=h.device)
        top_logps, top_tail = torch.empty(n, cfg.topm, dtype=acc, device=h.device), torch.empty_like(logp)
        with torch.no_grad(), _gather_ref(*((ref_b_, ref_c) if cfg.ref_kind == "model" else (None, None))):
            for sl in _chunks(n, cfg.chunk):
                _, z = _logits(h[sl], weight, bias, cfg.transform)
                lse[sl] = torch.logsumexp(z, dim=-1)
                logp[sl] = z.gather(-1, targets[sl, None]).squeeze(-1) - lse[sl]
                if cfg.ref_kind == "model":
                    kl[sl], ref_stat[sl] = _kl(ref_a[sl], ref_b_, ref_c, cfg.ref_transform, z - lse[sl, None])
                elif cfg.ref_kind == "topm":
                    kl[sl], ref_stat[sl] = topm_kl(z, ref_a[sl], ref_b_[sl], ref_c[sl], lse[sl])
                if cfg.topm:
                    top_logps[sl], top_ids[sl] = torch.topk(z, cfg.topm, dim=-1)
                    top_logps[sl] -= lse[sl, None]
                    top_tail[sl] = logsumexp_outside(z, top_ids[sl]) - lse[sl]
        ctx.save_for_backward(h, weight, bias, targets, lse, ref_a, ref_b_, ref_c, ref_stat)
        ctx.cfg, ctx.tied = cfg, tied
        ctx.mark_non_differentiable(top_ids, top_logps, top_tail)
        if cfg.ref_kind is None:
            ctx.mark_non_differentiable(kl)
        return logp, kl, top_ids, top_logps, top_tail

    @staticmethod
    def backward(ctx, g_logp, g_kl, *_top):
        h, weight, bias, targets, lse, ref_a, ref_b_, ref_c, ref_stat = ctx.saved_tensors
        cfg: _Cfg = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = torch.promote_types(weight.dtype, torch.float32)
        model_ref = (ref_b_, ref_c) if cfg.ref_kind == "model" else (None, None)
        if cfg.weight_grad == "vocab" or (cfg.weight_grad == "auto" and need_w and acc != weight.dtype):
            with _gather_ref(*model_ref):
                grad_h, grad_w, grad_b = _backward_by_vocab(h, weight, bias, targets, lse, (ref_a, ref_b_, ref_c),
                                                            ref_stat, g_logp, g_kl, cfg, need_h, need_w, need_b)
            return grad_h, _hand_over(ctx.tied, grad_w), grad_b, None, None, None, None, None, None
        grad_h = torch.empty_like(h) if need_h else None
        # weight gradients accumulate over chunks in ≥ fp32
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b and bias is not None else None
        with _gather_ref(*model_ref):
            for sl in _chunks(h.shape[0], cfg.chunk):
                z_model, z = _logits(h[sl], weight, bias, cfg.transform)
                q = torch.exp(z - lse[sl, None])
                d = q * (-g_logp[sl, None])
                d.scatter_add_(-1, targets[sl, None], g_logp[sl, None])
                if cfg.ref_kind == "model":
                    log_p = _ref_logprobs(ref_a[sl], ref_b_, ref_c, cfg.ref_transform)
                    d += (q - log_p.exp()) * g_kl[sl, None]
                elif cfg.ref_kind == "topm":
                    p_t, mass = _topm_target(z, ref_stat[sl], ref_a[sl], ref_b_[sl], ref_c[sl], slice(0, z.shape[1]))
                    d += (q * mass[:, None] - p_t) * g_kl[sl, None]
                dx = cfg.transform.backward(z_model.to(d.dtype), d).to(h.dtype)
                if grad_h is not None:
                    grad_h[sl] = dx @ weight
                if grad_w is not None:
                    grad_w.addmm_(dx.t().to(acc), h[sl].to(acc))
                if grad_b is not None:
                    grad_b += dx.to(acc).sum(0)
        return (grad_h, _hand_over(ctx.tied, None if grad_w is None else grad_w.to(weight.dtype)),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------------------
# A tied input/output embedding's gradient in one buffer
# ---------------------------------------------------------------------------------------------------------

# Input embeddings whose forward is ``nn.Embedding``'s times ``self.embed_scale`` in the weight's dtype (transformers'
# Gemma family), besides ``nn.Embedding`` itself.  Anything else keeps its own forward and backward.
SCALED_EMBEDDINGS = ("GemmaTextScaledWordEmbedding", "Gemma2TextScaledWordEmbedding", "Gemma3TextScaledWordEmbedding",
                     "VaultGemmaTextScaledWordEmbedding")


class TiedGrad:
    """Where the output layer's backward leaves its weight gradient when the input embedding shares the weight.

    Autograd would hold the output layer's ``[vocab, d]`` gradient until the input embedding's backward (the last
    node) has produced a second dense ``[vocab, d]`` gradient, then add the two: two or three such buffers at the end
    of every backward pass (Gemma 3 270M in fp32: 0.67 GB each).  Instead, the output layer's backward hands its
    gradient over here and returns none for the weight; the input embedding's backward (always later: its output is
    upstream of everything) adds its few touched rows into that buffer in place and returns it as the weight's whole
    gradient.  Autograd, DeepSpeed's gradient hooks and the optimizer see one gradient, as before."""

    def __init__(self):
        self.grad: Tensor | None = None


def _hand_over(tied: TiedGrad | None, grad_w: Tensor | None) -> Tensor | None:
    """The weight gradient the output layer's backward returns: ``grad_w``, or none once ``tied`` holds it."""
    if tied is None or grad_w is None:
        return grad_w
    tied.grad = grad_w
    return None


def _tied_embedding(model: nn.Module, layer: nn.Module) -> nn.Embedding | None:
    """The input embedding whose weight the output layer shares, where this backward pass will train it and
    :class:`_TiedEmbedding` computes exactly its forward; else None."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if (emb is None or getattr(emb, "weight", None) is not layer.weight or not layer.weight.requires_grad
            or not torch.is_grad_enabled()):
        return None
    if not (type(emb) is nn.Embedding or (type(emb).__name__ in SCALED_EMBEDDINGS and hasattr(emb, "embed_scale"))):
        return None
    if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse:
        return None
    return emb


class _TiedEmbedding(torch.autograd.Function):
    """``embedding(ids, W) [· scale]`` as the module computes it; backward adds ``∂W`` into the :class:`TiedGrad`
    buffer the output layer left (a fresh zero one if it left none) and returns that buffer.  ``∂W``'s rows are summed
    over positions in ≥ fp32, rounded once to the weight's dtype and added (equal to autograd's path within a few
    roundings: ``tests/test_lm_head.py``); the padding index gets no gradient, as in ``nn.Embedding``."""

    @staticmethod
    def forward(ctx, ids, weight, scale, padding_idx, tied: TiedGrad):
        out = nn.functional.embedding(ids, weight, padding_idx)
        if scale is not None:
            out = out * scale.to(weight.dtype)
        ctx.save_for_backward(ids)
        ctx.meta = (weight.shape, weight.dtype, weight.device, None if scale is None else scale.to(weight.dtype),
                    padding_idx, tied)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        shape, dtype, device, scale, padding_idx, tied = ctx.meta
        grad, tied.grad = tied.grad, None
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None
        if scale is not None:
            grad_out = grad_out * scale
        flat, rows = ids.reshape(-1), grad_out.reshape(-1, shape[1])
        if padding_idx is not None:
            keep = flat != padding_idx
            flat, rows = flat[keep], rows[keep]
        touched, where = torch.unique(flat, return_inverse=True)
        acc = torch.promote_types(dtype, torch.float32)
        sums = torch.zeros(touched.shape[0], shape[1], dtype=acc, device=device).index_add_(0, where, rows.to(acc))
        if grad is None:
            grad = torch.zeros(shape, dtype=dtype, device=device)
        grad.index_add_(0, touched, sums.to(dtype))
        return None, grad, None, None, None


def _backward_by_vocab(h, weight, bias, targets, lse, ref: tuple, ref_stat, g_logp, g_kl, cfg: _Cfg,
                       need_h: bool, need_w: bool, need_b: bool):
    """``(∂h, ∂W, ∂b)`` over blocks of the vocabulary (``WEIGHT_GRAD``'s "vocab"): per block, the logits of every
    selected position, ``∂z`` from the saved log-sum-exps (the model's and the reference's), then ``∂W`` and ``∂b``
    of the block's rows, complete, and the block's share of ``∂h`` added into an fp32 ``[positions, d]``."""
    n, vocab = h.shape[0], weight.shape[0]
    acc = torch.promote_types(weight.dtype, torch.float32)
    block = max(1, cfg.chunk * vocab // max(1, n))  # [n, block] holds what one [chunk, vocab] position chunk holds
    grad_h = torch.zeros(h.shape, dtype=acc, device=h.device) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.empty_like(bias) if need_b and bias is not None else None
    h_acc = h.to(acc) if need_w else None
    for vs in _chunks(vocab, block):
        w, b = weight[vs], None if bias is None else bias[vs]
        z_model, z = _logits(h, w, b, cfg.transform)
        d = torch.exp(z - lse[:, None])  # q
        if cfg.ref_kind == "model":
            ref_h, ref_w, ref_b = ref
            p = torch.exp(_logits(ref_h, ref_w[vs], None if ref_b is None else ref_b[vs], cfg.ref_transform)[1]
                          - ref_stat[:, None])
            d = d * (g_kl[:, None] - g_logp[:, None]) - p * g_kl[:, None]  # −g_logp·q + g_kl·(q − p)
        elif cfg.ref_kind == "topm":
            p, mass = _topm_target(z, ref_stat, *ref, vs)
            d = d * (g_kl * mass - g_logp)[:, None] - p * g_kl[:, None]  # −g_logp·q + g_kl·(q·m − p̃)
        else:
            d = d * (-g_logp[:, None])
        inside = ((targets >= vs.start) & (targets < vs.stop)).nonzero().squeeze(-1)
        d.index_put_((inside, targets[inside] - vs.start), g_logp[inside], accumulate=True)  # + g_logp·onehot(y)
        dx = cfg.transform.backward(z_model.to(d.dtype), d).to(h.dtype)
        if grad_h is not None:  # the model's dtype per block (as "positions" does per chunk), summed in fp32
            grad_h += (dx @ w).to(acc)
        if grad_w is not None:  # ≥ fp32, as "positions" accumulates it
            grad_w[vs] = torch.mm(dx.t().to(acc), h_acc).to(weight.dtype)
        if grad_b is not None:
            grad_b[vs] = dx.to(acc).sum(0).to(bias.dtype)
    return None if grad_h is None else grad_h.to(h.dtype), grad_w, grad_b


def _ref_logprobs(ref_h: Tensor, w: Tensor, b: Tensor | None, transform: HeadTransform) -> Tensor:
    return torch.log_softmax(_logits(ref_h, w, b, transform)[1], dim=-1)


def _kl(ref_h: Tensor, w: Tensor, b: Tensor | None, transform: HeadTransform, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """Per row ``(Σ_v p_v (log p_v − log q_v), log Σ_v exp z^ref_v)``; ``0 · log 0`` taken as 0."""
    z = _logits(ref_h, w, b, transform)[1]
    log_p = torch.log_softmax(z, dim=-1).to(log_q.dtype)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1), torch.logsumexp(z, dim=-1)


def _topm_target(z: Tensor, rest: Tensor, ids: Tensor, ref_logps: Tensor, ref_tail: Tensor, vs: slice
                 ) -> tuple[Tensor, Tensor]:
    """``(p̃ [n, v1 − v0], m [n])`` of :class:`_SelectedHead`'s backward for the vocabulary block ``vs`` (``z``: the
    model's logits over that block): ``p̃`` is ``p_j`` at the cached ids and ``p_tail · exp(z_v − rest)`` at every
    other token, so that ``∂KL/∂z = q · m − p̃`` with ``m = Σ_j p_j + p_tail``."""
    p, p_tail = ref_logps.to(z.dtype).exp(), ref_tail.to(z.dtype).exp()
    safe_rest = torch.where(p_tail > 0, rest, 0.0)  # rest is -inf only when the M ids are every token (p_tail = 0)
    target = torch.where(p_tail[:, None] > 0, torch.exp(z - safe_rest[:, None]) * p_tail[:, None], 0.0)
    inside = (ids >= vs.start) & (ids < vs.stop)
    r, j = inside.nonzero(as_tuple=True)
    target[r, ids[r, j] - vs.start] = p[r, j]
    return target, p.sum(-1) + p_tail
