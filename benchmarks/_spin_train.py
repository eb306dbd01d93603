"""The spin side of `benchmarks/train_step.py`: `spin train --spec SPEC --iteration 1` (the training job's real entry
point, `spin_core.cli`), run under `torchrun --nproc-per-node N`, with a stopwatch attached. Not meant to be run by
hand.

Nothing in the training is changed. Two functions are wrapped to read the time:
- the DeepSpeed engine's `step`: a timestamp (wall clock and this process's CPU time) after each optimizer step
  (the call at a gradient-accumulation boundary), the same instant TRL's `on_step_end` marks;
- `spin_core.train.opponent_logps`: the duration of the opponent log-prob pass (referenceLogprobs: precompute).

Each rank writes `rank-<r>.json` into $SPIN_BENCH_OUT with those times and its peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any


def main() -> int:
    started = time.perf_counter()
    out = Path(os.environ["SPIN_BENCH_OUT"])
    stamps: list[float] = []
    cpu: list[float] = []
    precompute: list[float] = []
    marks: dict[str, Any] = {}

    import deepspeed

    from spin_core import train

    initialize = deepspeed.initialize

    def timed_initialize(*args, **kwargs):
        result = initialize(*args, **kwargs)
        engine = result[0]
        step = engine.step

        def timed_step(*a, **k):
            boundary = engine.is_gradient_accumulation_boundary()
            value = step(*a, **k)
            if boundary:
                stamps.append(time.perf_counter())
                cpu.append(time.process_time())
            return value

        engine.step = timed_step
        marks["engine_ready"] = time.perf_counter()
        marks["engine"] = (
            f"{type(engine).__name__}, ZeRO-{engine.zero_optimization_stage()}, {type(engine.optimizer).__name__}"
        )
        return result

    deepspeed.initialize = timed_initialize

    opponent_logps = train.opponent_logps

    def timed_opponent_logps(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return opponent_logps(*args, **kwargs)
        finally:
            precompute.append(time.perf_counter() - t0)

    train.opponent_logps = timed_opponent_logps

    from spin_core.cli import app

    code = 0
    try:
        app(["train", "--spec", os.environ["SPIN_BENCH_SPEC"], "--iteration", "1"])
    except SystemExit as e:  # the command always ends with SystemExit (its exit code)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        rank = int(os.environ.get("RANK", 0))
        result = {
            "rank": rank,
            "stamps": stamps,
            "cpu": cpu,
            "started": started,
            "engine_ready": marks.get("engine_ready"),
            "engine": marks.get("engine"),
            "precompute_s": sum(precompute) if precompute else None,
            "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }
        (out / f"rank-{rank}.json").write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
