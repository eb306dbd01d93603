"""A task scorer for the fault tests: exact match, except that it raises on prompts containing
$SPIN_TEST_SCORER_RAISES (a scorer that breaks on one row, as user code does)."""

from __future__ import annotations

import os


def score(prompt: str, reference: str, generated: str) -> float:
    trap = os.environ.get("SPIN_TEST_SCORER_RAISES")
    if trap and trap in prompt:
        raise ValueError("cannot parse the answer")
    return float(reference.strip() == generated.strip())
