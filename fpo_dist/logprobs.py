"""Per-token log-probs, sequence log-probs and TDPO's sequential KL from logits, in fp32, chunk by chunk.

Imports only torch.  A sequence row is ``input_ids[b, :T]`` with ``response_mask[b, t]`` True where token ``t`` is
a response token; token ``t`` is predicted by the logits (and the hidden state) at position ``t − 1``:
:func:`prediction_mask` is the mask of those predicting positions, the one mask shared by log-probs, the TDPO KL
and SAE pooling.  No fp32 copy of a whole ``[B, T, V]`` logits tensor is held, in the forward or backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# fp32 bytes one chunk of [B, chunk, V] logits may take when the chunk size is automatic.
CHUNK_BUDGET_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------------------------------------
# Masks and chunking
# ---------------------------------------------------------------------------------------------------------


def prediction_mask(response_mask: Tensor) -> Tensor:
    """``pm[b, s] = response_mask[b, s + 1]``, ``pm[b, T−1] = False``: positions whose logits/hidden state
    predict a response token."""
    mask = response_mask.bool()
    return torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)


@dataclass(frozen=True)
class Selection:
    """The ``N`` positions a batch scores, as explicit lists: where the hidden state that predicts sits (a flat
    index into the ``[R, T]`` positions), the token it predicts, and the sequence it counts for.

    From a prediction mask (:meth:`of_mask`: packed and padded rows, where position ``s`` predicts token ``s + 1``)
    the entries are the mask's positions in row-major order.  A shared-prefix row (``fpo_dist.models.build_batch``,
    ``shared``) lists the prompt's last position twice — it predicts the first chosen and the first rejected
    token — which a mask cannot say.  Each sequence's entries are contiguous and in sequence order.
    """

    positions: Tensor  # [N] int64: flat index (r · T + s) of each predicting position
    targets: Tensor  # [N] int64: the token id each predicts
    sequences: Tensor  # [N] int64: the sequence each counts for

    @classmethod
    def of_mask(cls, input_ids: Tensor, pm: Tensor, sequence_ids: Tensor | None = None) -> "Selection":
        """The positions of ``pm [R, T]`` (row-major), each predicting the next token of its row."""
        pm = pm.bool()
        positions = pm.flatten().nonzero().squeeze(-1)
        targets = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)[pm].long()  # token s+1 for position s
        seqs = sequence_ids[pm] if sequence_ids is not None else torch.zeros_like(positions)
        return cls(positions, targets, seqs)

    def gather(self, x: Tensor) -> Tensor:
        """``x [R, T, …]`` at the selected positions: ``[N, …]`` (differentiable; a listed-twice position's
        gradient is the sum of both entries')."""
        return x.flatten(0, 1)[self.positions]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Selection":
        return Selection(*(t.to(device, non_blocking=non_blocking) for t in (self.positions, self.targets,
                                                                               self.sequences)))


def auto_chunk_size(batch: int, vocab: int, budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
    """Positions per chunk so that one fp32 ``[batch, chunk, vocab]`` block stays under ``budget_bytes``."""
    return max(1, budget_bytes // max(1, batch * vocab * 4))


def upcast(x: Tensor) -> Tensor:
    """At least fp32 (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


class _ShiftedTokenLogps(torch.autograd.Function):
    """``out[b, s] = log_softmax(fp32(logits[b, s]))[targets[b, s]]`` computed chunk by chunk.

    Saves only the input logits (no copy), the targets and the fp32 log-normaliser ``[B, S]``; the backward pass
    recomputes ``softmax`` per chunk: ``∂out/∂z_v = 1[v = target] − softmax(z)_v``.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, chunk: int) -> Tensor:
        batch, seq, _ = logits.shape
        out = torch.empty(batch, seq, dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
        lse = torch.empty_like(out)
        for sl in _chunks(seq, chunk):
            x = upcast(logits[:, sl])
            lse[:, sl] = torch.logsumexp(x, dim=-1)
            out[:, sl] = x.gather(-1, targets[:, sl, None]).squeeze(-1) - lse[:, sl]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None]:
        logits, targets, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad = torch.empty_like(logits)
        for sl in _chunks(logits.shape[1], ctx.chunk):
            g = grad_out[:, sl, None].to(lse.dtype)
            d = torch.exp(upcast(logits[:, sl]) - lse[:, sl, None]).mul_(-g)
            d.scatter_add_(-1, targets[:, sl, None], g)
            grad[:, sl] = d.to(grad.dtype)
        return grad, None, None


class _PositionKL(torch.autograd.Function):
    """``out[b, s] = KL(softmax(ref[b, s]) ‖ softmax(pol[b, s]))`` in fp32, chunk by chunk.

    Gradients (recomputed per chunk): ``∂/∂pol_j = q_j − p_j``; ``∂/∂ref_j = p_j((log p_j − log q_j) − KL)``.
    """

    @staticmethod
    def forward(ctx: Any, ref: Tensor, pol: Tensor, chunk: int) -> Tensor:
        batch, seq, _ = ref.shape
        dtype = torch.promote_types(torch.promote_types(ref.dtype, pol.dtype), torch.float32)
        out = torch.empty(batch, seq, dtype=dtype, device=ref.device)
        for sl in _chunks(seq, chunk):
            out[:, sl] = _kl_terms(ref[:, sl], pol[:, sl])[0].sum(-1)
        ctx.save_for_backward(ref, pol, out)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        ref, pol, kl = ctx.saved_tensors
        need_ref, need_pol = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_ref = torch.empty_like(ref) if need_ref else None
        grad_pol = torch.empty_like(pol) if need_pol else None
        for sl in _chunks(ref.shape[1], ctx.chunk):
            _, log_p, log_q = _kl_terms(ref[:, sl], pol[:, sl])
            g = grad_out[:, sl, None].to(kl.dtype)
            p = log_p.exp()
            if grad_pol is not None:
                grad_pol[:, sl] = ((log_q.exp() - p) * g).to(grad_pol.dtype)
            if grad_ref is not None:
                d = torch.where(p > 0, p * ((log_p - log_q) - kl[:, sl, None]), 0.0)
                grad_ref[:, sl] = (d * g).to(grad_ref.dtype)
        return grad_ref, grad_pol, None


def _kl_terms(ref: Tensor, pol: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 ``(p·(log p − log q), log p, log q)`` over the last axis; ``0·log 0`` taken as 0."""
    log_p = torch.log_softmax(upcast(ref), dim=-1)
    log_q = torch.log_softmax(upcast(pol), dim=-1)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0), log_p, log_q


# ---------------------------------------------------------------------------------------------------------
# Log-probs and the TDPO sequential KL
# ---------------------------------------------------------------------------------------------------------


def token_logps(logits: Tensor, input_ids: Tensor, response_mask: Tensor, chunk_size: int | None = None) -> Tensor:
    """Per-token log-probs ``[B, T]`` (fp32; fp64 for fp64 logits) of the response tokens.

    ``out[b, t] = log_softmax(logits[b, t−1])[input_ids[b, t]]`` where ``response_mask[b, t]``, else 0
    (position 0 has no predictor and is always 0).  The log-softmax runs in fp32 over chunks of
    ``chunk_size`` positions (default: :func:`auto_chunk_size`), so no fp32 copy of the whole
    ``[B, T, V]`` logits is ever held, in the forward or the backward pass.  Differentiable w.r.t. ``logits``.
    """
    batch, seq, vocab = logits.shape
    mask = response_mask.bool()[:, 1:]
    out = torch.zeros(batch, seq, dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
    if seq < 2:
        return out
    chunk = chunk_size or auto_chunk_size(batch, vocab)
    targets = input_ids[:, 1:].long().masked_fill(~mask, 0)  # any id works at masked positions
    shifted = _ShiftedTokenLogps.apply(logits[:, :-1], targets, chunk)
    return torch.cat([out[:, :1], torch.where(mask, shifted, 0.0)], dim=1)


def predicted_token_logps(logits: Tensor, input_ids: Tensor, response_mask: Tensor) -> Tensor:
    """``[N]``: at each position of ``prediction_mask(response_mask)`` (row-major), the log-prob of the response
    token it predicts — from full logits, the values :func:`fpo_dist.lm_head.selected_forward` computes."""
    per_token = token_logps(logits, input_ids, response_mask)  # token t's log-prob at t
    return torch.roll(per_token, -1, dims=1)[prediction_mask(response_mask)]


def sequence_logps(
    logits: Tensor, input_ids: Tensor, response_mask: Tensor, chunk_size: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp_sum[B], n_tokens[B], logp_avg[B])`` over response tokens: ``logπ(y|x) = Σ_t token_logps``,
    ``|y|`` = response tokens at positions ≥ 1, ``avg = logπ / max(|y|, 1)``."""
    per_token = token_logps(logits, input_ids, response_mask, chunk_size)
    n_tokens = response_mask.bool()[:, 1:].sum(-1)
    logp_sum = per_token.sum(-1)
    return logp_sum, n_tokens, logp_sum / n_tokens.clamp(min=1)


def position_kl(ref_logits: Tensor, pol_logits: Tensor, chunk_size: int | None = None) -> Tensor:
    """``KL(softmax(ref[b, s]) ‖ softmax(pol[b, s]))`` at every position ``[B, T]``, fp32, chunk by chunk."""
    if ref_logits.shape != pol_logits.shape:
        raise ValueError(f"ref_logits {tuple(ref_logits.shape)} and pol_logits {tuple(pol_logits.shape)} differ in shape")
    batch, _, vocab = pol_logits.shape
    return _PositionKL.apply(ref_logits, pol_logits, chunk_size or auto_chunk_size(batch, vocab))


def sequential_kl(ref_logits: Tensor, pol_logits: Tensor, response_mask: Tensor, chunk_size: int | None = None) -> Tensor:
    """TDPO's sequential KL ``[B]``: ``KL_y = Σ_{s: pm[b,s]} KL(π_ref(·|x, y_<s) ‖ π_θ(·|x, y_<s))``.

    Forward KL over the full vocabulary at the positions whose logits predict a response token
    (:func:`prediction_mask`, the same positions as the log-probs), computed in fp32 chunk by chunk.
    """
    per_position = position_kl(ref_logits, pol_logits, chunk_size)
    return torch.where(prediction_mask(response_mask), per_position, 0.0).sum(-1)


def logsumexp_outside(z: Tensor, ids: Tensor) -> Tensor:
    """Per row of ``z [N, V]``, ``log Σ_{v ∉ ids} exp z_v`` (``-inf`` when ``ids [N, M]`` holds every token)."""
    return torch.logsumexp(z.scatter(-1, ids, float("-inf")), dim=-1)


def topm_kl(z: Tensor, ids: Tensor, ref_logps: Tensor, ref_tail: Tensor, lse: Tensor | None = None
            ) -> tuple[Tensor, Tensor]:
    """Offline TDPO's per-position KL against a cached top-M reference: per row of the logits ``z [N, V]``
    (log-sum-exp ``lse``, computed when not given), ``(kl [N], rest [N])`` with ``rest = log Σ_{v ∉ ids} exp z_v``
    (``-inf`` when ``ids`` holds every token) and::

        kl = Σ_j p_j (log p_j − log q_{ids_j}) + p_tail (log p_tail − log q_tail)

    ``q = softmax(z)``, ``q_tail`` its mass outside the ``M`` ``ids [N, M]``; ``log p_j = ref_logps``,
    ``log p_tail = ref_tail``; ``0 · log 0`` taken as 0.  The KL of both distributions coarsened to the M tokens and
    one bucket: never above the exact KL, equal to it when the M ids are every token.  Differentiable (autograd); the
    chunked head (:mod:`fpo_dist.lm_head`) computes it with its own backward.
    """
    lse = torch.logsumexp(z, dim=-1) if lse is None else lse
    lp, tail = ref_logps.to(z.dtype), ref_tail.to(z.dtype)
    log_q = z.gather(-1, ids) - lse[:, None]
    rest = logsumexp_outside(z, ids)
    p, p_tail = lp.exp(), tail.exp()
    kl = torch.where(p > 0, p * (lp - log_q), 0.0).sum(-1)
    return kl + torch.where(p_tail > 0, p_tail * (tail - (rest - lse)), 0.0), rest
