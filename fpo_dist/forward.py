"""The forward path of training: one micro-batch → the per-sequence quantities a loss uses.

:func:`forward_quantities` runs the policy once over the micro-batch (chosen and rejected rows together) and
computes only what the loss's :class:`~fpo_dist.losses.LossSpec` declares:

- always the policy's summed response log-probs and token counts, from the output layer applied only at the
  positions that predict a response token (:mod:`fpo_dist.lm_head`; ``logits="materialized"`` keeps the full
  ``[rows, T, V]`` logits path it replaces, for comparisons);
- the reference's from the micro-batch's cached values (``needs == "cache"``, with the cached pooled SAE codes) or
  from a resident reference model (``needs == "reference_model"``, one no-grad forward);
- pooled policy SAE codes at the hook layer (``needs_sae``), through the selected ``W_enc`` columns only when the
  loss names its top-k columns (``feature_columns``);
- TDPO's sequential KL over the full vocabulary at the same positions (``needs_ref_logits``), from the
  reference's selected hidden states and its head, chunk by chunk; or offline (``needs_ref_topm``) against the
  micro-batch's cached top-M reference distributions plus their tail bucket, in the same chunked pass.

The result is a :class:`~fpo_dist.losses.Quantities`; the loss maps it to ``(loss, metrics)``.  Nothing here
branches on a loss's name.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from fpo_dist.attention import expect_packed
from fpo_dist.lm_head import ref_head, row_sums, selected_forward
from fpo_dist.logprobs import position_kl, predicted_token_logps, topm_kl, upcast
from fpo_dist.losses import LossSpec, PooledCodes, Quantities
from fpo_dist.models import capture_block_output


@dataclass
class LossContext:
    """A run's loss with everything its forward pass needs besides the policy and the micro-batch."""

    spec: LossSpec
    params: Mapping[str, Any] = field(default_factory=dict)  # resolved hyper-parameters (``LossConfig.params``)
    sae: Any = None  # the frozen SAE (``spec.needs_sae``)
    layer: int | None = None  # the hook layer ℓ (``spec.needs_sae``)
    reference: Any = None  # a callable resident reference model (``spec.needs == "reference_model"``)
    logits: str = "selected"  # "selected": fpo_dist.lm_head (response positions only); "materialized": full logits

    def __call__(self, policy, mb) -> tuple[torch.Tensor, dict]:
        """``(loss, metrics)`` of ``policy`` on micro-batch ``mb``."""
        return self.spec(forward_quantities(policy, mb, self), self.params)


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0] // 2
    return x[:n], x[n:]


@dataclass
class _PerPosition:
    """One forward's values at the selected positions (``batch.selection``'s order), before the segment sums."""

    logps: torch.Tensor  # [N] the policy's log-prob of each predicted response token
    ref_logps: torch.Tensor | None = None  # [N] the resident reference's (needs == "reference_model")
    kl: torch.Tensor | None = None  # [N] KL(reference ‖ policy) over the vocabulary (needs_ref_logits)
    hidden: torch.Tensor | None = None  # [N, D] block ℓ's output (needs_sae)


def forward_quantities(policy, mb, ctx: LossContext) -> Quantities:
    """Forward ``policy`` on ``mb`` (a :class:`fpo_dist.loader.MicroBatch`, any layout) and gather what
    ``ctx.spec`` needs.  Per-sequence values are segment sums over the selected (predicting) positions; the two
    ``logits`` paths differ only in how they get the per-position values (:func:`_selected`,
    :func:`_materialized`)."""
    batch, spec = mb.layout, ctx.spec
    sel = batch.selection
    seqs, n = sel.sequences, batch.n_sequences
    per = (_materialized if ctx.logits == "materialized" else _selected)(policy, batch, sel, ctx, mb.ref_topm)
    n_tok = torch.bincount(seqs, minlength=n)

    def sums(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _split(row_sums(values, seqs, n))

    q: dict[str, Any] = {"logps": sums(per.logps), "n_tokens": _split(n_tok)}
    if per.ref_logps is not None:
        q["ref_logps"], q["ref_n_tokens"] = sums(per.ref_logps), _split(n_tok)
    if per.kl is not None:
        q["kl"] = sums(per.kl)
    _cached_reference(q, mb, spec)
    if spec.needs_sae:
        q["codes"] = _policy_codes(ctx, per.hidden, seqs, n, q)
    return Quantities(**q)


def _selected(policy, batch, sel, ctx: LossContext, topm) -> _PerPosition:
    """The output layer only at the selected positions (:func:`fpo_dist.lm_head.selected_forward`), the
    reference's first (no grad) when it is resident, its selected hidden states feeding the TDPO KL."""
    spec = ctx.spec
    args = (batch.input_ids, batch.attention_mask, sel)
    ref_logps = ref = None
    if spec.needs == "reference_model":
        with torch.no_grad():
            r = selected_forward(ctx.reference, *args, position_ids=batch.position_ids)
        ref_logps = r.logps
        if spec.needs_ref_logits:
            ref = ref_head(ctx.reference, r.hidden)
    if spec.needs_ref_topm:
        ref = _cached_topm(topm, sel)
    with _maybe_capture(policy, ctx) as cap:
        out = selected_forward(policy, *args, position_ids=batch.position_ids, ref=ref)
    return _PerPosition(out.logps, ref_logps, out.kl if ref is not None else None,
                        sel.gather(cap.output) if spec.needs_sae else None)


def _cached_topm(topm, sel):
    """The micro-batch's cached top-M reference distributions, one per selected position: both are in sequence
    order, each response's tokens in order (``Selection``), so they line up when their counts do."""
    if topm is None:
        raise ValueError("the loss needs the cache's top-M reference distributions but the micro-batch has none: "
                         "read it with ref_topm=True (CacheLoader, read_rows)")
    if len(topm.tail) != len(sel.positions):
        raise ValueError(f"the micro-batch has cached top-M distributions for {len(topm.tail)} response tokens but "
                         f"its layout scores {len(sel.positions)}: the cache and the batch disagree")
    return topm


def _materialized(policy, batch, sel, ctx: LossContext, topm) -> _PerPosition:
    """The path :func:`_selected` replaces: full ``[R, T, V]`` logits of both models (kept for comparisons and
    benchmarks: ``logits: materialized``; the packed and padded layouts, whose selection is a mask)."""
    if batch.shared is not None:
        raise ValueError("logits: materialized runs the packed or padded layout, not shared (--batch_layout)")
    spec = ctx.spec
    pm = batch.prediction_mask
    fwd = batch.model_inputs()
    with _maybe_capture(policy, ctx) as cap, expect_packed(batch.position_ids is not None):
        logits = policy(**fwd).logits
    per = _PerPosition(predicted_token_logps(logits, batch.input_ids, batch.response_mask))
    if spec.needs == "reference_model":
        with torch.no_grad(), expect_packed(batch.position_ids is not None):
            ref_logits = ctx.reference(**fwd).logits
        per.ref_logps = predicted_token_logps(ref_logits, batch.input_ids, batch.response_mask)
        if spec.needs_ref_logits:
            per.kl = position_kl(ref_logits, logits)[pm]
    if spec.needs_ref_topm:
        t = _cached_topm(topm, sel)
        per.kl = topm_kl(upcast(logits[pm]), t.ids, t.logps, t.tail)[0]  # autograd through the full logits
    if spec.needs_sae:
        per.hidden = cap.output[pm]
    return per


def _maybe_capture(policy, ctx: LossContext):
    if not ctx.spec.needs_sae:
        return contextlib.nullcontext()
    return capture_block_output(getattr(policy, "module", policy), ctx.layer)


def _cached_reference(q: dict, mb, spec: LossSpec) -> None:
    if spec.needs == "cache":
        q["ref_logps"] = (mb.ref_logp_sum[:, 0], mb.ref_logp_sum[:, 1])
        q["ref_n_tokens"] = (mb.ref_n_tokens[:, 0], mb.ref_n_tokens[:, 1])
        q["ref_codes"] = (mb.ref_codes_chosen, mb.ref_codes_rejected)


def _policy_codes(ctx: LossContext, hidden: torch.Tensor, seqs: torch.Tensor, n: int, q: dict):
    columns = ctx.spec.feature_columns(ctx.params) if ctx.spec.feature_columns else None
    return pooled_policy_codes(ctx.sae, hidden, seqs, n, q.get("ref_codes") or (), columns)


def pooled_policy_codes(sae, hidden: torch.Tensor, seqs: torch.Tensor, n_sequences: int, refs,
                        columns: tuple[int, str] | None):
    """Pooled policy SAE codes for chosen (sequences [0,B)) and rejected ([B,2B)) as ``PooledCodes``, from the
    hidden states ``[N, D]`` at the predicting positions and the sequence ``seqs [N]`` (of ``n_sequences``) of each.

    ``columns = (k, topk_mode)``: pick the needed feature columns under no_grad (every sequence's policy top-k,
    plus the reference top-k for ``union``) and run the grad path through those columns of ``W_enc`` only;
    None: encode every feature with gradients.
    """
    from fpo_dist.sae import encode_full, encode_selected, pool_sequences, select_columns

    n2, n = n_sequences, n_sequences // 2
    if columns is None:
        pooled = pool_sequences(encode_full(sae, hidden), seqs, n2)
        return PooledCodes(pooled[:n]), PooledCodes(pooled[n:])
    k, mode = columns
    with torch.no_grad():
        full = pool_sequences(encode_full(sae, hidden.detach()), seqs, n2)
    cols = select_columns([full[:n], full[n:]], list(refs), k, mode)
    pooled = pool_sequences(encode_selected(sae, hidden, cols), seqs, n2)
    return PooledCodes(pooled[:n], cols), PooledCodes(pooled[n:], cols)
