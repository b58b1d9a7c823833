"""The reference side of a batch, without gradients: what the cache stores and the step-0 check recomputes.

:func:`score_batch` runs a (frozen) model once over a :class:`fpo_dist.models.PairBatch` in any layout and
returns, per sequence, the summed log-probs of its response tokens and their count, and — given an SAE and its
layer — the mean over the same predicting positions of the SAE codes of block ℓ's residual output.  The cache
worker (:func:`fpo_dist.cache.worker.reference_pass`) and the trainer's step-0 check both call it, so the two
sides of that comparison are one computation; the training forward (:mod:`fpo_dist.forward`) computes the same
per-sequence quantities with gradients, with the same segment sums.

Only the predicting positions are encoded by the SAE (``N × d_sae``, in blocks of :data:`SAE_BLOCK_BYTES`), never
prompt or padding positions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fpo_dist.attention import expect_packed
from fpo_dist.lm_head import RefTopM, row_sums, selected_forward, unwrap
from fpo_dist.logprobs import Selection, logsumexp_outside, predicted_token_logps, upcast
from fpo_dist.models import PairBatch, capture_block_output

# SAE codes are computed in blocks of positions so that [positions, d_sae] fp32 stays under this many bytes.
SAE_BLOCK_BYTES = 256 << 20


@dataclass
class Scored:
    """Per sequence (``[0, B)`` chosen, ``[B, 2B)`` rejected) and per selected position of one batch."""

    logp_sum: Tensor  # [2B] fp32 (fp64 for an fp64 model)
    n_tokens: Tensor  # [2B] int64
    token_logps: Tensor  # [N] the log-prob of the token each selected position predicts, position order
    sequences: Tensor  # [N] the sequence of each selected position (each sequence's positions are contiguous)
    pooled: Tensor | None = None  # [2B, d_sae] fp32, when an SAE was given
    token_codes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None  # per sequence: (nnz, idx, val)
    topm: RefTopM | None = None  # [N, M] / [N]: the model's top-M next-token distributions (``topm=M``)


@torch.no_grad()
def score_batch(model, batch: PairBatch, sae=None, layer: int | None = None, *, logits: str = "selected",
                token_codes: bool = False, topm: int = 0) -> Scored:
    """Score ``batch`` with ``model`` (a transformers causal LM, or an engine around one); see the module doc.

    ``logits="selected"`` computes the output layer only at the predicting positions
    (:func:`fpo_dist.lm_head.selected_forward`); ``"materialized"`` takes the model's full ``[R, T, vocab]``
    logits (the path it replaced; for tests and benchmarks).  ``token_codes``: also the sparse SAE codes of
    every predicting position, per sequence.  ``topm=M``: also, at every predicting position, the model's M most
    probable next tokens, their log-probs and the log of the remaining mass (what offline TDPO trains on).
    """
    if logits not in ("selected", "materialized"):
        raise ValueError(f"logits must be 'selected' or 'materialized', got {logits!r}")
    sel = batch.selection
    seqs = sel.sequences
    n = batch.n_sequences
    capture = capture_block_output(unwrap(model), layer) if sae is not None else contextlib.nullcontext()
    with capture as cap:
        logps, top = _response_logps(model, batch, sel, logits, topm)
    out = Scored(row_sums(logps, seqs, n), torch.bincount(seqs, minlength=n), logps, seqs, topm=top)
    if sae is not None:
        out.pooled, out.token_codes = _pooled_codes(sae, sel.gather(cap.output), seqs, n, token_codes)
    return out


@torch.no_grad()
def max_topm_kl(model, batch: PairBatch, topm: RefTopM) -> float:
    """The largest per-position KL of cached top-M reference distributions ``topm`` (one per selected position of
    ``batch``, in its order) against ``model``'s own, coarsened alike (the training forward's chunked head): 0 up to
    rounding when ``model`` is the reference the cache was built with (the step-0 check, ``cache verify
    --recompute``)."""
    kl = selected_forward(model, batch.input_ids, batch.attention_mask, batch.selection,
                          position_ids=batch.position_ids, ref=topm).kl
    return float(kl.max()) if kl.numel() else 0.0


def nonzeros(vec: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(indices int32, values fp32)`` of a pooled vector's non-zeros, as the store keeps them."""
    nz = vec.nonzero().squeeze(-1)
    return nz.to(torch.int32).cpu().numpy(), vec[nz].float().cpu().numpy()


def _response_logps(model, batch: PairBatch, sel: Selection, logits: str, topm: int) -> tuple[Tensor, RefTopM | None]:
    """``logps [N]`` at the selected positions (in ``sel``'s order): the log-prob of the token each predicts; and
    with ``topm`` the model's top-M there."""
    if logits == "selected":
        out = selected_forward(model, batch.input_ids, batch.attention_mask, sel, position_ids=batch.position_ids,
                               topm=topm)
        return out.logps, out.topm
    if batch.shared is not None:
        raise ValueError("logits: materialized runs the packed or padded layout, not shared")
    with expect_packed(batch.position_ids is not None):
        full = model(**batch.model_inputs()).logits
    logps = predicted_token_logps(full, batch.input_ids, batch.response_mask)
    if not topm:
        return logps, None
    log_q = torch.log_softmax(upcast(full[batch.prediction_mask]), dim=-1)
    vals, ids = torch.topk(log_q, topm, dim=-1)
    return logps, RefTopM(ids, vals, logsumexp_outside(log_q, ids))


def _pooled_codes(sae, hidden: Tensor, seqs: Tensor, n: int, per_token: bool):
    """Mean-pooled SAE codes ``[n, d_sae]`` of the selected hidden states ``[N, D]``, encoded in blocks; with
    ``per_token``, each sequence's per-position sparse codes as ``(nnz per token, indices, values)``."""
    from fpo_dist.sae import encode_full, mean_of_sums, sum_sequences

    d_sae = sae.cfg.d_sae
    block = max(1, SAE_BLOCK_BYTES // (d_sae * 4))
    summed = torch.zeros(n, d_sae, dtype=torch.float32, device=hidden.device)
    nnz, idx, val = [], [], []
    for a in range(0, hidden.shape[0], block):
        codes = encode_full(sae, hidden[a : a + block]).float()
        summed = sum_sequences(codes, seqs[a : a + block], n, summed)
        if per_token:
            nz = codes.nonzero()
            nnz.append((codes != 0).sum(-1).to(torch.int32).cpu())
            idx.append(nz[:, 1].to(torch.int32).cpu())
            val.append(codes[nz[:, 0], nz[:, 1]].cpu())
    pooled = mean_of_sums(summed, seqs, n)
    return pooled, (_split_per_sequence(seqs.cpu(), nnz, idx, val, n) if per_token else None)


def _split_per_sequence(seqs: Tensor, nnz: list, idx: list, val: list, n: int) -> list[tuple]:
    tokens = torch.cat(nnz) if nnz else torch.zeros(0, dtype=torch.int32)
    indices = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int32)
    values = torch.cat(val) if val else torch.zeros(0)
    per_seq = torch.bincount(seqs, minlength=n).tolist()
    out, t0, v0 = [], 0, 0
    for count in per_seq:  # each sequence's positions are contiguous and in sequence order
        t = tokens[t0 : t0 + count]
        k = int(t.sum())
        out.append((t.numpy(), indices[v0 : v0 + k].numpy(), values[v0 : v0 + k].float().numpy()))
        t0, v0 = t0 + count, v0 + k
    return out
