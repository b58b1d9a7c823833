"""The cache worker: one frozen reference model + SAE, turning shards of rows into store regions.

:func:`reference_pass` is the computation (one no-grad :func:`fpo_dist.scoring.score_batch` per batch of
pairs, chosen and rejected sequences packed together: the output layer only at the positions that predict response
tokens, the block-ℓ residual hook, SAE encoding of those positions on the worker's device, mean pooling per
sequence).  :class:`CacheWorker` wraps it with loading and shard I/O; the driver
runs it as a Ray actor, tests and ``verify`` run it in-process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from fpo_dist.config import CacheConfig
from fpo_dist.data import BadRowError, PairTokenizer, TokenizedPair, load_source
from fpo_dist.lm_head import unwrap
from fpo_dist.models import (
    build_batch,
    load_causal_lm,
    load_tokenizer,
    model_spec,
    pad_token_id,
    tokenizer_spec,
)
from fpo_dist.sae import load_sae
from fpo_dist.scoring import nonzeros, score_batch


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
    ref_topm: list[tuple] | None = None  # per pair ((ids, logps, tail) chosen, (…) rejected), numpy


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
    layout: str = "padded",
    topm: int = 0,
) -> PairOutputs:
    """Reference log-probs and pooled SAE codes for ``pairs`` (in the order given).

    Pairs are batched in a fixed, length-sorted order that depends only on ``pairs``, so the same shard
    gives bit-identical results on any worker.  Each batch is one :func:`fpo_dist.scoring.score_batch` in
    ``layout`` (``packed``: the batch's sequences back to back in one row, no padding, for a model loaded with
    ``varlen=True``, as the cache job runs it; ``padded``, the default of every function that builds batches, for
    any model).
    ``logits="selected"`` (what the cache job runs) computes the output layer only where a response token is
    predicted; ``"materialized"`` takes the model's full logits (the path it replaced; for tests and benchmarks).
    ``topm=M``: also the reference's top-M next-token distributions at every response position.
    """
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i].prompt_ids) + max(len(pairs[i].chosen_ids), len(pairs[i].rejected_ids)), i))
    device = next(unwrap(model).parameters()).device
    results: dict[int, tuple] = {}
    for b0 in range(0, len(order), batch_size):
        idx = order[b0 : b0 + batch_size]
        batch = build_batch([pairs[i] for i in idx], pad_id, layout).to(device)
        out = score_batch(model, batch, sae, layer, logits=logits, token_codes=per_token_codes, topm=topm)
        sums, counts = out.logp_sum.float().cpu(), out.n_tokens.cpu()
        per_tok = torch.split(out.token_logps.float().cpu(), counts.tolist()) if per_token_logps else None
        # each sequence's selected positions are contiguous, in sequence order (Selection): split by counts
        top = [torch.split(t.cpu(), counts.tolist()) for t in (out.topm.ids.int(), out.topm.logps.float(),
                                                                out.topm.tail.float())] if topm else None
        n = len(idx)
        for j, i in enumerate(idx):
            c, r = j, n + j
            entry = [
                (float(sums[c]), float(sums[r])),
                (int(counts[c]), int(counts[r])),
                (nonzeros(out.pooled[c]), nonzeros(out.pooled[r])),
            ]
            if per_token_logps:
                entry.append((per_tok[c].numpy(), per_tok[r].numpy()))
            if per_token_codes:
                entry.append((out.token_codes[c], out.token_codes[r]))
            if topm:
                entry.append(tuple(tuple(t[s].numpy() for t in top) for s in (c, r)))
            results[i] = tuple(entry)
    ordered = [results[i] for i in range(len(pairs))]
    return PairOutputs(
        logp_sum=[r[0] for r in ordered],
        n_tokens=[r[1] for r in ordered],
        pooled=[r[2] for r in ordered],
        token_logps=[r[3] for r in ordered] if per_token_logps else None,
        token_codes=[r[4 if per_token_logps else 3] for r in ordered] if per_token_codes else None,
        ref_topm=[r[-1] for r in ordered] if topm else None,
    )


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
        self.model = load_causal_lm(model_spec(cfg.model), device=self.device, varlen=cfg.batch_layout != "padded" and cfg.attention_kernel)
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

    def exit(self) -> None:
        """End this actor through Ray's graceful exit (``ray.actor.exit_actor``): its ``atexit`` handlers run, so the
        temporary directories made at import (wandb's, pulled in by sae-lens) are removed. Only under Ray."""
        import ray

        ray.actor.exit_actor()

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
            self.cfg.per_token_logps, self.cfg.per_token_codes, layout=self.cfg.batch_layout, topm=self.cfg.ref_topm,
        )
        result = ShardResult.build(
            start, stop, rng.pairs, rng.bad, out.logp_sum, out.n_tokens, out.pooled,
            token_logps=out.token_logps, token_codes=out.token_codes, ref_topm=out.ref_topm, topm=self.cfg.ref_topm,
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

