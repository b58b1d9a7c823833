"""Evaluate a trained policy against its reference on held-out preference data.

Metrics (all returned as one flat ``dict`` of numbers by :func:`evaluate`):

- Pairwise preference accuracy, per pair (pair ``i``'s chosen against pair ``i``'s own rejected; ties are wrong):
  ``accuracy_ln`` — the policy's length-normalised log-prob ranks chosen above rejected
  (``avg logπθ(y_w) > avg logπθ(y_l)``); with a reference, ``reward_accuracy`` — the DPO implicit reward
  ``β(logπθ(y) − logπref(y))`` (summed log-probs) ranks chosen above rejected, and ``reward_accuracy_ln`` — the
  same with length-normalised log-probs (FPO's reward).  A policy equal to its reference has reward accuracy 0.
- Generations: seeded samples for the held-out prompts (temperature / top-p, batched, ``max_new_tokens``), in
  AlpacaEval format (a JSON list of ``{instruction, output, generator}``) for external judging; with
  ``stop_at_newline`` a sample ends at its first line break (one-line answers from a base model).  Every
  (prompt, sample) has its own random generator, so the policy and the reference draw with the same seeds and a
  sample does not depend on how prompts are batched (up to float noise).
- ``win_rate``: a pluggable pairwise judge ``judge(instruction, policy_output, reference_output) -> float``
  (1 win, 0.5 tie, 0 loss) over the policy's and the reference's generations.
- ``entropy``: the mean per-token predictive entropy (nats) of the policy's own next-token distribution
  (softmax of its logits at temperature 1, whatever the sampling temperature) along its samples, averaged over
  all generated tokens up to and including the stop token.  This is our reading of the "entropy" (diversity)
  column of the FPO and TDPO papers; it is computed exactly per position, not estimated from the sampled tokens.
- ``feature_mse``: feature drift — the mean over held-out responses of the mean over all SAE features of
  ``(c̄θ − c̄ref)²``, the pooled SAE codes (block-ℓ residual output, mean over the positions that predict
  response tokens) of the policy and of the reference.  0 for a policy equal to its reference.
- The latents that drift (files, not numbers in the dict): the SAE latents whose mean pooled activation over the
  held-out responses moved most from the reference's — id, reference mean, policy mean, change — in
  ``drift.json`` / ``drift.png`` (:mod:`fpo_dist.drift`).
- ``kl_ref`` (with ``kl=True`` / ``--kl``): the KL to the reference on the held-out responses, per response token:
  ``Σ_t KL(π_ref(·|x, y<t) ‖ π_θ(·|x, y<t)) / Σ tokens`` over every chosen and rejected response — TDPO's sequential
  KL, exact over the vocabulary (the selected head's chunked pass, no ``[positions × vocab]`` tensor).  0 for a
  policy equal to its reference.
- ``units.json``: the values behind the means, per held-out pair and per generated sample, each with its prompt
  index, for confidence intervals that resample prompts (``fpo_dist.demo.stats``).

CLI: ``python -m fpo_dist.evaluate --policy DIR --reference DIR --data heldout.jsonl [--sae DIR --layer L]
[--judge module:function] [--kl] --out DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fpo_dist.config import DataConfig
from fpo_dist.data import PairTokenizer, TokenizedPair, encode_prompt, load_source, normalize_row, uses_chat_template

PairwiseJudge = Callable[[str, str, str], float]  # (instruction, policy_output, reference_output) -> 1 / 0.5 / 0


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    samples_per_prompt: int = 1  # AlpacaEval proper wants 1; more gives a less noisy win rate
    stop_at_newline: bool = False  # end a sample at its first line break (one-line answers from a base model)

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0 or self.batch_size <= 0 or self.samples_per_prompt <= 0:
            raise ValueError("max_new_tokens, batch_size and samples_per_prompt must be positive")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


# ---------------------------------------------------------------------------------------------------------
# Held-out data
# ---------------------------------------------------------------------------------------------------------


def load_heldout(data: DataConfig, tokenizer) -> tuple[list[TokenizedPair], list[tuple[dict, ...]]]:
    """The valid pairs of ``data``, tokenized like the cache job does, and the distinct prompts (message
    tuples, in first-seen order).  Bad rows follow ``data.on_bad_row``."""
    pairs, prompts, _ = load_heldout_units(data, tokenizer)
    return pairs, prompts


def load_heldout_units(data: DataConfig, tokenizer) -> tuple[list[TokenizedPair], list[tuple[dict, ...]], list[int]]:
    """:func:`load_heldout` plus, per pair, the index of its prompt in the prompt list (the unit a bootstrap over
    held-out prompts resamples)."""
    source = load_source(data)
    pairs = PairTokenizer(tokenizer, data).tokenize_range(source, 0, len(source)).pairs
    prompts: dict[str, tuple[dict, ...]] = {}
    position: dict[str, int] = {}
    prompt_of_pair = []
    for index in (p.index for p in pairs):
        example = normalize_row(source.dataset[index], source.schema, source.columns)
        key = json.dumps(example.prompt, sort_keys=True)
        prompts.setdefault(key, example.prompt)
        prompt_of_pair.append(position.setdefault(key, len(position)))
    return pairs, list(prompts.values()), prompt_of_pair


def instruction_of(messages: Sequence[dict]) -> str:
    """The AlpacaEval ``instruction`` of a prompt: its last user turn."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


# ---------------------------------------------------------------------------------------------------------
# (a) + (e): log-probs and pooled SAE codes of held-out pairs
# ---------------------------------------------------------------------------------------------------------


def response_stats(
    model, batch, layer: int | None = None, sae=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(logp_sum [2B], n_tokens [2B], pooled codes [2B, d_sae] or None)`` of a ``PairBatch``'s responses: the
    cache's own computation (:func:`fpo_dist.scoring.score_batch`), so the output layer runs only at the positions
    that predict a response token and no ``[rows, tokens, vocab]`` logits exist (262k-token vocabularies)."""
    from fpo_dist.scoring import score_batch

    device = next(model.parameters()).device
    scored = score_batch(model, batch.to(device), sae, layer)
    pooled = None if scored.pooled is None else scored.pooled.cpu()
    return scored.logp_sum.float().cpu(), scored.n_tokens.cpu(), pooled


def score_pairs(
    policy,
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    reference=None,
    sae=None,
    layer: int | None = None,
    batch_size: int = 8,
    kl: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-pair ``[N, 2]`` (column 0 chosen, 1 rejected) ``policy_logps``, ``n_tokens`` and, when given a
    reference, ``reference_logps``; with an SAE (needs the reference) ``feature_mse`` per response, and
    ``policy_code_mean`` / ``reference_code_mean`` ``[d_sae]``: each latent's pooled activation averaged over all
    ``2N`` responses (the input of :mod:`fpo_dist.drift`); with ``kl`` (needs the reference) ``kl_sum``: per
    response, :func:`reference_kl`."""
    from fpo_dist.models import build_batch

    if sae is not None and (reference is None or layer is None):
        raise ValueError("feature drift needs the reference model and the SAE's hook layer")
    if kl and reference is None:
        raise ValueError("the KL to the reference needs the reference model")
    cols: dict[str, list[torch.Tensor]] = {"policy_logps": [], "n_tokens": []}
    code_sums: dict[str, torch.Tensor] = {}
    for start in range(0, len(pairs), batch_size):
        batch = build_batch(pairs[start : start + batch_size], pad_id)
        pol_logps, n_tokens, pol_codes = response_stats(policy, batch, layer, sae)
        cols["policy_logps"].append(pol_logps)
        cols["n_tokens"].append(n_tokens)
        if reference is not None:
            ref_logps, _, ref_codes = response_stats(reference, batch, layer, sae)
            cols.setdefault("reference_logps", []).append(ref_logps)
            if kl:
                cols.setdefault("kl_sum", []).append(reference_kl(policy, reference, batch).float().cpu())
            if sae is not None:
                cols.setdefault("feature_mse", []).append((pol_codes - ref_codes).square().mean(-1))
                for name, codes in (("policy_code_mean", pol_codes), ("reference_code_mean", ref_codes)):
                    code_sums[name] = code_sums.get(name, 0) + codes.double().sum(0)
    # each batch is [chosen rows; rejected rows]: regroup into [n, 2]
    out = {k: torch.cat([v.view(2, -1).T for v in vs]) for k, vs in cols.items()}
    out.update({k: v / (2 * len(pairs)) for k, v in code_sums.items()})
    return out


@torch.no_grad()
def reference_kl(policy, reference, batch) -> torch.Tensor:
    """Per sequence of a ``PairBatch`` ``[2B]``: ``Σ_t KL(π_ref(·|x, y<t) ‖ π_θ(·|x, y<t))`` over its response
    positions (TDPO's sequential KL), exact over the vocabulary: the selected head's chunked pass
    (:func:`fpo_dist.lm_head.selected_forward` with the reference's hidden states), no ``[positions × vocab]``
    tensor."""
    from fpo_dist.lm_head import ref_head, row_sums, selected_forward

    device = next(policy.parameters()).device
    batch = batch.to(device)
    pm = batch.prediction_mask
    args = (batch.input_ids, batch.attention_mask, pm)
    ref = selected_forward(reference, *args, position_ids=batch.position_ids)
    pol = selected_forward(policy, *args, position_ids=batch.position_ids, ref=ref_head(reference, ref.hidden))
    return row_sums(pol.kl.double(), batch.sequence_ids[pm], batch.n_sequences)


def preference_metrics(scores: dict[str, torch.Tensor], beta: float = 0.1) -> dict[str, float]:
    """Pairwise accuracies and margins from :func:`score_pairs`' output (ties count as wrong)."""
    pol, n = scores["policy_logps"].double(), scores["n_tokens"].clamp(min=1).double()
    avg = pol / n
    out = {
        "n_pairs": float(len(pol)),
        "accuracy_ln": (avg[:, 0] > avg[:, 1]).double().mean().item(),
        "margin_ln": (avg[:, 0] - avg[:, 1]).mean().item(),
    }
    if "reference_logps" in scores:
        ref = scores["reference_logps"].double()
        reward = beta * (pol - ref)
        reward_ln = beta * (avg - ref / n)
        out["reward_accuracy"] = (reward[:, 0] > reward[:, 1]).double().mean().item()
        out["reward_margin"] = (reward[:, 0] - reward[:, 1]).mean().item()
        out["reward_accuracy_ln"] = (reward_ln[:, 0] > reward_ln[:, 1]).double().mean().item()
        out["reward_margin_ln"] = (reward_ln[:, 0] - reward_ln[:, 1]).mean().item()
    if "feature_mse" in scores:
        mse = scores["feature_mse"].double()
        out["feature_mse"] = mse.mean().item()
        out["feature_mse_chosen"] = mse[:, 0].mean().item()
        out["feature_mse_rejected"] = mse[:, 1].mean().item()
    if "kl_sum" in scores:  # per response token, over all held-out responses
        out["kl_ref"] = (scores["kl_sum"].double().sum() / scores["n_tokens"].double().sum()).item()
    return out


def pair_units(scores: dict[str, torch.Tensor], prompt_of_pair: Sequence[int], beta: float = 0.1) -> dict[str, list]:
    """Per held-out pair, the values whose means :func:`preference_metrics` reports (``accuracy_ln``,
    ``reward_accuracy``, ``reward_accuracy_ln`` as 0/1; ``feature_mse`` the mean of its two responses), with the
    pair's ``prompt`` index: what a bootstrap over held-out prompts resamples."""
    pol, n = scores["policy_logps"].double(), scores["n_tokens"].clamp(min=1).double()
    if len(prompt_of_pair) != len(pol):
        raise ValueError(f"{len(prompt_of_pair)} prompt ids for {len(pol)} pairs")
    avg = pol / n
    out: dict[str, list] = {"prompt": [int(i) for i in prompt_of_pair],
                            "accuracy_ln": (avg[:, 0] > avg[:, 1]).double().tolist()}
    if "reference_logps" in scores:
        ref = scores["reference_logps"].double()
        reward, reward_ln = beta * (pol - ref), beta * (avg - ref / n)
        out["reward_accuracy"] = (reward[:, 0] > reward[:, 1]).double().tolist()
        out["reward_accuracy_ln"] = (reward_ln[:, 0] > reward_ln[:, 1]).double().tolist()
    if "feature_mse" in scores:
        out["feature_mse"] = scores["feature_mse"].double().mean(1).tolist()
    if "kl_sum" in scores:
        out["kl_sum"] = scores["kl_sum"].double().sum(1).tolist()
        out["n_tokens"] = scores["n_tokens"].double().sum(1).tolist()
    return out


# ---------------------------------------------------------------------------------------------------------
# (b) + (d): seeded sampling, and the policy's entropy along its samples
# ---------------------------------------------------------------------------------------------------------


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The random seed of one (prompt, sample): independent of batching, shared by policy and reference."""
    digest = hashlib.sha256(f"{seed}/{prompt_index}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else from the tempered, nucleus-filtered softmax, row ``i``
    drawn with ``generators[i]``."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)  # keeps the top token
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    drawn = [torch.multinomial(probs[i].cpu(), 1, generator=g)[0] for i, g in enumerate(generators)]
    return torch.stack(drawn).to(logits.device)


def _row_sampler(generators: Sequence[torch.Generator], cfg: GenerationConfig, stop_ids: Sequence[int]):
    """A transformers ``LogitsProcessor`` that samples each row with its own generator (returned scores allow
    only the drawn token, so greedy decoding picks it) and sums the untempered entropy of live rows."""
    from transformers import LogitsProcessor

    class RowSampler(LogitsProcessor):
        def __init__(self) -> None:
            self.done = torch.zeros(len(generators), dtype=torch.bool)
            self.entropy_sum, self.tokens = 0.0, 0
            # per row: the entropy summed over its live positions, and their number
            self.row_entropy = torch.zeros(len(generators), dtype=torch.float64)
            self.row_tokens = torch.zeros(len(generators), dtype=torch.long)

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            logp = torch.log_softmax(scores.float(), dim=-1)
            entropy = -(logp.exp() * logp).nan_to_num().sum(-1).cpu()
            live = ~self.done
            self.entropy_sum += entropy[live].sum().item()
            self.tokens += int(live.sum())
            self.row_entropy += torch.where(live, entropy.double(), 0.0)
            self.row_tokens += live.long()
            tokens = sample_tokens(scores, cfg.temperature, cfg.top_p, generators)
            self.done |= torch.isin(tokens.cpu(), torch.tensor(list(stop_ids)))
            return torch.full_like(scores, float("-inf")).scatter_(-1, tokens[:, None], 0.0)

    return RowSampler()


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS of the tokenizer plus the model's generation-config EOS id(s)."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return sorted(i for i in ids if i is not None)


def newline_token_ids(tokenizer) -> list[int]:
    """Every token id whose text contains a line break (``GenerationConfig.stop_at_newline``)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [i for i, t in enumerate(texts) if "\n" in t]


@dataclass
class Generations:
    """Samples ``outputs[i][j]`` (prompt ``i``, sample ``j``), the mean per-token entropy over all of them, and per
    sample the entropy summed over its generated tokens (``entropy_sums[i][j]``) and their number
    (``n_tokens[i][j]``): ``entropy = Σ entropy_sums / Σ n_tokens``."""

    outputs: list[list[str]]
    entropy: float
    entropy_sums: list[list[float]]
    n_tokens: list[list[int]]


def generate(
    model, tokenizer, prompts: Sequence[Sequence[dict]], cfg: GenerationConfig, chat: bool
) -> tuple[list[list[str]], float]:
    """``cfg.samples_per_prompt`` seeded samples per prompt (``outputs[i][j]``) and the mean per-token entropy
    of the model along them.  Prompts are rendered exactly as for training (:func:`fpo_dist.data.encode_prompt`)."""
    g = generate_samples(model, tokenizer, prompts, cfg, chat)
    return g.outputs, g.entropy


@torch.no_grad()
def generate_samples(
    model, tokenizer, prompts: Sequence[Sequence[dict]], cfg: GenerationConfig, chat: bool
) -> Generations:
    """:func:`generate` with the per-sample entropy sums and token counts."""
    from transformers import GenerationConfig as HFGenerationConfig

    from fpo_dist.models import pad_token_id

    device = next(model.parameters()).device
    stop = stop_token_ids(model, tokenizer)
    pad_id = pad_token_id(tokenizer)
    pad_id = stop[0] if pad_id is None else pad_id
    eos = set(stop)
    if cfg.stop_at_newline:
        stop = sorted(eos | set(newline_token_ids(tokenizer)))
    jobs = [(i, j) for i in range(len(prompts)) for j in range(cfg.samples_per_prompt)]
    encoded = [encode_prompt(tokenizer, prompts[i], chat) for i in range(len(prompts))]
    outputs: list[list[str]] = [[""] * cfg.samples_per_prompt for _ in prompts]
    row_entropy = [[0.0] * cfg.samples_per_prompt for _ in prompts]
    row_tokens = [[0] * cfg.samples_per_prompt for _ in prompts]
    entropy_sum, n_tokens = 0.0, 0
    # greedy over the sampler's one-hot scores; a fresh config, so no model-default processors run before it
    hf_cfg = HFGenerationConfig(
        do_sample=False, max_new_tokens=cfg.max_new_tokens, eos_token_id=stop, pad_token_id=pad_id
    )
    for start in range(0, len(jobs), cfg.batch_size):
        chunk = jobs[start : start + cfg.batch_size]
        width = max(len(encoded[i]) for i, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for row, (i, _) in enumerate(chunk):  # left padding
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            attn[row, width - len(encoded[i]) :] = 1
        gens = [torch.Generator().manual_seed(sample_seed(cfg.seed, i, j)) for i, j in chunk]
        sampler = _row_sampler(gens, cfg, stop)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            generation_config=hf_cfg,
            logits_processor=[sampler],
        )
        entropy_sum, n_tokens = entropy_sum + sampler.entropy_sum, n_tokens + sampler.tokens
        for row, (i, j) in enumerate(chunk):
            new = out[row, width:].tolist()
            cut = next((t for t, tok in enumerate(new) if tok in stop), len(new))
            keep = new[: cut + (cut < len(new) and new[cut] not in eos)]  # a line-break token may carry text
            text = tokenizer.decode(keep, skip_special_tokens=True)
            outputs[i][j] = (text.split("\n")[0] if cfg.stop_at_newline else text).strip()
            row_entropy[i][j], row_tokens[i][j] = sampler.row_entropy[row].item(), int(sampler.row_tokens[row])
    return Generations(outputs, entropy_sum / max(n_tokens, 1), row_entropy, row_tokens)


# ---------------------------------------------------------------------------------------------------------
# (b) AlpacaEval files and (c) judged win rate
# ---------------------------------------------------------------------------------------------------------


def alpaca_eval_records(instructions: Sequence[str], outputs: Sequence[str], generator: str) -> list[dict]:
    """AlpacaEval's model-outputs format: ``[{"instruction", "output", "generator"}, ...]``."""
    if len(instructions) != len(outputs):
        raise ValueError(f"{len(instructions)} instructions but {len(outputs)} outputs")
    return [{"instruction": i, "output": o, "generator": generator} for i, o in zip(instructions, outputs)]


def write_alpaca_eval(
    path: str | os.PathLike, instructions: Sequence[str], outputs: Sequence[str], generator: str
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = alpaca_eval_records(instructions, outputs, generator)
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    return path


def win_rate(
    instructions: Sequence[str], policy_outputs: Sequence[str], reference_outputs: Sequence[str], judge: PairwiseJudge
) -> dict[str, float]:
    """``{win_rate, wins, ties, losses, n}``: ``win_rate = (wins + 0.5·ties) / n``; the judge returns 1 (policy
    better), 0.5 (tie) or 0 (reference better) per instruction."""
    return tally(judge_verdicts(instructions, policy_outputs, reference_outputs, judge))


def judge_verdicts(
    instructions: Sequence[str], policy_outputs: Sequence[str], reference_outputs: Sequence[str], judge: PairwiseJudge
) -> list[float]:
    """The judge's verdict per instruction (1 / 0.5 / 0), checked."""
    if not len(instructions) == len(policy_outputs) == len(reference_outputs) or not instructions:
        raise ValueError("need one policy and one reference output per instruction, and at least one instruction")
    verdicts = [float(judge(i, p, r)) for i, p, r in zip(instructions, policy_outputs, reference_outputs)]
    bad = sorted({v for v in verdicts if v not in (0.0, 0.5, 1.0)})
    if bad:
        raise ValueError(f"a pairwise judge must return 1 (win), 0.5 (tie) or 0 (loss), got {bad}")
    return verdicts


def tally(verdicts: Sequence[float]) -> dict[str, float]:
    """``{win_rate, wins, ties, losses, n}`` of checked verdicts."""
    verdicts = list(verdicts)
    n = len(verdicts)
    return {
        "win_rate": sum(verdicts) / n,
        "wins": float(verdicts.count(1.0)),
        "ties": float(verdicts.count(0.5)),
        "losses": float(verdicts.count(0.0)),
        "n": float(n),
    }


def load_judge(spec: str) -> PairwiseJudge:
    """``"package.module:function"`` -> the function (e.g. ``fpo_dist.demo.task:pairwise_judge``)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"a judge is given as 'package.module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------------------------
# Everything together
# ---------------------------------------------------------------------------------------------------------


def evaluate(
    policy_dir: str,
    data: DataConfig,
    reference_dir: str | None = None,
    sae_source: str | None = None,
    sae_layer: int | None = None,
    sae_id: str | None = None,
    judge: PairwiseJudge | None = None,
    generation: GenerationConfig | None = GenerationConfig(),
    beta: float = 0.1,
    out_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 8,
    drift_top: int = 20,
    kl: bool = False,
    reference_samples: str | os.PathLike | None = None,
) -> dict[str, float]:
    """All metrics for one policy (see the module docstring); ``generation=None`` skips sampling.

    The tokenizer is the reference's when there is one (the cache was tokenized with it), else the policy's.
    With ``out_dir``: ``policy_outputs.json`` / ``reference_outputs.json`` (AlpacaEval), ``metrics.json``,
    ``units.json`` (the per-pair and per-sample values behind the metrics, with their prompt index) and, with an
    SAE, ``drift.json`` / ``drift.png`` (the ``drift_top`` latents that moved most: :mod:`fpo_dist.drift`).
    ``kl``: also ``kl_ref``, the KL to the reference per response token (:func:`reference_kl`).
    ``reference_samples``: a JSON file that keeps the reference's generations for these prompts and settings, so
    that evaluating many policies against one reference samples it once (rewritten when they differ).
    """
    from fpo_dist.models import ModelSpec, load_causal_lm, load_tokenizer, pad_token_id
    from fpo_dist.sae import load_sae

    tokenizer = load_tokenizer(ModelSpec(reference_dir or policy_dir))
    policy = load_causal_lm(ModelSpec(policy_dir, dtype=dtype), device=device)
    reference = load_causal_lm(ModelSpec(reference_dir, dtype=dtype), device=device) if reference_dir else None
    sae = load_sae(sae_source, sae_id, device=device) if sae_source else None
    pairs, prompts, prompt_of_pair = load_heldout_units(data, tokenizer)
    pad_id = pad_token_id(tokenizer)
    scores = score_pairs(policy, pairs, pad_id, reference, sae, sae_layer, batch_size, kl=kl)
    metrics = preference_metrics(scores, beta)
    units = {"pairs": pair_units(scores, prompt_of_pair, beta)}
    if generation is not None:
        gen_metrics, units["generations"] = _generation_metrics(
            policy, reference, tokenizer, prompts, data, generation, judge, out_dir, reference_samples
        )
        metrics.update(gen_metrics)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        Path(out_dir, "units.json").write_text(json.dumps(units) + "\n")
        if "policy_code_mean" in scores:
            _write_drift(scores, sae, sae_source, sae_id, sae_layer, drift_top, out_dir)
    return metrics


def _write_drift(scores, sae, sae_source, sae_id, sae_layer, top, out_dir) -> None:
    from fpo_dist import drift

    rows = drift.drift_table(scores["reference_code_mean"], scores["policy_code_mean"], top)
    meta = {"source": sae_source, "sae_id": sae_id, "layer": sae_layer,
            "neuronpedia_id": getattr(sae.cfg.metadata, "neuronpedia_id", None)}
    drift.write_drift(Path(out_dir, "drift.json"), rows, 2 * len(scores["policy_logps"]), sae.cfg.d_sae, meta)
    drift.plot_drift(rows, Path(out_dir, "drift.png"), f"top {len(rows)} drifting SAE latents")


def _generation_metrics(policy, reference, tokenizer, prompts, data, cfg, judge, out_dir, reference_samples=None
                        ) -> tuple[dict, dict]:
    """The generation metrics and their per-sample units (flat, sample ``j`` of prompt ``i`` at ``i·k + j``)."""
    chat = uses_chat_template(tokenizer, data)
    k = cfg.samples_per_prompt
    instructions = [instruction_of(p) for p in prompts for _ in range(k)]
    gens = generate_samples(policy, tokenizer, prompts, cfg, chat)
    out = {"entropy": gens.entropy, "n_generations": float(len(instructions))}
    units = {"prompt": [i for i in range(len(prompts)) for _ in range(k)],
             "entropy_sum": [x for per in gens.entropy_sums for x in per],
             "n_tokens": [x for per in gens.n_tokens for x in per]}
    pol_flat = [o for per_prompt in gens.outputs for o in per_prompt]
    if out_dir is not None:
        write_alpaca_eval(Path(out_dir, "policy_outputs.json"), instructions, pol_flat, "policy")
    if reference is not None and (judge is not None or out_dir is not None):
        ref_out, ref_entropy = _reference_generations(reference, tokenizer, prompts, cfg, chat, reference_samples)
        ref_flat = [o for per_prompt in ref_out for o in per_prompt]
        out["reference_entropy"] = ref_entropy
        if out_dir is not None:
            write_alpaca_eval(Path(out_dir, "reference_outputs.json"), instructions, ref_flat, "reference")
        if judge is not None:
            units["verdict"] = judge_verdicts(instructions, pol_flat, ref_flat, judge)
            out.update(tally(units["verdict"]))
    return out, units


def _reference_generations(reference, tokenizer, prompts, cfg: GenerationConfig, chat: bool, path):
    """:func:`generate` of the reference, kept in ``path`` (JSON: a key of the reference, prompts and settings, the
    outputs and the entropy) and read back from it while the key matches."""
    key = hashlib.sha256(json.dumps([getattr(reference.config, "_name_or_path", ""), [list(p) for p in prompts],
                                     cfg.__dict__, chat], sort_keys=True, default=str).encode()).hexdigest()
    if path is not None and Path(path).exists():
        kept = json.loads(Path(path).read_text())
        if kept.get("key") == key:
            return kept["outputs"], kept["entropy"]
    outputs, entropy = generate(reference, tokenizer, prompts, cfg, chat)
    if path is not None:  # written whole, then renamed: a concurrent reader sees the old file or the new one
        tmp = Path(f"{path}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "outputs": outputs, "entropy": entropy}))
        os.replace(tmp, path)
    return outputs, entropy


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(prog="python -m fpo_dist.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="HF model directory of the trained policy")
    p.add_argument("--reference", help="HF model directory of the reference (DPO reward, win rate, drift)")
    p.add_argument("--data", required=True, help="held-out preference data (.jsonl/.json/.parquet, or a hub id)")
    p.add_argument("--split", default="train")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--max-prompt-length", type=int, default=512)
    p.add_argument("--sae", help="SAE directory (sae-lens save_model) or release, for feature drift")
    p.add_argument("--sae-id")
    p.add_argument("--layer", type=int, help="the SAE's hook layer (residual output of this decoder block)")
    p.add_argument("--judge", help="pairwise judge 'package.module:function' for the win rate")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--no-generate", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--stop-at-newline", action="store_true", help="end each sample at its first line break")
    p.add_argument("--kl", action="store_true", help="also kl_ref: KL(reference ‖ policy) per response token on the "
                   "held-out responses (needs --reference)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--drift-top", type=int, default=20, help="latents listed in drift.json (with --sae)")
    p.add_argument("--out", help="directory for metrics.json, units.json, drift.json/png and the AlpacaEval files")
    a = p.parse_args(argv)
    if a.sae and a.layer is None:
        p.error("--sae needs --layer")
    if a.kl and not a.reference:
        p.error("--kl needs --reference")
    data = DataConfig(source=a.data, split=a.split, max_length=a.max_length, max_prompt_length=a.max_prompt_length)
    data.validate()
    gen = None if a.no_generate else GenerationConfig(
        a.max_new_tokens, a.temperature, a.top_p, a.seed, a.batch_size, a.samples_per_prompt, a.stop_at_newline
    )
    metrics = evaluate(
        a.policy, data, a.reference, a.sae, a.layer, a.sae_id, load_judge(a.judge) if a.judge else None, gen,
        a.beta, a.out, a.device, batch_size=a.batch_size, drift_top=a.drift_top, kl=a.kl,
    )
    json.dump(metrics, sys.stdout, indent=2)
    print()
    return metrics


if __name__ == "__main__":
    main()
