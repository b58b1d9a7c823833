"""Phase 2: the training recipe — setup → train → save_checkpoint → export → cleanup.

The policy (initialised from the cache's reference model) runs under DeepSpeed (``fpo_dist.engine``, which also
owns the process group: ``Distributed``); reference log-probs and pooled SAE codes stream from the cache
(``fpo_dist.loader``); the frozen SAE runs replicated outside the engine.  The loss is a registry entry of
``fpo_dist.losses``: ``fpo_dist.forward`` computes what it declares it needs, so nothing here depends on which
loss runs.  An FPO run holds no reference model: only losses that declare ``needs="reference_model"``
(``dpo-online``, ``tdpo1``, ``tdpo2``) load one.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fpo_dist import checkpoints as ckpt
from fpo_dist.config import ConfigError, ModelConfig, TrainConfig, public_dict, storage_options_for, to_dict, to_yaml
from fpo_dist.diagnostics import FeatureTermMonitor
from fpo_dist.losses import LOSSES, check_loss_requirements
from fpo_dist.machine import describe


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops, naming the step, the batch uids and the metrics."""


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


def resolve_models(cfg: TrainConfig, prov: dict) -> tuple[ModelConfig, ModelConfig | None]:
    """The policy's and (online losses) the reference's model configs: the cache's reference by default."""
    cached = ModelConfig.from_provenance(prov, cfg.policy.trust_remote_code)
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
    return cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
               **({"fused": True} if o.use_fused() else {}))


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then constant (the paper's schedule)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


# --------------------------------------------------------------------------------------------- trainer


@dataclass
class StepStats:
    loss: float = 0.0
    metrics: dict = field(default_factory=dict)
    tokens: int = 0  # the sequences' own tokens
    computed: int = 0  # positions the forward ran (tokens + padding)
    scored: int = 0  # response tokens predicted (the positions the output layer scores)
    micro: int = 0
    rows: list = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.step = 0
        self.tracker = None
        self.eval_store = None
        self.eval_summary = None

    # the process's place in the job: owned by ``self.dist`` (``fpo_dist.engine.Distributed``)
    rank = property(lambda self: self.dist.rank)
    world = property(lambda self: self.dist.world)
    is_main = property(lambda self: self.dist.is_main)
    device = property(lambda self: self.dist.device)

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        from fpo_dist import engine as eng
        from fpo_dist.store import StoreError, open_store

        cfg = self.cfg
        self.dist = eng.init_distributed(cfg.dist_timeout_s)
        if self.is_main:
            print("fpo-dist train, config:\n" + to_yaml(cfg), flush=True)
            if cfg.loss.ignored:
                print(f"loss {cfg.loss.name} does not use: {', '.join(cfg.loss.ignored)}", flush=True)
        try:
            self.store = open_store(cfg.cache, storage_options=storage_options_for(cfg.cache, cfg.storage_options))
        except StoreError as e:
            raise ConfigError(f"'cache': {e}") from None
        if not self.store.attrs.get("complete"):
            raise ConfigError(f"cache {cfg.cache} is not complete; finish it with `python -m fpo_dist.cache` (rerun resumes)")
        prov = self.store.provenance
        self._open_eval_cache(prov)
        policy_cfg, ref_cfg = resolve_models(cfg, prov)
        try:
            self.spec = check_loss_requirements(
                cfg.loss.name, have_cache=True, have_reference_model=bool(ref_cfg and ref_cfg.name_or_path),
                have_sae=bool(cfg.sae.source or prov.get("sae", {}).get("source")),
                cache_topm=self.store.options["ref_topm"],
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.eval_store is not None and self.spec.needs_ref_topm:
            from fpo_dist.evaluation_loop import topm_difference

            why = topm_difference(self.store.options["ref_topm"], self.eval_store.options["ref_topm"], cfg.eval_cache)
            if why:
                raise ConfigError(why)
        policy_cfg, ref_cfg = self._resolve(policy_cfg, ref_cfg, prov)
        self._setup_models(policy_cfg, ref_cfg, prov)
        self._setup_loader()
        self._setup_logging()
        self._write_run_info()

    def _open_eval_cache(self, prov: dict) -> None:
        """The held-out cache (``--eval_cache``), refused unless built like the training cache."""
        from fpo_dist.evaluation_loop import EvalSummary, provenance_differences
        from fpo_dist.store import StoreError, open_store

        cfg = self.cfg
        if not cfg.eval_cache:
            return
        try:
            self.eval_store = open_store(cfg.eval_cache,
                                         storage_options=storage_options_for(cfg.eval_cache, cfg.storage_options))
        except StoreError as e:
            raise ConfigError(f"'eval_cache': {e}; build it with `python -m fpo_dist.cache` and the training "
                              "cache's config, another data.split") from None
        if not self.eval_store.attrs.get("complete"):
            raise ConfigError(f"eval cache {cfg.eval_cache} is not complete; finish it with `python -m fpo_dist.cache`")
        diffs = provenance_differences(prov, self.eval_store.provenance)
        if diffs:
            raise ConfigError(f"the eval cache {cfg.eval_cache} was not built like the training cache {cfg.cache} "
                              "(only the data source/split may differ):\n  " + "\n  ".join(diffs))
        self.eval_summary = EvalSummary(cfg.eval_cache, cfg.eval_every)

    def _policy_shape(self) -> dict:
        """The policy's width, vocabulary and whether its output layer is its input embedding (what a FLOP count
        needs beside the parameter count)."""
        from fpo_dist.lm_head import output_layer, unwrap

        inner = unwrap(self.policy.module)
        head, emb = output_layer(inner).weight, inner.get_input_embeddings().weight
        vocab, d_model = (int(n) for n in getattr(head, "ds_shape", head.shape))  # ds_shape: ZeRO-3 partitioned
        return {"d_model": d_model, "vocab": vocab, "tied_head": head is emb}

    def _write_run_info(self) -> None:
        models = self.dist.resident_models()
        info = {
            "world_size": self.world, "device": str(self.device), "dtype": "bfloat16" if self.bf16 else "float32",
            "loss": self.cfg.loss.name, "zero_stage": int(self.ds_config.get("zero_optimization", {}).get("stage", 0)),
            "resident_models": models, "reference_model_resident": self.reference is not None,
            "sae_resident": self.sae is not None, "ds_config": self.ds_config,
            "trainable_numel": sum(int(getattr(p, "ds_numel", p.numel())) for p in self.policy.module.parameters()
                                   if p.requires_grad),
            "lora": to_dict(self.cfg.policy.lora) if self.cfg.policy.lora.rank else None,
            "policy_shape": self._policy_shape(), "machine": describe(str(self.device)),
        }
        self.run_info = info
        if self.is_main:
            (Path(self.cfg.output_dir) / "run_info.json").write_text(json.dumps(info, indent=1, default=str))
            print(f"resident models: {[(m['class'], m['numel'], 'local', m['local_numel']) for m in models]}; reference model: "
                  f"{'yes' if self.reference is not None else 'none'}", flush=True)

    def _resolve(self, policy_cfg: ModelConfig, ref_cfg: ModelConfig | None, prov: dict):
        """Every model and the SAE as local directories, checked to fit (``fpo_dist.resolve``), before any is loaded;
        a missing path, an unknown id or an unreachable hub is a ConfigError (one line, exit 2)."""
        from dataclasses import replace

        from fpo_dist.resolve import ResolveError, check_fit, resolve_dir, resolve_model, resolve_sae

        def local(m: ModelConfig, key: str):
            info = resolve_model(m.name_or_path, m.revision, m.gguf_file, m.trust_remote_code, key=f"{key}.name_or_path")
            tok = resolve_dir(m.tokenizer, m.revision, "tokenizer", f"{key}.tokenizer") if m.tokenizer else None
            return replace(m, name_or_path=info.path, tokenizer=tok), info

        cfg = self.cfg
        try:
            policy_cfg, info = local(policy_cfg, "policy")
            ref_cfg = local(ref_cfg, "ref_model")[0] if ref_cfg is not None else None
            self._sae_dir = None
            if self.spec.needs_sae:
                source = cfg.sae.source or prov["sae"]["source"]
                sae_id = cfg.sae.sae_id if cfg.sae.source else prov["sae"]["sae_id"]
                sae = resolve_sae(source, sae_id)
                self._sae_dir = sae.path
                check_fit(prov["sae"]["layer"], info, sae, "policy.name_or_path")
        except ResolveError as e:
            raise ConfigError(str(e)) from None
        return policy_cfg, ref_cfg

    def _load_sae(self, prov: dict):
        """The frozen SAE when the loss needs one (loaded before the engine: see ``engine.zero3_init_context``)."""
        if not self.spec.needs_sae:
            return None
        from fpo_dist.sae import load_sae

        return load_sae(self._sae_dir, None, device=self.device, dtype="float32")  # resolved by _resolve

    def _setup_ds_config(self, policy_cfg: ModelConfig) -> None:
        """The checked DeepSpeed config and the checkpoint to resume (converted when the world size changed)."""
        from fpo_dist import engine as eng

        cfg = self.cfg
        self.bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        template = eng.load_ds_template(cfg.deepspeed) if cfg.deepspeed else {"zero_optimization": {"stage": 0}}
        self.ds_config = eng.build_ds_config(template, cfg, self.world, _hidden_size(policy_cfg), self.bf16)
        note = eng.single_rank_zero_note(self.ds_config, self.world)
        if note:
            self._print(note)
        self.resume_from = ckpt.resume_target(self.cfg, log=self._print)
        if self.resume_from is not None:
            load_dir, tag, saved = self.resume_from
            now = eng.engine_layout(self.ds_config)
            layout = eng.checkpoint_layout(Path(load_dir) / tag, saved.get("layout"), now)
            try:
                convert = eng.resume_conversion(layout, saved["world_size"], saved.get("zero_stage"), now, self.world,
                                                eng.zero_stage(self.ds_config), "optimizer_params" in saved)
            except ConfigError as e:
                raise ConfigError(f"resume {load_dir}/{tag}: {e}") from None
            if convert:  # DeepSpeed's universal checkpoint re-partitions the optimizer state
                self._print(f"resume: converting {load_dir}/{tag} ({layout}, world {saved['world_size']}) to DeepSpeed's "
                            f"universal format for this run ({now}, world {self.world})")
                tag = eng.to_universal_checkpoint(load_dir, tag, self.is_main, saved.get("optimizer_params"))
                if now == eng.PARTITIONED:
                    self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
            self.resume_from = (load_dir, tag, saved)

    def _setup_models(self, policy_cfg: ModelConfig, ref_cfg: ModelConfig | None, prov: dict) -> None:
        from fpo_dist import engine as eng
        from fpo_dist.forward import LossContext
        from fpo_dist.models import load_causal_lm, load_tokenizer, model_spec, pad_token_id, tokenizer_spec

        cfg = self.cfg
        self.tokenizer = load_tokenizer(tokenizer_spec(policy_cfg))
        self.pad_id = pad_token_id(self.tokenizer)
        diffs = check_cache_provenance(prov, cfg, self.tokenizer)
        if diffs:
            raise ConfigError(f"the cache {cfg.cache} does not match this run:\n  " + "\n  ".join(diffs))
        self.sae = self._load_sae(prov)
        self._setup_ds_config(policy_cfg)
        dtype = "bfloat16" if self.bf16 else "float32"
        self._zero_ctx = eng.zero3_init_context(self.ds_config)  # keep alive: partitioned loading
        lora = cfg.policy.lora
        varlen = cfg.batch_layout != "padded" and cfg.attention_kernel
        policy = load_causal_lm(model_spec(policy_cfg, dtype), requires_grad=not lora.rank, varlen=varlen)
        if lora.rank:
            from fpo_dist.lora import apply_lora

            policy = apply_lora(policy, lora, cfg.seed)
        if cfg.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
            if lora.rank:  # frozen embeddings: checkpointed blocks need inputs that require grad
                policy.enable_input_require_grads()
        policy.config.use_cache = False
        optimizer = build_optimizer([p for p in policy.parameters() if p.requires_grad], cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_factor(s, cfg.optim.warmup_steps))
        self.policy = eng.Engine(policy, self.ds_config, optimizer=optimizer, lr_scheduler=scheduler)
        self.reference = None
        if ref_cfg is not None:
            ref = load_causal_lm(model_spec(ref_cfg, dtype), varlen=varlen)
            self.reference = eng.Engine.frozen(ref, self.ds_config)
        self.layer = prov["sae"]["layer"]
        self.loss = LossContext(self.spec, cfg.loss.params, sae=self.sae, layer=self.layer, reference=self.reference,
                                logits=cfg.logits)

    def _setup_loader(self) -> None:
        from fpo_dist.loader import CacheLoader

        cfg = self.cfg
        try:
            self.loader = CacheLoader(
                self.store, topology=self.dist.topology(cfg.micro_batch_size, cfg.grad_accum), seed=cfg.seed,
                pad_id=self.pad_id, layout=cfg.batch_layout, prefetch=cfg.prefetch, epochs=cfg.epochs,
                ref_topm=self.spec.needs_ref_topm,
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
        from fpo_dist.tracking import Tracker

        out = Path(self.cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(self.cfg))
        self.tracker = Tracker(out, self.cfg.report_to, public_dict(self.cfg))  # credentials masked

    # ------------------------------------------------------------------ resume / checkpoints (fpo_dist.checkpoints)

    def _print(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def maybe_resume(self) -> None:
        if self.resume_from is None:
            return
        load_dir, tag, saved = self.resume_from
        state = self.policy.load(load_dir, tag, saved.get("optimizer_step"))
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        rng = ckpt.rng_file(load_dir, tag, self.rank)
        if rng.exists():  # absent in a converted checkpoint (another world or layout)
            ckpt.set_rng(torch.load(rng, weights_only=True))
        if self.is_main:
            print(f"resumed from {load_dir}/{tag}: step {self.step}, loader {state['loader']}", flush=True)

    def save_checkpoint(self) -> None:
        from fpo_dist import engine as eng

        root = Path(self.cfg.output_dir) / ckpt.CHECKPOINTS
        tag = f"step_{self.step}"
        state = {"step": self.step, "loader": self.loader.state_dict(), "config": public_dict(self.cfg)}
        self.policy.save(str(root), tag, client_state=state)
        torch.save(ckpt.get_rng(), ckpt.rng_file(root, tag, self.rank))
        ckpt.sync_tree(root / tag)  # this rank's files are on disk before rank 0 may commit the checkpoint
        self.dist.barrier()
        optimizer_step = self.policy.optimizer_step()
        if self.is_main:
            meta = {"step": self.step, "world_size": self.world, "loader": state["loader"], "loss": self.cfg.loss.name,
                    "run": ckpt.resume_fields(self.cfg), "zero_stage": eng.zero_stage(self.ds_config),
                    "optimizer_step": optimizer_step,
                    "layout": eng.engine_layout(self.ds_config),
                    "optimizer_params": [n for n, p in self.policy.module.named_parameters() if p.requires_grad]}
            ckpt.commit(root, tag, meta, self.cfg.keep_last)
            print(f"checkpoint {root / tag}", flush=True)
        self.dist.barrier()

    # ------------------------------------------------------------------ step-0 check

    def step0_check(self) -> None:
        """Policy == reference at step 0: cached log-probs (and, for FPO, pooled features) must be
        reproduced under the run's real layout (engine, dtype, batch layout), or the run aborts."""
        if not self.cfg.step0_check or self.step > 0:
            return
        from fpo_dist.consistency import compare
        from fpo_dist.loader import cached_topm
        from fpo_dist.models import build_batch, pairs_from_batch
        from fpo_dist.scoring import max_topm_kl, nonzeros, score_batch

        rows = self.store.ok_rows()[: self.cfg.step0_rows].tolist()
        batch = self.store.read_rows(rows, ref_topm=self.spec.needs_ref_topm)
        pb = build_batch(pairs_from_batch(batch), self.pad_id, self.cfg.batch_layout).to(self.device)
        self.policy.train(False)
        out = score_batch(self.policy, pb, self.sae, self.layer)  # what the cache worker computed, on this run
        topm_kl = max_topm_kl(self.policy, pb, cached_topm(batch).to(self.device)) if self.spec.needs_ref_topm else None
        self.policy.train(True)
        n = len(rows)
        pooled = None
        if out.pooled is not None:
            codes = out.pooled.cpu()
            pooled = [tuple(nonzeros(codes[r]) for r in (b, n + b)) for b in range(n)]
        lp = torch.stack([out.logp_sum[:n], out.logp_sum[n:]], 1).float().cpu().numpy()
        nt = torch.stack([out.n_tokens[:n], out.n_tokens[n:]], 1).cpu().numpy()
        cmp = compare(batch, lp, nt, pooled, self.sae.cfg.d_sae if self.sae is not None else 0)
        cmp.max_topm_kl = topm_kl
        atol_logp = self.cfg.step0_atol_logp * (30 if self.bf16 else 1)
        rtol_mse = self.cfg.step0_rtol_mse * (100 if self.bf16 else 1)
        if self.is_main:
            print(f"step-0 check: {cmp.describe()} (tolerances: avg logp {atol_logp:g}, relative MSE {rtol_mse:g})",
                  flush=True)
        if not cmp.ok(atol_logp, rtol_mse):
            raise RuntimeError(f"step-0 check failed: the initial policy does not reproduce the cache ({cmp.describe()}). "
                               + self._step0_hint())

    def _step0_hint(self) -> str:
        """What to check after a failed step-0 check; names both dtypes when the cache's and the run's differ."""
        cached = self.store.provenance.get("model", {}).get("dtype")
        run = "bfloat16" if self.bf16 else "float32"
        if cached and cached != run:
            return (f"The cache was computed in {cached} and this run computes in {run}: build the cache in {run} "
                    f"(cache --model.dtype {run}) or run in {cached} (train --dtype {cached}).")
        return ("Is the policy the cache's reference model, with the SAE and hook layer the cache was built with "
                f"(both in {run})?")

    # ------------------------------------------------------------------ train

    def train(self) -> None:
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {cfg.loss.name}", disable=not self.is_main,
                   file=sys.stderr, dynamic_ncols=True)
        self.policy.train(True)
        terms = FeatureTermMonitor(self.total_steps, cfg.loss.params.get("alpha"), cfg.loss.params.get("beta"))
        stats, t_step = StepStats(), time.perf_counter()
        for mb in self.loader if self.step < self.total_steps else ():
            self._epoch_of_step = mb.epoch
            mb = mb.to(self.device)
            loss, metrics = self.loss(self.policy, mb)
            self._check_finite(loss, metrics, mb)
            self.policy.backward(loss)
            boundary = self.policy.is_boundary()
            self.policy.step()
            stats.loss += float(loss.detach())
            for k, v in metrics.items():
                stats.metrics[k] = stats.metrics.get(k, 0.0) + float(v)
            stats.computed += mb.input_ids.numel()
            stats.tokens += mb.input_ids.numel() - mb.padding_tokens
            stats.scored += int(mb.ref_n_tokens.sum())
            stats.micro += 1
            stats.rows.extend(int(r) for r in mb.rows)
            if not boundary:
                continue
            self.step += 1  # the loader's state advanced when it handed out this step's last micro-batch
            record = self._reduce(stats, time.perf_counter() - t_step)
            if self.is_main and (warning := terms.update(record)):  # FPO's feature term swamps its margin term
                print(warning, flush=True)
                self.run_info.setdefault("warnings", []).append(warning)  # run_info.json and every sink, at the end
            if cfg.log_samples:
                self._log_samples(stats.rows, record["epoch"])
            if self.is_main and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                self._log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('reward_accuracy', 0):.2f}")
            bar.update(1)
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self.evaluate()
            if self.step >= self.total_steps:
                break  # before the loader hands out (and counts) another step
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save_checkpoint()
            stats, t_step = StepStats(), time.perf_counter()
        bar.close()

    def _check_finite(self, loss, metrics, mb) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if self.dist.any(not finite):
            local = "non-finite" if not finite else "finite (another rank diverged)"
            raise TrainingDiverged(
                f"non-finite loss at optimizer step {self.step + 1} on rank {self.rank} (local loss {local}: "
                f"{float(loss.detach())}); batch uids {mb.uids}; metrics "
                + json.dumps({k: float(v) for k, v in metrics.items()})
            )

    def _reduce(self, s: StepStats, seconds: float) -> dict:
        keys = sorted(s.metrics)
        vec = self.dist.sum([s.loss / s.micro] + [s.metrics[k] / s.micro for k in keys]
                            + [float(s.scored), float(s.computed), float(s.tokens)])
        means = [v / self.world for v in vec[:-3]]
        record = {"step": self.step, "loss": means[0]}
        record.update(dict(zip(keys, means[1:])))
        record.update(
            lr=self.policy.lr(), grad_norm=self.policy.grad_norm(), tokens_per_s=vec[-1] / max(seconds, 1e-9),
            scored_tokens_per_s=vec[-3] / max(seconds, 1e-9),
            padding_share=1.0 - vec[-1] / max(vec[-2], 1.0),
            step_time_s=seconds, peak_memory_mb=self.dist.max(self.dist.peak_memory_mb()), epoch=self._epoch_of_step,
        )
        return record

    def _log_samples(self, rows: list[int], epoch: int) -> None:
        """samples.jsonl: the source rows of every optimizer step, from all ranks (an audit trail)."""
        gathered = self.dist.gather_objects(rows)
        if self.is_main:
            with open(Path(self.cfg.output_dir) / "samples.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "epoch": epoch, "rows": sorted(r for g in gathered for r in g)}) + "\n")

    def _log(self, record: dict) -> None:
        self.tracker.log(record)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict | None:
        """Loss and metrics over every pair of the eval cache (all ranks; see ``fpo_dist.evaluation_loop``)."""
        if self.eval_store is None:
            return None
        from fpo_dist.evaluation_loop import evaluate

        batch = self.cfg.eval_batch_size or self.cfg.micro_batch_size
        record = {"step": self.step, **evaluate(self.policy, self.loss, self.eval_store, self.dist, self.pad_id, batch,
                                                 self.cfg.batch_layout)}
        self.eval_summary.add(record)
        if self.is_main:
            self._log(record)
            print(f"eval at step {self.step}: loss {record['eval/loss']:.4f}, reward accuracy "
                  f"{record.get('eval/reward_accuracy', float('nan')):.3f} over {record['eval/n_pairs']} pairs",
                  flush=True)
        return record

    def finish_evaluation(self) -> None:
        """The final evaluation (unless the last step was just evaluated) and the run's summary."""
        if self.eval_store is not None and (not self.eval_summary.last or self.eval_summary.last["step"] != self.step):
            self.evaluate()
        if self.eval_summary is not None:
            self.run_info["eval"] = self.eval_summary.to_dict()
        if self.is_main:
            (Path(self.cfg.output_dir) / "run_info.json").write_text(json.dumps(self.run_info, indent=1, default=str))
            self.tracker.summary(self.run_info)

    # ------------------------------------------------------------------ finish

    def export(self) -> str | None:
        if not self.cfg.export:
            return None
        out = str(Path(self.cfg.output_dir) / "hf")
        writer = None
        if self.cfg.policy.lora.rank:
            from fpo_dist.lora import export as writer
        self.policy.export_hf(out, self.tokenizer, torch.bfloat16 if self.bf16 else torch.float32, writer=writer)
        if self.is_main:
            what = "the LoRA adapter to {0}/adapter and the merged model" if writer else "Hugging Face model"
            print(f"exported {what.format(out)} to {out}", flush=True)
        return out

    def cleanup(self) -> None:
        try:
            if getattr(self, "loader", None) is not None:
                self.loader.close()
            if self.tracker is not None:
                self.tracker.close()
        finally:
            if getattr(self, "dist", None) is not None:
                self.dist.close()

    def run(self) -> None:
        try:
            self.setup()
            self.maybe_resume()
            self.step0_check()
            self.train()
            if self.cfg.save_final:
                self.save_checkpoint()
            self.finish_evaluation()
            self.export()
        finally:
            self.cleanup()


def _hidden_size(model_cfg: ModelConfig) -> int:
    from transformers import AutoConfig

    kwargs = {"gguf_file": model_cfg.gguf_file} if model_cfg.gguf_file else {}
    if model_cfg.trust_remote_code:
        kwargs["trust_remote_code"] = True
    c = AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision, **kwargs)
    c = getattr(c, "text_config", c)
    return int(c.hidden_size)


def main(argv: list[str] | None = None) -> int:
    from fpo_dist.config import load_config, split_config_args
    from fpo_dist.storage_options import mask_text  # error lines never show URL userinfo or a credential

    argv = list(sys.argv[1:] if argv is None else argv)
    # the deepspeed launcher appends --local_rank=N; LOCAL_RANK is in the environment too
    argv = [a for i, a in enumerate(argv) if not a.startswith("--local_rank") and
            not (i > 0 and argv[i - 1] == "--local_rank")]
    path, overrides = split_config_args(argv)
    try:
        cfg = load_config(TrainConfig, path, overrides)
    except ConfigError as e:
        print(f"configuration error: {mask_text(str(e))}", file=sys.stderr)
        return 2
    from fpo_dist.store import StoreError

    trainer = Trainer(cfg)
    try:
        trainer.run()
    except ConfigError as e:
        print(f"configuration error (rank {getattr(trainer, 'rank', '?')}): {mask_text(str(e))}", file=sys.stderr)
        return 2
    except StoreError as e:  # e.g. a shard that fails its checksum on read: one line naming it, no traceback
        print(f"cache error (rank {getattr(trainer, 'rank', '?')}, step {trainer.step}): {mask_text(str(e))}",
              file=sys.stderr)
        return 2
    return 0
