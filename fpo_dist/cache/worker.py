"""The cache worker: one frozen reference model + SAE, turning shards of rows into store regions.

:func:`reference_pass` is the computation (one no-grad forward per batch, chosen and rejected rows
together, the output layer only at the positions that predict response tokens (:mod:`fpo_dist.lm_head`), block-ℓ
residual hook, SAE encoding on the worker's device, mean pooling over the positions
that predict response tokens).  :class:`CacheWorker` wraps it with loading and shard I/O; the driver
runs it as a Ray actor, tests and ``verify`` run it in-process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from fpo_dist.config import CacheConfig
from fpo_dist.data import BadRowError, PairTokenizer, TokenizedPair, load_source
from fpo_dist.lm_head import row_sums, selected_forward
from fpo_dist.logprobs import token_logps
from fpo_dist.losses import prediction_mask
from fpo_dist.models import (
    build_batch,
    capture_block_output,
    load_causal_lm,
    load_tokenizer,
    model_spec,
    pad_token_id,
    tokenizer_spec,
)
from fpo_dist.sae import encode_full, load_sae, pool_mean

# SAE codes are computed in row groups so that [rows, T, d_sae] fp32 stays under this many bytes.
SAE_BLOCK_BYTES = 256 << 20


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but this worker sees no GPU")
    return torch.device(device)


@dataclass
class PairOutputs:
    """Per pair, (chosen, rejected): reference log-prob sums, token counts, pooled SAE non-zeros, extras."""

    logp_sum: list[tuple[float, float]]
    n_tokens: list[tuple[int, int]]
    pooled: list[tuple[tuple, tuple]]  # ((idx_c, val_c), (idx_r, val_r)) numpy arrays
    token_logps: list[tuple] | None = None
    token_codes: list[tuple] | None = None


@torch.no_grad()
def reference_pass(
    model,
    sae,
    layer: int,
    pairs: list[TokenizedPair],
    pad_id: int,
    batch_size: int,
    per_token_logps: bool = False,
    per_token_codes: bool = False,
    logits: str = "selected",
) -> PairOutputs:
    """Reference log-probs and pooled SAE codes for ``pairs`` (in the order given).

    Pairs are batched in a fixed, length-sorted order that depends only on ``pairs``, so the same shard
    gives bit-identical results on any worker.  ``logits="selected"`` (what the cache job runs) computes the
    output layer only where a response token is predicted (:func:`fpo_dist.lm_head.selected_forward`);
    ``"materialized"`` takes the model's full ``[rows, T, vocab]`` logits (the path it replaced; for tests
    and benchmarks).  Both sum the same per-token values in the same order.
    """
    if logits not in ("selected", "materialized"):
        raise ValueError(f"logits must be 'selected' or 'materialized', got {logits!r}")
    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i].prompt_ids) + max(len(pairs[i].chosen_ids), len(pairs[i].rejected_ids)), i))
    results: dict[int, tuple] = {}
    for b0 in range(0, len(order), batch_size):
        idx = order[b0 : b0 + batch_size]
        batch = build_batch([pairs[i] for i in idx], pad_id)
        input_ids = batch.input_ids.to(device)
        attention = batch.attention_mask.to(device)
        response = batch.response_mask.to(device)
        pm = prediction_mask(response)
        with capture_block_output(model, layer) as cap:
            logps, rows = _response_logps(model, input_ids, attention, response, pm, logits)
        per_tok = torch.zeros(pm.shape, dtype=logps.dtype, device=device)
        per_tok[torch.roll(pm, 1, dims=1)] = logps  # token t's log-prob at t (pm[:, T-1] is never set)
        pooled, tok_codes = _pooled_codes(sae, cap.output, pm, per_token_codes)
        n = len(idx)
        sums = row_sums(logps, rows, len(input_ids)).float().cpu()  # the trainer's summation order
        counts = response[:, 1:].sum(-1).cpu()
        for j, i in enumerate(idx):
            entry = [
                (float(sums[j]), float(sums[n + j])),
                (int(counts[j]), int(counts[n + j])),
                (_nonzeros(pooled[j]), _nonzeros(pooled[n + j])),
            ]
            if per_token_logps:
                entry.append(tuple(per_tok[r][response[r]].float().cpu().numpy() for r in (j, n + j)))
            if per_token_codes:
                entry.append((tok_codes[j], tok_codes[n + j]))
            results[i] = tuple(entry)
    ordered = [results[i] for i in range(len(pairs))]
    return PairOutputs(
        logp_sum=[r[0] for r in ordered],
        n_tokens=[r[1] for r in ordered],
        pooled=[r[2] for r in ordered],
        token_logps=[r[3] for r in ordered] if per_token_logps else None,
        token_codes=[r[-1] for r in ordered] if per_token_codes else None,
    )


def _response_logps(model, input_ids, attention, response, pm, logits: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps[N], rows[N])`` at the positions ``pm`` (row-major): the log-prob of the token each predicts."""
    if logits == "selected":
        sel = selected_forward(model, input_ids, attention, pm)
        return sel.logps, sel.rows
    full = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
    per_token = token_logps(full, input_ids, response)  # token t's log-prob at t
    return torch.roll(per_token, -1, dims=1)[pm], pm.nonzero()[:, 0]


def _nonzeros(vec: torch.Tensor) -> tuple:
    nz = vec.nonzero().squeeze(-1)
    return nz.to(torch.int32).cpu().numpy(), vec[nz].float().cpu().numpy()


def _pooled_codes(sae, hidden: torch.Tensor, mask: torch.Tensor, per_token: bool):
    """Mean-pooled SAE codes ``[R, d_sae]`` over ``mask`` positions, encoded in row groups; optionally the
    per-token sparse codes of the masked positions as ``(nnz per token, indices, values)`` per row."""
    rows, seq, _ = hidden.shape
    d_sae = sae.cfg.d_sae
    group = max(1, SAE_BLOCK_BYTES // max(1, seq * d_sae * 4))
    pooled, tok = [], []
    for r0 in range(0, rows, group):
        codes = encode_full(sae, hidden[r0 : r0 + group])
        m = mask[r0 : r0 + group]
        pooled.append(pool_mean(codes, m))
        if per_token:
            for c, mm in zip(codes, m):
                sel = c[mm]  # [n_tokens, d_sae]
                nz = sel.nonzero()
                tok.append(
                    (
                        (sel != 0).sum(-1).to(torch.int32).cpu().numpy(),
                        nz[:, 1].to(torch.int32).cpu().numpy(),
                        sel[nz[:, 0], nz[:, 1]].float().cpu().numpy(),
                    )
                )
    return torch.cat(pooled), tok


class CacheWorker:
    """Loads the reference model, SAE and data source once; then processes shards on request."""

    def __init__(self, cfg: CacheConfig, threads: int | None = None):
        from fpo_dist.store import open_store

        if threads:
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        # storage_options come in the config (never the environment), so every node's actor reaches the store
        self.store = open_store(cfg.output, mode="r+", storage_options=cfg.storage_options or None)
        self.store.check_writable()  # fail fast when the store is unreachable from this node
        self.tokenizer = load_tokenizer(tokenizer_spec(cfg.model))
        self.pairs = PairTokenizer(self.tokenizer, cfg.data)
        self.source = load_source(cfg.data)
        self.model = load_causal_lm(model_spec(cfg.model), device=self.device)
        self.sae = load_sae(cfg.sae.source, cfg.sae.sae_id, device=self.device, dtype="float32")
        self.pad_id = pad_token_id(self.tokenizer)

    def info(self) -> dict:
        """Who did the work: host, pid, device, threads, and under Ray the node id (several Ray nodes may share a
        hostname, e.g. SLURM nodes on one machine; the node id tells them apart)."""
        info = {"pid": os.getpid(), "host": os.uname().nodename, "device": str(self.device), "threads": torch.get_num_threads()}
        try:
            import ray

            if ray.is_initialized():
                info["node"] = ray.get_runtime_context().get_node_id()
        except ImportError:  # in-process use without Ray
            pass
        return info

    def process(self, shard: int) -> dict:
        """Tokenize, run and write shard ``shard``; return what the driver needs to commit and report."""
        from fpo_dist.store import ShardResult

        t0 = time.perf_counter()
        start, stop = self.store.plan.shard_range(shard)
        try:
            rng = self.pairs.tokenize_range(self.source, start, stop)
        except BadRowError as e:  # deterministic: retrying elsewhere cannot help
            return {"shard": shard, "error": str(e)}
        out = reference_pass(
            self.model, self.sae, self.cfg.sae.layer, rng.pairs, self.pad_id, self.cfg.batch_size,
            self.cfg.per_token_logps, self.cfg.per_token_codes,
        )
        result = ShardResult.build(
            start, stop, rng.pairs, rng.bad, out.logp_sum, out.n_tokens, out.pooled,
            token_logps=out.token_logps, token_codes=out.token_codes,
        )
        self.store.write_shard(shard, result)
        tokens = sum(len(p.prompt_ids) * 2 + len(p.chosen_ids) + len(p.rejected_ids) for p in rng.pairs)
        return {
            "shard": shard,
            "checksum": result.checksum(),
            "rows": stop - start,
            "ok": len(rng.pairs),
            "bad": [(b.index, b.reason, b.field, b.detail) for b in rng.bad],
            "tokens": tokens,
            "seconds": time.perf_counter() - t0,
            "worker": self.info(),
        }

