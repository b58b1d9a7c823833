"""One rank of TRL's ``DPOTrainer`` in the peer benchmark (launched by ``bench.peer`` under torchrun).

    python -m torch.distributed.run --nproc_per_node N -m bench.peer_rank --out DIR --dataset DIR --model DIR \
        --steps S [--deepspeed ds_configs/zero3.json] [--lr 1e-6 --beta 0.1 --grad_clip 1.0 --seed 0 --fused true]

TRL 1.16 is fed exactly the token ids fpo-dist trains on, in its order: ``--dataset`` is a ``datasets`` directory
(``save_to_disk``) with ``prompt_ids``/``chosen_ids``/``rejected_ids`` rows in the global order of fpo-dist's loader
(step ``k`` of rank ``r`` is row ``k * world + r``); :class:`PeerDPOTrainer` skips TRL's own tokenization and reads
the rows with a sequential sampler (accelerate's batch sharding gives rank ``r`` rows ``r, r + world, ...``).  The
reference log-probs are TRL's own precompute pass (``precompute_ref_log_probs=True``), done at construction, before
the measured training.

Writes ``DIR/rank{r}.json``: memory at each stage (RSS; the high-water mark reset at ``on_train_begin``, after the
engine and optimizer are built: the post-setup baseline), wall and CPU seconds per optimizer step (interval between
consecutive ``on_step_end``), a hash of each step's unpadded token ids (checked by ``bench.peer`` against the order
it asked for), and on rank 0 the per-step loss (``log_history``, the mean over ranks).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path


def pair_hash(chosen: list[int], rejected: list[int]) -> str:
    """The hash of one pair's two sequences (prompt + response each): what a step trained on."""
    return hashlib.sha1(json.dumps([list(map(int, chosen)), list(map(int, rejected))]).encode()).hexdigest()[:16]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peer_rank")
    p.add_argument("--out", required=True)
    p.add_argument("--dataset", required=True, help="datasets directory with prompt_ids/chosen_ids/rejected_ids")
    p.add_argument("--model", required=True, help="the policy's HF directory (also the reference: precomputed)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--deepspeed", default="", help="DeepSpeed JSON config (empty: plain PyTorch)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--betas", default="0.9,0.999")
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fused", default="true", help="fused AdamW (adamw_torch_fused) or the per-tensor loop")
    p.add_argument("--keep_precompute_engine", action="store_true",
                   help="skip the ZeRO-3 workaround below (to see whether this TRL still needs it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    # the same modules as bench.train_rank (fair RSS: the imports are in every baseline), then TRL
    import sae_lens  # noqa: F401, I001
    import torch
    import deepspeed  # noqa: F401
    import transformers

    from bench.train_rank import _memory, _reset_peak

    # as fpo_dist.engine.init_distributed does: gloo only on CPU, no shared-memory allreduce op (it compiles for ~70 s
    # and leaves /dev/shm buffers behind); both sides then run the same collectives.  Set before accelerate calls
    # deepspeed.init_distributed.  (A star import in deepspeed.comm shadows the module name.)
    if not torch.cuda.is_available():
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    import datasets
    import trl
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    mem = {"after_imports": _memory(False)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    b1, b2 = (float(x) for x in a.betas.split(","))
    configured = None
    if a.deepspeed and not torch.cuda.is_available():
        # accelerate 1.16 on a CPU-only host: TrainingArguments' DeepSpeed branch builds PartialState without a
        # backend, so accelerate leaves it None and counts one process per rank (DeepSpeed's "auto"
        # train_batch_size becomes 1 and its batch assertion fails; nothing would be sharded).  Build the state with
        # gloo first (as a DeepSpeed launch: ACCELERATE_USE_DEEPSPEED) and let the Trainer use it.
        import datetime
        import os

        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo", timeout=datetime.timedelta(seconds=300))
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
        configured = {"use_configured_state": True}
        cpu_workaround = ("PartialState(backend='gloo') built before DPOConfig, accelerator_config use_configured_state "
                          "(accelerate on a CPU-only host leaves the DeepSpeed backend None: 1 process per rank)")
    else:
        cpu_workaround = None
    args = DPOConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=a.steps,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=a.weight_decay,
        adam_beta1=b1, adam_beta2=b2, adam_epsilon=a.eps, max_grad_norm=a.grad_clip,
        optim="adamw_torch_fused" if a.fused.lower() == "true" else "adamw_torch",
        bf16=False, fp16=False, gradient_checkpointing=False,  # DPOConfig defaults both on; fpo-dist: fp32, none
        beta=a.beta, loss_type=["sigmoid"], precompute_ref_log_probs=True, max_length=None,  # ids are final
        disable_dropout=True, seed=a.seed, data_seed=a.seed, logging_steps=1, save_strategy="no", report_to="none",
        dataloader_num_workers=0, model_init_kwargs={"dtype": "float32"},
        deepspeed=a.deepspeed or None, ddp_timeout=300,
        **({"accelerator_config": configured} if configured else {}),
    )
    # the DeepSpeed config is attached to the args above (HfTrainerDeepSpeedConfig): the model TRL loads next is
    # created under zero.Init (partitioned) when it is ZeRO-3
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    dataset = datasets.load_from_disk(a.dataset)  # on disk: every rank finds TRL's precompute cache file
    hashes: list[str] = []

    class PeerDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer fed fpo-dist's token ids in fpo-dist's order."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already prompt_ids/chosen_ids/rejected_ids: no chat template, EOS or truncation here

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def training_step(self, model, inputs, *rest, **kw):
            ids, att = inputs["input_ids"], inputs["attention_mask"].bool()
            n = ids.shape[0] // 2
            for i in range(n):  # rows [0, n): prompt + chosen, [n, 2n): prompt + rejected
                hashes.append(pair_hash(ids[i][att[i]].tolist(), ids[n + i][att[n + i]].tolist()))
            return super().training_step(model, inputs, *rest, **kw)

    class Clock(TrainerCallback):
        def __init__(self):
            self.step_s: list[float] = []
            self.cpu_s: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            mem["after_setup"] = _memory(False)  # engine, optimizer (ZeRO-3: its state too), precompute done
            _reset_peak(False)
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            t, c = time.perf_counter(), time.process_time()
            self.step_s.append(t - self.t)
            self.cpu_s.append(c - self.c)
            self.t, self.c = t, c

        def on_train_end(self, args, state, control, **kw):
            mem["train_peak"] = _memory(False)

    clock = Clock()
    t0 = time.perf_counter()
    trainer = PeerDPOTrainer(model=a.model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[clock])
    init_s = time.perf_counter() - t0
    workaround = None
    engine = getattr(trainer, "_precompute_engine", None)
    if engine is not None and not a.keep_precompute_engine:
        # TRL 1.16 under ZeRO-3: the forward-only DeepSpeed engine built for the precompute pass keeps its parameter
        # hooks on the policy, and the training engine's first forward then fails (IndexError: pop from an empty
        # deque, in DeepSpeed's parameter coordinator).  Destroying it after the pass removes them.
        engine.destroy()
        trainer._precompute_engine = None
        workaround = "precompute engine destroyed after the precompute pass (TRL 1.16 + ZeRO-3)"
    rank, world = trainer.args.process_index, trainer.args.world_size
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    mem["end"] = _memory(False)
    opt = trainer.optimizer
    for _ in range(4):  # accelerate's wrapper → DeepSpeed's ZeRO optimizer → the torch optimizer
        if isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "optimizer"):
            break
        opt = getattr(opt, "optimizer", opt)
    losses = [{"step": h["step"], "loss": h["loss"], "grad_norm": h.get("grad_norm"), "margin": h.get("rewards/margins")}
              for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    info = {"rank": rank, "world": world, "init_s": init_s, "train_s": train_s, "memory": mem,
            "step_times_s": clock.step_s, "cpu_s_per_step": clock.cpu_s, "hashes": hashes, "losses": losses,
            "workaround": workaround, "cpu_workaround": cpu_workaround, "distributed_type": str(trainer.accelerator.distributed_type),
            "zero_stage": (trainer.accelerator.state.deepspeed_plugin.zero_stage
                           if trainer.accelerator.state.deepspeed_plugin is not None else 0),
            "optimizer": type(opt).__name__, "optimizer_fused": getattr(opt, "defaults", {}).get("fused"),
            "optim": args.optim, "attn_implementation": trainer.model.config._attn_implementation,
            "threads": torch.get_num_threads(),
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                         "deepspeed": deepspeed.__version__, "torch": torch.__version__}}
    (out / f"rank{rank}.json").write_text(json.dumps(info, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
