"""Preference losses (DPO, SimPO, TDPO1/2, FPO) as pure functions of tensors, with their metrics.

Imports only torch and the standard library, so these functions (and their tests) run anywhere.

Conventions (see ``docs/fpo-method.md``):

- A sequence row is ``input_ids[b, :T]`` with ``response_mask[b, t]`` True where token ``t`` is a response token.
  Token ``t`` is predicted by the logits (and the hidden state) at position ``t - 1``: :func:`prediction_mask`
  is the mask of those predicting positions, the one mask shared by log-probs, the TDPO KL and SAE pooling.
- Every loss is ``L = −mean_b log σ(u_b)`` and returns ``(loss, metrics)``; metrics are detached scalars.
- ``reward_accuracy`` is pairwise: pair ``b``'s chosen reward against pair ``b``'s own rejected reward, strictly
  greater (ties count as wrong).  ``margin`` is the batch mean of ``u`` (the logit inside σ);
  ``reward_margin`` is the batch mean of ``rewards_chosen − rewards_rejected``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

LossOutput = tuple[Tensor, dict[str, Tensor]]
TopkMode = Literal["union", "policy"]

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


def auto_chunk_size(batch: int, vocab: int, budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
    """Positions per chunk so that one fp32 ``[batch, chunk, vocab]`` block stays under ``budget_bytes``."""
    return max(1, budget_bytes // max(1, batch * vocab * 4))


def _upcast(x: Tensor) -> Tensor:
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
            x = _upcast(logits[:, sl])
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
            d = torch.exp(_upcast(logits[:, sl]) - lse[:, sl, None]).mul_(-g)
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
    log_p = torch.log_softmax(_upcast(ref), dim=-1)
    log_q = torch.log_softmax(_upcast(pol), dim=-1)
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


def sequence_logps(
    logits: Tensor, input_ids: Tensor, response_mask: Tensor, chunk_size: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp_sum[B], n_tokens[B], logp_avg[B])`` over response tokens: ``logπ(y|x) = Σ_t token_logps``,
    ``|y|`` = response tokens at positions ≥ 1, ``avg = logπ / max(|y|, 1)``."""
    per_token = token_logps(logits, input_ids, response_mask, chunk_size)
    n_tokens = response_mask.bool()[:, 1:].sum(-1)
    logp_sum = per_token.sum(-1)
    return logp_sum, n_tokens, logp_sum / n_tokens.clamp(min=1)


def sequential_kl(ref_logits: Tensor, pol_logits: Tensor, response_mask: Tensor, chunk_size: int | None = None) -> Tensor:
    """TDPO's sequential KL ``[B]``: ``KL_y = Σ_{s: pm[b,s]} KL(π_ref(·|x, y_<s) ‖ π_θ(·|x, y_<s))``.

    Forward KL over the full vocabulary at the positions whose logits predict a response token
    (:func:`prediction_mask`, the same positions as the log-probs), computed in fp32 chunk by chunk.
    """
    if ref_logits.shape != pol_logits.shape:
        raise ValueError(f"ref_logits {tuple(ref_logits.shape)} and pol_logits {tuple(pol_logits.shape)} differ in shape")
    batch, _, vocab = pol_logits.shape
    chunk = chunk_size or auto_chunk_size(batch, vocab)
    per_position = _PositionKL.apply(ref_logits, pol_logits, chunk)
    return torch.where(prediction_mask(response_mask), per_position, 0.0).sum(-1)


# ---------------------------------------------------------------------------------------------------------
# Sparse / pooled SAE codes
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseCodes:
    """A batch of sparse pooled SAE vectors, CSR style.

    Row ``b`` holds ``indices[offsets[b]:offsets[b+1]]`` (feature ids) with ``values[...]``; absent features are 0.
    """

    offsets: Tensor  # [B + 1] int64, offsets[0] = 0, non-decreasing
    indices: Tensor  # [nnz] int32 / int64
    values: Tensor  # [nnz] float

    def __post_init__(self) -> None:
        if self.offsets.dim() != 1 or self.offsets.numel() < 1:
            raise ValueError("SparseCodes.offsets must be a 1-D tensor of length batch + 1")
        if self.indices.shape != self.values.shape or self.indices.dim() != 1:
            raise ValueError(
                f"SparseCodes.indices {tuple(self.indices.shape)} and values {tuple(self.values.shape)} "
                "must be 1-D of the same length"
            )
        if self.offsets.device.type == "cpu" and int(self.offsets[-1]) != self.indices.numel():
            raise ValueError(f"SparseCodes.offsets[-1] = {int(self.offsets[-1])} but there are {self.indices.numel()} entries")

    @property
    def batch_size(self) -> int:
        return self.offsets.numel() - 1

    def to(self, device: torch.device | str) -> SparseCodes:
        return SparseCodes(self.offsets.to(device), self.indices.to(device), self.values.to(device))

    def rows(self) -> Tensor:
        """Row id ``[nnz]`` of every entry."""
        counts = self.offsets.diff()
        return torch.repeat_interleave(torch.arange(self.batch_size, device=counts.device), counts)

    @classmethod
    def from_dense(cls, dense: Tensor) -> SparseCodes:
        """All non-zeros of ``dense[B, F]``: indices int32 ascending per row, values fp32."""
        nz = dense != 0
        rows, cols = nz.nonzero(as_tuple=True)  # row-major: ascending column within each row
        counts = nz.sum(-1)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).long()
        return cls(offsets, cols.to(torch.int32), dense[rows, cols].float())

    def to_dense(self, d_sae: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[B, d_sae]`` dense vectors."""
        out = torch.zeros(self.batch_size, d_sae, dtype=dtype, device=self.values.device)
        out[self.rows(), self.indices.long()] = self.values.to(dtype)
        return out

    def topk(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Each row's ``k`` largest non-zero entries: ``(indices[B, k] int64, values[B, k], valid[B, k])``.

        Rows with fewer than ``k`` non-zeros are padded with ``index −1, value 0, valid False`` — the same
        selection rule as :func:`topk_mask` on the dense vector (zeros are never selected).
        """
        batch = self.batch_size
        rows = self.rows()
        pos = torch.arange(rows.numel(), device=rows.device) - self.offsets[rows]
        width = max(k, int(self.offsets.diff().max()) if batch else 0)
        vals = torch.zeros(batch, width, dtype=self.values.dtype, device=self.values.device)
        ids = torch.full((batch, width), -1, dtype=torch.long, device=self.values.device)
        vals[rows, pos] = self.values
        ids[rows, pos] = self.indices.long()
        top = vals.topk(k, dim=-1)
        valid = top.values != 0
        return ids.gather(-1, top.indices).masked_fill(~valid, -1), top.values, valid


@dataclass(frozen=True)
class PooledCodes:
    """Pooled policy codes, dense over all features (``columns=None``) or over a column subset.

    ``values[B, n]``; ``columns[n]`` are the ascending, unique feature ids of the columns of ``values``
    (what ``sae.encode_selected`` returns for ``sae.select_columns``' output).
    """

    values: Tensor
    columns: Tensor | None = None

    def __post_init__(self) -> None:
        if self.values.dim() != 2:
            raise ValueError(f"PooledCodes.values must be [batch, n_columns], got {tuple(self.values.shape)}")
        if self.columns is not None and self.columns.shape != (self.values.shape[1],):
            raise ValueError(
                f"PooledCodes.columns {tuple(self.columns.shape)} must have one id per column of values "
                f"{tuple(self.values.shape)}"
            )
        if self.columns is not None and not bool((self.columns[1:] > self.columns[:-1]).all()):
            raise ValueError("PooledCodes.columns must be ascending and unique (as select_columns returns them)")


def topk_mask(values: Tensor, k: int) -> Tensor:
    """Bool mask of each row's ``k`` largest non-zero entries (non-differentiable; zeros are never selected)."""
    v = values.detach()
    top = v.topk(min(k, v.shape[-1]), dim=-1).indices
    return torch.zeros_like(v, dtype=torch.bool).scatter_(-1, top, True) & (v != 0)


def _column_positions(columns: Tensor | None, n_cols: int, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of feature ``ids`` among the columns, and whether each id is a column at all."""
    ids = ids.long()
    if n_cols == 0:
        return torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    if columns is None:
        found = (ids >= 0) & (ids < n_cols)
        return ids.clamp(0, n_cols - 1), found
    cols = columns.to(ids.device).long()
    pos = torch.searchsorted(cols, ids).clamp(max=n_cols - 1)
    return pos, (cols[pos] == ids) & (ids >= 0)


def feature_distance(pol: PooledCodes, ref: SparseCodes, k: int, topk_mode: TopkMode = "union") -> tuple[Tensor, Tensor]:
    """FPO's ``D = (1/k) Σ_{i∈I} (c̄θ_i − c̄ref_i)²`` per row, and ``|topk_pol ∩ topk_ref| / |topk_ref|``.

    ``I`` = policy top-k ∪ reference top-k (``union``) or policy top-k (``policy``).  D divides by ``k`` even
    when ``|I| > k`` (the union) or ``|I| < k`` (fewer than k non-zeros).  Differentiable w.r.t. ``pol.values``
    only; the index selection is not.  With a column subset, the reference top-k must lie in the columns.
    """
    if topk_mode not in ("union", "policy"):
        raise ValueError(f"topk_mode must be 'union' or 'policy', got {topk_mode!r}")
    vals = _upcast(pol.values)
    batch, n_cols = vals.shape
    if ref.batch_size != batch:
        raise ValueError(f"policy codes have {batch} rows but the reference codes {ref.batch_size}")
    ref = ref.to(vals.device)

    pos, found = _column_positions(pol.columns, n_cols, ref.indices)
    if pol.columns is None and not bool(found.all()):
        raise ValueError(
            f"reference codes hold feature ids >= {n_cols}, the width of the policy codes: the cache was built "
            "with a different SAE"
        )
    ref_vals = torch.zeros_like(vals)
    ref_vals[ref.rows()[found], pos[found]] = ref.values[found].to(vals.dtype)

    ref_ids, _, ref_valid = ref.topk(k)
    ref_pos, ref_found = _column_positions(pol.columns, n_cols, ref_ids)
    ref_sel = ref_valid & ref_found
    if topk_mode == "union" and bool((ref_valid & ~ref_found).any()):
        raise ValueError(
            "the reference top-k features are not all among the policy code columns; build the columns with "
            "fpo_dist.sae.select_columns(..., topk_mode='union') or pass dense policy codes"
        )
    ref_mask = torch.zeros_like(vals, dtype=torch.bool)
    ref_mask[torch.arange(batch, device=vals.device)[:, None].expand_as(ref_pos)[ref_sel], ref_pos[ref_sel]] = True

    pol_mask = topk_mask(vals, k)
    selected = pol_mask | ref_mask if topk_mode == "union" else pol_mask
    distance = torch.where(selected, (vals - ref_vals).square(), 0.0).sum(-1) / k
    # the share of the reference's top-k set (k entries, fewer if it has fewer non-zeros) that the policy's
    # top-k recovers: 1 when policy == reference, whatever the number of non-zeros
    overlap = (pol_mask & ref_mask).sum(-1).float() / ref_valid.sum(-1).clamp(min=1).float()
    return distance, overlap


# ---------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------


def _nll_sigmoid(u: Tensor) -> Tensor:
    """``−mean log σ(u)``."""
    return -F.logsigmoid(u).mean()


def _metrics(
    u: Tensor, rewards_chosen: Tensor, rewards_rejected: Tensor, logps_chosen: Tensor, logps_rejected: Tensor
) -> dict[str, Tensor]:
    """Detached batch means; ``reward_accuracy`` is pairwise (pair b vs its own rejected; ties are wrong)."""
    r_c, r_r = rewards_chosen.detach().float(), rewards_rejected.detach().float()
    return {
        "reward_accuracy": (r_c > r_r).float().mean(),
        "rewards_chosen": r_c.mean(),
        "rewards_rejected": r_r.mean(),
        "reward_margin": (r_c - r_r).mean(),
        "margin": u.detach().float().mean(),
        "logps_chosen": logps_chosen.detach().float().mean(),
        "logps_rejected": logps_rejected.detach().float().mean(),
    }


def dpo_loss(pol_chosen: Tensor, pol_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float = 0.1) -> LossOutput:
    """DPO on summed log-probs: ``u = β[(logπθ(y_w) − logπref(y_w)) − (logπθ(y_l) − logπref(y_l))]``.

    Rewards ``β(logπθ(y) − logπref(y))``.  The reference values may come from the cache or a resident model.
    """
    rewards_chosen = beta * (pol_chosen - ref_chosen)
    rewards_rejected = beta * (pol_rejected - ref_rejected)
    u = rewards_chosen - rewards_rejected
    return _nll_sigmoid(u), _metrics(u, rewards_chosen, rewards_rejected, pol_chosen, pol_rejected)


def simpo_loss(
    pol_avg_chosen: Tensor, pol_avg_rejected: Tensor, beta: float = 2.0, gamma: float = 1.0, gamma_is_ratio: bool = False
) -> LossOutput:
    """SimPO: ``u = β·avg logπθ(y_w) − β·avg logπθ(y_l) − γ``.

    ``gamma`` is the paper's absolute margin γ (default 1.0 with β = 2).  With ``gamma_is_ratio=True`` it is the
    SimPO code's ``gamma_beta_ratio`` = γ/β, so the margin is ``gamma · beta`` (0.5 · 2 = 1.0 gives the same loss).
    Rewards ``β·avg logπθ(y)``; the margin γ is not part of the rewards.
    """
    margin = gamma * beta if gamma_is_ratio else gamma
    rewards_chosen = beta * pol_avg_chosen
    rewards_rejected = beta * pol_avg_rejected
    u = rewards_chosen - rewards_rejected - margin
    return _nll_sigmoid(u), _metrics(u, rewards_chosen, rewards_rejected, pol_avg_chosen, pol_avg_rejected)


def tdpo_loss(
    pol_chosen: Tensor,
    pol_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    kl_chosen: Tensor,
    kl_rejected: Tensor,
    beta: float = 0.1,
    alpha: float = 0.5,
    variant: Literal[1, 2] = 2,
) -> LossOutput:
    """TDPO on summed log-probs and sequential KLs (:func:`sequential_kl`), ``lr_y = logπθ(y) − logπref(y)``:

    - TDPO1: ``u = β[(lr_w − lr_l) − (KL_l − KL_w)]`` (``alpha`` unused);
    - TDPO2: ``u = β[(lr_w − lr_l) − α(KL_l − sg(KL_w))]``.

    Rewards follow the TDPO authors' code: ``β(lr_y + KL_y)``.
    """
    if variant not in (1, 2):
        raise ValueError(f"TDPO variant must be 1 or 2, got {variant!r}")
    lr_w, lr_l = pol_chosen - ref_chosen, pol_rejected - ref_rejected
    if variant == 1:
        u = beta * ((lr_w - lr_l) - (kl_rejected - kl_chosen))
    else:
        u = beta * ((lr_w - lr_l) - alpha * (kl_rejected - kl_chosen.detach()))
    metrics = _metrics(u, beta * (lr_w + kl_chosen), beta * (lr_l + kl_rejected), pol_chosen, pol_rejected)
    metrics["kl_chosen"] = kl_chosen.detach().float().mean()
    metrics["kl_rejected"] = kl_rejected.detach().float().mean()
    return _nll_sigmoid(u), metrics


def fpo_loss(
    pol_avg_chosen: Tensor,
    pol_avg_rejected: Tensor,
    ref_avg_chosen: Tensor,
    ref_avg_rejected: Tensor,
    pol_codes_chosen: Tensor | PooledCodes,
    pol_codes_rejected: Tensor | PooledCodes,
    ref_codes_chosen: SparseCodes,
    ref_codes_rejected: SparseCodes,
    beta: float = 0.1,
    alpha: float = 0.5,
    k: int = 50,
    topk_mode: TopkMode = "union",
    stop_grad_chosen: bool = True,
) -> LossOutput:
    """FPO: ``u = β[(avg logπθ(y_w) − avg logπθ(y_l)) − (avg logπref(y_w) − avg logπref(y_l))]
    − α·β·(D_l − sg(D_w))``, with ``D`` from :func:`feature_distance` (sg only when ``stop_grad_chosen``).

    Policy codes are the pooled ``c̄θ`` (a dense ``[B, d_sae]`` tensor or :class:`PooledCodes` over a column
    subset); reference codes are the cached sparse ``c̄ref``.  Rewards ``β(avg logπθ(y) − avg logπref(y))``.
    """
    pol_w = pol_codes_chosen if isinstance(pol_codes_chosen, PooledCodes) else PooledCodes(pol_codes_chosen)
    pol_l = pol_codes_rejected if isinstance(pol_codes_rejected, PooledCodes) else PooledCodes(pol_codes_rejected)
    d_w, overlap_w = feature_distance(pol_w, ref_codes_chosen, k, topk_mode)
    d_l, overlap_l = feature_distance(pol_l, ref_codes_rejected, k, topk_mode)
    if stop_grad_chosen:
        d_w = d_w.detach()

    rewards_chosen = beta * (pol_avg_chosen - ref_avg_chosen)
    rewards_rejected = beta * (pol_avg_rejected - ref_avg_rejected)
    u = (rewards_chosen - rewards_rejected) - alpha * beta * (d_l - d_w)
    metrics = _metrics(u, rewards_chosen, rewards_rejected, pol_avg_chosen, pol_avg_rejected)
    metrics["feature_mse_chosen"] = d_w.detach().mean()
    metrics["feature_mse_rejected"] = d_l.detach().mean()
    metrics["topk_overlap"] = torch.cat([overlap_w, overlap_l]).mean()
    return _nll_sigmoid(u), metrics


# ---------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """What a loss needs at train time, and its default hyper-parameters (keyword arguments of ``fn``).

    ``needs``: where the reference values come from — the offline ``cache``, a resident ``reference_model``,
    or ``none`` (reference-free).  ``needs_ref_logits``: full-vocabulary reference logits (TDPO's KL).
    """

    name: str
    fn: Callable[..., LossOutput]
    needs: Literal["cache", "reference_model", "none"]
    needs_sae: bool = False
    needs_ref_logits: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))


LOSSES: dict[str, LossSpec] = {
    s.name: s
    for s in (
        LossSpec(
            "fpo",
            fpo_loss,
            "cache",
            needs_sae=True,
            defaults={"beta": 0.1, "alpha": 0.5, "k": 50, "topk_mode": "union", "stop_grad_chosen": True},
        ),
        LossSpec("dpo", dpo_loss, "cache", defaults={"beta": 0.1}),
        LossSpec("simpo", simpo_loss, "none", defaults={"beta": 2.0, "gamma": 1.0, "gamma_is_ratio": False}),
        LossSpec("dpo-online", dpo_loss, "reference_model", defaults={"beta": 0.1}),
        LossSpec("tdpo1", partial(tdpo_loss, variant=1), "reference_model", needs_ref_logits=True, defaults={"beta": 0.1}),
        LossSpec(
            "tdpo2",
            partial(tdpo_loss, variant=2),
            "reference_model",
            needs_ref_logits=True,
            defaults={"beta": 0.1, "alpha": 0.5},
        ),
    )
}


def _names(names: Sequence[str]) -> str:
    return "/".join(names)


def check_loss_requirements(name: str, have_cache: bool, have_reference_model: bool, have_sae: bool) -> LossSpec:
    """Return ``LOSSES[name]``, or raise ``ValueError`` saying what to change if the run lacks what it needs."""
    spec = LOSSES.get(name)
    if spec is None:
        raise ValueError(f"unknown loss {name!r}; choose one of {_names(list(LOSSES))}")
    if spec.needs == "cache" and not have_cache:
        raise ValueError(
            f"loss {name!r} needs an offline reference cache (cached reference log-probs"
            f"{' and pooled SAE codes' if spec.needs_sae else ''}); build one with `python -m fpo_dist.cache` and "
            f"pass --cache PATH, or choose {_names([n for n, s in LOSSES.items() if s.needs != 'cache'])}"
        )
    if spec.needs == "reference_model" and not have_reference_model:
        why = (
            " (the cache holds no full-vocabulary reference distributions)"
            if spec.needs_ref_logits
            else " (it computes reference log-probs online)"
        )
        raise ValueError(
            f"loss {name!r} needs a resident reference model{why}; pass --ref_model.name_or_path MODEL, "
            f"or choose {_names([n for n, s in LOSSES.items() if s.needs != 'reference_model'])}"
        )
    if spec.needs_sae and not have_sae:
        raise ValueError(
            f"loss {name!r} needs the SAE the cache was built with; pass --sae.source (a sae-lens release with "
            "--sae.sae_id, or a local SAE directory), or choose a loss without feature terms "
            f"({_names([n for n, s in LOSSES.items() if not s.needs_sae])})"
        )
    return spec
