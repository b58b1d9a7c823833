"""The demo's synthetic task: the judge, deterministic generators, disjoint splits, the pair invariant."""

from __future__ import annotations

import json

import pytest

from fpo_dist.demo import task

# ----------------------------------------------------------------------------------------- the judge


@pytest.mark.parametrize(
    "prompt, response, expected",
    [
        ("Name three fruits.", "Fruits: pear, mango, plum.", True),
        ("Can you name two tools?", "Tools: hammer, saw.", True),
        ("List five animals.", "animals: Cat, dog, fox, wolf, bear.", True),  # case-insensitive
        ("Name three fruits.", "  Fruits:pear,mango ,plum.  ", True),  # whitespace around the parts
        ("Name three fruits.", "Vegetables: carrot, leek, onion.", False),  # the confusable category
        ("Name three fruits.", "Vegetables: pear, mango, plum.", False),  # the wrong topic
        ("Name three fruits.", "Fruits: carrot, leek, onion.", False),  # the wrong items
        ("Name three fruits.", "Fruits: pear, leek, plum.", False),  # one off-topic item
        ("Name three fruits.", "pear, mango, plum.", False),  # no topic
        ("Name three fruits.", "Fruits: pear, mango.", False),  # too few
        ("Name three fruits.", "Fruits: pear, mango, plum, kiwi.", False),  # too many
        ("Name three fruits.", "Fruits: pear, pear, plum.", False),  # repeated
        ("Name three fruits.", "Fruits: pear, mango, plum", False),  # no final period
        ("Name three fruits.", "Fruits: pear mango, plum, kiwi.", False),  # not a list of single items
        ("Name three fruits.", "", False),
        ("Which four colors come to mind?", "Colors: red, blue, green, violet.", True),
        ("Which four colors come to mind?", "Colors: red, blue, green, spain.", False),
    ],
)
def test_judge_examples(prompt, response, expected):
    assert task.judge(prompt, response) is expected


@pytest.mark.parametrize(
    "response, outcome",
    [
        ("Fruits: pear, mango, plum.", "on_topic"),
        ("Vegetables: carrot, leek, onion.", "confusable"),
        ("Fruits: pear, mango.", "wrong_count"),
        ("Vegetables: carrot, leek, onion, beet.", "wrong_count"),
        ("Fruits: pear, pear, plum.", "repeated_item"),
        ("Fruits: pear, leek, plum.", "stray_item"),
        ("Tools: saw, axe, rake.", "stray_item"),
        ("pear, mango, plum.", "malformed"),
    ],
)
def test_classify(response, outcome):
    assert task.classify("Name three fruits.", response) == outcome


def test_parse_prompt_and_foreign_prompt():
    assert task.parse_prompt("Which four colors come to mind?") == ("colors", 4)
    assert task.parse_prompt("I need five instruments.") == ("instruments", 5)
    with pytest.raises(ValueError, match="not a prompt of the demo task"):
        task.judge("What is the capital of France?", "paris.")


def test_pairwise_judge_and_win_rate():
    p = "Name two sports."
    good, bad = "Sports: golf, judo.", "Animals: cat, dog."
    assert task.pairwise_judge(p, good, bad) == 1.0
    assert task.pairwise_judge(p, bad, good) == 0.0
    assert task.pairwise_judge(p, good, good) == 0.5
    assert task.pairwise_judge(p, bad, bad) == 0.5
    # 1 win, 1 loss, 2 ties -> (1 + 0 + 0.5 + 0.5) / 4
    assert task.win_rate([p] * 4, [good, bad, good, bad], [bad, good, good, bad]) == pytest.approx(0.5)
    assert task.win_rate([p] * 2, [good, good], [bad, good]) == pytest.approx(0.75)
    assert task.follow_rate([p, p, p], [good, bad, good]) == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------------------- data


def test_categories_are_disjoint_single_words_and_confusable_is_an_involution():
    items = [i for v in task.CATEGORIES.values() for i in v]
    assert len(items) == len(set(items))
    assert all(i.isalpha() and i.islower() for i in items)
    assert all(len(v) >= max(task.COUNT_WORDS.values()) for v in task.CATEGORIES.values())
    for cat, other in task.CONFUSABLE.items():
        assert other != cat and task.CONFUSABLE[other] == cat


def test_splits_are_disjoint_deterministic_and_cover_every_cell():
    train, heldout = task.split_prompts(0)
    assert set(train).isdisjoint(heldout)
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    assert (train, heldout) == task.split_prompts(0)
    assert heldout != task.split_prompts(1)[1]
    cells = {(c, n) for c in task.CATEGORIES for n in task.COUNT_WORDS.values()}
    assert {task.parse_prompt(p) for p in train} == cells == {task.parse_prompt(p) for p in heldout}
    assert len(train) + len(heldout) == len(cells) * len(task.TEMPLATES)


def test_pairs_deterministic_per_seed_and_invariant():
    train, _ = task.split_prompts(0)
    a = task.preference_pairs(train, 300, seed=0)
    assert a == task.preference_pairs(train, 300, seed=0)
    assert a != task.preference_pairs(train, 300, seed=1)
    for row in a:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["prompt"] in train
        assert task.judge(row["prompt"], row["chosen"])
        assert not task.judge(row["prompt"], row["rejected"])
        assert task.classify(row["prompt"], row["rejected"]) == "confusable"
        # same requested count on both sides: the pair differs only in topic
        assert len(task.parse_response(row["chosen"])[1]) == len(task.parse_response(row["rejected"])[1])


def test_sft_mix_is_mostly_off_topic():
    train, _ = task.split_prompts(0)
    rows = task.sft_examples(train, 4000, seed=0)
    assert rows == task.sft_examples(train, 4000, seed=0)
    rate = task.follow_rate([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert rate == pytest.approx(task.SFT_P_ON_TOPIC, abs=0.03)
    # every response is well formed with the requested count, on topic or from the confusable category
    assert {task.classify(r["prompt"], r["response"]) for r in rows} == {"on_topic", "confusable"}


def test_write_preference_data(tmp_path):
    paths = task.write_preference_data(tmp_path, seed=0, n_train=64, n_heldout=16)
    rows = {k: [json.loads(line) for line in p.read_text().splitlines()] for k, p in paths.items()}
    assert len(rows["train"]) == 64 and len(rows["heldout"]) == 16
    assert {r["prompt"] for r in rows["train"]}.isdisjoint({r["prompt"] for r in rows["heldout"]})
    again = task.write_preference_data(tmp_path / "again", seed=0, n_train=64, n_heldout=16)
    assert all(paths[k].read_bytes() == again[k].read_bytes() for k in paths)


def test_pairs_load_through_the_data_pipeline(tmp_path):
    """The files are valid ``strings``-schema data for ``fpo_dist.data`` (no bad rows)."""
    from fpo_dist.config import DataConfig
    from fpo_dist.data import PairTokenizer, load_source
    from fpo_dist.testing import build_tokenizer

    paths = task.write_preference_data(tmp_path, seed=0, n_train=32, n_heldout=8)
    cfg = DataConfig(source=str(paths["train"]), max_length=64, max_prompt_length=32)
    source = load_source(cfg)
    assert source.schema == "strings"
    result = PairTokenizer(build_tokenizer(), cfg).tokenize_range(source, 0, len(source))
    assert len(result.pairs) == 32 and not result.bad


# ----------------------------------------------------------------------------------------- assets


@pytest.fixture(scope="module")
def assets():
    from fpo_dist.demo.build_assets import DEFAULT_OUT

    if not (DEFAULT_OUT / "manifest.json").exists():
        pytest.skip("fpo_dist/demo/assets not built (python -m fpo_dist.demo.build_assets)")
    return DEFAULT_OUT


def test_bundled_assets_are_small_and_consistent(assets):
    """The committed reference + SAE load through the project's loaders and match the manifest."""
    import torch

    from fpo_dist.data import encode_prompt
    from fpo_dist.models import ModelSpec, capture_block_output, load_causal_lm, load_tokenizer
    from fpo_dist.sae import encode_full, load_sae

    manifest = json.loads((assets / "manifest.json").read_text())
    assert sum(f.stat().st_size for f in assets.rglob("*") if f.is_file()) < 4 * 2**20
    spec = ModelSpec(str(assets / "model"))
    model, tok, sae = load_causal_lm(spec), load_tokenizer(spec), load_sae(str(assets / "sae"))
    layer = manifest["sae"]["hook_layer"]
    assert 0 < layer < model.config.num_hidden_layers - 1  # a middle block
    assert sae.cfg.d_in == model.config.hidden_size and sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
    assert tok.chat_template and len(tok) == model.config.vocab_size == manifest["model"]["vocab_size"]
    # every item is one token after ", " (so the topic shows in item tokens, not sub-word pieces)
    items = [item for v in task.CATEGORIES.values() for item in v]
    assert all(len(tok(" " + item, add_special_tokens=False)["input_ids"]) == 1 for item in items)
    ids = torch.tensor([encode_prompt(tok, [{"role": "user", "content": "Name three fruits."}], chat=True)])
    with capture_block_output(model, layer) as cap:
        model(input_ids=ids)
    assert 0 < (encode_full(sae, cap.output) > 0).sum(-1).float().mean() < sae.cfg.d_sae / 4  # sparse, not dead
    follow = manifest["reference_rule_follow"]
    assert 0.2 <= follow["sampled_t1"]["follow_rate"] <= 0.45 and follow["greedy"]["follow_rate"] <= 0.1


def test_build_assets_smoke(tmp_path):
    """The whole build (tokenizer, SFT, sae-lens SAETrainer, save, reload, manifest) at toy sizes."""
    from fpo_dist.demo.build_assets import BuildConfig, build
    from fpo_dist.sae import load_sae

    cfg = BuildConfig(
        sft_examples=256, sft_steps=3, sft_batch=16, sae_tokens=4096, sae_batch=512, eval_samples_per_prompt=1
    )
    manifest = build(tmp_path, cfg, log=lambda *a: None)
    assert (tmp_path / "model" / "config.json").exists() and (tmp_path / "model" / "tokenizer.json").exists()
    sae = load_sae(str(tmp_path / "sae"))
    assert type(sae).__name__ == "JumpReLUSAE" and sae.cfg.normalize_activations == "none"  # scaling folded in
    assert json.loads((tmp_path / "manifest.json").read_text())["sae"]["hook_name"] == "blocks.2.hook_resid_post"
    assert set(manifest["reference_rule_follow"]["greedy"]["outcomes"]) == set(task.OUTCOMES)
