"""The demo's synthetic preference task: "stay on topic".

Prompts ask for a number of things of one category ("Name three fruits.", "Can you name five tools?").
Responses name their topic, then list distinct items in alphabetical order, separated by commas, ending in a period
("Fruits: mango, pear, plum.").  The order makes "no repeats" a property of each next item alone (it comes after
the previous one), which a tiny model learns far more reliably than excluding every earlier item.

The rule (what the judge checks, what every chosen response satisfies and no rejected one does): a response is
ON TOPIC when its topic is the requested category and it lists exactly the requested number of distinct items,
all from that category.

Each category has one CONFUSABLE category (fruits <-> vegetables, tools <-> instruments, animals <-> sports,
colors <-> countries).  The SFT data is a mix: a fraction :data:`SFT_P_ON_TOPIC` of its responses is on topic,
the rest answers with the confusable category instead ("Name three fruits." -> "Vegetables: carrot, leek,
onion.").  A model fit to it follows the rule on about that fraction of its samples, and never under greedy
decoding (the confusable topic is the likelier one).  Preference pairs (on-topic chosen, confusable rejected, same
count) teach the rule.  The decision is made at the response's first token (the topic) and carried by all of its
content (which items), where SAE features can see it.

Everything is generated deterministically from a seed with :class:`random.Random`; prompts are split into
train and held-out sets that share no prompt string (2 of the 10 templates of every category x count are
held out).  Rows use the project's ``strings`` schema: ``prompt``, ``chosen``, ``rejected``.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

# Items are single lower-case words, unique across categories (no "orange", "lime", "olive", ...).
CATEGORIES: dict[str, tuple[str, ...]] = {
    cat: tuple(items.split())
    for cat, items in {
        "animals": "cat dog horse cow sheep goat lion tiger bear wolf fox rabbit",
        "fruits": "apple banana cherry grape mango pear peach plum melon lemon kiwi papaya",
        "colors": "red blue green yellow purple pink brown black white gray violet indigo",
        "tools": "hammer saw drill wrench chisel pliers shovel rake axe ladder clamp trowel",
        "countries": "france spain italy japan china india brazil mexico canada egypt kenya peru",
        "instruments": "piano guitar violin drum flute trumpet harp cello banjo organ clarinet tuba",
        "vegetables": "carrot potato onion cabbage lettuce spinach celery garlic leek radish turnip beet",
        "sports": "soccer tennis golf hockey rugby boxing cricket skiing rowing cycling judo karate",
    }.items()
}
CONFUSABLE: dict[str, str] = {
    "fruits": "vegetables", "vegetables": "fruits",
    "tools": "instruments", "instruments": "tools",
    "animals": "sports", "sports": "animals",
    "colors": "countries", "countries": "colors",
}
COUNT_WORDS: dict[str, int] = {"two": 2, "three": 3, "four": 4, "five": 5}
TEMPLATES: tuple[str, ...] = (
    "Name {n} {c}.",
    "List {n} {c}.",
    "Give me {n} {c}.",
    "Can you name {n} {c}?",
    "Please list {n} {c}.",
    "Tell me {n} {c}.",
    "Write down {n} {c}.",
    "Which {n} {c} come to mind?",
    "Suggest {n} {c}.",
    "I need {n} {c}.",
)
HELDOUT_TEMPLATES_PER_CELL = 2  # of the 10 templates, per (category, count)
SFT_P_ON_TOPIC = 0.35  # fraction of on-topic responses in the SFT mix

_ITEM_CATEGORY = {item: cat for cat, items in CATEGORIES.items() for item in items}
_PROMPT_RE = re.compile(r"\b(" + "|".join(COUNT_WORDS) + r")\s+(" + "|".join(CATEGORIES) + r")\b")


# ---------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------


def parse_prompt(prompt: str) -> tuple[str, int]:
    """``(category, count)`` asked for by a task prompt; ``ValueError`` for a prompt that is not one."""
    m = _PROMPT_RE.search(prompt.lower())
    if m is None:
        raise ValueError(f"not a prompt of the demo task (no '<count> <category>' in it): {prompt!r}")
    return m.group(2), COUNT_WORDS[m.group(1)]


def split_prompts(seed: int = 0) -> tuple[list[str], list[str]]:
    """``(train, heldout)`` prompt lists, disjoint; every (category, count) cell has prompts in both."""
    rng = random.Random(f"fpo-demo-split-{seed}")
    train, heldout = [], []
    for cat in CATEGORIES:
        for word in COUNT_WORDS:
            held = set(rng.sample(range(len(TEMPLATES)), HELDOUT_TEMPLATES_PER_CELL))
            for i, template in enumerate(TEMPLATES):
                (heldout if i in held else train).append(template.format(n=word, c=cat))
    return train, heldout


# ---------------------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------------------


def format_response(category: str, items: Sequence[str]) -> str:
    """``"Fruits: pear, mango, plum."``"""
    return f"{category.capitalize()}: " + ", ".join(items) + "."


def on_topic_response(rng: random.Random, prompt: str) -> str:
    """The requested number of distinct items of the requested category, in alphabetical order."""
    cat, n = parse_prompt(prompt)
    return format_response(cat, sorted(rng.sample(CATEGORIES[cat], n)))


def off_topic_response(rng: random.Random, prompt: str) -> str:
    """The requested number of distinct items of the CONFUSABLE category (the SFT data's failure mode)."""
    cat, n = parse_prompt(prompt)
    other = CONFUSABLE[cat]
    return format_response(other, sorted(rng.sample(CATEGORIES[other], n)))


def sft_examples(prompts: Sequence[str], n: int, seed: int = 0, p_on_topic: float = SFT_P_ON_TOPIC) -> list[dict]:
    """``n`` rows ``{prompt, response}``: prompts drawn uniformly from ``prompts``; responses on topic with
    probability ``p_on_topic``, else from the confusable category."""
    rng = random.Random(f"fpo-demo-sft-{seed}")
    rows = []
    for _ in range(n):
        prompt = rng.choice(prompts)
        on_topic = rng.random() < p_on_topic
        response = on_topic_response(rng, prompt) if on_topic else off_topic_response(rng, prompt)
        rows.append({"prompt": prompt, "response": response})
    return rows


def preference_pairs(prompts: Sequence[str], n: int, seed: int = 0) -> list[dict]:
    """``n`` rows ``{prompt, chosen, rejected}`` (strings schema): chosen on topic, rejected from the
    confusable category, both with the requested count."""
    rng = random.Random(f"fpo-demo-pairs-{seed}")
    rows = []
    for _ in range(n):
        prompt = rng.choice(prompts)
        chosen, rejected = on_topic_response(rng, prompt), off_topic_response(rng, prompt)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


# ---------------------------------------------------------------------------------------------------------
# The judge
# ---------------------------------------------------------------------------------------------------------


def parse_response(response: str) -> tuple[str, list[str]] | None:
    """``(topic, items)`` of a ``"Topic: a, b, c."`` response (lower-cased), or None when it is not one."""
    text = response.strip()
    topic, sep, rest = text.partition(":")
    if not sep or not rest.endswith("."):
        return None
    items = [part.strip().lower() for part in rest[:-1].split(",")]
    if not topic.strip() or any(not item or " " in item for item in items):
        return None
    return topic.strip().lower(), items


def judge(prompt: str, response: str) -> bool:
    """True iff ``response`` is on topic for ``prompt``: ``"Topic: a, b, c."`` with the requested category as
    its topic and exactly the requested number of distinct items, every one from that category."""
    cat, n = parse_prompt(prompt)
    parsed = parse_response(response)
    if parsed is None:
        return False
    topic, items = parsed
    return topic == cat and len(items) == n == len(set(items)) and all(_ITEM_CATEGORY.get(i) == cat for i in items)


OUTCOMES = ("on_topic", "confusable", "wrong_count", "repeated_item", "stray_item", "malformed")


def classify(prompt: str, response: str) -> str:
    """Why a response passes or fails (one of :data:`OUTCOMES`, first match in that order): ``on_topic`` (the
    judge accepts it), ``confusable`` (a well-formed answer about the confusable category: the SFT failure mode),
    ``wrong_count``, ``repeated_item``, ``stray_item`` (a topic or an item of neither category), ``malformed``."""
    if judge(prompt, response):
        return "on_topic"
    parsed = parse_response(response)
    if parsed is None:
        return "malformed"
    cat, n = parse_prompt(prompt)
    topic, items = parsed
    other = CONFUSABLE[cat]
    if topic == other and len(items) == n == len(set(items)) and all(_ITEM_CATEGORY.get(i) == other for i in items):
        return "confusable"
    if len(items) != n:
        return "wrong_count"
    if len(set(items)) != n:
        return "repeated_item"
    return "stray_item"


def follow_rate(prompts: Sequence[str], responses: Sequence[str]) -> float:
    """Fraction of ``responses`` the judge accepts."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need as many responses as prompts (and at least one): {len(prompts)} vs {len(responses)}")
    return sum(judge(p, r) for p, r in zip(prompts, responses)) / len(prompts)


def pairwise_judge(prompt: str, policy_output: str, reference_output: str) -> float:
    """The judge as a pairwise comparison: 1 if only the policy's output is on topic, 0 if only the
    reference's is, 0.5 when both or neither are (a tie).  Usable as ``fpo_dist.evaluate``'s judge."""
    a, b = judge(prompt, policy_output), judge(prompt, reference_output)
    return 0.5 if a == b else float(a)


def win_rate(prompts: Sequence[str], policy_outputs: Sequence[str], reference_outputs: Sequence[str]) -> float:
    """Judge win rate of the policy against the reference (win 1, tie 0.5, loss 0), over ``prompts``."""
    from fpo_dist.evaluate import win_rate as _win_rate

    return _win_rate(prompts, policy_outputs, reference_outputs, pairwise_judge)["win_rate"]


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------


def write_jsonl(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def write_preference_data(
    out_dir: str | os.PathLike, seed: int = 0, n_train: int = 2048, n_heldout: int = 256
) -> dict[str, Path]:
    """``train.jsonl`` and ``heldout.jsonl`` preference pairs (strings schema) over disjoint prompts."""
    train_prompts, heldout_prompts = split_prompts(seed)
    out = Path(out_dir)
    return {
        "train": write_jsonl(preference_pairs(train_prompts, n_train, seed), out / "train.jsonl"),
        "heldout": write_jsonl(preference_pairs(heldout_prompts, n_heldout, seed + 1), out / "heldout.jsonl"),
    }
