"""The real-model study's task: "count as asked", a constraint a program checks, posed to the pretrained Gemma 3 270M.

Prompts ask for a count ("Count from 7 to 10.", "Count down from 23 to 20."), after two solved examples of the
same kind, as a conversation in the project's plain template (``User: …\\n\\nAssistant: …``; the base model has no
chat template).  The answer is one line: the numbers in order, separated by ", ", ending in "." ("7, 8, 9, 10.").
The pretrained model follows it on about a quarter of its samples at temperature 1 (it stops early, runs on,
counts the wrong way, repeats a number); preference pairs come from its own samples.

The rule (what the judge checks): the response up to its first line break, stripped, is exactly the canonical
answer (a sample ends at its first line break: ``GenerationConfig.stop_at_newline``).
Everything is deterministic from a seed; train and held-out prompts share no (start, end, direction).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

DIRECTIONS = ("up", "down")
STARTS = range(1, 31)
LENGTHS = (3, 4, 5)  # numbers in the answer
HELDOUT_FRACTION = 0.25


def question(start: int, end: int) -> str:
    return f"Count from {start} to {end}." if end > start else f"Count down from {start} to {end}."


def answer(start: int, end: int) -> str:
    step = 1 if end > start else -1
    return ", ".join(str(i) for i in range(start, end + step, step)) + "."


def parse_question(text: str) -> tuple[int, int]:
    """``(start, end)`` of a task question; ``ValueError`` for anything else."""
    words = text.strip().rstrip(".").split()
    try:
        if words[:2] == ["Count", "from"] and words[3] == "to" and len(words) == 5:
            return int(words[2]), int(words[4])
        if words[:3] == ["Count", "down", "from"] and words[4] == "to" and len(words) == 6:
            return int(words[3]), int(words[5])
    except (IndexError, ValueError):
        pass
    raise ValueError(f"not a question of the count task: {text!r}")


def all_questions() -> list[tuple[int, int]]:
    """Every ``(start, end)``: counting up from 1..30, and down to 1..30, with 3-5 numbers."""
    out = []
    for a in STARTS:
        for n in LENGTHS:
            out.append((a, a + n - 1))
            out.append((a + n - 1, a))
    return out


def split_questions(seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(train, heldout)``: disjoint, a shuffled :data:`HELDOUT_FRACTION` held out."""
    qs = all_questions()
    random.Random(f"fpo-count-split-{seed}").shuffle(qs)
    cut = int(len(qs) * HELDOUT_FRACTION)
    return qs[cut:], qs[:cut]


def prompt_messages(start: int, end: int, seed: int = 0) -> list[dict]:
    """Two solved examples (drawn by the question, one counting up and one down) and the question: the prompt
    turns of a ``messages``-schema row."""
    rng = random.Random(f"fpo-count-shots-{seed}-{start}-{end}")
    shots = []
    for up in rng.sample([True, False], 2):
        a = rng.choice([x for x in STARTS if abs(x - start) > 5])
        n = rng.choice(LENGTHS)
        s, e = (a, a + n - 1) if up else (a + n - 1, a)
        shots += [{"role": "user", "content": question(s, e)}, {"role": "assistant", "content": answer(s, e)}]
    return shots + [{"role": "user", "content": question(start, end)}]


def first_line(response: str) -> str:
    return response.split("\n")[0].strip()


def judge(instruction: str, response: str) -> bool:
    """True iff the response's first line is exactly the count the instruction asks for."""
    return first_line(response) == answer(*parse_question(instruction))


def pairwise_judge(instruction: str, policy_output: str, reference_output: str) -> float:
    """1 if only the policy follows the rule, 0 if only the reference does, 0.5 otherwise (``fpo_dist.evaluate``'s
    judge interface)."""
    a, b = judge(instruction, policy_output), judge(instruction, reference_output)
    return 0.5 if a == b else float(a)


def follow_rate(instructions: Sequence[str], responses: Sequence[str]) -> float:
    if len(instructions) != len(responses) or not instructions:
        raise ValueError(f"need as many responses as instructions (and one at least): {len(instructions)} vs "
                         f"{len(responses)}")
    return sum(judge(i, r) for i, r in zip(instructions, responses)) / len(instructions)


def pair_rows(prompts: Sequence[list[dict]], samples: Sequence[Sequence[str]], canonical_chosen: bool = False
              ) -> tuple[list[dict], dict]:
    """Preference rows (``messages`` schema) from each prompt's samples: chosen = its first sample the judge
    accepts, rejected = its first one it does not.  A prompt without both yields no row, or with
    ``canonical_chosen`` (held-out rows) the canonical answer as chosen when no sample follows the rule.  Returns
    the rows and counts (prompts, rows, prompts without a following / a violating sample)."""
    rows, counts = [], {"prompts": len(prompts), "rows": 0, "no_following_sample": 0, "no_violating_sample": 0}
    for msgs, outs in zip(prompts, samples):
        q = msgs[-1]["content"]
        ok = [o for o in outs if judge(q, o)]
        bad = [first_line(o) for o in outs if not judge(q, o) and first_line(o)]
        counts["no_following_sample"] += not ok
        counts["no_violating_sample"] += not bad
        chosen = first_line(ok[0]) if ok else (answer(*parse_question(q)) if canonical_chosen else None)
        if chosen is None or not bad:
            continue
        rows.append({"chosen": [*msgs, {"role": "assistant", "content": chosen}],
                     "rejected": [*msgs, {"role": "assistant", "content": bad[0]}]})
    counts["rows"] = len(rows)
    return rows, counts
