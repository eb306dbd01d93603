"""The demo task's data: distinct addition problems of the asked size, with correct answers."""

from __future__ import annotations

import re

import pytest

from spin_core import demo


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_rows_are_distinct_problems_of_the_asked_size_with_correct_answers(digits: int) -> None:
    exclude = {r["messages"][0]["content"] for r in demo.make_rows(20, seed=7, digits=digits)}
    rows = demo.make_rows(50, seed=1, exclude=exclude, digits=digits)
    prompts = [r["messages"][0]["content"] for r in rows]
    assert len(set(prompts)) == 50 and not set(prompts) & exclude
    for r in rows:
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", r["messages"][0]["content"]).groups())
        assert len(str(a)) == len(str(b)) == digits
        assert r["messages"][1] == {"role": "assistant", "content": str(a + b)}


def test_asking_for_more_problems_than_exist_is_an_error() -> None:
    assert len(demo.make_rows(81, seed=0, digits=1)) == 81  # every one-digit pair 1..9 + 1..9
    with pytest.raises(ValueError, match="cannot make 82 distinct problems"):
        demo.make_rows(82, seed=0, digits=1)


def test_the_scorer_is_exact_match_ignoring_surrounding_whitespace() -> None:
    assert demo.score("What is 1 + 2?", "3", " 3\n") == 1.0
    assert demo.score("What is 1 + 2?", "3", "33") == 0.0
