"""Typed configuration for the cache job and the train job.

A config is a tree of dataclasses.  It is built from defaults, then a YAML file, then command-line
overrides (``--section.key value`` or ``--section.key=value``; top-level keys as ``--key value``), and
checked before any work: unknown keys, wrong types, values outside a fixed set and invalid flag
combinations raise :class:`ConfigError` with the key and what to change.  Every run prints the
resolved config in full (:func:`to_yaml`), with credentials in ``storage_options`` masked (:func:`public_dict`).

A ``dict[str, Any]`` field (``storage_options``) takes a mapping in YAML, or JSON / a YAML flow mapping on the
command line.  Credentials come from a file or the environment, never the command line:
``--storage_options @creds.json`` (or ``storage_options: "@creds.json"`` in YAML), or ``FPO_STORAGE_OPTIONS``;
inline JSON holding a secret is refused (:mod:`fpo_dist.storage_options`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from fpo_dist.domains import NON_NEGATIVE, POSITIVE, UNIT_OPEN_RIGHT, check
from fpo_dist.errors import ConfigError
from fpo_dist.storage_options import (  # noqa: F401  (re-exported: the config's view of fsspec options)
    MASK,
    check_command_line_value,
    check_storage_options,
    is_url,
    mask_secrets,
    mask_text,
    options_from_env,
    resolve_storage_options,
    storage_options_for,
)


def parse_storage_options(text: str, paths: dict[str, str]) -> dict[str, Any] | None:
    """``--storage_options`` of a CLI outside the config (``verify``/``info``): JSON text or ``@path`` (else
    ``FPO_STORAGE_OPTIONS``) -> the options for ``paths`` (None when empty), or :class:`ConfigError`."""
    options = resolve_storage_options(text) or options_from_env(paths)
    check_storage_options(options, paths)
    return options or None


# --------------------------------------------------------------------------------------------------
# Sections shared by both jobs
# --------------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the preference pairs come from and how they become token sequences."""

    source: str = ""  # hub dataset id, or local .json/.jsonl/.parquet file(s) (comma-separated or a glob)
    split: str = "train"
    revision: str | None = None  # hub datasets only
    schema: Literal["auto", "strings", "messages", "transcripts"] = "auto"
    columns: dict[str, str] = field(default_factory=dict)  # e.g. {prompt: question, chosen: good}
    template: Literal["auto", "chat", "plain"] = "auto"  # auto: chat template if the tokenizer has one
    max_length: int = 1024  # prompt + response tokens
    max_prompt_length: int = 512
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"  # which part of the prompt survives
    over_length: Literal["truncate", "drop"] = "truncate"  # drop: over-length rows become bad rows
    on_bad_row: Literal["fail", "skip"] = "fail"  # skip: bad rows are counted and reported, not fatal
    max_rows: int | None = None  # use only the first N rows (smoke runs)

    def validate(self, prefix: str = "data") -> None:
        if not self.source:
            raise ConfigError(f"'{prefix}.source' is required: a hub dataset id or local .json/.jsonl/.parquet file(s)")
        if self.max_prompt_length <= 0 or self.max_length <= 0:
            raise ConfigError(f"'{prefix}.max_length' and '{prefix}.max_prompt_length' must be positive")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"'{prefix}.max_prompt_length' ({self.max_prompt_length}) must be smaller than "
                f"'{prefix}.max_length' ({self.max_length}), or no response token fits"
            )
        unknown = set(self.columns) - {"prompt", "chosen", "rejected"}
        if unknown:
            raise ConfigError(f"'{prefix}.columns' maps unknown fields {sorted(unknown)}; use prompt/chosen/rejected")
        if self.max_rows is not None and self.max_rows <= 0:
            raise ConfigError(f"'{prefix}.max_rows' must be positive or null")


@dataclass
class ModelConfig:
    """A causal LM: hub id or local directory (optionally a GGUF file inside it)."""

    name_or_path: str = ""
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gguf_file: str | None = None
    tokenizer: str | None = None  # defaults to name_or_path
    trust_remote_code: bool = False  # only when the user explicitly asks

    @classmethod
    def from_provenance(cls, prov: dict, trust_remote_code: bool = False) -> ModelConfig:
        """A cache's reference model (its provenance) as a config.  ``trust_remote_code`` comes from the user's
        run, never from the store: a shared cache must not be able to make this process run remote code."""
        fields = {k: v for k, v in prov["model"].items() if k != "files"}
        return cls(**{**fields, "trust_remote_code": trust_remote_code})


@dataclass
class SAEConfig:
    """A sae-lens SAE: a release + id for ``SAE.from_pretrained``, or a directory saved by sae-lens."""

    source: str = ""  # release name (e.g. gemma-scope-2b-pt-res-canonical) or local directory
    sae_id: str | None = None  # e.g. layer_25/width_16k/canonical (releases only)
    layer: int | None = None  # hook layer ℓ: residual output of decoder block ℓ (0-based)


@dataclass
class LoraConfig:
    """LoRA adapters on the policy through peft (``rank`` 0: full fine-tuning).  The reference stays the base model."""

    rank: int = 0
    alpha: float = 16.0  # scaling alpha / rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # peft names, or all-linear

    def validate(self) -> None:
        if self.rank < 0:
            raise ConfigError("'policy.lora.rank' must be >= 0 (0: full fine-tuning, no adapters)")
        if self.rank and (self.alpha <= 0 or not 0 <= self.dropout < 1 or not self.target_modules):
            raise ConfigError("'policy.lora.alpha' must be positive, 'policy.lora.dropout' in [0, 1) and "
                              "'policy.lora.target_modules' non-empty (module names such as q_proj,v_proj, or all-linear)")


@dataclass
class PolicyConfig(ModelConfig):
    """The trained model: a :class:`ModelConfig` (empty: the cache's reference model) and optional LoRA adapters."""

    lora: LoraConfig = field(default_factory=LoraConfig)


# --------------------------------------------------------------------------------------------------
# Cache job
# --------------------------------------------------------------------------------------------------


@dataclass
class CacheConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: str = ""  # store path or fsspec URL
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for an 'output' URL (JSON on the CLI)
    workers: int = 0  # 0: one per GPU in the cluster, else CPU workers (one per cpus_per_worker)
    cpus_per_worker: int = 1  # CPU workers: torch threads per actor
    device: Literal["auto", "cpu", "cuda"] = "auto"
    rows_per_shard: int = 512
    chunk_rows: int = 256  # zarr chunk length; rows_per_shard must be a multiple
    batch_size: int = 8  # pairs per forward (2x sequences)
    # "shared": per pair one [prompt, chosen, rejected] segment group, the prompt computed once (rejected positions
    # continue from the prompt); "packed": the batch's sequences back to back in one row, per-sequence
    # position_ids, no padding; "padded": one right-padded row per sequence.  Recorded in the store's provenance.
    batch_layout: Literal["shared", "packed", "padded"] = "shared"
    # the shared/packed rows' attention (fpo_dist.attention.KERNELS): "sdpa" one call per sequence (any device);
    # "flex" one FlexAttention call per layer (CUDA; forward-only on CPU); "flash" one varlen_attn call per layer
    # (CUDA, bf16/fp16, no soft-cap).  Recorded in the store's provenance.
    attention_kernel: Literal["sdpa", "flex", "flash"] = "sdpa"
    per_token_logps: bool = False
    per_token_codes: bool = False
    # M > 0: per response position, the reference's M most probable next tokens, their log-probs and the log of the
    # remaining mass (what tdpo1-offline / tdpo2-offline train on; docs/cache-format.md gives the size)
    ref_topm: int = 0
    overwrite: bool = False
    ray_address: str | None = None  # None: local Ray instance (or RAY_ADDRESS when set); "auto": attach
    max_retries: int = 3  # per shard, when an actor dies

    def validate(self) -> None:
        self.data.validate()
        if not self.model.name_or_path:
            raise ConfigError("'model.name_or_path' is required: the reference model (hub id or local dir)")
        if not self.sae.source:
            raise ConfigError("'sae.source' is required: a sae-lens release or a local SAE directory")
        if self.sae.layer is None:
            raise ConfigError("'sae.layer' is required: the decoder block whose residual output the SAE reads")
        if not self.output:
            raise ConfigError("'output' is required: where the cache store is written (path or fsspec URL)")
        if isinstance(self.ref_topm, bool) or not isinstance(self.ref_topm, int) or self.ref_topm < 0:
            raise ConfigError(f"'ref_topm' must be an integer >= 0 (reference tokens kept per response position; "
                              f"0: none), got {self.ref_topm!r}")
        self.storage_options = self.storage_options or options_from_env({"output": self.output})
        check_storage_options(self.storage_options, {"output": self.output})
        if self.chunk_rows <= 0 or self.rows_per_shard <= 0 or self.rows_per_shard % self.chunk_rows:
            raise ConfigError(
                f"'rows_per_shard' ({self.rows_per_shard}) must be a positive multiple of 'chunk_rows' "
                f"({self.chunk_rows}) so that exactly one writer owns each chunk"
            )
        if self.batch_size <= 0 or self.cpus_per_worker <= 0 or self.workers < 0:
            raise ConfigError("'batch_size' and 'cpus_per_worker' must be positive, 'workers' >= 0")


# --------------------------------------------------------------------------------------------------
# Train job
# --------------------------------------------------------------------------------------------------


@dataclass
class LossConfig:
    """The loss (a name registered in ``fpo_dist.losses.LOSSES``) and its hyper-parameters.

    Hyper-parameters and their defaults are declared once, by each loss's registry entry.  Set one as
    ``loss.<key>`` (``--loss.beta 0.1``, or ``loss: {beta: 0.1}`` in YAML) or under ``loss.params``.  Any key that
    some registered loss declares is accepted, so one set of flags can drive several losses; after validation
    ``params`` holds exactly the chosen loss's resolved hyper-parameters (given values over its defaults) and
    ``ignored`` the given keys that it does not use.
    """

    name: str = "fpo"
    params: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    _open_field = "params"  # the config parser stores unknown keys of this section here, checked in validate()

    def spec(self):
        """The registry entry of ``name`` (after ``validate``)."""
        from fpo_dist.losses import LOSSES

        return LOSSES[self.name]

    def validate(self) -> None:
        from fpo_dist.losses import LOSSES, hyper_parameter_types

        if self.name not in LOSSES:
            raise ConfigError(f"'loss.name' must be one of {list(LOSSES)}, got {self.name!r}")
        types_ = hyper_parameter_types()
        spec = LOSSES[self.name]
        resolved, ignored = dict(spec.hyper_parameters), list(self.ignored)
        for key, value in self.params.items():
            if key not in types_:
                raise _unknown_key(f"loss.{key}", sorted(["name", "params", *types_]), "'loss'", "config")
            tp = types_[key]
            tp = Literal[tp] if isinstance(tp, tuple) else tp  # type: ignore[valid-type]
            value = _coerce(value, tp, f"loss.{key}", "config", from_string=isinstance(value, str))
            if key in resolved:
                if key in spec.choices and value not in spec.choices[key]:
                    raise ConfigError(f"'loss.{key}' must be one of {list(spec.choices[key])}, got {value!r}")
                if key in spec.domains:
                    check(f"loss.{key}", value, spec.domains[key], f"loss '{self.name}'")
                resolved[key] = value
            elif key not in ignored:
                ignored.append(key)
        self.params, self.ignored = resolved, sorted(ignored)


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "rmsprop"] = "adamw"
    lr: float = 5e-7
    weight_decay: float = 0.0
    warmup_steps: int = 150
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    # torch's fused Adam/AdamW kernel: one pass over the (flat ZeRO) partition, no temporaries — 0.031 of the
    # per-tensor loop's step on CPU (bench/optimizer.py).  null (the default): fused for adam/adamw (TRL's default
    # too), the per-tensor loop for rmsprop (no fused kernel); false: the per-tensor loop (its results differ from
    # the fused kernel's in the last bits); true with rmsprop is refused
    fused: bool | None = None

    def use_fused(self) -> bool:
        """Whether the optimizer runs torch's fused kernel (``fused``, resolved for the optimizer)."""
        return self.name != "rmsprop" if self.fused is None else self.fused

    def validate(self) -> None:
        check("optim.lr", self.lr, POSITIVE)
        check("optim.weight_decay", self.weight_decay, NON_NEGATIVE)
        check("optim.warmup_steps", self.warmup_steps, NON_NEGATIVE, "linear warm-up steps; 0: none")
        for i, b in enumerate(self.betas):
            check(f"optim.betas[{i}]", b, UNIT_OPEN_RIGHT)
        check("optim.eps", self.eps, POSITIVE)
        check("optim.grad_clip", self.grad_clip, NON_NEGATIVE, "gradient-norm clipping threshold; 0: none")
        if self.fused and self.name == "rmsprop":
            raise ConfigError("'optim.fused': torch has a fused kernel for adam and adamw only, not rmsprop")


@dataclass
class TrainConfig:
    cache: str = ""  # the store built by the cache job (path or fsspec URL)
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for a cache/eval_cache URL
    plugins: list[str] = field(default_factory=list)  # "module" or "module:function", run first (register a loss)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # empty: the cache's reference model (+ LoRA)
    ref_model: ModelConfig = field(default_factory=ModelConfig)  # online losses; empty: the cache's
    sae: SAEConfig = field(default_factory=SAEConfig)  # empty: the cache's SAE
    output_dir: str = "runs/fpo"
    deepspeed: str = ""  # path to a DeepSpeed JSON config
    micro_batch_size: int = 2  # pairs per rank per micro-step
    grad_accum: int = 1
    global_batch_size: int | None = None  # checked = micro * accum * data-parallel world
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    # "selected": the output layer only where a response token is predicted, chunked (fpo_dist.lm_head);
    # "materialized": full [rows, T, vocab] logits (the path it replaces; for comparisons and benchmarks)
    logits: Literal["selected", "materialized"] = "selected"
    # "shared": each pair's [prompt, chosen, rejected] as one segment group, the prompt computed once (the
    # rejected tokens attend to the prompt and themselves, positions continuing from the prompt); "packed": each
    # micro-batch's chosen and rejected sequences back to back in one row (per-sequence position_ids, block-
    # diagonal attention, no padding); "padded": one right-padded row per sequence.  Any layout reads any cache.
    batch_layout: Literal["shared", "packed", "padded"] = "shared"
    # the shared/packed rows' attention (fpo_dist.attention.KERNELS): "sdpa" one call per sequence (any device);
    # "flex" one FlexAttention call per layer (CUDA: no FlexAttention backward on CPU); "flash" one varlen_attn call
    # per layer (CUDA, bf16/fp16, no soft-cap)
    attention_kernel: Literal["sdpa", "flex", "flash"] = "sdpa"
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end)
    # a resumable checkpoint (weights + optimizer state: ~12 bytes per parameter) after the last step; false:
    # only save_every's, e.g. a run whose product is the HF export (tests, benchmarks)
    save_final: bool = True
    keep_last: int = 2
    resume: str | None = None  # "auto" or a checkpoint path
    log_every: int = 1
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, none (several: a,b)
    eval_cache: str = ""  # a held-out cache built with the training cache's config (another data.split)
    eval_every: int = 0  # optimizer steps between evaluations on eval_cache (0: only at the end)
    eval_batch_size: int | None = None  # pairs per rank per eval forward; default micro_batch_size
    log_samples: bool = False  # samples.jsonl: the source rows of every step (an audit trail; one gather per step)
    step0_check: bool = True
    step0_rows: int = 4
    step0_atol_logp: float = 1e-3  # per-token average log-prob tolerance
    step0_rtol_mse: float = 1e-4  # pooled-feature MSE tolerance, relative to the cached vector's mean square
    # (both tolerances are for fp32; bf16 runs use 30x / 100x looser ones)
    export: bool = True  # HF export at the end
    prefetch: int = 2  # micro-batches read ahead by the loader
    dist_timeout_s: int = 1800

    def validate(self) -> None:
        if not self.cache:
            raise ConfigError("'cache' is required: the path of a store built by `python -m fpo_dist.cache`")
        if self.micro_batch_size <= 0 or self.grad_accum <= 0 or self.epochs <= 0:
            raise ConfigError("'micro_batch_size', 'grad_accum' and 'epochs' must be positive")
        self.optim.validate()
        check("step0_atol_logp", self.step0_atol_logp, POSITIVE)
        check("step0_rtol_mse", self.step0_rtol_mse, POSITIVE)
        check("dist_timeout_s", self.dist_timeout_s, POSITIVE)
        self._import_plugins()
        self.loss.validate()
        self.policy.lora.validate()
        spec = self.loss.spec()
        if not spec.needs_sae and self.sae.source:
            raise ConfigError(
                f"'sae.source' is set but loss '{self.loss.name}' uses no SAE; drop 'sae.*' or use --loss.name fpo"
            )
        if self.ref_model.name_or_path and spec.needs != "reference_model":
            from fpo_dist.losses import LOSSES

            online = "/".join(n for n, s in LOSSES.items() if s.needs == "reference_model")
            raise ConfigError(
                f"'ref_model' is set but loss '{self.loss.name}' uses no resident reference model; "
                f"drop 'ref_model.*' or choose {online}"
            )
        if self.resume not in (None, "auto") and not Path(self.resume).exists():
            raise ConfigError(f"'resume' must be 'auto' or an existing checkpoint directory, got '{self.resume}'")
        if self.logits == "materialized" and self.batch_layout == "shared":
            raise ConfigError("'logits: materialized' (full logits, the path the selected head replaces) runs the "
                              "packed or padded layout: add --batch_layout packed (or padded)")
        if self.keep_last < 1:
            raise ConfigError("'keep_last' must be at least 1")
        if self.log_every < 1 or self.step0_rows < 1:
            raise ConfigError("'log_every' and 'step0_rows' must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("'max_steps' must be positive, or null for the whole run")
        if self.save_every < 0 or self.prefetch < 0:
            raise ConfigError("'save_every' (0: only at the end) and 'prefetch' must not be negative")
        self._validate_eval_and_tracking()
        if not self.sae.source and (self.sae.sae_id is not None or self.sae.layer is not None):
            raise ConfigError("'sae.sae_id'/'sae.layer' need 'sae.source'; without it the cache's SAE and layer are "
                              "used, so drop them")

    def _validate_eval_and_tracking(self) -> None:
        from fpo_dist.tracking import check_report_to

        try:
            check_report_to(self.report_to)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.eval_every < 0:
            raise ConfigError("'eval_every' must not be negative (0: evaluate only at the end)")
        if self.eval_every and not self.eval_cache:
            raise ConfigError("'eval_every' is set but there is no 'eval_cache' to evaluate on; build one with "
                              "`python -m fpo_dist.cache` (the training cache's config, another data.split)")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError("'eval_batch_size' must be positive, or null for micro_batch_size")
        paths = {"cache": self.cache, "eval_cache": self.eval_cache}
        self.storage_options = self.storage_options or options_from_env(paths)
        check_storage_options(self.storage_options, paths)

    def _import_plugins(self) -> None:
        """Import each ``plugins`` entry: ``module`` (registers on import) or ``module:function`` (called after)."""
        import importlib

        for name in self.plugins:
            module, _, func = name.partition(":")
            try:
                mod = importlib.import_module(module)
            except ImportError as e:
                raise ConfigError(f"'plugins': cannot import {module!r}: {e}") from None
            if func:
                if not callable(getattr(mod, func, None)):
                    raise ConfigError(f"'plugins': {module!r} has no function {func!r}")
                getattr(mod, func)()


# --------------------------------------------------------------------------------------------------
# Building configs: defaults < YAML < CLI
# --------------------------------------------------------------------------------------------------

_T = typing.TypeVar("_T")


def load_config(cls: type[_T], yaml_path: str | Path | None = None, overrides: list[str] | None = None) -> _T:
    """Build ``cls`` from defaults, a YAML file and ``--key value`` overrides; validate it."""
    cfg = cls()
    if yaml_path:
        import yaml

        path = Path(yaml_path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:  # line and column only: the text around them may hold a credential
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{at}: {mask_text(str(getattr(e, 'problem', '') or ''))}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
        _apply_mapping(cfg, raw, prefix="", origin=str(path))
    for key, value in _parse_overrides(overrides or []):
        check_command_line_value(key, value)  # no credential on a command line (fpo_dist.storage_options)
        _apply_dotted(cfg, key, value, origin="command line")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def public_dict(cfg: Any) -> dict:
    """:func:`to_dict` for printing, logging and files: credentials in ``storage_options`` masked, and URL userinfo or
    a credential-like ``name=value`` in any other string (:func:`mask_text`)."""
    out = _plain(to_dict(cfg), mask_text)
    if "storage_options" in out:
        out["storage_options"] = mask_secrets(out["storage_options"])
    return out


def to_yaml(cfg: Any) -> str:
    """The config as YAML, as printed and written next to a run (:func:`public_dict`: credentials masked)."""
    import yaml

    return yaml.safe_dump(_plain(public_dict(cfg)), sort_keys=False, default_flow_style=False)


def _plain(x: Any, text=None) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v, text) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v, text) for v in x]
    return text(x) if text is not None and isinstance(x, str) else x


def _parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': overrides are --key value or --key=value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 2
        else:  # a bare flag: boolean true
            value = "true"
            i += 1
        out.append((key.replace("-", "_"), value))
    return out


def _fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _unknown_key(key: str, known: list[str], where: str, origin: str) -> ConfigError:
    hint = difflib.get_close_matches(key.split(".")[-1], known, n=1)
    did_you_mean = f"; did you mean '{hint[0]}'?" if hint else ""
    return ConfigError(f"{origin}: unknown key '{key}'{did_you_mean} (known keys in {where}: {', '.join(known)})")


def _apply_mapping(obj: Any, raw: dict, prefix: str, origin: str) -> None:
    fields = _fields(obj)
    hints = typing.get_type_hints(type(obj))
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if _set_open(obj, key, value, from_string=False):
            continue
        if key not in fields:
            raise _unknown_key(full, sorted(fields), f"'{prefix[:-1]}'" if prefix else "the top level", origin)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: '{full}' is a section; give it a mapping, not {value!r}")
            _apply_mapping(current, value, prefix=f"{full}.", origin=origin)
        else:
            setattr(obj, key, _coerce(value, hints[key], full, origin, from_string=False))


def _set_open(obj: Any, key: str, value: Any, from_string: bool) -> bool:
    """An open section (``_open_field``, e.g. ``loss``) keeps keys that are not its fields, and the mapping given
    as its open field, for its own ``validate`` to check; True when ``key`` was taken that way."""
    open_field = getattr(type(obj), "_open_field", None)
    if open_field is None or (key in _fields(obj) and key != open_field):
        return False
    if key == open_field:
        if from_string:
            import yaml

            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping of hyper-parameters, e.g. {{beta: 0.1}}")
        getattr(obj, open_field).update(value)
    else:
        getattr(obj, open_field)[key] = value
    return True


def _apply_dotted(cfg: Any, key: str, value: str, origin: str) -> None:
    parts = key.split(".")
    obj, prefix = cfg, ""
    for part in parts[:-1]:
        fields = _fields(obj)
        if part not in fields or not dataclasses.is_dataclass(getattr(obj, part)):
            raise _unknown_key(prefix + part, sorted(fields), f"'{prefix[:-1]}'" if prefix else "the top level", origin)
        obj, prefix = getattr(obj, part), f"{prefix}{part}."
    last = parts[-1]
    fields = _fields(obj)
    if _set_open(obj, last, value, from_string=True):
        return
    if last not in fields:
        raise _unknown_key(key, sorted(fields), f"'{prefix[:-1]}'" if prefix else "the top level", origin)
    if dataclasses.is_dataclass(getattr(obj, last)):
        raise ConfigError(f"{origin}: '{key}' is a section; set its keys, e.g. --{key}.<key> value")
    hint = typing.get_type_hints(type(obj))[last]
    setattr(obj, last, _coerce(value, hint, key, origin, from_string=True))


def _coerce(value: Any, tp: Any, key: str, origin: str, from_string: bool) -> Any:
    """Convert ``value`` to type ``tp`` (from YAML or from a CLI string), or raise naming ``key``."""
    origin_tp = get_origin(tp)
    args = get_args(tp)
    if origin_tp in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (from_string and str(value).lower() in ("none", "null")):
            if type(None) in args:
                return None
        last_err: ConfigError | None = None
        for a in non_none:
            try:
                return _coerce(value, a, key, origin, from_string)
            except ConfigError as e:
                last_err = e
        raise last_err or ConfigError(f"{origin}: '{key}': cannot use {value!r}")
    if origin_tp is Literal:
        choices = list(args)
        if value not in choices:
            raise ConfigError(f"{origin}: '{key}' must be one of {choices}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_string and str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if from_string and str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{origin}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{origin}: '{key}' must be an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{origin}: '{key}' must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{origin}: '{key}' must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{origin}: '{key}' must be a number, got {value!r}") from None
    if tp is str:
        if from_string or isinstance(value, str):
            return str(value)
        raise ConfigError(f"{origin}: '{key}' must be a string, got {value!r}")
    if (origin_tp in (dict,) or tp is dict) and key.endswith("storage_options"):  # @file, secrets refused on the CLI
        return resolve_storage_options(value, key, origin, from_command_line=from_string)
    if origin_tp in (dict,) or tp is dict:
        return _coerce_mapping(value, args[1] if len(args) == 2 else str, key, origin, from_string)
    if origin_tp in (tuple, list):
        if from_string:
            value = [v for v in str(value).split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{origin}: '{key}' must be a list, got {value!r}")
        elem = args[0] if args else str
        if origin_tp is tuple and len(args) >= 2 and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{origin}: '{key}' must have {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, key, origin, from_string) for v, a in zip(value, args))
        items = [_coerce(v, elem, key, origin, from_string) for v in value]
        return tuple(items) if origin_tp is tuple else items
    raise ConfigError(f"{origin}: '{key}': unsupported config type {tp!r}")  # pragma: no cover


def _coerce_mapping(value: Any, value_type: Any, key: str, origin: str, from_string: bool) -> dict:
    """A mapping with string keys; values strings (``dict[str, str]``) or any YAML/JSON value (``dict[str, Any]``).
    From the command line the value is JSON or a YAML flow mapping."""
    if from_string:
        import yaml

        try:
            value = yaml.safe_load(value)  # JSON is YAML
        except yaml.YAMLError as e:
            raise ConfigError(f"{origin}: '{key}' must be a JSON mapping, e.g. '{{\"a\": 1}}': {e}") from None
    if value_type is Any:
        value = {} if value is None else value  # an empty YAML key
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{origin}: '{key}' must be a mapping with string keys (JSON on the command line, "
                              f"e.g. '{{\"endpoint_url\": \"http://127.0.0.1:9000\"}}'), got {type(value).__name__}")
        return dict(value)
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"{origin}: '{key}' must be a mapping of strings, e.g. {{prompt: question}}")
    return dict(value)


def split_config_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """Pull ``--config PATH`` out of ``argv``; the rest are overrides."""
    rest, path = [], None
    i = 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            path, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            path, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return path, rest
