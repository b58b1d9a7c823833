"""fpo_dist.demo.count_task: the real-model study's task, its checker and its pairs (hand-derived cases)."""

from __future__ import annotations

import pytest

from fpo_dist.demo import count_task as ct


def test_questions_answers_and_parsing():
    assert ct.question(7, 10) == "Count from 7 to 10." and ct.answer(7, 10) == "7, 8, 9, 10."
    assert ct.question(23, 21) == "Count down from 23 to 21." and ct.answer(23, 21) == "23, 22, 21."
    for a, b in ct.all_questions():
        assert ct.parse_question(ct.question(a, b)) == (a, b)
    for bad in ("Count to 3.", "Count from x to 4.", "Name three fruits.", "Count down from 3 to 1 please."):
        with pytest.raises(ValueError, match="not a question of the count task"):
            ct.parse_question(bad)


def test_the_split_is_disjoint_and_complete():
    train, held = ct.split_questions(0)
    assert not set(train) & set(held) and sorted(train + held) == sorted(ct.all_questions())
    assert len(ct.all_questions()) == len(ct.STARTS) * len(ct.LENGTHS) * 2 == 180 and len(held) == 45
    assert ct.split_questions(0) == (train, held) and ct.split_questions(1) != (train, held)


def test_prompts_carry_two_solved_examples_one_per_direction():
    msgs = ct.prompt_messages(12, 9)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[-1]["content"] == "Count down from 12 to 9."
    shots = [ct.parse_question(msgs[i]["content"]) for i in (0, 2)]
    assert {a < b for a, b in shots} == {True, False}  # one up, one down
    for i, (a, b) in zip((1, 3), shots):
        assert msgs[i]["content"] == ct.answer(a, b)
        assert abs(a - 12) > 5  # the example never gives away the asked numbers' start


@pytest.mark.parametrize(("response", "ok"), [
    ("3, 4, 5.", True), ("  3, 4, 5.\nUser: more", True), ("3, 4, 5", False), ("3, 4, 5, 6.", False),
    ("3, 4.", False), ("5, 4, 3.", False), ("3,4,5.", False), ("3, 3, 5.", False), ("", False),
    ("\n3, 4, 5.", False), ("3, 4\n, 5.", False),  # the response up to its first line break
])
def test_the_judge(response, ok):
    assert ct.judge("Count from 3 to 5.", response) is ok
    assert ct.pairwise_judge("Count from 3 to 5.", response, "3, 4.") == (1.0 if ok else 0.5)
    assert ct.pairwise_judge("Count from 3 to 5.", response, "3, 4, 5.") == (0.5 if ok else 0.0)


def test_pairs_from_samples_count_what_they_drop():
    p1, p2, p3 = ct.prompt_messages(3, 5), ct.prompt_messages(9, 7), ct.prompt_messages(1, 4)
    samples = [["3, 4.", "3, 4, 5.\nUser:", "3, 4, 5, 6."],  # a pair: the first right one, the first wrong one
               ["9, 8, 7.", "9, 8, 7."],  # no wrong sample
               ["1, 2.", "1, 2, 3."]]  # no right sample
    rows, counts = ct.pair_rows([p1, p2, p3], samples)
    assert counts == {"prompts": 3, "rows": 1, "no_following_sample": 1, "no_violating_sample": 1}
    assert rows[0]["chosen"] == [*p1, {"role": "assistant", "content": "3, 4, 5."}]
    assert rows[0]["rejected"] == [*p1, {"role": "assistant", "content": "3, 4."}]
    rows, counts = ct.pair_rows([p1, p2, p3], samples, canonical_chosen=True)
    assert counts["rows"] == 2 and rows[1]["chosen"][-1]["content"] == "1, 2, 3, 4."
    assert rows[1]["rejected"][-1]["content"] == "1, 2."
    with pytest.raises(ValueError):
        ct.follow_rate(["Count from 3 to 5."], [])
    assert ct.follow_rate(["Count from 3 to 5."] * 2, ["3, 4, 5.", "3, 4."]) == 0.5
