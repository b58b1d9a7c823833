"""Phase 2: the training recipe — setup → train → save_checkpoint → export → cleanup.

The policy (initialised from the cache's reference model) runs under DeepSpeed (``fpo_dist.engine``);
reference log-probs and pooled SAE codes stream from the cache (``fpo_dist.loader``); the frozen SAE
runs replicated outside the engine; losses are the pure functions of ``fpo_dist.losses``.  An FPO run
holds no reference model: only the online baselines (``dpo-online``, ``tdpo1``, ``tdpo2``) load one.
"""

from __future__ import annotations

import json
import math
import re
import warnings
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fpo_dist.config import ConfigError, ModelConfig, TrainConfig, to_dict, to_yaml
from fpo_dist.losses import LOSSES, PooledCodes, check_loss_requirements, prediction_mask, sequence_logps, sequential_kl
from fpo_dist.models import capture_block_output

CHECKPOINTS = "checkpoints"
STATE_FILE = "fpo_state.json"  # step, world size and loader state of a checkpoint, readable before the engine exists
# DeepSpeed 0.19 still calls the deprecated collective names once per partitioned parameter.
warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops, naming the step, the batch uids and the metrics."""


# --------------------------------------------------------------------------------------------- the loss


@dataclass
class LossInputs:
    """What a loss needs besides the policy: the run's resolved hyper-parameters and frozen helpers."""

    name: str
    params: dict  # keyword arguments of the loss function (beta, alpha, …)
    sae: object | None = None  # frozen SAE (fpo)
    layer: int | None = None  # hook layer (fpo)
    encode_selected: bool = True
    reference: object | None = None  # callable reference model (online losses)


def loss_params(cfg: TrainConfig) -> dict:
    """The loss function's keyword arguments from ``cfg.loss`` (None → the registry default)."""
    spec = LOSSES[cfg.loss.name]
    params = dict(spec.defaults)
    if cfg.loss.beta is not None:
        params["beta"] = cfg.loss.beta
    if "alpha" in params:
        params["alpha"] = cfg.loss.alpha
    if cfg.loss.name == "fpo":
        params.update(k=cfg.loss.k, topk_mode=cfg.loss.topk_mode, stop_grad_chosen=cfg.loss.stop_grad_chosen)
    if cfg.loss.name == "simpo":
        params.update(gamma=cfg.loss.gamma, gamma_is_ratio=cfg.loss.gamma_is_ratio)
    return params


def pooled_policy_codes(sae, hidden: torch.Tensor, pmask: torch.Tensor, refs, k: int, mode: str, selected: bool):
    """Pooled policy SAE codes for chosen (rows [0,B)) and rejected (rows [B,2B)) as ``PooledCodes``.

    ``selected``: pick the needed feature columns under no_grad (every row's policy top-k, plus the
    reference top-k for ``union``) and run the grad path through those columns of ``W_enc`` only.
    """
    from fpo_dist.sae import encode_full, encode_selected, pool_mean, select_columns

    n = hidden.shape[0] // 2
    if not selected:
        pooled = pool_mean(encode_full(sae, hidden), pmask)
        return PooledCodes(pooled[:n]), PooledCodes(pooled[n:])
    with torch.no_grad():
        full = pool_mean(encode_full(sae, hidden.detach()), pmask)
    cols = select_columns([full[:n], full[n:]], list(refs), k, mode)
    pooled = pool_mean(encode_selected(sae, hidden, cols), pmask)
    return PooledCodes(pooled[:n], cols), PooledCodes(pooled[n:], cols)


def compute_loss(policy, mb, inputs: LossInputs) -> tuple[torch.Tensor, dict]:
    """Forward the policy on one micro-batch (chosen and rejected rows together) and apply the loss."""
    n = mb.input_ids.shape[0] // 2
    fwd = dict(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
    if inputs.name == "fpo":
        with capture_block_output(policy.module if hasattr(policy, "module") else policy, inputs.layer) as cap:
            logits = policy(**fwd).logits
        hidden = cap.output
    else:
        logits = policy(**fwd).logits
    logp_sum, n_tok, logp_avg = sequence_logps(logits, mb.input_ids, mb.response_mask)
    p = inputs.params
    if inputs.name == "fpo":
        ref_avg = mb.ref_logp_sum / mb.ref_n_tokens.clamp(min=1)
        codes_c, codes_r = pooled_policy_codes(
            inputs.sae, hidden, prediction_mask(mb.response_mask), (mb.ref_codes_chosen, mb.ref_codes_rejected),
            p["k"], p["topk_mode"], inputs.encode_selected,
        )
        loss, metrics = LOSSES["fpo"].fn(
            logp_avg[:n], logp_avg[n:], ref_avg[:, 0], ref_avg[:, 1], codes_c, codes_r,
            mb.ref_codes_chosen, mb.ref_codes_rejected, **p,
        )
    elif inputs.name == "dpo":
        loss, metrics = LOSSES["dpo"].fn(logp_sum[:n], logp_sum[n:], mb.ref_logp_sum[:, 0], mb.ref_logp_sum[:, 1], **p)
    elif inputs.name == "simpo":
        loss, metrics = LOSSES["simpo"].fn(logp_avg[:n], logp_avg[n:], **p)
    else:  # online reference: dpo-online, tdpo1, tdpo2
        with torch.no_grad():
            ref_logits = inputs.reference(**fwd).logits
        ref_sum, _, _ = sequence_logps(ref_logits, mb.input_ids, mb.response_mask)
        if inputs.name == "dpo-online":
            loss, metrics = LOSSES["dpo-online"].fn(logp_sum[:n], logp_sum[n:], ref_sum[:n], ref_sum[n:], **p)
        else:
            kl = sequential_kl(ref_logits, logits, mb.response_mask)
            loss, metrics = LOSSES[inputs.name].fn(
                logp_sum[:n], logp_sum[n:], ref_sum[:n], ref_sum[n:], kl[:n], kl[n:], **p
            )
    return loss, metrics


# --------------------------------------------------------------------------------------------- provenance


def check_cache_provenance(prov: dict, cfg: TrainConfig, tokenizer) -> list[str]:
    """Fields where the run disagrees with the cache it trains from (empty = compatible)."""
    from fpo_dist.data import tokenizer_fingerprint

    diffs = []
    fp = tokenizer_fingerprint(tokenizer)
    for key in ("tokenizer_sha256", "chat_template_sha256", "eos_token_id"):
        if fp.get(key) != prov["tokenizer"].get(key):
            diffs.append(f"tokenizer.{key}: cache {prov['tokenizer'].get(key)!r}, policy tokenizer {fp.get(key)!r}")
    for key in ("source", "sae_id", "layer"):
        run_value = getattr(cfg.sae, key)
        if cfg.sae.source and run_value is not None and run_value != prov["sae"].get(key):
            diffs.append(f"sae.{key}: cache {prov['sae'].get(key)!r}, run {run_value!r}")
    return diffs


def cached_model_config(prov: dict, trust_remote_code: bool = False) -> ModelConfig:
    """The cache's reference model as a config.  ``trust_remote_code`` comes from the user's run, never from
    the store: a shared cache must not be able to make this process run remote code."""
    fields = {k: v for k, v in prov["model"].items() if k != "files"}
    return ModelConfig(**{**fields, "trust_remote_code": trust_remote_code})


def resolve_models(cfg: TrainConfig, prov: dict) -> tuple[ModelConfig, ModelConfig | None]:
    """The policy's and (online losses) the reference's model configs: the cache's reference by default."""
    cached = cached_model_config(prov, cfg.policy.trust_remote_code)
    policy = cfg.policy if cfg.policy.name_or_path else cached
    needs_ref = LOSSES[cfg.loss.name].needs == "reference_model"
    ref = (cfg.ref_model if cfg.ref_model.name_or_path else cached) if needs_ref else None
    return policy, ref


# --------------------------------------------------------------------------------------------- optimizer


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=o.lr, eps=o.eps, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then constant (the paper's schedule)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


# --------------------------------------------------------------------------------------------- trainer


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class StepStats:
    loss: float = 0.0
    metrics: dict = field(default_factory=dict)
    tokens: int = 0
    micro: int = 0
    rows: list = field(default_factory=list)


def resident_models() -> list[dict]:
    """Every Hugging Face model object alive in this process, with its local parameter count (under
    ZeRO-3 the local tensors are partitions): proof that an FPO run holds no reference model."""
    import gc

    from transformers import PreTrainedModel

    def local(p) -> int:  # a ZeRO-3 parameter is an empty placeholder; its shard is ``ds_tensor``
        return p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()

    def full(p) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    models = [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]
    inner = {id(m) for o in models for m in o.modules() if m is not o}  # e.g. LlamaModel inside *ForCausalLM
    return [
        {"class": type(o).__name__, "numel": sum(full(p) for p in o.parameters()),
         "local_numel": sum(local(p) for p in o.parameters()),
         "trainable": any(p.requires_grad for p in o.parameters())}
        for o in models if id(o) not in inner
    ]


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.step = 0
        self.log_file = None
        self.tb = None

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        from fpo_dist import engine as eng
        from fpo_dist.store import open_store

        cfg = self.cfg
        self.rank, self.world, self.local_rank = eng.init_distributed(cfg.dist_timeout_s)
        self.device = eng.device()
        self.is_main = self.rank == 0
        if self.is_main:
            print("fpo-dist train, config:\n" + to_yaml(cfg), flush=True)
        try:
            self.store = open_store(cfg.cache)
        except FileNotFoundError as e:
            raise ConfigError(f"'cache': {e}; build it with `python -m fpo_dist.cache`") from None
        if not self.store.attrs.get("complete"):
            raise ConfigError(f"cache {cfg.cache} is not complete; finish it with `python -m fpo_dist.cache` (rerun resumes)")
        prov = self.store.provenance
        self.spec = check_loss_requirements(
            cfg.loss.name, have_cache=True, have_reference_model=LOSSES[cfg.loss.name].needs == "reference_model",
            have_sae=True,
        )
        policy_cfg, ref_cfg = resolve_models(cfg, prov)
        self._setup_models(policy_cfg, ref_cfg, prov)
        self._setup_loader()
        self._setup_logging()
        self._write_run_info()

    def _write_run_info(self) -> None:
        models = resident_models()
        info = {
            "world_size": self.world, "device": str(self.device), "dtype": "bfloat16" if self.bf16 else "float32",
            "loss": self.cfg.loss.name, "zero_stage": int(self.ds_config.get("zero_optimization", {}).get("stage", 0)),
            "resident_models": models, "reference_model_resident": self.reference is not None,
            "sae_resident": self.sae is not None, "ds_config": self.ds_config,
        }
        if self.is_main:
            (Path(self.cfg.output_dir) / "run_info.json").write_text(json.dumps(info, indent=1, default=str))
            print(f"resident models: {[(m['class'], m['numel'], 'local', m['local_numel']) for m in models]}; reference model: "
                  f"{'yes' if self.reference is not None else 'none'}", flush=True)

    def _setup_models(self, policy_cfg: ModelConfig, ref_cfg: ModelConfig | None, prov: dict) -> None:
        from fpo_dist import engine as eng
        from fpo_dist.cache.worker import model_spec, tokenizer_spec
        from fpo_dist.models import load_causal_lm, load_tokenizer

        cfg = self.cfg
        self.tokenizer = load_tokenizer(tokenizer_spec(policy_cfg))
        diffs = check_cache_provenance(prov, cfg, self.tokenizer)
        if diffs:
            raise ConfigError(f"the cache {cfg.cache} does not match this run:\n  " + "\n  ".join(diffs))
        # The SAE first: sae_lens must be imported before DeepSpeed's zero.Init patches nn.Module subclassing
        # (its Generic SAE classes fail to define under that patch).
        self.sae = None
        if self.spec.needs_sae:
            from fpo_dist.sae import load_sae

            source = cfg.sae.source or prov["sae"]["source"]
            sae_id = cfg.sae.sae_id if cfg.sae.source else prov["sae"]["sae_id"]
            self.sae = load_sae(source, sae_id, device=self.device, dtype="float32")
        on_gpu = torch.cuda.is_available()
        self.bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and on_gpu)
        dtype = "bfloat16" if self.bf16 else "float32"
        template = eng.load_ds_template(cfg.deepspeed) if cfg.deepspeed else {"zero_optimization": {"stage": 0}}
        hidden = _hidden_size(policy_cfg)
        self.ds_config = eng.build_ds_config(template, cfg, self.world, hidden, self.bf16)
        self.resume_from = self._resume_target()
        if self.resume_from is not None and self.resume_from[2] != self.world:
            # another data-parallel world: DeepSpeed's universal checkpoint re-partitions optimizer state
            load_dir, tag, _ = self.resume_from
            universal = eng.to_universal_checkpoint(load_dir, tag, self.is_main)
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
            self.resume_from = (load_dir, universal, self.world)
        self._zero_ctx = eng.zero3_init_context(self.ds_config)  # keep alive: partitioned loading
        spec = model_spec(policy_cfg)
        policy = load_causal_lm(type(spec)(**{**spec.__dict__, "dtype": dtype}), requires_grad=True)
        if cfg.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        policy.config.use_cache = False
        optimizer = build_optimizer([p for p in policy.parameters() if p.requires_grad], cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_factor(s, cfg.optim.warmup_steps))
        self.policy = eng.Engine(policy, self.ds_config, optimizer=optimizer, lr_scheduler=scheduler)
        self.reference = None
        if ref_cfg is not None:
            rspec = model_spec(ref_cfg)
            ref = load_causal_lm(type(rspec)(**{**rspec.__dict__, "dtype": dtype}))
            self.reference = eng.Engine.frozen(ref, self.ds_config)
        self.layer = prov["sae"]["layer"]
        self.loss_inputs = LossInputs(
            name=cfg.loss.name, params=loss_params(cfg), sae=self.sae, layer=self.layer,
            encode_selected=cfg.loss.encode_selected, reference=self.reference,
        )
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def _setup_loader(self) -> None:
        from fpo_dist.loader import CacheLoader

        cfg = self.cfg
        try:
            self.loader = CacheLoader(
                self.store, micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum, world_size=self.world,
                rank=self.rank, seed=cfg.seed, pad_id=self.pad_id, prefetch=cfg.prefetch, epochs=cfg.epochs,
            )
        except ValueError as e:  # too few rows for one global batch, and the like
            raise ConfigError(f"cache {cfg.cache}: {e}") from None
        steps_epoch = self.loader.steps_per_epoch
        total = steps_epoch * cfg.epochs
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        if self.is_main:
            print(f"data: {self.loader.order.n} ok rows, {steps_epoch} steps/epoch × {cfg.epochs} epoch(s), "
                  f"{self.loader.dropped_per_epoch} row(s) per epoch beyond the last full global batch are not "
                  f"used in that epoch (a different remainder each epoch); training {self.total_steps} steps",
                  flush=True)

    def _setup_logging(self) -> None:
        if not self.is_main:
            return
        out = Path(self.cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(self.cfg))
        self.log_file = open(out / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # tensorboard is a pinned dependency; tolerate its absence in minimal installs
            self.tb = None

    # ------------------------------------------------------------------ resume / checkpoints

    def _resume_target(self) -> tuple[str, str, int] | None:
        """``(directory, tag, world size it was saved with)`` of the checkpoint to resume, or None."""
        cfg = self.cfg
        if not cfg.resume:
            return None
        if cfg.resume == "auto":
            root = Path(cfg.output_dir) / CHECKPOINTS
            latest = root / "latest"
            if not latest.exists():
                if self.is_main:
                    print(f"resume auto: no checkpoint under {root}; starting fresh", flush=True)
                return None
            load_dir, tag = root, latest.read_text().strip()
        else:
            path = Path(cfg.resume)
            load_dir, tag = path.parent, path.name
        meta = load_dir / tag / STATE_FILE
        if not meta.exists():
            raise ConfigError(f"{load_dir / tag} is not a complete fpo-dist checkpoint (no {STATE_FILE})")
        saved = json.loads(meta.read_text())
        now = _resume_fields(cfg)
        diffs = [f"{k}: checkpoint {saved['run'].get(k)!r}, this run {v!r}" for k, v in now.items()
                 if k in saved.get("run", {}) and saved["run"][k] != v]
        if diffs:
            raise ConfigError(f"resuming {load_dir / tag} with different settings would continue another "
                              "experiment:\n  " + "\n  ".join(diffs))
        return str(load_dir), tag, int(saved["world_size"])

    def maybe_resume(self) -> None:
        if self.resume_from is None:
            return
        load_dir, tag, _ = self.resume_from
        state = self.policy.load(load_dir, tag)
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        rng_file = Path(load_dir) / tag / f"rng_rank{self.rank}.pt"
        if rng_file.exists():  # absent when the world size changed: ranks have no predecessor
            _set_rng(torch.load(rng_file, weights_only=True))
        if self.is_main:
            print(f"resumed from {load_dir}/{tag}: step {self.step}, loader {state['loader']}", flush=True)

    def save_checkpoint(self) -> None:
        root = Path(self.cfg.output_dir) / CHECKPOINTS
        tag = f"step_{self.step}"
        state = {"step": self.step, "loader": self.loader.state_dict(), "config": to_dict(self.cfg)}
        self.policy.save(str(root), tag, client_state=state)
        torch.save(_get_rng(), root / tag / f"rng_rank{self.rank}.pt")
        torch.distributed.barrier()
        if self.is_main:
            meta = {"step": self.step, "world_size": self.world, "loader": state["loader"], "loss": self.cfg.loss.name,
                    "run": _resume_fields(self.cfg)}
            (root / tag / STATE_FILE).write_text(json.dumps(meta, indent=1))
            (root / "latest").write_text(tag)  # only now is the checkpoint complete
            tags = sorted((p for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)),
                          key=lambda p: int(p.name.split("_")[1]))
            for old in tags[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
                shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)
            print(f"checkpoint {root / tag}", flush=True)
        torch.distributed.barrier()

    # ------------------------------------------------------------------ step-0 check

    def step0_check(self) -> None:
        """Policy == reference at step 0: cached log-probs (and, for FPO, pooled features) must be
        reproduced under the run's real layout (engine, dtype, padding), or the run aborts."""
        if not self.cfg.step0_check or self.step > 0:
            return
        from fpo_dist.cache.verify import compare, pairs_from_batch
        from fpo_dist.models import build_batch
        from fpo_dist.sae import encode_full, pool_mean

        rows = self.store.ok_rows()[: self.cfg.step0_rows].tolist()
        batch = self.store.read_rows(rows)
        pb = build_batch(pairs_from_batch(batch), self.pad_id)
        ids, att, resp = (t.to(self.device) for t in (pb.input_ids, pb.attention_mask, pb.response_mask))
        self.policy.train(False)
        with torch.no_grad(), capture_block_output(self.policy.module, self.layer) as cap:
            logits = self.policy(input_ids=ids, attention_mask=att, use_cache=False).logits
        logp_sum, n_tok, _ = sequence_logps(logits, ids, resp)
        self.policy.train(True)
        n = len(rows)
        pooled = None
        if self.sae is not None:
            with torch.no_grad():
                codes = pool_mean(encode_full(self.sae, cap.output), prediction_mask(resp)).cpu()
            pooled = [tuple(_nz(codes[r]) for r in (b, n + b)) for b in range(n)]
        lp = torch.stack([logp_sum[:n], logp_sum[n:]], 1).float().cpu().numpy()
        nt = torch.stack([n_tok[:n], n_tok[n:]], 1).cpu().numpy()
        cmp = compare(batch, lp, nt, pooled, self.sae.cfg.d_sae if self.sae is not None else 0)
        atol_logp = self.cfg.step0_atol_logp * (30 if self.bf16 else 1)
        rtol_mse = self.cfg.step0_rtol_mse * (100 if self.bf16 else 1)
        if self.is_main:
            print(f"step-0 check: {cmp.describe()} (tolerances: avg logp {atol_logp:g}, relative MSE {rtol_mse:g})",
                  flush=True)
        if not cmp.ok(atol_logp, rtol_mse):
            raise RuntimeError(
                f"step-0 check failed: the initial policy does not reproduce the cache ({cmp.describe()}). "
                "Is the policy the cache's reference model, in the same dtype, with the SAE and hook layer the "
                "cache was built with?"
            )

    # ------------------------------------------------------------------ train

    def train(self) -> None:
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {cfg.loss.name}", disable=not self.is_main,
                   file=sys.stderr, dynamic_ncols=True)
        self.policy.train(True)
        stats, t_step = StepStats(), time.perf_counter()
        for mb in self.loader if self.step < self.total_steps else ():
            self._epoch_of_step = mb.epoch
            mb = mb.to(self.device)
            loss, metrics = compute_loss(self.policy, mb, self.loss_inputs)
            self._check_finite(loss, metrics, mb)
            self.policy.backward(loss)
            boundary = self.policy.is_boundary()
            self.policy.step()
            stats.loss += float(loss.detach())
            for k, v in metrics.items():
                stats.metrics[k] = stats.metrics.get(k, 0.0) + float(v)
            stats.tokens += int(mb.attention_mask.sum())
            stats.micro += 1
            stats.rows.extend(int(r) for r in mb.rows)
            if not boundary:
                continue
            self.step += 1  # the loader's state advanced when it handed out this step's last micro-batch
            record = self._reduce(stats, time.perf_counter() - t_step)
            if cfg.log_samples:
                self._log_samples(stats.rows, record["epoch"])
            if self.is_main and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                self._log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('reward_accuracy', 0):.2f}")
            bar.update(1)
            if self.step >= self.total_steps:
                break  # before the loader hands out (and counts) another step
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save_checkpoint()
            stats, t_step = StepStats(), time.perf_counter()
        bar.close()

    def _check_finite(self, loss, metrics, mb) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item() > 0:
            local = "non-finite" if not torch.isfinite(loss.detach()).all() else "finite (another rank diverged)"
            raise TrainingDiverged(
                f"non-finite loss at optimizer step {self.step + 1} on rank {self.rank} (local loss {local}: "
                f"{float(loss.detach())}); batch uids {mb.uids}; metrics "
                + json.dumps({k: float(v) for k, v in metrics.items()})
            )

    def _reduce(self, s: StepStats, seconds: float) -> dict:
        keys = sorted(s.metrics)
        # collectives on the run's device: NCCL has no CPU backend
        vec = torch.tensor([s.loss / s.micro] + [s.metrics[k] / s.micro for k in keys] + [float(s.tokens)],
                           dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(vec)
        vec = vec.cpu()
        vec[:-1] /= self.world
        mem = torch.tensor([peak_memory_mb()], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(mem, op=torch.distributed.ReduceOp.MAX)
        mem = mem.cpu()
        record = {"step": self.step, "loss": float(vec[0])}
        record.update({k: float(v) for k, v in zip(keys, vec[1:-1])})
        record.update(
            lr=self.policy.lr(), grad_norm=self.policy.grad_norm(), tokens_per_s=float(vec[-1]) / max(seconds, 1e-9),
            step_time_s=seconds, peak_memory_mb=float(mem[0]), epoch=self._epoch_of_step,
        )
        return record

    def _log_samples(self, rows: list[int], epoch: int) -> None:
        """samples.jsonl: the source rows of every optimizer step, from all ranks (an audit trail)."""
        gathered = [None] * self.world
        torch.distributed.all_gather_object(gathered, rows)
        if self.is_main:
            with open(Path(self.cfg.output_dir) / "samples.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "epoch": epoch, "rows": sorted(r for g in gathered for r in g)}) + "\n")

    def _log(self, record: dict) -> None:
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    # ------------------------------------------------------------------ finish

    def export(self) -> str | None:
        if not self.cfg.export:
            return None
        out = str(Path(self.cfg.output_dir) / "hf")
        self.policy.export_hf(out, self.tokenizer, torch.bfloat16 if self.bf16 else torch.float32)
        if self.is_main:
            print(f"exported Hugging Face model to {out}", flush=True)
        return out

    def cleanup(self) -> None:
        try:
            if getattr(self, "loader", None) is not None:
                self.loader.close()
            if self.log_file:
                self.log_file.close()
            if self.tb is not None:
                self.tb.close()
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    def run(self) -> None:
        try:
            self.setup()
            self.maybe_resume()
            self.step0_check()
            self.train()
            self.save_checkpoint()
            self.export()
        finally:
            self.cleanup()


def _resume_fields(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share with the checkpoint it continues."""
    out = {f"loss.{k}": v for k, v in to_dict(cfg.loss).items()}
    out.update({f"optim.{k}": list(v) if isinstance(v, tuple) else v for k, v in to_dict(cfg.optim).items()})
    out.update(cache=cfg.cache, seed=cfg.seed, epochs=cfg.epochs)
    return out


def _hidden_size(model_cfg: ModelConfig) -> int:
    from transformers import AutoConfig

    kwargs = {"gguf_file": model_cfg.gguf_file} if model_cfg.gguf_file else {}
    if model_cfg.trust_remote_code:
        kwargs["trust_remote_code"] = True
    c = AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision, **kwargs)
    c = getattr(c, "text_config", c)
    return int(c.hidden_size)


def _nz(vec: torch.Tensor) -> tuple:
    idx = vec.nonzero().squeeze(-1)
    return idx.numpy(), vec[idx].float().numpy()


def _get_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
             "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def main(argv: list[str] | None = None) -> int:
    from fpo_dist.config import load_config, split_config_args

    argv = list(sys.argv[1:] if argv is None else argv)
    # the deepspeed launcher appends --local_rank=N; LOCAL_RANK is in the environment too
    argv = [a for i, a in enumerate(argv) if not a.startswith("--local_rank") and
            not (i > 0 and argv[i - 1] == "--local_rank")]
    path, overrides = split_config_args(argv)
    try:
        cfg = load_config(TrainConfig, path, overrides)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    trainer = Trainer(cfg)
    try:
        trainer.run()
    except ConfigError as e:
        print(f"configuration error (rank {getattr(trainer, 'rank', '?')}): {e}", file=sys.stderr)
        return 2
    return 0
