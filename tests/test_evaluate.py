"""fpo_dist.evaluate: pairwise accuracy, AlpacaEval files, win-rate arithmetic, seeded generation, drift."""

from __future__ import annotations

import json

import pytest
import torch

from fpo_dist.config import DataConfig
from fpo_dist.evaluate import (
    GenerationConfig,
    alpaca_eval_records,
    evaluate,
    generate,
    load_heldout,
    load_judge,
    preference_metrics,
    sample_tokens,
    score_pairs,
    win_rate,
    write_alpaca_eval,
)

ROWS = [
    {"prompt": "Name three fruits.", "chosen": "pear, mango, plum.", "rejected": "carrot, leek, onion."},
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "The capital of France is Lyon."},
    {"prompt": "Name three fruits.", "chosen": "apple, kiwi, lemon.", "rejected": "beet, leek."},
    {"prompt": "Say hello.", "chosen": "Hello! How are you today?", "rejected": "no"},
    {"prompt": "Explain gradient descent.", "chosen": "Follow the slope downhill.", "rejected": "I like apples."},
]


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return DataConfig(source=str(path), max_length=64, max_prompt_length=32)


@pytest.fixture(scope="module")
def loaded(tiny):
    from fpo_dist.models import ModelSpec, load_causal_lm, load_tokenizer
    from fpo_dist.sae import load_sae

    torch.set_num_threads(1)
    spec = ModelSpec(str(tiny.model_dir))
    return load_causal_lm(spec), load_tokenizer(spec), load_sae(str(tiny.sae_dir))


# ----------------------------------------------------------------------------------------- pure arithmetic


def test_win_rate_counts_ties_as_half():
    judge = {("a", "b"): 1.0, ("b", "a"): 0.0, ("a", "a"): 0.5}
    out = win_rate(["x"] * 5, ["a", "b", "a", "a", "a"], ["b", "a", "a", "b", "b"], lambda i, p, r: judge[(p, r)])
    assert out == {"win_rate": pytest.approx((3 * 1 + 0 + 0.5) / 5), "wins": 3.0, "ties": 1.0, "losses": 1.0, "n": 5.0}


def test_win_rate_rejects_bad_verdicts_and_lengths():
    with pytest.raises(ValueError, match="1 \\(win\\), 0.5 \\(tie\\) or 0"):
        win_rate(["x"], ["a"], ["b"], lambda i, p, r: 0.7)
    with pytest.raises(ValueError, match="one policy and one reference output"):
        win_rate(["x", "y"], ["a"], ["b"], lambda i, p, r: 1.0)


def test_load_judge():
    from fpo_dist.demo.task import pairwise_judge

    assert load_judge("fpo_dist.demo.task:pairwise_judge") is pairwise_judge
    with pytest.raises(ValueError, match="package.module:function"):
        load_judge("fpo_dist.demo.task")


def test_alpaca_eval_format(tmp_path):
    assert alpaca_eval_records(["i1", "i2"], ["o1", "o2"], "fpo") == [
        {"instruction": "i1", "output": "o1", "generator": "fpo"},
        {"instruction": "i2", "output": "o2", "generator": "fpo"},
    ]
    path = write_alpaca_eval(tmp_path / "out" / "model_outputs.json", ["i1"], ["ü 🙂"], "fpo")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, list) and data == [{"instruction": "i1", "output": "ü 🙂", "generator": "fpo"}]
    with pytest.raises(ValueError):
        alpaca_eval_records(["i1"], [], "fpo")


def test_preference_metrics_by_hand():
    """avg = logp / n: pair 0 (-1 vs -2) right, pair 1 (-3 vs -1) wrong -> accuracy_ln 1/2.
    DPO rewards β(logπ − logπref): pair 0 (0 vs -β) right, pair 1 (0 vs +β) wrong -> 1/2.
    LN rewards β(avg − ref/n): pair 0 (0 vs -β/3) right, pair 1 (0 vs +β) wrong -> 1/2.
    Feature MSE: the mean of all four responses, and per side."""
    scores = {
        "policy_logps": torch.tensor([[-2.0, -6.0], [-3.0, -1.0]]),
        "n_tokens": torch.tensor([[2, 3], [1, 1]]),
        "reference_logps": torch.tensor([[-2.0, -5.0], [-3.0, -2.0]]),
        "feature_mse": torch.tensor([[0.0, 1.0], [2.0, 3.0]]),
    }
    m = preference_metrics(scores, beta=0.1)
    assert m["n_pairs"] == 2
    assert m["accuracy_ln"] == pytest.approx(0.5)
    assert m["margin_ln"] == pytest.approx(((-1 + 2) + (-3 + 1)) / 2)
    assert m["reward_accuracy"] == pytest.approx(0.5)
    assert m["reward_margin"] == pytest.approx((0.1 + -0.1) / 2)
    assert m["reward_accuracy_ln"] == pytest.approx(0.5)
    assert m["reward_margin_ln"] == pytest.approx((0.1 / 3 - 0.1) / 2)
    assert m["feature_mse"] == pytest.approx(1.5)
    assert (m["feature_mse_chosen"], m["feature_mse_rejected"]) == (pytest.approx(1.0), pytest.approx(2.0))
    # without a reference only the policy's own ranking is reported
    no_ref = preference_metrics({k: scores[k] for k in ("policy_logps", "n_tokens")})
    assert set(no_ref) == {"n_pairs", "accuracy_ln", "margin_ln"}


def test_sample_tokens_greedy_and_nucleus():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.9]])
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    assert sample_tokens(logits, 0.0, 1.0, gens).tolist() == [1, 0]
    assert sample_tokens(logits, 1.0, 1e-6, gens).tolist() == [1, 0]  # the nucleus is the top token alone
    draws = {tuple(sample_tokens(logits, 1.0, 1.0, [torch.Generator().manual_seed(s)] * 2).tolist()) for s in range(50)}
    assert len(draws) > 1


# ----------------------------------------------------------------------------------------- on the tiny model


def _direct_logp(model, prompt_ids, response_ids) -> float:
    """Σ log π(response token | prefix) from one unpadded forward: the reference computation."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    n = len(prompt_ids)
    return sum(logp[n - 1 + t, tok].item() for t, tok in enumerate(response_ids))


def test_score_pairs_matches_direct_computation(loaded, heldout):
    model, tok, _ = loaded
    pairs, prompts = load_heldout(heldout, tok)
    assert len(pairs) == len(ROWS) and len(prompts) == 4  # distinct prompts, first-seen order
    scores = score_pairs(model, pairs, tok.pad_token_id, batch_size=2)  # batches of 2, 2, 1 pairs
    expected = torch.tensor(
        [[_direct_logp(model, p.prompt_ids, r) for r in (p.chosen_ids, p.rejected_ids)] for p in pairs],
        dtype=torch.float64,
    )
    torch.testing.assert_close(scores["policy_logps"].double(), expected, atol=1e-4, rtol=1e-5)
    n = torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs])
    assert torch.equal(scores["n_tokens"], n)
    avg = expected / n
    assert preference_metrics(scores)["accuracy_ln"] == pytest.approx((avg[:, 0] > avg[:, 1]).double().mean().item())


def test_policy_equal_to_reference(loaded, heldout, tiny):
    """Same weights: every DPO reward is 0, so ties everywhere -> reward accuracy 0; feature drift 0."""
    model, tok, sae = loaded
    pairs, _ = load_heldout(heldout, tok)
    scores = score_pairs(model, pairs, tok.pad_token_id, reference=model, sae=sae, layer=tiny.hook_layer, batch_size=3)
    m = preference_metrics(scores)
    assert m["reward_accuracy"] == 0.0 and m["reward_accuracy_ln"] == 0.0
    assert m["reward_margin"] == 0.0 and m["feature_mse"] == 0.0
    with pytest.raises(ValueError, match="needs the reference model"):
        score_pairs(model, pairs, tok.pad_token_id, sae=sae, layer=tiny.hook_layer)


def test_feature_drift_is_positive_for_a_perturbed_policy(loaded, heldout, tiny):
    import copy

    model, tok, sae = loaded
    policy = copy.deepcopy(model)
    with torch.no_grad():
        policy.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    pairs, _ = load_heldout(heldout, tok)
    scores = score_pairs(policy, pairs, tok.pad_token_id, reference=model, sae=sae, layer=tiny.hook_layer)
    m = preference_metrics(scores)
    assert m["feature_mse"] > 0 and m["reward_margin"] != 0


def test_generate_is_seeded_and_independent_of_batching(loaded):
    model, tok, _ = loaded
    prompts = [[{"role": "user", "content": c}] for c in ("Say hello.", "Name three fruits please now.", "Hi")]
    cfg = GenerationConfig(max_new_tokens=6, temperature=1.0, seed=3, batch_size=4, samples_per_prompt=2)
    out, entropy = generate(model, tok, prompts, cfg, chat=True)
    assert [len(o) for o in out] == [2, 2, 2]
    out1, entropy1 = generate(model, tok, prompts, GenerationConfig(**{**cfg.__dict__, "batch_size": 1}), chat=True)
    assert out1 == out and entropy1 == pytest.approx(entropy, rel=1e-4)
    other, _ = generate(model, tok, prompts, GenerationConfig(**{**cfg.__dict__, "seed": 4}), chat=True)
    assert other != out
    assert 0 < entropy < torch.log(torch.tensor(float(len(tok)))).item()


def test_greedy_generation_matches_transformers(loaded):
    from fpo_dist.data import encode_prompt

    model, tok, _ = loaded
    msgs = [{"role": "user", "content": "Say hello."}]
    ((out,),), _ = generate(model, tok, [msgs], GenerationConfig(max_new_tokens=5, temperature=0.0), chat=True)
    ids = torch.tensor([encode_prompt(tok, msgs, True)])
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = ref[0, ids.shape[1]:].tolist()
    new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    assert out == tok.decode(new, skip_special_tokens=True).strip()


def test_evaluate_end_to_end(tiny, heldout, tmp_path):
    """Policy == reference with the same seeds: identical generations, so every verdict is a tie (0.5)."""
    judge_calls = []

    def judge(instruction, policy_output, reference_output):
        judge_calls.append(instruction)
        return 0.5 if policy_output == reference_output else 1.0

    m = evaluate(
        str(tiny.model_dir), heldout, reference_dir=str(tiny.model_dir), sae_source=str(tiny.sae_dir),
        sae_layer=tiny.hook_layer, judge=judge, generation=GenerationConfig(max_new_tokens=4, batch_size=4),
        out_dir=tmp_path,
    )
    assert m["win_rate"] == 0.5 and m["ties"] == m["n"] == 4
    assert m["feature_mse"] == 0.0 and m["reward_accuracy"] == 0.0
    assert m["entropy"] == pytest.approx(m["reference_entropy"])
    assert judge_calls[0] == "Name three fruits."
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(m)
    records = json.loads((tmp_path / "policy_outputs.json").read_text())
    assert [r["instruction"] for r in records] == judge_calls and {r["generator"] for r in records} == {"policy"}
    assert json.loads((tmp_path / "reference_outputs.json").read_text())[0]["generator"] == "reference"
    # units.json: the per-sample values behind the generation metrics, one per (prompt, sample), prompt-indexed
    gens = json.loads((tmp_path / "units.json").read_text())["generations"]
    assert gens["verdict"] == [0.5] * 4 and gens["prompt"] == [0, 1, 2, 3]
    assert sum(gens["entropy_sum"]) / sum(gens["n_tokens"]) == pytest.approx(m["entropy"], rel=1e-6)
    assert (tmp_path / "drift.json").exists()


def test_generate_samples_per_sample_entropy(loaded):
    from fpo_dist.evaluate import generate_samples

    model, tok, _ = loaded
    prompts = [[{"role": "user", "content": c}] for c in ("Say hello.", "Hi")]
    cfg = GenerationConfig(max_new_tokens=6, temperature=1.0, seed=3, batch_size=3, samples_per_prompt=2)
    g = generate_samples(model, tok, prompts, cfg, chat=True)
    out, entropy = generate(model, tok, prompts, cfg, chat=True)
    assert g.outputs == out and g.entropy == entropy
    flat_sums = [x for per in g.entropy_sums for x in per]
    flat_n = [x for per in g.n_tokens for x in per]
    assert all(1 <= n <= 6 for n in flat_n) and all(s > 0 for s in flat_sums)
    assert sum(flat_sums) / sum(flat_n) == pytest.approx(entropy, rel=1e-6)


def test_reference_kl_matches_full_logits(loaded, heldout, tiny):
    """KL(π_ref ‖ π_θ) summed over each response's positions (the selected head's chunked pass) against a plain
    fp64 computation over full logits; 0 for a policy equal to its reference."""
    import copy

    model, tok, _ = loaded
    policy = copy.deepcopy(model)
    with torch.no_grad():
        policy.model.norm.weight.mul_(3.0)  # sharper next-token distributions everywhere
    pairs, _ = load_heldout(heldout, tok)

    def direct(prompt_ids, response_ids) -> float:
        ids = torch.tensor([list(prompt_ids) + list(response_ids)])
        with torch.no_grad():
            lp_ref = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            lp_pol = torch.log_softmax(policy(input_ids=ids).logits[0].double(), -1)
        pos = slice(len(prompt_ids) - 1, ids.shape[1] - 1)  # the positions that predict a response token
        return (lp_ref[pos].exp() * (lp_ref[pos] - lp_pol[pos])).sum().item()

    scores = score_pairs(policy, pairs, tok.pad_token_id, reference=model, batch_size=2, kl=True)
    expected = torch.tensor([[direct(p.prompt_ids, r) for r in (p.chosen_ids, p.rejected_ids)] for p in pairs],
                            dtype=torch.float64)
    assert expected.min() > 1e-3  # the perturbation moves every response's distribution
    torch.testing.assert_close(scores["kl_sum"].double(), expected, rtol=1e-3, atol=1e-6)
    m = preference_metrics(scores)
    assert m["kl_ref"] == pytest.approx((expected.sum() / scores["n_tokens"].sum()).item(), rel=1e-3)
    same = score_pairs(model, pairs, tok.pad_token_id, reference=model, batch_size=3, kl=True)
    assert same["kl_sum"].abs().max() < 1e-5 * expected.abs().max()
    with pytest.raises(ValueError, match="needs the reference model"):
        score_pairs(policy, pairs, tok.pad_token_id, kl=True)


def test_stop_at_newline_keeps_each_sample_up_to_its_first_line_break(loaded):
    """Same seeds, so a sample that stops at its first line break is the unstopped sample's first line."""
    from fpo_dist.evaluate import newline_token_ids

    model, tok, _ = loaded
    ids = newline_token_ids(tok)
    assert ids and all("\n" in tok.decode([i]) for i in ids)
    assert not any("\n" in tok.decode([i]) for i in set(range(len(tok))) - set(ids))
    prompts = [[{"role": "user", "content": c}] for c in ("Say hello.", "Name three fruits.", "Hi")]
    cfg = GenerationConfig(max_new_tokens=24, temperature=1.5, seed=5, batch_size=4, samples_per_prompt=4)
    plain, _ = generate(model, tok, prompts, cfg, chat=True)
    stopped, _ = generate(model, tok, prompts, GenerationConfig(**{**cfg.__dict__, "stop_at_newline": True}),
                          chat=True)
    flat_plain, flat_stopped = [o for per in plain for o in per], [o for per in stopped for o in per]
    assert any("\n" in o for o in flat_plain)  # the case this tests occurs
    # (or empty: a sample whose first token is a line break, which the unstopped output's strip() hides)
    assert all(s in (p.split("\n")[0].strip(), "") for s, p in zip(flat_stopped, flat_plain))
    assert sum(s == p.split("\n")[0].strip() != "" for s, p in zip(flat_stopped, flat_plain)) >= len(flat_plain) // 2


def test_reference_samples_are_kept_and_reused_only_for_the_same_settings(tiny, heldout, tmp_path):
    kept = tmp_path / "reference_samples.json"
    gen = GenerationConfig(max_new_tokens=4, batch_size=4, seed=2)

    def run(generation, out):
        evaluate(str(tiny.model_dir), heldout, reference_dir=str(tiny.model_dir), judge=lambda *a: 0.5,
                 generation=generation, out_dir=tmp_path / out, reference_samples=kept)
        return [r["output"] for r in json.loads((tmp_path / out / "reference_outputs.json").read_text())]

    first = run(gen, "a")
    assert json.loads(kept.read_text())["outputs"] == [[o] for o in first]
    marked = {**json.loads(kept.read_text()), "outputs": [["kept"]] * len(first)}
    kept.write_text(json.dumps(marked))
    assert run(gen, "b") == ["kept"] * len(first)  # same prompts and settings: read back, not sampled again
    assert run(GenerationConfig(**{**gen.__dict__, "seed": 3}), "c") != ["kept"] * len(first)  # other settings
