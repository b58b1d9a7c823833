"""Preference losses (DPO, SimPO, TDPO1/2, FPO) as pure functions of tensors, their metrics, and the registry
through which the trainer uses them.

Imports only torch and the standard library, so these functions (and their tests) run anywhere.

Conventions (the math with every paper-vs-code choice: ``docs/method.md``):

- Log-probs, masks and the TDPO KL come from :mod:`fpo_dist.logprobs` (re-exported here): token ``t`` is
  predicted at position ``t − 1`` (:func:`prediction_mask`), one mask for log-probs, the KL and SAE pooling.
- Every loss is ``L = −mean_b log σ(u_b)`` and returns ``(loss, metrics)``; metrics are detached scalars.
- ``reward_accuracy`` is pairwise: pair ``b``'s chosen reward against pair ``b``'s own rejected reward, strictly
  greater (ties count as wrong).  ``margin`` is the batch mean of ``u`` (the logit inside σ);
  ``reward_margin`` is the batch mean of ``rewards_chosen − rewards_rejected`` (for FPO: the margin term of ``u``,
  beside its ``feature_term``; see :func:`fpo_loss`).
- The seam to the trainer: the forward pass (:mod:`fpo_dist.forward`) turns a micro-batch into
  :class:`Quantities`; a registered :class:`LossSpec` declares which quantities it needs and its
  hyper-parameters with their defaults, and maps the quantities to ``(loss, metrics)``.  Add a loss with
  :func:`register_loss` (from a module named in the train config's ``plugins``, or here for a built-in one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fpo_dist.domains import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Interval
from fpo_dist.logprobs import (  # noqa: F401  (re-exported: the log-prob half of the losses' inputs)
    CHUNK_BUDGET_BYTES,
    auto_chunk_size,
    prediction_mask,
    sequence_logps,
    sequential_kl,
    token_logps,
    upcast,
)

LossOutput = tuple[Tensor, dict[str, Tensor]]
TopkMode = Literal["union", "policy"]

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
    vals = upcast(pol.values)
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

    The two terms of ``u_b = m_b − f_b``, logged separately (batch means; ``margin = reward_margin − feature_term``):
    the margin term ``m_b = rewards_chosen_b − rewards_rejected_b`` is ``reward_margin`` (as for every loss), with
    ``reward_margin_abs = mean_b |m_b|``; the feature term ``f_b = α·β·(D_l,b − D_w,b)`` is ``feature_term``, with
    ``feature_term_abs = mean_b |f_b|``.  The magnitudes are what :mod:`fpo_dist.diagnostics` compares (a signed
    batch mean can be near 0 while every pair's term is large).
    """
    pol_w = pol_codes_chosen if isinstance(pol_codes_chosen, PooledCodes) else PooledCodes(pol_codes_chosen)
    pol_l = pol_codes_rejected if isinstance(pol_codes_rejected, PooledCodes) else PooledCodes(pol_codes_rejected)
    d_w, overlap_w = feature_distance(pol_w, ref_codes_chosen, k, topk_mode)
    d_l, overlap_l = feature_distance(pol_l, ref_codes_rejected, k, topk_mode)
    if stop_grad_chosen:
        d_w = d_w.detach()

    rewards_chosen = beta * (pol_avg_chosen - ref_avg_chosen)
    rewards_rejected = beta * (pol_avg_rejected - ref_avg_rejected)
    margin_term = rewards_chosen - rewards_rejected
    feature_term = alpha * beta * (d_l - d_w)
    u = margin_term - feature_term
    metrics = _metrics(u, rewards_chosen, rewards_rejected, pol_avg_chosen, pol_avg_rejected)
    metrics["reward_margin_abs"] = margin_term.detach().float().abs().mean()
    metrics["feature_term"] = feature_term.detach().float().mean()
    metrics["feature_term_abs"] = feature_term.detach().float().abs().mean()
    metrics["feature_mse_chosen"] = d_w.detach().mean()
    metrics["feature_mse_rejected"] = d_l.detach().mean()
    metrics["topk_overlap"] = torch.cat([overlap_w, overlap_l]).mean()
    return _nll_sigmoid(u), metrics


# ---------------------------------------------------------------------------------------------------------
# The seam: per-sequence quantities → (loss, metrics)
# ---------------------------------------------------------------------------------------------------------

Pair = tuple[Tensor, Tensor]  # (chosen, rejected), each [B]


@dataclass(frozen=True)
class Quantities:
    """What the forward pass (:func:`fpo_dist.forward.forward_quantities`) computed for ``B`` pairs.

    Each field is ``(chosen, rejected)``; those the loss did not ask for are None.
    ``logps``/``n_tokens``: the policy's ``log πθ(y|x)`` summed over response tokens and ``|y|``;
    ``ref_logps``/``ref_n_tokens``: the reference's, from the cache or a resident reference model;
    ``codes``: pooled policy SAE codes; ``ref_codes``: the cached sparse reference codes;
    ``kl``: TDPO's sequential KL(π_ref ‖ πθ) per sequence.
    """

    logps: Pair
    n_tokens: Pair
    ref_logps: Pair | None = None
    ref_n_tokens: Pair | None = None
    codes: tuple[PooledCodes, PooledCodes] | None = None
    ref_codes: tuple[SparseCodes, SparseCodes] | None = None
    kl: Pair | None = None

    @property
    def avg_logps(self) -> Pair:
        """``log πθ(y|x) / max(|y|, 1)`` (length-normalised, SimPO/FPO)."""
        return _avg(self.logps, self.n_tokens)

    @property
    def ref_avg_logps(self) -> Pair:
        return _avg(_need(self.ref_logps, "ref_logps"), _need(self.ref_n_tokens, "ref_n_tokens"))


def _avg(sums: Pair, counts: Pair) -> Pair:
    return sums[0] / counts[0].clamp(min=1), sums[1] / counts[1].clamp(min=1)


def _need(value: Any, name: str) -> Any:
    if value is None:
        raise ValueError(f"the loss needs '{name}' but the forward pass did not compute it: declare it in its LossSpec")
    return value


# ---------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """A loss as the trainer sees it: what it needs, its hyper-parameters, and how quantities become its inputs.

    ``fn`` is the pure loss function; ``inputs`` picks its positional tensors from :class:`Quantities`;
    ``defaults`` are its keyword hyper-parameters (the one place their defaults live).
    ``needs``: where the reference values come from — the offline ``cache``, a resident ``reference_model``,
    or ``none`` (reference-free).  ``needs_sae``: pooled policy SAE codes at the cache's hook layer (the forward
    pass also hands over the cached reference codes).  ``needs_ref_logits``: full-vocabulary reference logits,
    for the sequential KL.  ``needs_ref_topm``: the sequential KL against the cache's top-M reference
    distributions instead (``needs == "cache"``; a store built with ``--ref_topm M``).  ``choices``: allowed values of a hyper-parameter; ``domains``: the
    :class:`~fpo_dist.domains.Interval` of each numeric one (every int/float hyper-parameter must declare one — use
    ``fpo_dist.domains.ANY`` for an unconstrained one — and its default must lie in it), checked by the config before
    any work.
    ``forward_defaults``: options of the forward pass, not of ``fn`` (FPO's ``encode_selected``);
    ``feature_columns(params)``: ``(k, topk_mode)`` when only the SAE columns a top-k term reads need gradients.
    """

    name: str
    fn: Callable[..., LossOutput]
    needs: Literal["cache", "reference_model", "none"]
    inputs: Callable[[Quantities], tuple] = lambda q: (*q.logps, *_need(q.ref_logps, "ref_logps"))
    needs_sae: bool = False
    needs_ref_logits: bool = False
    needs_ref_topm: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)
    choices: Mapping[str, tuple] = field(default_factory=dict)
    domains: Mapping[str, Interval] = field(default_factory=dict)
    forward_defaults: Mapping[str, Any] = field(default_factory=dict)
    feature_columns: Callable[[Mapping[str, Any]], tuple[int, str] | None] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "forward_defaults", MappingProxyType(dict(self.forward_defaults)))
        if self.needs not in ("cache", "reference_model", "none"):
            raise ValueError(f"loss {self.name!r}: needs must be cache/reference_model/none, got {self.needs!r}")
        if self.needs_ref_logits and self.needs != "reference_model":
            raise ValueError(f"loss {self.name!r}: full-vocabulary reference logits need a resident reference model")
        if self.needs_ref_topm and (self.needs != "cache" or self.needs_ref_logits):
            raise ValueError(f"loss {self.name!r}: the cached top-M reference distributions come from the cache "
                             "(needs='cache', not with needs_ref_logits)")
        object.__setattr__(self, "domains", MappingProxyType(dict(self.domains)))
        params = self.hyper_parameters
        for key, default in params.items():
            numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
            if numeric and key not in self.domains:
                raise ValueError(f"loss {self.name!r}: numeric hyper-parameter {key!r} declares no domain; add "
                                 f"domains={{{key!r}: Interval(...)}} (fpo_dist.domains; ANY for an unconstrained one)")
            if key in self.domains and default not in self.domains[key]:
                raise ValueError(f"loss {self.name!r}: the default {key}={default!r} is outside its domain "
                                 f"({self.domains[key]})")
        if set(self.domains) - set(params):
            raise ValueError(f"loss {self.name!r}: domains for undeclared hyper-parameters {sorted(set(self.domains) - set(params))}")

    @property
    def hyper_parameters(self) -> dict[str, Any]:
        """Every hyper-parameter a run may set for this loss, with its default."""
        return {**self.defaults, **self.forward_defaults}

    def __call__(self, q: Quantities, params: Mapping[str, Any]) -> LossOutput:
        """``(loss, metrics)`` from the forward pass's quantities and the run's resolved hyper-parameters."""
        return self.fn(*self.inputs(q), **{k: v for k, v in params.items() if k in self.defaults})


LOSSES: dict[str, LossSpec] = {}


def register_loss(spec: LossSpec, replace: bool = False) -> LossSpec:
    """Add ``spec`` to :data:`LOSSES` (the train config's ``loss.name`` choices come from here)."""
    if spec.name in LOSSES and not replace:
        raise ValueError(f"a loss named {spec.name!r} is already registered; pass replace=True to override it")
    LOSSES[spec.name] = spec
    return spec


def hyper_parameter_types() -> dict[str, Any]:
    """Every hyper-parameter any registered loss declares → its type (from the default) or its choices."""
    out: dict[str, Any] = {}
    for spec in LOSSES.values():
        for key, default in spec.hyper_parameters.items():
            out.setdefault(key, tuple(spec.choices[key]) if key in spec.choices else type(default))
    return out


def _fpo_inputs(q: Quantities) -> tuple:
    codes, ref_codes = _need(q.codes, "codes"), _need(q.ref_codes, "ref_codes")
    return (*q.avg_logps, *q.ref_avg_logps, *codes, *ref_codes)


def _tdpo_inputs(q: Quantities) -> tuple:
    return (*q.logps, *_need(q.ref_logps, "ref_logps"), *_need(q.kl, "kl"))


for _spec in (
    LossSpec(
        "fpo", fpo_loss, "cache", inputs=_fpo_inputs, needs_sae=True,
        defaults={"beta": 0.1, "alpha": 0.5, "k": 50, "topk_mode": "union", "stop_grad_chosen": True},
        choices={"topk_mode": ("union", "policy")},
        domains={"beta": POSITIVE, "alpha": NON_NEGATIVE, "k": AT_LEAST_ONE},
        forward_defaults={"encode_selected": True},
        feature_columns=lambda p: (p["k"], p["topk_mode"]) if p["encode_selected"] else None,
    ),
    LossSpec("dpo", dpo_loss, "cache", defaults={"beta": 0.1}, domains={"beta": POSITIVE}),
    LossSpec("simpo", simpo_loss, "none", inputs=lambda q: q.avg_logps,
             defaults={"beta": 2.0, "gamma": 1.0, "gamma_is_ratio": False},
             domains={"beta": POSITIVE, "gamma": NON_NEGATIVE}),
    LossSpec("dpo-online", dpo_loss, "reference_model", defaults={"beta": 0.1}, domains={"beta": POSITIVE}),
    LossSpec("tdpo1", partial(tdpo_loss, variant=1), "reference_model", inputs=_tdpo_inputs, needs_ref_logits=True,
             defaults={"beta": 0.1}, domains={"beta": POSITIVE}),
    LossSpec("tdpo2", partial(tdpo_loss, variant=2), "reference_model", inputs=_tdpo_inputs, needs_ref_logits=True,
             defaults={"beta": 0.1, "alpha": 0.5}, domains={"beta": POSITIVE, "alpha": NON_NEGATIVE}),
    # offline TDPO: the same losses, the KL from the cache's top-M reference distributions + one tail bucket (a
    # lower bound of the exact KL, equal to it when M is the vocabulary); no resident reference model
    LossSpec("tdpo1-offline", partial(tdpo_loss, variant=1), "cache", inputs=_tdpo_inputs, needs_ref_topm=True,
             defaults={"beta": 0.1}, domains={"beta": POSITIVE}),
    LossSpec("tdpo2-offline", partial(tdpo_loss, variant=2), "cache", inputs=_tdpo_inputs, needs_ref_topm=True,
             defaults={"beta": 0.1, "alpha": 0.5}, domains={"beta": POSITIVE, "alpha": NON_NEGATIVE}),
):
    register_loss(_spec)


def _names(names: Sequence[str]) -> str:
    return "/".join(names)


def check_loss_requirements(name: str, have_cache: bool, have_reference_model: bool, have_sae: bool,
                            cache_topm: int = 0) -> LossSpec:
    """Return ``LOSSES[name]``, or raise ``ValueError`` saying what to change if the run lacks what it needs
    (``cache_topm``: the M of the cache's top-M reference distributions, 0 without them)."""
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
            " (the cache holds no full-vocabulary reference distributions; "
            f"{name}-offline trains on the cache's top-M ones, built with --ref_topm M)"
            if spec.needs_ref_logits
            else " (it computes reference log-probs online)"
        )
        raise ValueError(
            f"loss {name!r} needs a resident reference model{why}; pass --ref_model.name_or_path MODEL, "
            f"or choose {_names([n for n, s in LOSSES.items() if s.needs != 'reference_model'])}"
        )
    if spec.needs_ref_topm and not cache_topm:
        raise ValueError(
            f"loss {name!r} needs the reference's top-M next-token distributions in the cache, and the cache has "
            f"none: rebuild it with --ref_topm M (e.g. 128), or train {name.removesuffix('-offline')} with a "
            "resident reference model (--ref_model.name_or_path)"
        )
    if spec.needs_sae and not have_sae:
        raise ValueError(
            f"loss {name!r} needs the SAE the cache was built with; pass --sae.source (a sae-lens release with "
            "--sae.sae_id, or a local SAE directory), or choose a loss without feature terms "
            f"({_names([n for n, s in LOSSES.items() if not s.needs_sae])})"
        )
    return spec
