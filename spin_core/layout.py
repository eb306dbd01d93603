"""The fixed layout of a run under `spec.storage.uri`, shared by the jobs, the local runner and the operator.

    run.json                                   resolved SpinRun (JSON document)
    iter-<t>/generated/shard-<i>-of-<n>/       artefact: rows.jsonl (pairs written by model M_{t-1})
    iter-<t>/train-state/step-<k>/             artefact: resumable training state (scratch, pruned)
    iter-<t>/checkpoint/                       artefact: model M_t in HF format (safetensors + tokenizer)
    iter-<t>/metrics.json                      JSON document: training metrics of iteration t
    iter-<t>/eval.json                         JSON document: evaluation of M_t

Iterations are 1-based. M_0 is `spec.model.uri`; iteration t generates with M_{t-1} and trains M_t.
"""

from __future__ import annotations

RUN = "run.json"
SHARD_ROWS = "rows.jsonl"


def iteration_prefix(t: int) -> str:
    return f"iter-{t}"


def shard(t: int, index: int, count: int) -> str:
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is out of range for {count} shards (0..{count - 1})")
    return f"iter-{t}/generated/shard-{index}-of-{count}"


def generated_prefix(t: int) -> str:
    return f"iter-{t}/generated/"


def checkpoint(t: int) -> str:
    return f"iter-{t}/checkpoint"


def train_state_prefix(t: int) -> str:
    return f"iter-{t}/train-state/"


def train_state(t: int, step: int) -> str:
    return f"iter-{t}/train-state/step-{step:08d}"


def metrics(t: int) -> str:
    return f"iter-{t}/metrics.json"


def evaluation(t: int) -> str:
    return f"iter-{t}/eval.json"
