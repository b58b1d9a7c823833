"""Regenerate the demo's assets: a tokenizer trained on the task's text, a tiny Llama fine-tuned (SFT) on the
task's mixed responses — the REFERENCE model — and a JumpReLU SAE on the residual output of one of its middle
blocks, trained with sae-lens's own ``SAETrainer``.

    python -m fpo_dist.demo.build_assets --out fpo_dist/demo/assets

Writes ``model/`` (HF ``save_pretrained``: weights + tokenizer), ``sae/`` (sae-lens ``save_inference_model``;
loads with ``SAE.load_from_disk`` / ``fpo_dist.sae.load_sae``) and ``manifest.json`` (seed, sizes, SFT loss,
SAE L0 / explained variance, the reference's rule-follow rate on held-out prompts, wall time, versions).
Deterministic for a seed on one thread (it sets ``torch.set_num_threads(1)``): two builds on one machine give
byte-identical files; other machines may differ by float noise.  ~2.5 min on one CPU core (SFT ~2 min, SAE ~20 s).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fpo_dist.demo import task

DEFAULT_OUT = Path(__file__).resolve().parent / "assets"


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    vocab_size: int = 1024  # an upper bound: BPE runs out of merges on the task text at ~750
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    hook_layer: int = 2  # a middle block (0-based) of the 4
    sft_examples: int = 16384
    sft_steps: int = 1200
    sft_batch: int = 64
    sft_lr: float = 3e-3
    sft_warmup: int = 50
    d_sae: int = 256
    sae_tokens: int = 1_500_000  # training samples (activation vectors) seen by the SAE trainer
    sae_batch: int = 1024
    sae_lr: float = 3e-3
    sae_l0_coefficient: float = 0.2
    sae_init_threshold: float = 0.1
    eval_samples_per_prompt: int = 4


# ---------------------------------------------------------------------------------------------------------
# Tokenizer, model, SFT
# ---------------------------------------------------------------------------------------------------------


def build_task_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, set up like the test fixtures' (same special tokens,
    BOS post-processor and chat template)."""
    from fpo_dist.testing import build_tokenizer

    return build_tokenizer(vocab_size=vocab_size, texts=texts)


def tokenizer_text(row: dict) -> str:
    """The text a tokenizer is trained on for one SFT row (the chat template's role names, not its special
    tokens)."""
    return f"user\n{row['prompt']}\nassistant\n{row['response']}"


def tokenize_sft(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """``(prompt_ids, response_ids)`` rendered exactly like the preference pipeline (chat template, EOS)."""
    from fpo_dist.data import encode_prompt, encode_response

    return [
        (
            encode_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}], chat=True),
            encode_response(tokenizer, r["response"]),
        )
        for r in rows
    ]


def sft_batch(
    examples: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)``; labels are -100 except on response tokens."""
    width = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attn = torch.zeros_like(ids)
    for i, (p, r) in enumerate(examples):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
        attn[i, : len(p) + len(r)] = 1
    return ids, attn, labels


def response_nll(model, examples, pad_id: int, batch_size: int = 256) -> float:
    """Mean per-token NLL of the response tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            ids, attn, labels = sft_batch(examples[s : s + batch_size], pad_id)
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
            target = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
            )
            total, count = total + nll.item(), count + int((target != -100).sum())
    return total / count


def train_sft(model, examples, pad_id: int, cfg: BuildConfig, log=print) -> list[float]:
    """AdamW, linear warm-up then cosine decay to 0; returns the per-step training losses."""
    rng = random.Random(f"fpo-demo-sft-order-{cfg.seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.sft_warmup) * 0.5 * (1 + math.cos(math.pi * min(s / cfg.sft_steps, 1.0)))
    )
    order: list[int] = []
    losses = []
    model.train()
    for step in range(cfg.sft_steps):
        if len(order) < cfg.sft_batch:
            order += rng.sample(range(len(examples)), len(examples))
        idx, order = order[: cfg.sft_batch], order[cfg.sft_batch :]
        ids, attn, labels = sft_batch([examples[i] for i in idx], pad_id)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == cfg.sft_steps - 1:
            log(f"sft step {step:5d}  loss {loss.item():.4f}")
    model.eval()
    return losses


def rule_follow(model, tokenizer, prompts: list[str], temperature: float, samples: int, seed: int) -> dict:
    """Judge acceptance of the model's generations: the rule-follow rate (and an example)."""
    from fpo_dist.evaluate import GenerationConfig, generate

    gen = GenerationConfig(
        max_new_tokens=24, temperature=temperature, seed=seed, batch_size=64, samples_per_prompt=samples
    )
    outputs, entropy = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts], gen, chat=True)
    flat_p = [p for p, outs in zip(prompts, outputs) for _ in outs]
    flat_o = [o for outs in outputs for o in outs]
    outcomes = Counter(task.classify(p, o) for p, o in zip(flat_p, flat_o))
    return {
        "follow_rate": task.follow_rate(flat_p, flat_o),
        "outcomes": {k: outcomes[k] for k in task.OUTCOMES},
        "entropy": entropy,
        "n": len(flat_o),
        "examples": [{"prompt": p, "output": o} for p, o in list(zip(flat_p, flat_o))[:: max(1, len(flat_o) // 4)][:4]],
    }


# ---------------------------------------------------------------------------------------------------------
# SAE (sae-lens SAETrainer on block-ℓ residual activations)
# ---------------------------------------------------------------------------------------------------------


def collect_activations(model, examples, pad_id: int, layer: int, batch_size: int = 256) -> torch.Tensor:
    """Block-``layer`` residual outputs (forward hook, ``blocks.ℓ.hook_resid_post``) at every real token."""
    from fpo_dist.models import forward_with_hook

    chunks = []
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            ids, attn, _ = sft_batch(examples[s : s + batch_size], pad_id)
            _, hidden = forward_with_hook(model, ids, attn, layer)
            chunks.append(hidden[attn.bool()].float())
    return torch.cat(chunks)


def activation_batches(acts: torch.Tensor, batch: int, seed: int):
    """An endless, seeded stream of shuffled activation batches: sae-lens's ``DataProvider``."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(acts), generator=g)
        for s in range(0, len(acts) - batch + 1, batch):
            yield acts[perm[s : s + batch]]


def train_sae(acts: torch.Tensor, cfg: BuildConfig, model_name: str):
    """A ``JumpReLUTrainingSAE`` fit with sae-lens's ``SAETrainer`` (norm scaling folded in at the end)."""
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(cfg.seed)
    sae_cfg = JumpReLUTrainingSAEConfig(
        d_in=acts.shape[1],
        d_sae=cfg.d_sae,
        normalize_activations="expected_average_only_in",
        jumprelu_init_threshold=cfg.sae_init_threshold,
        l0_coefficient=cfg.sae_l0_coefficient,
        l0_warm_up_steps=200,
    )
    sae_cfg.metadata.hook_name = f"blocks.{cfg.hook_layer}.hook_resid_post"
    sae_cfg.metadata.model_name = model_name
    sae = JumpReLUTrainingSAE(sae_cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.sae_tokens,
        train_batch_size_samples=cfg.sae_batch,
        lr=cfg.sae_lr,
        lr_warm_up_steps=50,
        lr_decay_steps=cfg.sae_tokens // cfg.sae_batch // 5,
        lr_end=cfg.sae_lr / 10,
        n_batches_for_norm_estimate=20,
        dead_feature_window=500,
        feature_sampling_window=500,
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=activation_batches(acts, cfg.sae_batch, cfg.seed))
    return trainer.fit()


@torch.no_grad()
def sae_quality(sae, acts: torch.Tensor) -> dict:
    """L0 (mean active features per token), explained variance and dead-feature count on ``acts``."""
    codes = sae.encode(acts)
    recon = sae.decode(codes)
    resid = (acts - recon).square().sum(-1).mean()
    total = (acts - acts.mean(0)).square().sum(-1).mean()
    return {
        "l0": (codes > 0).float().sum(-1).mean().item(),
        "explained_variance": (1 - resid / total).item(),
        "dead_features": int(((codes > 0).sum(0) == 0).sum()),
    }


# ---------------------------------------------------------------------------------------------------------
# The whole build
# ---------------------------------------------------------------------------------------------------------


def _versions() -> dict:
    import sae_lens
    import tokenizers
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "sae_lens": sae_lens.__version__,
            "tokenizers": tokenizers.__version__}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _manifest(cfg: BuildConfig, out: Path, n_params: int, vocab_size: int, sae_metrics: dict, sft: dict,
              reference: dict, n_prompts: tuple[int, int], wall_s: float) -> dict:
    """manifest.json: how the assets were built and how good they are."""
    return {
        "task": "fpo_dist.demo.task",
        "rule": "on topic: the response's topic is the requested category and it lists exactly the requested "
        "number of distinct items, all from that category",
        "seed": cfg.seed,
        "build_config": asdict(cfg),
        "model": {
            "parameters": n_params,
            "vocab_size": vocab_size,
            "dtype": "float32",
            "bytes": _dir_bytes(out / "model"),
        },
        "sae": {
            "architecture": "jumprelu",
            "d_in": cfg.hidden_size,
            "d_sae": cfg.d_sae,
            "hook_layer": cfg.hook_layer,
            "hook_name": f"blocks.{cfg.hook_layer}.hook_resid_post",
            "bytes": _dir_bytes(out / "sae"),
            **sae_metrics,
        },
        "sft": sft,
        "splits": {"train_prompts": n_prompts[0], "heldout_prompts": n_prompts[1],
                   "sft_p_on_topic": task.SFT_P_ON_TOPIC},
        "reference_rule_follow": reference,
        "wall_seconds": round(wall_s, 1),
        "versions": _versions(),
    }


def build(out: Path, cfg: BuildConfig = BuildConfig(), log=print) -> dict:
    from fpo_dist.sae import load_sae
    from fpo_dist.testing import build_llama

    t0 = time.time()
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    train_prompts, heldout_prompts = task.split_prompts(cfg.seed)
    sft_rows = task.sft_examples(train_prompts, cfg.sft_examples, cfg.seed)
    heldout_rows = task.sft_examples(heldout_prompts, 1024, cfg.seed + 1)
    corpus = [tokenizer_text(r) for r in sft_rows[:4096]] + [", ".join(v) + "." for v in task.CATEGORIES.values()]
    tokenizer = build_task_tokenizer(corpus, cfg.vocab_size)
    train_ex, heldout_ex = tokenize_sft(tokenizer, sft_rows), tokenize_sft(tokenizer, heldout_rows)
    pad_id = tokenizer.pad_token_id
    model = build_llama(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=128, seed=cfg.seed, tokenizer=tokenizer,
    )
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tiny llama: {n_params:,} parameters; vocab {len(tokenizer)}; {len(train_ex)} SFT examples")

    t_sft = time.time()
    losses = train_sft(model, train_ex, pad_id, cfg, log)
    sft = {
        "train_loss_last50": sum(losses[-50:]) / len(losses[-50:]),
        "heldout_response_nll": response_nll(model, heldout_ex, pad_id),
        "seconds": round(time.time() - t_sft, 1),
    }
    log(f"sft: {sft}")

    out = Path(out)
    for old in (out / "model", out / "sae"):  # only what this script writes: never the whole --out
        shutil.rmtree(old, ignore_errors=True)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")

    t_sae = time.time()
    acts = collect_activations(model, train_ex[:8192], pad_id, cfg.hook_layer)
    heldout_acts = collect_activations(model, heldout_ex, pad_id, cfg.hook_layer)
    training_sae = train_sae(acts, cfg, model_name="fpo-demo-tiny-llama")
    training_sae.save_inference_model(str(out / "sae"))
    sae = load_sae(str(out / "sae"))  # the SAE exactly as the cache job and trainer will load it
    sae_metrics = {
        **sae_quality(sae, heldout_acts),
        "train_activations": len(acts),
        "seconds": round(time.time() - t_sae, 1),
    }
    log(f"sae: {sae_metrics}")

    reference = {
        "sampled_t1": rule_follow(model, tokenizer, heldout_prompts, 1.0, cfg.eval_samples_per_prompt, cfg.seed),
        "greedy": rule_follow(model, tokenizer, heldout_prompts, 0.0, 1, cfg.seed),
    }
    log("reference on held-out prompts: " + ", ".join(f"{k} {v['follow_rate']:.3f}" for k, v in reference.items()))
    manifest = _manifest(cfg, out, n_params, len(tokenizer), sae_metrics, sft, reference,
                         (len(train_prompts), len(heldout_prompts)), time.time() - t0)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fpo_dist.demo.build_assets", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=BuildConfig.seed)
    p.add_argument("--sft-steps", type=int, default=BuildConfig.sft_steps)
    p.add_argument("--sae-tokens", type=int, default=BuildConfig.sae_tokens)
    a = p.parse_args(argv)
    cfg = BuildConfig(seed=a.seed, sft_steps=a.sft_steps, sae_tokens=a.sae_tokens)
    manifest = build(a.out, cfg)
    print(json.dumps({k: manifest[k] for k in ("model", "sae", "sft", "wall_seconds")}, indent=2))
    return manifest


if __name__ == "__main__":
    main()
