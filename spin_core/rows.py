"""The generated-pair row: what `spin generate` writes (one JSON object per line) and `spin train` reads."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spin_core.errors import SpinError


@dataclass
class OpponentLogps:
    """Summed log-probs of both answers under the generating model M_{t-1}, as the trainer would compute them
    (same tokens: `chat.encode_pair_side` with these lengths). The trainer reuses them only if all fields match."""

    real: float
    generated: float
    max_length: int
    max_prompt_length: int
    dtype: str  # "float32" is the only dtype the trainer trusts


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

    def to_json(self) -> str:
        doc = asdict(self)
        if self.opponent_logps is None:
            doc.pop("opponent_logps")
        if not self.extra:
            doc.pop("extra")
        return json.dumps(doc, ensure_ascii=False)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> GeneratedRow:
        logps = doc.get("opponent_logps")
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
