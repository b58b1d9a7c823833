"""A single-process, plain-PyTorch run of the demo's preference phase — a sanity check of the recommended
hyper-parameters, and an oracle for the distributed trainer's demo run (same losses, same data, no Ray,
no DeepSpeed, no cache: the reference values are computed in memory, exactly as the cache job defines them).

    python -m fpo_dist.demo.preference_check --loss fpo      # defaults: fpo_dist.demo.recipe.RECIPE

Prints the held-out rule-follow rate (sampled, temperature 1) of the policy every ``--eval-every`` steps and
its judge win rate against the reference at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from fpo_dist.demo import task
from fpo_dist.demo.build_assets import DEFAULT_OUT
from fpo_dist.demo.recipe import RECIPE


def load_assets(assets: Path):
    from fpo_dist.models import ModelSpec, load_causal_lm, load_tokenizer
    from fpo_dist.sae import load_sae

    manifest = json.loads((assets / "manifest.json").read_text())
    spec = ModelSpec(str(assets / "model"))
    return load_causal_lm(spec), load_tokenizer(spec), load_sae(str(assets / "sae")), manifest["sae"]["hook_layer"]


def tokenized_pairs(tokenizer, rows: list[dict]):
    """Rows through the project's data pipeline (strings schema, chat template), as the cache job reads them."""
    from fpo_dist.config import DataConfig
    from fpo_dist.data import PairTokenizer, load_source

    with tempfile.TemporaryDirectory() as tmp:
        path = task.write_jsonl(rows, Path(tmp) / "pairs.jsonl")
        cfg = DataConfig(source=str(path), max_length=RECIPE.max_length, max_prompt_length=RECIPE.max_prompt_length)
        source = load_source(cfg)
        return PairTokenizer(tokenizer, cfg).tokenize_range(source, 0, len(source)).pairs


def forward(model, batch, layer: int, sae):
    """``(logits, logp_sum, n_tokens, pooled codes or None)`` for a ``PairBatch``."""
    from fpo_dist.losses import sequence_logps
    from fpo_dist.models import forward_with_hook
    from fpo_dist.sae import encode_full, pool_mean

    logits, hidden = forward_with_hook(model, batch.input_ids, batch.attention_mask, layer)
    logp_sum, n_tokens, _ = sequence_logps(logits, batch.input_ids, batch.response_mask)
    pooled = pool_mean(encode_full(sae, hidden), batch.prediction_mask) if sae is not None else None
    return logits, logp_sum, n_tokens, pooled


def loss_fn(args, pol, ref, response_mask):
    """The project's loss ``args.loss`` on one batch; ``pol``/``ref`` are :func:`forward` outputs (chosen rows
    first)."""
    from fpo_dist import losses
    from fpo_dist.sae import to_sparse

    logits, lp, n, codes = pol
    ref_logits, ref_lp, _, ref_codes = ref
    b = lp.shape[0] // 2
    avg, ref_avg = lp / n.clamp(min=1), ref_lp / n.clamp(min=1)
    if args.loss == "dpo":
        return losses.dpo_loss(lp[:b], lp[b:], ref_lp[:b], ref_lp[b:], beta=args.beta)
    if args.loss == "simpo":
        return losses.simpo_loss(avg[:b], avg[b:], beta=args.beta, gamma=args.gamma)
    if args.loss == "tdpo2":
        kl = losses.sequential_kl(ref_logits, logits, response_mask)
        return losses.tdpo_loss(
            lp[:b], lp[b:], ref_lp[:b], ref_lp[b:], kl[:b], kl[b:], beta=args.beta, alpha=args.alpha
        )
    return losses.fpo_loss(
        avg[:b], avg[b:], ref_avg[:b], ref_avg[b:], codes[:b], codes[b:],
        to_sparse(ref_codes[:b]), to_sparse(ref_codes[b:]), beta=args.beta, alpha=args.alpha, k=args.k,
    )


def _flat(outputs: list[list[str]]) -> list[str]:
    return [x for per_prompt in outputs for x in per_prompt]


def follow_rate(model, tokenizer, prompts: list[str], samples: int, seed: int = 0) -> tuple[float, list[list[str]]]:
    """Held-out rule-follow rate of ``samples`` seeded samples per prompt, and the samples."""
    from fpo_dist.evaluate import GenerationConfig, generate

    cfg = GenerationConfig(
        max_new_tokens=RECIPE.max_new_tokens, temperature=RECIPE.temperature, top_p=RECIPE.top_p, seed=seed,
        batch_size=64, samples_per_prompt=samples,
    )
    outs, _ = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts], cfg, chat=True)
    flat_p = [p for p, o in zip(prompts, outs) for _ in o]
    return task.follow_rate(flat_p, _flat(outs)), outs


def run(args) -> dict:
    from fpo_dist.models import build_batch

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    reference, tok, sae, layer = load_assets(Path(args.assets))
    policy = copy.deepcopy(reference).train()
    policy.requires_grad_(True)
    train_prompts, heldout_prompts = task.split_prompts(0)
    rows = task.preference_pairs(train_prompts, max(RECIPE.n_train_pairs, args.steps * args.batch), seed=args.seed)
    pairs = tokenized_pairs(tok, rows[: args.steps * args.batch])  # the demo's train.jsonl, in file order
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=RECIPE.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(args.warmup, 1)))
    use_sae = sae if args.loss == "fpo" else None
    history = []
    t0 = time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            policy.eval()
            rate, _ = follow_rate(policy, tok, heldout_prompts, args.samples)
            policy.train()
            history.append({"step": step, "follow_rate": rate, "seconds": round(time.time() - t0, 1)})
            print(json.dumps(history[-1]), flush=True)
        if step == args.steps:
            break
        batch = build_batch(pairs[step * args.batch : (step + 1) * args.batch], tok.pad_token_id)
        with torch.no_grad():
            ref = forward(reference, batch, layer, use_sae)
        pol = forward(policy, batch, layer, use_sae)
        loss, metrics = loss_fn(args, pol, ref, batch.response_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), RECIPE.grad_clip)
        opt.step()
        sched.step()
        if step % args.eval_every == 0:
            logged = {k: round(v.item(), 4) for k, v in metrics.items()}
            print(json.dumps({"step": step, "loss": round(loss.item(), 4), **logged}), flush=True)
    policy.eval()
    _, pol_out = follow_rate(policy, tok, heldout_prompts, args.samples, seed=1)
    _, ref_out = follow_rate(reference, tok, heldout_prompts, args.samples, seed=1)
    flat_p = [p for p, o in zip(heldout_prompts, pol_out) for _ in o]
    result = {
        "loss": args.loss, "lr": args.lr, "beta": args.beta, "batch": args.batch, "steps": args.steps,
        "history": history,
        "win_rate_vs_reference": task.win_rate(flat_p, _flat(pol_out), _flat(ref_out)),
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "history"}), flush=True)
    if args.save:
        policy.save_pretrained(args.save)
        tok.save_pretrained(args.save)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fpo_dist.demo.preference_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default=str(DEFAULT_OUT))
    p.add_argument("--loss", choices=["fpo", "dpo", "simpo", "tdpo2"], default="fpo")
    p.add_argument("--steps", type=int, default=RECIPE.steps)
    p.add_argument("--batch", type=int, default=RECIPE.batch_pairs, help="pairs per optimizer step")
    p.add_argument("--lr", type=float, default=RECIPE.lr)
    p.add_argument("--warmup", type=int, default=RECIPE.warmup_steps)
    p.add_argument("--beta", type=float, default=None, help=f"default per loss: {dict(RECIPE.beta)}")
    p.add_argument("--alpha", type=float, default=RECIPE.alpha, help="FPO feature weight / TDPO2 KL weight")
    p.add_argument("--gamma", type=float, default=RECIPE.simpo_gamma, help="SimPO margin (absolute)")
    p.add_argument("--k", type=int, default=RECIPE.k)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--samples", type=int, default=RECIPE.samples_per_prompt, help="samples per held-out prompt")
    p.add_argument("--seed", type=int, default=RECIPE.data_seed, help="data seed (and torch seed)")
    p.add_argument("--save", help="write the trained policy here (HF format, with the tokenizer)")
    args = p.parse_args(argv)
    if args.beta is None:
        args.beta = RECIPE.beta_for(args.loss)
    return run(args)


if __name__ == "__main__":
    main()
