"""Everything DeepSpeed, behind one thin layer: config building, init, backward/step, save/load, export.

No other module imports deepspeed.  DeepSpeed config dicts are built by the pure function
:func:`build_ds_config` from a JSON template (``ds_configs/*.json``, using DeepSpeed's ``"auto"``
convention) and the train config, and checked: micro-batch × grad-accumulation × data-parallel world
must equal the global batch.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import resource
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fpo_dist.config import ConfigError, TrainConfig
from fpo_dist.machine import usable_cores

# DeepSpeed 0.19 still calls the deprecated collective names once per partitioned parameter.
warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")


# --------------------------------------------------------------------------------------------- config


def load_ds_template(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"DeepSpeed config not found: {path} (see ds_configs/zero3.json)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None


def build_ds_config(template: dict, cfg: TrainConfig, world_size: int, hidden_size: int, bf16: bool) -> dict:
    """Fill the template's ``"auto"`` values from ``cfg`` and check the batch arithmetic (pure)."""
    ds = copy.deepcopy(template)
    micro, accum = cfg.micro_batch_size, cfg.grad_accum
    global_batch = micro * accum * world_size
    if cfg.global_batch_size is not None and cfg.global_batch_size != global_batch:
        raise ConfigError(
            f"global_batch_size {cfg.global_batch_size} != micro_batch_size {micro} × grad_accum {accum} × "
            f"data-parallel world {world_size} = {global_batch}; change grad_accum to "
            f"{cfg.global_batch_size / (micro * world_size):g} or the global batch size"
        )

    def fill(key: str, value: Any, where: dict = ds, must_match: bool = True) -> None:
        current = where.get(key, "auto")
        if current == "auto":
            where[key] = value
        elif must_match and current != value:
            raise ConfigError(
                f"the DeepSpeed config sets {key}={current} but the train config implies {value} "
                f"(micro_batch_size {micro} × grad_accum {accum} × world {world_size}, optim.grad_clip, dtype); "
                "set it to \"auto\""
            )

    fill("train_micro_batch_size_per_gpu", micro)
    fill("gradient_accumulation_steps", accum)
    fill("train_batch_size", global_batch)
    fill("gradient_clipping", cfg.optim.grad_clip)
    # the policy's dtype decides: bf16 weights need DeepSpeed's bf16 mode (fp32 master weights), always
    fill("enabled", bf16, ds.setdefault("bf16", {}))
    if bf16 and isinstance(ds.get("fp16"), dict) and ds["fp16"].get("enabled") is True:
        raise ConfigError("the DeepSpeed config enables fp16 while the run uses bf16; drop the fp16 section")
    zero = ds.get("zero_optimization", {})
    fill("reduce_bucket_size", hidden_size * hidden_size, zero, must_match=False)
    fill("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size), zero, must_match=False)
    fill("stage3_param_persistence_threshold", 10 * hidden_size, zero, must_match=False)
    leftover = _find_auto(ds)
    if leftover:
        raise ConfigError(f"DeepSpeed config keys left as \"auto\" that fpo-dist cannot fill: {leftover}")
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(
            "the DeepSpeed config defines 'optimizer'/'scheduler'; fpo-dist builds them from the train config "
            "(optim.*): remove those sections"
        )
    offload = zero.get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    if offload:
        ds.setdefault("zero_force_ds_cpu_optimizer", False)  # the client torch optimizer runs on CPU
    return ds


def _find_auto(d: Any, prefix: str = "") -> list[str]:
    if isinstance(d, dict):
        return [k for key, v in d.items() for k in _find_auto(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if d == "auto" else []


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def single_rank_zero_note(ds_config: dict, world_size: int) -> str | None:
    """A warning for ZeRO stage ≥ 1 on one rank without offloading (pure): it partitions nothing, yet ZeRO-3 still
    gathers and releases every layer's weights each forward and backward."""
    zero = ds_config.get("zero_optimization", {})
    offload = any(zero.get(k, {}).get("device") in ("cpu", "nvme") for k in ("offload_param", "offload_optimizer"))
    if world_size != 1 or zero_stage(ds_config) == 0 or offload:
        return None
    return (f"WARNING: ZeRO stage {zero_stage(ds_config)} on a world of one rank partitions nothing and still pays "
            "for it (bench, CPU, one rank: ZeRO-3 took 1.7x the step time and 1.3x the memory of the same run "
            "without --deepspeed). For one device, leave out --deepspeed (the trainer then runs DeepSpeed without ZeRO "
            "partitioning; such a run resumes under ZeRO on more ranks, and back); keep ZeRO-3 here only to offload.")


# --------------------------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job and every collective the trainer uses (the trainer never calls
    ``torch.distributed`` itself).  Collectives run on ``device``: NCCL has no CPU tensors."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        vec = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(vec)
        return vec.cpu().tolist()

    def max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.cpu()[0])

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank."""
        return self.max(1.0 if flag else 0.0) > 0

    def gather_objects(self, obj: Any) -> list:
        """``obj`` of every rank, in rank order (on every rank)."""
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def topology(self, micro_batch_size: int, grad_accum: int):
        """The loader's rank arithmetic for this process (:class:`fpo_dist.loader.Topology`)."""
        from fpo_dist.loader import Topology

        return Topology(micro_batch_size, grad_accum, self.world, self.rank)

    def peak_memory_mb(self) -> float:
        """This process's peak: CUDA allocations on a GPU, peak RSS on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    @staticmethod
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

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_distributed(timeout_s: int) -> Distributed:
    """Join the process group (NCCL on GPUs, gloo on CPU).

    Works under ``deepspeed``, ``torchrun`` and plain ``python`` (world size 1 on a free local port).
    """
    import deepspeed

    if "RANK" not in os.environ:
        for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
            if int(os.environ.get(var, "1") or 1) > 1:
                raise RuntimeError(
                    f"{var}={os.environ[var]} but RANK is not set: launch through torchrun or deepspeed (see "
                    "cluster/slurm/train.sbatch), or every task would train alone as a world of 1"
                )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    gpu = torch.cuda.is_available()
    if not gpu and os.environ.get("FPO_DS_SHM", "0") != "1":
        # DeepSpeed's CPU shared-memory allreduce compiles for ~70 s and leaves /dev/shm buffers behind;
        # gloo is enough for CPU runs.  (A star import in deepspeed.comm shadows the module name.)
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(
        dist_backend="nccl" if gpu else "gloo", timeout=datetime.timedelta(seconds=timeout_s), verbose=False
    )
    local_rank = int(os.environ["LOCAL_RANK"])
    if gpu:
        torch.cuda.set_device(local_rank)
    return Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device())


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def zero3_init_context(ds_config: dict):
    """Must be created (and kept alive) before ``from_pretrained`` so weights load partitioned under ZeRO-3.

    Import sae_lens (load the SAE) before this: DeepSpeed's ``zero.Init`` patches ``nn.Module`` subclassing, and
    sae_lens's Generic SAE classes fail to define under that patch.
    """
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None


def gathered(params: list[torch.Tensor]):
    """A context in which ZeRO-3-partitioned ``params`` hold their full data (read-only); a null context for
    parameters that are not partitioned or already gathered (e.g. a tied weight inside its module's forward)."""
    import contextlib

    todo = {id(p): p for p in params if hasattr(p, "ds_id") and getattr(p, "ds_status", None) is not None}
    if not todo:
        return contextlib.nullcontext()
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    todo = {k: p for k, p in todo.items() if p.ds_status != ZeroParamStatus.AVAILABLE}
    if not todo:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(todo.values()), modifier_rank=None)


# A checkpoint's layout, as DeepSpeed writes it:
# - PLAIN: no ZeRO, fp32 (no --deepspeed): the module and the torch optimizer's state whole, in one
#   ``mp_rank_00_model_states.pt``, the same on every rank — it loads as it is on any number of ranks;
# - PLAIN_BF16: no ZeRO, bf16: the same file, holding DeepSpeed's bf16 optimizer wrapper (``FP16_UnfusedOptimizer``
#   for a torch optimizer: an fp32 master copy of each parameter, ``fp32_groups``, and the optimizer's state over them);
# - PARTITIONED: ZeRO stage 1-3: DeepSpeed's optimizer-state files (``*_optim_states.pt``), split by rank.
# Between any two of them, or for PARTITIONED on another world size or ZeRO stage, a checkpoint goes through
# DeepSpeed's universal format (one directory per parameter, ``zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt``).
PLAIN, PLAIN_BF16, PARTITIONED = "plain", "plain-bf16", "partitioned"
PLAIN_STATES = "mp_rank_00_model_states.pt"


def engine_layout(ds_config: dict) -> str:
    """The layout an engine built from ``ds_config`` saves (and loads without conversion)."""
    if zero_stage(ds_config) > 0:
        return PARTITIONED
    return PLAIN_BF16 if ds_config.get("bf16", {}).get("enabled") else PLAIN


def _has_zero_files(ckpt_dir: str | Path) -> bool:
    return any(Path(ckpt_dir).glob("*optim_states.pt"))


def checkpoint_layout(ckpt_dir: str | Path, recorded: str | None, now: str) -> str:
    """A checkpoint's layout: as recorded with it, or for one saved before layouts were recorded, from its files —
    where they show no ZeRO, this run's no-ZeRO layout ``now`` when it has one (fp32 or bf16: the files do not say)."""
    if recorded:
        return recorded
    if _has_zero_files(ckpt_dir):
        return PARTITIONED
    return now if now in (PLAIN, PLAIN_BF16) else PLAIN


def resume_conversion(saved: str, saved_world: int, saved_stage: int | None, now: str, world: int, stage: int,
                      has_names: bool) -> bool:
    """Whether a checkpoint of layout ``saved`` (``saved_world`` ranks, ZeRO ``saved_stage``; None: not recorded,
    taken as this run's) resumes in a run of layout ``now`` through the universal format (True) or as it is
    (False); a :class:`ConfigError` for what cannot be converted."""
    if saved == now and (saved != PARTITIONED or (saved_world == world and saved_stage in (None, stage))):
        return False
    if saved in (PLAIN, PLAIN_BF16) and not has_names:
        raise ConfigError("this checkpoint was saved without ZeRO by an older fpo-dist that did not record its "
                          "optimizer's parameters: resume it without --deepspeed")
    return True


def to_universal_checkpoint(load_dir: str, tag: str, is_main: bool, trainable: list[str] | None = None) -> str:
    """Convert checkpoint ``tag`` to DeepSpeed's universal format (rank 0; others wait); returns the new tag.

    Needed to resume on a different data-parallel world size (ZeRO partitions optimizer state by rank) or with
    another layout (:data:`PLAIN` ↔ :data:`PARTITIONED`).  A PARTITIONED checkpoint goes through DeepSpeed's
    ``ds_to_universal``; a PLAIN one (which that tool cannot read) through :func:`_plain_to_universal`, given the
    names of the optimizer's parameters in its order (``trainable``, recorded with the checkpoint).
    """
    target = f"{tag}_universal"
    final = Path(load_dir) / target
    if is_main and not final.exists():
        import shutil
        import subprocess

        tmp = final.with_name(f"{target}.tmp-{os.getpid()}")  # renamed only when complete
        shutil.rmtree(tmp, ignore_errors=True)
        source = Path(load_dir) / tag
        if not _has_zero_files(source):  # PLAIN or PLAIN_BF16
            _plain_to_universal(source, tmp, trainable or [])
        else:
            workers = str(max(1, min(8, usable_cores() // 2)))
            subprocess.run(
                [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
                 "--output_folder", str(tmp), "--num_extract_workers", workers, "--num_merge_workers", workers],
                check=True, stdout=subprocess.DEVNULL,
            )
        os.replace(tmp, final)
    torch.distributed.barrier()
    return target


def _plain_optimizer(sd: dict, trainable: list[str], where: Path) -> tuple[dict, torch.Tensor, list]:
    """A no-ZeRO checkpoint's optimizer, per parameter: ``({name: ({"fp32": weight, "exp_avg": …}, step)}, step,
    param_groups)``.  PLAIN: the torch optimizer's state of each parameter and the module's weight.  PLAIN_BF16
    (DeepSpeed's ``FP16_UnfusedOptimizer`` in bf16, the wrapper a torch optimizer gets): its fp32 master copy of
    each parameter (``fp32_groups``, the weights the optimizer steps) and the torch optimizer's state over them."""
    opt, module = sd["optimizer"], sd["module"]
    if "fp32_groups_flat" in opt:
        raise ConfigError(f"{where}: saved by DeepSpeed's flat bf16/fp16 optimizer wrapper (a DeepSpeed fused "
                          "optimizer, not what fpo-dist builds); it cannot be converted to another layout")
    masters = opt.get("fp32_groups")
    inner = opt["optimizer_state_dict"] if masters is not None else opt
    groups = inner["param_groups"]
    order = [i for group in groups for i in group["params"]]
    if len(order) != len(trainable):
        raise ConfigError(f"{where}: its optimizer holds {len(order)} parameters but the checkpoint names "
                          f"{len(trainable)}; it cannot be converted to resume with another DeepSpeed layout")
    weights = [w for group in masters for w in group] if masters is not None else [module[n] for n in trainable]
    keys = {k for state in inner["state"].values() for k in state if k != "step"}
    step = next((state["step"] for state in inner["state"].values() if "step" in state), torch.tensor(0.0))
    out: dict[str, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}
    for index, name, weight in zip(order, trainable, weights):
        if weight.shape != module[name].shape:
            raise ConfigError(f"{where}: optimizer parameter {index} has shape {tuple(weight.shape)} but {name} is "
                              f"{tuple(module[name].shape)}; it cannot be converted")
        state = inner["state"].get(index, {})  # a parameter that never had a gradient has no state: zeros, as fresh
        weight = weight.float()
        out[name] = ({"fp32": weight, **{k: state.get(k, torch.zeros_like(weight)).float() for k in sorted(keys)}},
                     state.get("step", step))
    return out, step, groups


def _plain_to_universal(source: Path, out: Path, trainable: list[str]) -> None:
    """Write a PLAIN or PLAIN_BF16 checkpoint in DeepSpeed's universal format, as ``ds_to_universal`` writes a ZeRO
    one: per trainable parameter ``zero/<name>/fp32.pt`` (the fp32 weight; bf16: its fp32 master) and one file per
    optimizer state (``{"param": full tensor}``) and ``step.pt``; the optimizer's hyper-parameters and step in
    ``zero/optimizer_state.pt``; and the model-states file without module and optimizer (lr scheduler, step counters,
    client state) under both names a loading engine looks for (ZeRO-3: ``zero_pp_rank_0_…``; ZeRO-1/2:
    ``mp_rank_00_…``).  Tested into ZeRO-3 and back (``test_train.py``); a ZeRO-1/2 target reads the same files
    through DeepSpeed's loader, untested here."""
    sd = torch.load(source / PLAIN_STATES, map_location="cpu", weights_only=True)
    params, step, groups = _plain_optimizer(sd, trainable, source)
    for name, (tensors, param_step) in params.items():
        folder = out / "zero" / name
        folder.mkdir(parents=True)
        for key, value in tensors.items():
            torch.save({"param": value}, folder / f"{key}.pt")
        torch.save(param_step, folder / "step.pt")
    torch.save({"param_groups": groups, "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": groups},
                "ds_version": sd.get("ds_version"), "clip_grad": float(sd["ds_config"].get("gradient_clipping", 0.0))},
               out / "zero" / "optimizer_state.pt")
    rest = {k: v for k, v in sd.items() if k not in ("module", "optimizer")}
    rest.update(module={}, optimizer=None)
    for name in (PLAIN_STATES, "zero_pp_rank_0_" + PLAIN_STATES):
        torch.save(rest, out / name)


# --------------------------------------------------------------------------------------------- engine


class Engine:
    """A DeepSpeed engine for the policy (trainable) or a frozen reference model."""

    def __init__(self, model: torch.nn.Module, ds_config: dict, optimizer=None, lr_scheduler=None):
        import deepspeed

        self.ds_config = ds_config
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_config,
            model_parameters=[p for p in model.parameters() if p.requires_grad] if optimizer is None and
            any(p.requires_grad for p in model.parameters()) else None,
        )
        if zero_stage(ds_config) == 0 and self.engine.dp_world_size == 1:
            # Without ZeRO, DeepSpeed "all-reduces" the gradients even over one rank: it flattens them into
            # 5e8-element buckets (a full fp32 copy of every gradient: +0.5 GB peak RSS on Gemma 3 270M, bench.peer)
            # and copies them back, all to divide by 1.  Over one rank there is nothing to reduce.
            self.engine.enable_backward_allreduce = False
        if engine_layout(ds_config) == PLAIN and self.optimizer is not None and self.engine.gradient_clipping() > 0:
            # Without ZeRO DeepSpeed clips with its own clip_grad_norm_ but drops the norm it computes, so the run's
            # grad_norm would read None: the same call, keeping the norm
            from deepspeed.runtime.utils import clip_grad_norm_

            def clip_keeping_the_norm() -> None:
                self.engine._global_grad_norm = clip_grad_norm_(parameters=self.engine.module.parameters(),
                                                                max_norm=self.engine.gradient_clipping(),
                                                                mpu=self.engine.mpu)

            self.engine.clip_fp32_gradients = clip_keeping_the_norm

    @classmethod
    def frozen(cls, model: torch.nn.Module, ds_config: dict) -> "Engine":
        """A forward-only engine (ZeRO-3 partitioned reference model for the online baselines)."""
        cfg = copy.deepcopy(ds_config)
        cfg.pop("gradient_clipping", None)
        zero = cfg.get("zero_optimization", {})
        for key in ("offload_optimizer",):
            zero.pop(key, None)
        model.requires_grad_(False)
        eng = cls.__new__(cls)
        import deepspeed

        eng.ds_config = cfg
        eng.engine, *_ = deepspeed.initialize(model=model, config=cfg)
        eng.engine.eval()
        eng.optimizer = eng.lr_scheduler = None
        return eng

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        """Called every micro-step: DeepSpeed steps the optimizer at the accumulation boundary."""
        self.engine.step()

    def is_boundary(self) -> bool:
        return self.engine.is_gradient_accumulation_boundary()

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, directory: str, tag: str, client_state: dict) -> None:
        # the caller writes `latest` once its own state files are in place
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)

    def optimizer_step(self) -> float | None:
        """The step count the innermost torch optimizer holds (Adam's ``t``; None before its first step).  It can
        differ from the engine's: DeepSpeed's bf16 wrapper without ZeRO takes one step with zero gradients at set-up.
        Recorded with each checkpoint, so that a no-ZeRO engine loading the universal form goes on from it."""
        inner = self.optimizer
        while getattr(inner, "optimizer", None) is not None:  # DeepSpeed's wrappers (ZeRO, bf16) hold the torch one
            inner = inner.optimizer
        steps = [float(state["step"]) for state in getattr(inner, "state", {}).values() if "step" in state]
        return max(steps) if steps else None

    def load(self, directory: str, tag: str | None, optimizer_step: float | None = None) -> dict:
        """Load checkpoint ``tag``; ``optimizer_step``: the saved optimizer's step count, recorded with it
        (:meth:`optimizer_step`), for a universal checkpoint loaded without ZeRO."""
        if tag is not None and (Path(directory) / tag / "zero").is_dir() and engine_layout(self.ds_config) != PARTITIONED:
            return self._load_universal_plain(Path(directory) / tag, optimizer_step)
        path, client_state = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint found in {directory} (tag {tag})")
        return client_state or {}

    def _load_universal_plain(self, folder: Path, optimizer_step: float | None = None) -> dict:
        """A universal checkpoint into an engine without ZeRO (DeepSpeed cannot load one there): each trainable
        parameter's fp32 weight and its optimizer state (``exp_avg``…, at the checkpoint's step count) — in bf16, into
        DeepSpeed's bf16 optimizer wrapper: its fp32 master copies and their state, the bf16 weights rounded from the
        masters as its step does — the lr scheduler and DeepSpeed's step counters; returns the client state
        saved with the checkpoint."""
        states = sorted(folder.glob("*model_states.pt"))[0]  # every rank's copy holds the same client state
        sd = torch.load(states, map_location="cpu", weights_only=True)
        steps = int(sd["global_steps"])
        names = {id(p): n for n, p in self.module.named_parameters() if p.requires_grad}
        # the saved optimizer's own step count (Adam's t): per parameter where the universal form has step.pt
        # (written from a no-ZeRO checkpoint), else as recorded with the checkpoint (:meth:`optimizer_step`), else
        # the engine's; they can differ (DeepSpeed's bf16 wrapper counts one more: its set-up takes an optimizer
        # step with zero gradients)
        saved_step = float(steps if optimizer_step is None else optimizer_step)

        def read(param: torch.Tensor) -> dict[str, torch.Tensor]:
            where = folder / "zero" / names[id(param)]
            if not where.is_dir():
                raise FileNotFoundError(f"{folder}: no universal state for parameter {names[id(param)]}")
            out = {}
            for path in where.glob("*.pt"):
                obj = torch.load(path, map_location="cpu", weights_only=True)
                obj = obj["param"] if isinstance(obj, dict) else obj
                out[path.stem] = obj if path.stem == "step" else obj.reshape(param.shape)
            return out

        def step_of(state: dict, like: torch.Tensor) -> torch.Tensor:
            step = float(state.pop("step", saved_step))
            return torch.tensor(step, dtype=torch.float32, device=like.device if fused else "cpu")

        wrapped = hasattr(self.optimizer, "fp32_groups")  # PLAIN_BF16: DeepSpeed's FP16_UnfusedOptimizer (bf16)
        inner = self.optimizer.optimizer if wrapped else self.optimizer
        fused = bool(inner.defaults.get("fused"))
        pairs = ([(p, m) for ps, ms in zip(self.optimizer.fp16_groups, self.optimizer.fp32_groups)
                  for p, m in zip(ps, ms)] if wrapped else
                 [(p, p) for p in self.module.parameters() if p.requires_grad])
        with torch.no_grad():
            for param, master in pairs:  # master: the fp32 tensor the optimizer steps (the parameter itself in fp32)
                state = read(param)
                master.copy_(state.pop("fp32"))
                if master is not param:
                    param.copy_(master)  # rounded to bf16, as the wrapper's step does
                step = step_of(state, master)
                inner.state[master] = {**{k: v.to(master.device, torch.float32) for k, v in state.items()},
                                       "step": step}
        if self.lr_scheduler is not None and sd.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(sd["lr_scheduler"])
        self.engine.global_steps = steps
        self.engine.global_samples = int(sd.get("global_samples", steps * self.engine.train_batch_size()))
        self.engine.skipped_steps = int(sd.get("skipped_steps", 0))
        internal = {"module", "optimizer", "lr_scheduler", "global_steps", "global_samples", "skipped_steps",
                    "dp_world_size", "mp_world_size", "data_sampler", "random_ltd"}
        return {k: v for k, v in sd.items() if k not in internal}

    def consolidated_state_dict(self) -> dict | None:
        """The full (ZeRO-3: gathered) module state dict on rank 0, None elsewhere.  Collective: call on every rank."""
        if zero_stage(self.ds_config) == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.module.state_dict()
        return state if torch.distributed.get_rank() == 0 else None

    def export_hf(self, out_dir: str, tokenizer, dtype: torch.dtype, writer=None) -> None:
        """Consolidate the (ZeRO-3 partitioned) weights into one Hugging Face checkpoint on rank 0.

        ``writer(module, state, out_dir, tokenizer, dtype)`` writes it instead of ``save_pretrained`` (LoRA:
        ``fpo_dist.lora.export``).  Must be called on every rank (the gather is collective).
        """
        state = self.consolidated_state_dict()
        if state is not None:
            if writer is not None:
                writer(self.module, state, out_dir, tokenizer, dtype)
            else:
                self.module.save_pretrained(out_dir, state_dict={k: v.to(dtype) for k, v in state.items()},
                                            safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(out_dir)
        torch.distributed.barrier()
