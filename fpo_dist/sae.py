"""Frozen sae-lens SAEs: loading, encoding (all features, or only selected columns), pooling, sparse export.

``sae_lens`` is imported lazily inside the functions that need it, so importing this module is cheap.
SAE parameters are frozen; gradients flow only into the hidden states ``h``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from fpo_dist.losses import SparseCodes, TopkMode, topk_mask

if TYPE_CHECKING:
    from sae_lens import SAE


def _dtype_name(dtype: str | torch.dtype) -> str:
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype


def load_sae(
    source: str, sae_id: str | None = None, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"
) -> SAE:
    """Load a frozen (``requires_grad=False``, eval) sae-lens SAE.

    ``source`` is a local directory written by ``SAE.save_model`` (``SAE.load_from_disk``; with ``sae_id``,
    the sub-directory ``source/sae_id``) or a sae-lens release name (``SAE.from_pretrained(release, sae_id)``,
    which in sae-lens 6 returns the SAE itself).
    """
    from sae_lens import SAE

    device, dtype = str(device), _dtype_name(dtype)
    local = Path(source)
    if local.is_dir():
        if sae_id is not None:
            local = local / sae_id
            if not local.is_dir():
                raise ValueError(f"sae_id {sae_id!r} is not a sub-directory of the local SAE directory {source!r}")
        sae = SAE.load_from_disk(str(local), device=device, dtype=dtype)
    else:
        if sae_id is None:
            raise ValueError(
                f"{source!r} is not a local directory, so it is read as a sae-lens release, which needs an sae_id "
                "(e.g. release gemma-scope-2b-pt-res, sae_id layer_25/width_16k/average_l0_55)"
            )
        sae = SAE.from_pretrained(release=source, sae_id=sae_id, device=device, dtype=dtype)
        if isinstance(sae, tuple):  # sae-lens < 6 returned (sae, cfg, sparsity)
            sae = sae[0]
    sae.requires_grad_(False)
    return sae.eval()


def encode_full(sae: SAE, h: Tensor) -> Tensor:
    """All feature codes ``c = SAE_enc(h)`` ``[..., d_sae]`` (sae-lens' own ``encode``; the oracle)."""
    return sae.encode(h)


def encode_selected(sae: SAE, h: Tensor, columns: Tensor) -> Tensor:
    """Codes of the feature ``columns`` only: equal to ``sae.encode(h)[..., columns]``.

    ``pre = (h − b_dec·apply_b_dec_to_input) @ W_enc[:, cols] + b_enc[cols]`` (``h`` cast to the SAE dtype,
    like ``process_sae_in``); JumpReLU ``c = 1[pre > θ_cols]·relu(pre)``, standard ``c = relu(pre)``.
    Gradients flow into ``h`` (through active units), never into SAE parameters.  sae-lens hook points are
    bypassed.  Other architectures and activation normalisation raise ``NotImplementedError``.
    """
    from sae_lens import JumpReLUSAE, StandardSAE

    kind = type(sae)
    if kind not in (JumpReLUSAE, StandardSAE) or not isinstance(sae.activation_fn, torch.nn.ReLU):
        raise NotImplementedError(
            f"encode_selected supports sae-lens JumpReLUSAE and StandardSAE (ReLU), not {kind.__name__}; "
            "use encode_full (set loss.encode_selected false)"
        )
    if sae.cfg.normalize_activations != "none" or sae.cfg.reshape_activations != "none":
        raise NotImplementedError(
            f"encode_selected does not implement normalize_activations={sae.cfg.normalize_activations!r} / "
            f"reshape_activations={sae.cfg.reshape_activations!r}; use encode_full (set loss.encode_selected false)"
        )
    cols = columns.to(device=sae.W_enc.device, dtype=torch.long)
    x = h.to(sae.dtype)
    if sae.cfg.apply_b_dec_to_input:
        x = x - sae.b_dec.detach()
    pre = x @ sae.W_enc.detach()[:, cols] + sae.b_enc.detach()[cols]
    acts = torch.relu(pre)
    if kind is JumpReLUSAE:
        acts = acts * (pre > sae.threshold.detach()[cols]).to(acts.dtype)
    return acts


def pool_mean(codes: Tensor, mask: Tensor) -> Tensor:
    """``c̄[b] = Σ_{t: mask[b,t]} codes[b, t] / max(Σ_t mask[b,t], 1)`` in fp32 ``[B, F]``.

    Padded positions are excluded by selection (``where``), not by multiplication, so garbage there (even
    non-finite) cannot leak in.  Use ``losses.prediction_mask(response_mask)`` as the mask for hidden states.
    """
    m = mask.bool()
    summed = torch.where(m[..., None], codes.float(), 0.0).sum(dim=1)
    return summed / m.sum(dim=1, keepdim=True).clamp(min=1)


def pool_sequences(codes: Tensor, sequences: Tensor, n: int) -> Tensor:
    """``c̄[s] = Σ_{i: sequences[i] = s} codes[i] / max(|{i: sequences[i] = s}|, 1)`` in fp32 ``[n, F]``.

    ``codes [N, F]`` are the codes of the selected positions only (the hidden states at
    ``PairBatch.selection.positions``, in any layout), ``sequences [N]`` the sequence of each
    (``PairBatch.selection.sequences``).  Padded and prompt positions are never encoded, so garbage
    there (even non-finite) cannot leak in.  Equal to :func:`pool_mean` on the padded layout.
    """
    return mean_of_sums(sum_sequences(codes, sequences, n), sequences, n)


def sum_sequences(codes: Tensor, sequences: Tensor, n: int, into: Tensor | None = None) -> Tensor:
    """``Σ_{i: sequences[i] = s} codes[i]`` in fp32 ``[n, F]``, added to ``into`` when given: summing the selected
    positions block by block into one ``into`` adds them in the same order as one call (the cache's blocked SAE
    encode and the training forward pool identically)."""
    if into is None:
        into = torch.zeros(n, codes.shape[-1], dtype=torch.float32, device=codes.device)
    return into.index_add(0, sequences, codes.float())


def mean_of_sums(summed: Tensor, sequences: Tensor, n: int) -> Tensor:
    """:func:`sum_sequences`' sums divided by each sequence's count of positions (at least 1)."""
    counts = torch.bincount(sequences, minlength=n)[:n].clamp(min=1)
    return summed / counts[:, None].to(summed.dtype)


def to_sparse(pooled: Tensor) -> SparseCodes:
    """All non-zeros of pooled codes ``[B, F]`` (detached): indices int32 ascending, values fp32 — for the cache."""
    return SparseCodes.from_dense(pooled.detach())


def select_columns(
    policy_pooled: Tensor | Sequence[Tensor],
    reference: SparseCodes | Sequence[SparseCodes],
    k: int,
    topk_mode: TopkMode = "union",
) -> Tensor:
    """Ascending unique feature ids the FPO loss will read, over the whole batch.

    From the full pooled policy codes (computed under ``no_grad`` with :func:`encode_full`) and the cached
    reference codes: every row's policy top-k, plus (``union``) every row's reference top-k.  The grad path
    then runs :func:`encode_selected` on these columns and passes ``PooledCodes(values, columns)`` to the loss.
    """
    if topk_mode not in ("union", "policy"):
        raise ValueError(f"topk_mode must be 'union' or 'policy', got {topk_mode!r}")
    pols = [policy_pooled] if isinstance(policy_pooled, Tensor) else list(policy_pooled)
    refs = [reference] if isinstance(reference, SparseCodes) else list(reference)
    device = pols[0].device
    parts = [topk_mask(p, k).any(dim=0).nonzero().squeeze(-1) for p in pols]
    if topk_mode == "union":
        for ref in refs:
            ids, _, valid = ref.topk(k)
            parts.append(ids[valid].to(device))
    return torch.unique(torch.cat(parts))
