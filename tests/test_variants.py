"""Regularised SPIN variants (issue 9): each new loss term against hand-computed values, the defaults are exactly
`spin_loss`, the mixture opponent with history 1 is the plain opponent, identical pairs are dropped and counted, the
spec fields and labels, and short real trainer runs that publish the collapse diagnostics."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from spin_core import layout
from spin_core.context import RunContext
from spin_core.losses import (
    k3_per_token,
    mixture_logps,
    mixture_weights,
    nll_per_token,
    spin_loss,
    spin_objective,
)
from spin_core.pairs import Pair, base_tokens_like, batch_tensors, pair_logps, pair_token_logps, select_pairs
from spin_core.resource import SpecError, parse
from spin_core.rows import GeneratedRow, write_rows
from spin_core.store import Store
from spin_core.train import METRICS, Trainer, collapse_check, metric_names
from spin_core.variants import variant_label
from tests.fixtures.models import make_chat_rows


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# -- the loss terms, by hand -----------------------------------------------------------------------------------------


def test_nll_is_length_normalised_per_token():
    # Real answers of 4 and 2 tokens with summed log-probs -2 and -3: NLL per token 0.5 and 1.5.
    assert nll_per_token(t(-2.0, -3.0), t(4, 2)).tolist() == [0.5, 1.5]


def test_k3_by_hand():
    # Row 0: two tokens, r = base - policy = (-1.5 - -1) = -0.5 and (-1 - -2) = 1; row 1: one token (one padding).
    policy = t([-1.0, -2.0], [-0.3, 0.0])
    base = t([-1.5, -1.0], [-0.3, 0.0])
    mask = torch.tensor([[True, True], [True, False]])
    k3 = k3_per_token(policy, base, mask)
    expected_0 = ((math.exp(-0.5) - 1 + 0.5) + (math.exp(1.0) - 1 - 1.0)) / 2
    assert k3.tolist() == pytest.approx([expected_0, 0.0])


def test_k3_pulls_toward_the_base_from_both_sides_and_never_overflows():
    for policy_value, direction in ((-3.0, 1), (-0.5, -1)):  # below the base (-1): pushed up; above: pushed down
        policy = t([policy_value]).requires_grad_()
        k3_per_token(policy, t([-1.0]), torch.tensor([[True]])).sum().backward()
        assert -policy.grad.item() * direction > 0  # descent moves log p toward -1
    # A collapsed token (r = 200): finite, and the gradient still pushes the policy up.
    policy = t([-201.0]).requires_grad_()
    value = k3_per_token(policy, t([-1.0]), torch.tensor([[True]]))
    value.sum().backward()
    assert math.isfinite(value.item()) and policy.grad.item() < 0


def test_objective_with_every_new_weight_at_zero_is_spin_loss_exactly():
    args = (t(-1.0, -4.0, -2.0), t(-3.0, -1.0, -2.0), t(-2.0, -3.5, -2.5), t(-2.5, -1.2, -2.0))
    for loss_type in ("sigmoid", "hinge", "ipo"):
        expected = spin_loss(*args, beta=0.3, loss_type=loss_type)
        losses, real, generated, terms = spin_objective(*args, beta=0.3, loss_type=loss_type)
        for a, b in zip((losses, real, generated), expected, strict=True):
            assert torch.equal(a, b), loss_type
        assert set(terms) == {"spin"}


def test_objective_adds_the_weighted_terms_by_hand():
    # One pair: logits = (-1 - -3) - (-2 - -2.5) = 1.5, beta 0.5: spin = log(1 + e^-0.75).
    # Real answer of 4 tokens with log-probs -0.5, -0.25, -0.125, -0.125 (sum -1): NLL per token 0.25.
    # Base log-probs of those tokens -0.5, -0.5, -0.125, -0.125: r = 0, -0.25, 0, 0 -> k3 = (e^-0.25 - 1 + 0.25) / 4.
    tokens = t([-0.5, -0.25, -0.125, -0.125])
    base = t([-0.5, -0.5, -0.125, -0.125])
    mask = torch.ones((1, 4), dtype=torch.bool)
    losses, _, _, terms = spin_objective(
        t(-1.0),
        t(-3.0),
        t(-2.0),
        t(-2.5),
        beta=0.5,
        sft_weight=0.2,
        real_token_counts=t(4),
        kl_to_base=0.1,
        policy_real_token_logps=tokens,
        base_real_token_logps=base,
        real_token_mask=mask,
    )
    spin = math.log1p(math.exp(-0.75))
    k3 = (math.exp(-0.25) - 1 + 0.25) / 4
    assert terms["spin"].item() == pytest.approx(spin)
    assert terms["sft"].item() == pytest.approx(0.25)
    assert terms["kl"].item() == pytest.approx(k3)
    assert losses.item() == pytest.approx(spin + 0.2 * 0.25 + 0.1 * k3)


def test_nll_term_pushes_the_real_answer_up():
    real = t(-5.0).requires_grad_()
    losses, *_ = spin_objective(real, t(-5.0), t(-5.0), t(-5.0), beta=0.1, sft_weight=1.0, real_token_counts=t(5))
    losses.sum().backward()
    spin_only = t(-5.0).requires_grad_()
    spin_loss(spin_only, t(-5.0), t(-5.0), t(-5.0), beta=0.1)[0].sum().backward()
    assert real.grad.item() == pytest.approx(spin_only.grad.item() - 1 / 5)


def test_objective_refuses_missing_inputs_and_negative_weights():
    with pytest.raises(ValueError, match="real_token_counts"):
        spin_objective(t(0.0), t(0.0), t(0.0), t(0.0), beta=0.1, sft_weight=0.5)
    with pytest.raises(ValueError, match="per-token"):
        spin_objective(t(0.0), t(0.0), t(0.0), t(0.0), beta=0.1, kl_to_base=0.5)
    with pytest.raises(ValueError, match=">= 0"):
        spin_objective(t(0.0), t(0.0), t(0.0), t(0.0), beta=0.1, sft_weight=-1.0)


def test_mixture_weights_by_hand():
    assert mixture_weights(0.5, 3, 5) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert mixture_weights(0.5, 3, 2) == pytest.approx([2 / 3, 1 / 3])  # only M_1 and M_0 exist at iteration 2
    assert mixture_weights(1.0, 4, 9) == pytest.approx([0.25] * 4)  # alpha 1: uniform (fictitious play)
    assert mixture_weights(0.3, 1, 7) == [1.0]
    assert mixture_weights(0.9, 5, 1) == [1.0]  # iteration 1: M_0 is the only iterate
    with pytest.raises(ValueError):
        mixture_weights(0.0, 2, 2)


def test_mixture_logps_by_hand_and_one_component_is_the_opponent_itself():
    newest, older = t(-2.0, -4.0), t(-3.0, -1.0)
    assert mixture_logps([newest, older], [2 / 3, 1 / 3]).tolist() == pytest.approx([-7 / 3, -3.0])
    assert mixture_logps([newest], [1.0]) is newest


# -- pairs ---------------------------------------------------------------------------------------------------------


def pair(i: int, identical: bool = False, real=(5, 6, 7), generated=(8, 9)) -> Pair:
    return Pair(f"p{i}", 1, [1, 2, 3][: 1 + i % 3], list(real), list(real if identical else generated), identical, None)


def test_identical_pairs_are_always_counted_and_dropped_only_when_asked():
    pairs = [pair(0, True), pair(1), pair(2, True), pair(3)]
    kept, stats = select_pairs(pairs, drop_identical=False)
    assert kept == pairs
    assert stats == {
        "pairs/total": 4,
        "pairs/identical": 2,
        "pairs/identical_share": 0.5,
        "pairs/truncated": 0,
        "pairs/retokenized": 0,
        "pairs/dropped": 0,
        "pairs/trained": 4,
    }
    kept, stats = select_pairs(pairs, drop_identical=True)
    assert [p.id for p in kept] == ["p1", "p3"]
    assert (stats["pairs/identical"], stats["pairs/dropped"], stats["pairs/trained"]) == (2, 2, 2)


def test_truncated_answers_are_always_counted_and_dropped_only_when_asked():
    pairs = [pair(0, True), pair(1), pair(2), pair(3)]
    pairs[0].truncated = pairs[2].truncated = True
    kept, stats = select_pairs(pairs, drop_identical=False)
    assert kept == pairs and (stats["pairs/truncated"], stats["pairs/dropped"]) == (2, 0)
    kept, stats = select_pairs(pairs, drop_identical=False, drop_truncated=True)
    assert [p.id for p in kept] == ["p1", "p3"]
    assert (stats["pairs/truncated"], stats["pairs/dropped"], stats["pairs/trained"]) == (2, 2, 2)
    kept, stats = select_pairs(pairs, drop_identical=True, drop_truncated=True)  # p0 is both: dropped once
    assert [p.id for p in kept] == ["p1", "p3"] and stats["pairs/dropped"] == 2


def test_base_tokens_are_laid_out_on_the_real_answer_positions():
    pairs = [pair(0, real=(5, 6)), pair(1, real=(7, 8, 9))]
    pairs[0].base_real_tokens = torch.tensor([-1.0, -2.0])
    pairs[1].base_real_tokens = torch.tensor([-3.0, -4.0, -5.0])
    _, _, labels = batch_tensors(pairs, pad_id=0)
    mask = (labels[:, 1:] != -100)[: len(pairs)]
    laid = base_tokens_like(pairs, mask)
    # Row i holds its values where the targets are the real answer's tokens, in order.
    assert laid[0][mask[0]].tolist() == [-1.0, -2.0] and laid[1][mask[1]].tolist() == [-3.0, -4.0, -5.0]
    assert labels[0, 1:][mask[0]].tolist() == [5, 6] and labels[1, 1:][mask[1]].tolist() == [7, 8, 9]
    pairs[1].base_real_tokens = torch.tensor([-3.0])
    with pytest.raises(ValueError, match="token counts"):
        base_tokens_like(pairs, mask)


def test_per_token_logps_sum_to_the_sequence_logps(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pairs = [pair(0), pair(1, real=(10, 11, 12, 13)), pair(2, True)]
    with torch.no_grad():
        real, generated = pair_logps(model, pairs, pad_id=0)
        out = pair_token_logps(model, pairs, pad_id=0)
    assert torch.equal(out.real, real) and torch.equal(out.generated, generated)
    assert out.real_mask.sum(-1).tolist() == [3, 4, 3]
    assert out.real_tokens.sum(-1).tolist() == pytest.approx(real.tolist())


# -- trainer pieces without a model ---------------------------------------------------------------------------------


def document(tmp_path: Path, **training) -> dict:
    return {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SpinRun",
        "metadata": {"name": "variants"},
        "spec": {
            "model": {"uri": f"file://{tmp_path}/model"},
            "dataset": {"uri": f"file://{tmp_path}/data.jsonl"},
            "storage": {"uri": f"file://{tmp_path}/run"},
            "iterations": 4,
            "training": training,
        },
    }


def test_mixture_opponent_with_history_1_is_the_plain_opponent(tmp_path):
    batch = [pair(0), pair(1)]
    o_real, o_gen = t(-2.0, -3.0), t(-4.0, -5.0)
    plain = Trainer(RunContext.from_document(document(tmp_path)), 3)
    mixed1 = Trainer(
        RunContext.from_document(document(tmp_path, opponent="mixture", opponentMixture={"history": 1, "alpha": 0.3})),
        3,
    )
    assert plain.weights == mixed1.weights == [1.0]
    for trainer in (plain, mixed1):
        real, gen = trainer.opponent_of(batch, o_real, o_gen, "cpu")
        assert real is o_real and gen is o_gen
    # history 3 at iteration 3: M_2, M_1, M_0 with weights 1, 0.5, 0.25 (normalised).
    mixed3 = Trainer(
        RunContext.from_document(document(tmp_path, opponent="mixture", opponentMixture={"history": 3})), 3
    )
    for p, older in zip(batch, ([(-1.0, -1.0), (-7.0, -3.0)], [(-2.0, -8.0), (-4.0, -4.0)]), strict=True):
        p.older = older
    real, gen = mixed3.opponent_of(batch, o_real, o_gen, "cpu")
    assert real.tolist() == pytest.approx([(-2 * 4 - 1 * 2 - 7) / 7, (-3 * 4 - 2 * 2 - 4) / 7])
    assert gen.tolist() == pytest.approx([(-4 * 4 - 1 * 2 - 3) / 7, (-5 * 4 - 8 * 2 - 4) / 7])


def test_metric_names_follow_the_terms_that_are_on(tmp_path):
    assert metric_names(parse(document(tmp_path)).spec.training) == METRICS
    both = parse(document(tmp_path, sftWeight=0.1, klToBase=0.2)).spec.training
    assert metric_names(both) == (*METRICS, "loss/sft", "loss/kl")


def test_collapse_warning_past_the_threshold_only():
    steps = [
        {"logps/real_start": -2.0, "logps/real_change": c} for c in (0.0, -0.5, -1.0, -1.5, -2.0, -2.5, -3.0, -3.5)
    ]
    numbers, warnings = collapse_check(steps, 1.0, 2)
    assert numbers == {"logps/real_change_end": -3.25}  # the last quarter: steps 7 and 8
    assert len(warnings) == 1 and "fell by 3.25 nats" in warnings[0] and "-2.00 under M_1 -> -5.25" in warnings[0]
    assert collapse_check(steps, 4.0, 2)[1] == []
    assert collapse_check([{"logps/real_change": 0.4}], 1.0, 1) == ({"logps/real_change_end": 0.4}, [])
    assert collapse_check([{"loss": 1.0}], 1.0, 1) == ({}, [])


# -- the spec and the labels ----------------------------------------------------------------------------------------


def test_defaults_are_the_papers_method(tmp_path):
    training = parse(document(tmp_path)).spec.training
    assert (training.sft_weight, training.opponent, training.opponent_mixture) == (0.0, "previous", None)
    assert (training.kl_to_base, training.drop_identical_pairs, training.collapse_warn_nats) == (0.0, False, 1.0)
    assert variant_label(parse(document(tmp_path))) == "SPIN (paper)"


@pytest.mark.parametrize(
    ("training", "field"),
    [
        ({"sftWeight": -0.1}, "sftWeight"),
        ({"klToBase": -1}, "klToBase"),
        ({"opponent": "best"}, "opponent"),
        ({"opponent": "mixture", "opponentMixture": {"alpha": 0}}, "alpha"),
        ({"opponent": "mixture", "opponentMixture": {"alpha": 1.5}}, "alpha"),
        ({"opponent": "mixture", "opponentMixture": {"history": 0}}, "history"),
        ({"dropIdenticalPairs": "yes"}, "dropIdenticalPairs"),
        ({"collapseWarnNats": 0}, "collapseWarnNats"),
    ],
)
def test_bad_variant_fields_are_refused(tmp_path, training, field):
    with pytest.raises(SpecError, match=field):
        parse(document(tmp_path, **training))


def test_variant_labels(tmp_path):
    def label(**training):
        return variant_label(parse(document(tmp_path, **training)))

    assert label(sftWeight=0.2) == "SPIN + NLL (sftWeight 0.2)"
    assert label(opponent="mixture") == "SPIN + mixture opponent (alpha 0.5, history 2)"
    assert (
        label(klToBase=0.05, dropIdenticalPairs=True) == "SPIN + KL to base (klToBase 0.05) + identical pairs dropped"
    )
    assert label(loss="hinge") == "SPIN-hinge"
    assert label(opponentMixture={"history": 4}) == "SPIN (paper)"  # ignored without opponent: mixture
    # The same from run.json's document, its spec, or the bare training section.
    doc = parse(document(tmp_path, sftWeight=0.2, opponent="mixture")).to_document()
    expected = "SPIN + NLL (sftWeight 0.2) + mixture opponent (alpha 0.5, history 2)"
    assert variant_label(doc) == variant_label(doc["spec"]) == variant_label(doc["spec"]["training"]) == expected


def test_report_names_the_variant_and_shows_the_diagnostics(tmp_path):
    from spin_core.report import write_report

    doc = parse(document(tmp_path, sftWeight=0.2)).to_document()
    store = Store.open(f"file://{tmp_path}/run")
    store.publish_json(layout.RUN, doc)
    steps = [
        {"step": i + 1, "loss": 0.6, "logps/real": -2.0 - i, "logps/generated": -3 - 2 * i, "logps/real_change": -i}
        for i in range(4)
    ]
    final = {"logps/real": -5.5, "logps/generated": -9.25, "logps/real_change_end": -3.5, "pairs/identical_share": 0.25}
    store.publish_json(layout.metrics(1), {"steps": steps, "final": final, "warnings": ["iteration 1: log p fell"]})
    png, md = write_report(f"file://{tmp_path}/run", tmp_path / "out")
    text = md.read_text()
    assert "method: **SPIN + NLL (sftWeight 0.2)**" in text
    assert "logps/generated" in text and "logps/real_change_end" in text
    assert "| 1 | - | - | - | -5.5000 | -9.2500 | -3.5000 | - | 0.2500 | - |" in text
    assert "## Warnings" in text and "- iteration 1: log p fell" in text
    assert png.stat().st_size > 0


# -- real trainer runs -----------------------------------------------------------------------------------------------

ROWS = 24


def make_run(root: Path, model_dir: Path, iteration: int, identical: int, **training) -> Path:
    """A file:// run whose iteration `iteration` has one published shard of ROWS pairs (the first `identical` of
    them with the generated answer equal to the real one); for iteration 2 a perturbed copy of the model is
    published as M_1, so that M_1, M_0 and the base differ."""
    root.mkdir(parents=True, exist_ok=True)
    spec = {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SpinRun",
        "metadata": {"name": "variants"},
        "spec": {
            "model": {"uri": f"file://{model_dir}"},
            "dataset": {"uri": f"file://{root}/unused.jsonl"},
            "storage": {"uri": f"file://{root}/run"},
            "iterations": 2,
            "mixPreviousIterations": 0,
            "generation": {"shards": 1, "backend": "hf"},
            "training": {
                "learningRate": 1e-3,
                "optimizer": "adamw",
                "epochs": 1,
                "globalBatchSize": 4,
                "microBatchSize": 4,
                "maxLength": 96,
                "maxPromptLength": 48,
                "zeroStage": 2,
                "processesPerNode": 1,
                "gpusPerNode": 0,
                "checkpointEverySteps": 100,
                **training,
            },
        },
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    rng = random.Random(0)
    rows = [
        GeneratedRow(
            id=f"row-{i}",
            prompt=r["messages"][:1],
            real=r["messages"][1]["content"],
            generated=r["messages"][1]["content"]
            if i < identical
            else "".join(rng.choice("abc xyz") for _ in range(rng.randint(3, 12))),
            finish_reason="stop",
            prompt_tokens=0,
            generated_tokens=0,
            iteration=iteration,
            shard=0,
        )
        for i, r in enumerate(make_chat_rows(ROWS, seed=0))
    ]
    write_rows(root / "rows.jsonl", rows)
    store = Store.open(f"file://{root}/run")
    store.publish(layout.shard(iteration, 0, 1), {"rows.jsonl": root / "rows.jsonl"})
    if iteration == 2:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        out = root / "m1"
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
        store.publish(layout.checkpoint(1), out)
    return root / "spec.yaml"


def train(spec: Path, iteration: int, procs: int = 1) -> subprocess.CompletedProcess:
    job = ["-m", "spin_core", "train", "--spec", str(spec), "--iteration", str(iteration)]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
    argv = [sys.executable, *launcher, *job]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "SPIN_TERMINATION_LOG": str(spec.parent / "termination")}
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=environ)


def metrics_of(spec: Path, iteration: int) -> dict:
    return Store.open(f"file://{spec.parent}/run").read_json(layout.metrics(iteration))


EVERY_VARIANT = {
    "sftWeight": 0.2,
    "klToBase": 0.1,
    "opponent": "mixture",
    "opponentMixture": {"alpha": 0.5, "history": 3},
    "dropIdenticalPairs": True,
}


@pytest.fixture(scope="module")
def every_variant(tmp_path_factory, tiny_model_dir):
    """Iteration 2 with sftWeight, klToBase, a mixture of M_1 and M_0 and identical pairs dropped (1 process,
    precomputed opponent log-probs, ZeRO 2)."""
    spec = make_run(tmp_path_factory.mktemp("every"), tiny_model_dir, iteration=2, identical=4, **EVERY_VARIANT)
    result = train(spec, 2)
    assert result.returncode == 0, result.stderr[-5000:]
    return spec, result


@pytest.mark.slow
def test_trainer_with_every_variant_publishes_the_diagnostics(every_variant):
    spec, result = every_variant
    assert "scoring the pairs under M_0 (mixture opponent, base model, per token)" in result.stderr
    metrics = metrics_of(spec, 2)
    label = "SPIN + NLL (sftWeight 0.2) + mixture opponent (alpha 0.5, history 3) + KL to base (klToBase 0.1)"
    assert metrics["variant"] == label + " + identical pairs dropped"
    final = metrics["final"]
    assert (final["pairs/total"], final["pairs/identical"], final["pairs/dropped"], final["pairs/trained"]) == (
        ROWS,
        4,
        4,
        ROWS - 4,
    )
    assert final["pairs/identical_share"] == pytest.approx(4 / ROWS)
    assert final["opponent/iterates"] == 2  # M_1 and M_0 exist at iteration 2
    steps = metrics["steps"]
    assert len(steps) == (ROWS - 4) // 4
    for step in steps:
        assert set(metric_names(parse(yaml.safe_load(spec.read_text())).spec.training)) <= set(step)
        assert step["pairs/identical_share"] == 0.0  # all dropped
        assert step["loss/kl"] >= 0 and step["loss/sft"] > 0
        assert step["logps/real_per_token"] < 0 and step["logps/generated"] < 0
        # The total is the SPIN loss plus the weighted terms (means of per-pair sums are sums of means).
        assert step["loss"] == pytest.approx(step["loss/spin"] + 0.2 * step["loss/sft"] + 0.1 * step["loss/kl"])
        assert step["logps/real_change"] == pytest.approx(step["logps/real"] - step["logps/real_start"], abs=1e-5)
    # The first step's policy is M_1 itself: no change yet, and NLL is minus the per-token log-prob.
    assert steps[0]["logps/real_change"] == pytest.approx(0.0, abs=1e-4)
    assert steps[0]["loss/sft"] == pytest.approx(-steps[0]["logps/real_per_token"], abs=1e-5)
    assert "logps/real_change_end" in final
    assert isinstance(metrics["warnings"], list)
    assert bool(metrics["warnings"]) == (final["logps/real_change_end"] < -1.0)
    summary = json.loads((spec.parent / "termination").read_text())
    assert summary["variant"] == metrics["variant"] and summary["warnings"] == metrics["warnings"]
    assert summary["metrics"]["logps/real"] == pytest.approx(final["logps/real"], abs=1e-6)


@pytest.mark.slow
def test_defaults_and_mixture_history_1_train_exactly_alike_and_a_fall_of_log_p_real_warns(tmp_path, tiny_model_dir):
    """Bare SPIN at a high learning rate (3 epochs of 6 steps): the paper's defaults and opponent: mixture with
    history 1 follow the same trajectory bit for bit; log p(real answer) falls (measured here: about -0.46 nats over
    the last quarter of steps), which the default threshold (1 nat) lets pass and collapseWarnNats 0.1 reports."""
    hot = {"epochs": 3, "learningRate": 3e-3}
    plain = make_run(tmp_path / "plain", tiny_model_dir, iteration=1, identical=6, **hot)
    mixed = make_run(
        tmp_path / "mixed",
        tiny_model_dir,
        iteration=1,
        identical=6,
        opponent="mixture",
        opponentMixture={"history": 1},
        collapseWarnNats=0.1,
        **hot,
    )
    for spec in (plain, mixed):
        result = train(spec, 1)
        assert result.returncode == 0, result.stderr[-5000:]
    a, b = metrics_of(plain, 1), metrics_of(mixed, 1)
    assert [s["loss"] for s in a["steps"]] == [s["loss"] for s in b["steps"]]  # bit for bit
    assert a["variant"] == "SPIN (paper)" and a["final"]["pairs/identical"] == 6 and a["final"]["pairs/dropped"] == 0
    assert a["final"]["pairs/trained"] == ROWS
    assert sum(s["pairs/identical_share"] for s in a["steps"]) == pytest.approx(3 * 6 / 4)  # 6 identical per epoch
    assert "loss/sft" not in a["steps"][0] and a["steps"][0]["loss"] == a["steps"][0]["loss/spin"]
    change = b["final"]["logps/real_change_end"]
    assert change == a["final"]["logps/real_change_end"]
    assert -1.0 < change < -0.1, "the fixture no longer makes log p(real answer) fall: pick another setting"
    assert a["warnings"] == []
    (warning,) = b["warnings"]
    assert "log p(real answer) fell by" in warning and "collapseWarnNats 0.1" in warning
    assert json.loads((mixed.parent / "termination").read_text())["warnings"] == [warning]
    assert "warning: iteration 1: log p(real answer) fell" in result.stderr


@pytest.mark.slow
def test_online_reference_on_two_processes_with_zero3_starts_like_precompute(tmp_path, tiny_model_dir, every_variant):
    """The same variants with the frozen opponent kept online, 2 processes, ZeRO-3: the first step (before any
    update) sees the same opponent mixture, base log-probs and terms as the precomputed run."""
    two = {"referenceLogprobs": "online", "zeroStage": 3, "processesPerNode": 2, "microBatchSize": 2}
    spec = make_run(tmp_path, tiny_model_dir, iteration=2, identical=4, **EVERY_VARIANT, **two)
    result = train(spec, 2, procs=2)
    assert result.returncode == 0, result.stderr[-5000:]
    first, reference = metrics_of(spec, 2)["steps"][0], metrics_of(every_variant[0], 2)["steps"][0]
    for key in ("loss", "loss/spin", "loss/sft", "loss/kl", "rewards/margins", "logps/real_start", "logps/generated"):
        assert first[key] == pytest.approx(reference[key], abs=1e-4), key
