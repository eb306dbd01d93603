"""The demo task: two-digit addition in chat format, a deliberately weak SFT model, and its scorer.

`spin demo prepare DIR` writes, in a minute on a laptop CPU:

    DIR/train.jsonl      SFT data (messages format) the SpinRun trains on
    DIR/heldout.jsonl    held-out prompts for evaluation
    DIR/sft-model/       a tiny Llama + tokenizer, SFT-trained too briefly on purpose: weak (~15 % exact match)

The answers are checkable automatically (`score`), so "does SPIN make it stronger?" has a number.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from spin_core.errors import SpinError

SYSTEM = None  # no system turn: the prompt is one user message


def problem(rng: random.Random, digits: int = 2) -> tuple[str, str]:
    """One addition of two `digits`-digit numbers: (prompt, answer)."""
    low, high = 10 ** (digits - 1), 10**digits - 1
    a, b = rng.randint(low, high), rng.randint(low, high)
    return f"What is {a} + {b}?", str(a + b)


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def reversal(rng: random.Random, length: int = 5) -> tuple[str, str]:
    """One string reversal: `length` random lowercase letters, (prompt, the letters in reverse order)."""
    word = "".join(rng.choice(LETTERS) for _ in range(length))
    return f"Reverse {word}", word[::-1]


TASKS = ("addition", "reversal")


def make_rows(
    n: int, seed: int, exclude: set[str] | None = None, digits: int = 2, task: str = "addition"
) -> list[dict[str, Any]]:
    """n distinct problems as chat rows (`messages` format), none of whose prompts is in `exclude`.

    task addition: two `digits`-digit addends; task reversal: `digits` random letters to write backwards (a
    different skill, same exact-match scorer)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    rng, seen, rows = random.Random(seed), set(exclude or ()), []
    count = (9 * 10 ** (digits - 1)) ** 2 if task == "addition" else len(LETTERS) ** digits
    if n > count - len(seen):
        raise ValueError(f"cannot make {n} distinct problems")
    while len(rows) < n:
        prompt, answer = problem(rng, digits) if task == "addition" else reversal(rng, digits)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append(
            {
                "prompt_id": f"{'add' if task == 'addition' else 'rev'}-{len(rows):05d}-{seed}",
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            }
        )
    return rows


def score(prompt: str, reference: str, generated: str) -> float:
    """Exact match of the answer (whitespace ignored): 1.0 or 0.0. Usable as an evaluation scorer."""
    del prompt
    return float(generated.strip() == reference.strip())


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def corpus(rows: list[dict[str, Any]]) -> list[str]:
    return [m["content"] for r in rows for m in r["messages"]]


# The truncation of the demo SpinRun (training.maxPromptLength / maxLength): the SFT that makes a starting model
# and its scoring cut sequences exactly as the SpinRun's steps do.
MAX_PROMPT_LENGTH, MAX_LENGTH = 48, 64


def sft(
    model_dir: Path,
    rows: list[dict[str, Any]],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    max_prompt_length: int = MAX_PROMPT_LENGTH,
    max_length: int = MAX_LENGTH,
) -> None:
    """Plain supervised fine-tuning (AdamW, constant lr; loss on the answer tokens only), in place; one process."""
    import torch
    from transformers import AutoModelForCausalLM

    from spin_core.chat import encode_pair_side, load_tokenizer

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(model_dir, str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    examples = []
    for r in rows:
        prompt_ids, answer_ids = encode_pair_side(
            tokenizer, r["messages"][:1], r["messages"][1]["content"], max_prompt_length, max_length
        )
        examples.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id
    for _ in range(steps):
        batch = rng.sample(examples, min(batch_size, len(examples)))
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(model_dir, safe_serialization=True)


def accuracy(model_dir: Path, rows: list[dict[str, Any]], max_new_tokens: int = 8, batch_size: int = 64) -> float:
    """Greedy exact-match accuracy of a model on rows (transformers generate, left padding)."""
    import torch
    from transformers import AutoModelForCausalLM

    from spin_core.chat import load_tokenizer, prompt_token_ids

    tokenizer = load_tokenizer(model_dir, str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    correct = 0.0
    pad = tokenizer.pad_token_id
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        ids = [prompt_token_ids(tokenizer, r["messages"][:1], MAX_PROMPT_LENGTH) for r in chunk]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
        for r, seq in zip(chunk, out[:, width:], strict=True):
            text = tokenizer.decode(seq, skip_special_tokens=True)
            correct += score(r["messages"][0]["content"], r["messages"][1]["content"], text)
    return correct / max(1, len(rows))


def prepare(
    out: Path,
    train_size: int = 1000,
    heldout_size: int = 500,
    sft_steps: int = 600,
    seed: int = 0,
    overwrite: bool = False,
    layers: int = 4,
    lr: float = 1e-3,
) -> dict[str, Any]:
    """Write the demo dataset and a weak SFT model under `out`; returns a summary.

    The defaults: 1000 training rows, 500 held-out (a held-out score has a standard error of at most 2.2 points),
    a 4-layer Llama (hidden 128, 0.8M parameters) after 600 AdamW steps at lr 1e-3: under-trained on purpose, so
    that more training on the same rows can make it much stronger (`spin run manifests/examples/spinrun-tiny.yaml`).
    """
    from spin_core.tiny import build_model, build_tokenizer

    out = Path(out)
    model_dir = out / "sft-model"
    if model_dir.exists() and not overwrite:
        raise SpinError(f"{model_dir} already exists: pass --overwrite to rebuild the demo")
    out.mkdir(parents=True, exist_ok=True)
    heldout = make_rows(heldout_size, seed + 1000)
    train = make_rows(train_size, seed, exclude={r["messages"][0]["content"] for r in heldout})
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", heldout)
    tokenizer = build_tokenizer(corpus(train + heldout), vocab_size=64)
    build_model(model_dir, tokenizer, hidden_size=128, layers=layers, heads=4, seed=seed)
    sft(model_dir, train, steps=sft_steps, lr=lr, batch_size=32, seed=seed)
    summary = {"train": len(train), "heldout": len(heldout), "sft_steps": sft_steps}
    summary["heldout_accuracy"] = accuracy(model_dir, heldout)
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    return summary
