"""The generated-pair row: what `spin generate` writes (one JSON object per line) and `spin train` reads."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spin_core.errors import SpinError

# How the rows' answers become tokens (spin_core.chat): the real answer in context, the generated one as sampled.
# Opponent log-probs computed with another tokenisation (older rows lack the field) are not reused.
TOKENIZATION = "in-context-v2"


@dataclass
class OpponentLogps:
    """Summed log-probs of both answers under the generating model M_{t-1}, as the trainer would compute them
    (same tokens: `chat.encode_pair_side` / `encode_generated_side` with these lengths). The trainer reuses them only
    if all fields match its own settings."""

    real: float
    generated: float
    max_length: int
    max_prompt_length: int
    dtype: str  # "float32" is the only dtype the trainer trusts, and only when it trains in float32
    tokenization: str | None = None  # TOKENIZATION when the answers were tokenised as the trainer does


@dataclass
class GeneratedRow:
    id: str
    prompt: list[dict[str, str]]
    real: str
    generated: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    generated_tokens: int
    iteration: int
    shard: int
    opponent_logps: OpponentLogps | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The ids the engine sampled, its stop token included when finish_reason is "stop": what the trainer trains on.
    # Rows written before this field existed have None (the trainer then tokenises `generated`, see spin_core.pairs).
    generated_token_ids: list[int] | None = None

    def to_json(self) -> str:
        doc = asdict(self)
        if self.opponent_logps is None:
            doc.pop("opponent_logps")
        if self.generated_token_ids is None:
            doc.pop("generated_token_ids")
        if not self.extra:
            doc.pop("extra")
        return json.dumps(doc, ensure_ascii=False)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> GeneratedRow:
        logps = doc.get("opponent_logps")
        ids = doc.get("generated_token_ids")
        if ids is not None and not (isinstance(ids, list) and all(type(i) is int and i >= 0 for i in ids)):
            raise TypeError("generated_token_ids must be a list of non-negative integers")
        return cls(**{**doc, "opponent_logps": OpponentLogps(**logps) if logps else None})


def write_rows(path: Path, rows: list[GeneratedRow]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(row.to_json() + "\n")


def read_rows(path: Path, source: str | None = None) -> Iterator[GeneratedRow]:
    """Rows of a shard file; a malformed line raises SpinError naming the source and line."""
    where = source or str(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield GeneratedRow.from_dict(json.loads(line))
            except (json.JSONDecodeError, TypeError) as e:
                raise SpinError(f"{where}:{n}: not a generated row: {e}") from None
