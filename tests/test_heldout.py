"""Issue 18: continued SFT through the SPIN trainer (objective sft), the held-out score's uncertainty, the starting
model as iteration 0 in the summary and the report, and the evaluation-based collapse check with stopWhen.collapse.
Fast: hand-computed values and constructed evaluation histories (the real runs are in test_evaluation_run.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from spin_core import layout
from spin_core.local import LocalRunner
from spin_core.losses import spin_objective
from spin_core.planner import Progress, plan
from spin_core.report import write_report
from spin_core.resource import SpecError, parse
from spin_core.stopping import (
    StopRule,
    estimate,
    format_score,
    heldout_collapse,
    heldout_points,
    paired_change,
    stop_reason,
)
from spin_core.store import Store
from spin_core.train import METRICS, metric_names
from spin_core.variants import CONTINUED_SFT, loss_weights, variant_label


def document(tmp_path: Path, evaluation: dict | None = None, **training) -> dict:
    spec = {
        "model": {"uri": f"file://{tmp_path}/model"},
        "dataset": {"uri": f"file://{tmp_path}/data.jsonl"},
        "storage": {"uri": f"file://{tmp_path}/run"},
        "iterations": 3,
        "training": training,
    }
    if evaluation is not None:
        spec["evaluation"] = {"dataset": {"uri": f"file://{tmp_path}/heldout.jsonl"}, **evaluation}
    return {"apiVersion": "selfplay.dev/v1alpha1", "kind": "SpinRun", "metadata": {"name": "unit"}, "spec": spec}


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# -- objective sft: continued SFT through the same trainer ----------------------------------------------------------


def test_sft_objective_is_the_nll_alone_with_no_spin_gradient():
    real, gen = t(-4.0, -6.0).requires_grad_(), t(-3.0, -1.0).requires_grad_()
    losses, _, _, terms = spin_objective(
        real, gen, t(-5.0, -5.0), t(-2.0, -2.0), beta=0.1, spin_weight=0.0, sft_weight=1.0, real_token_counts=t(4, 3)
    )
    assert losses.tolist() == [1.0, 2.0]  # 4 / 4 and 6 / 3 nats per token
    assert terms["spin"].gt(0).all()  # still reported, unweighted
    losses.sum().backward()
    assert gen.grad is None  # the generated answer plays no part: no gradient path at all
    assert real.grad.tolist() == pytest.approx([-1 / 4, -1 / 3])


def test_spin_weight_scales_the_spin_term_and_nothing_to_train_is_refused():
    args = (t(-1.0), t(-3.0), t(-2.0), t(-2.5))
    half = spin_objective(*args, beta=0.5, spin_weight=0.5)[0]
    assert half.item() == pytest.approx(0.5 * math.log1p(math.exp(-0.75)))
    with pytest.raises(ValueError, match="nothing to train"):
        spin_objective(*args, beta=0.5, spin_weight=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        spin_objective(*args, beta=0.5, spin_weight=-1.0)


def test_objective_field_weights_and_label(tmp_path):
    def training(**fields):
        return parse(document(tmp_path, **fields)).spec.training

    assert training().objective == "spin" and loss_weights(training()) == (1.0, 0.0, 0.0)
    assert loss_weights(training(sftWeight=0.3)) == (1.0, 0.3, 0.0)
    sft = training(objective="sft", sftWeight=0.3, klToBase=0.2)
    assert loss_weights(sft) == (0.0, 1.0, 0.2)  # NLL at weight 1, whatever sftWeight says
    assert metric_names(training(objective="sft")) == (*METRICS, "loss/sft")
    assert variant_label(training(objective="sft")) == CONTINUED_SFT
    assert variant_label(sft) == CONTINUED_SFT + " + KL to base (klToBase 0.2)"
    with pytest.raises(SpecError, match="objective"):
        parse(document(tmp_path, objective="dpo"))


# -- the held-out score's uncertainty ---------------------------------------------------------------------------


def test_exact_match_gets_a_binomial_error_and_wilson_interval_by_hand():
    e = estimate([1.0] * 3 + [0.0] * 7)  # 3 / 10
    assert e.mean == pytest.approx(0.3) and e.stderr == pytest.approx(math.sqrt(0.3 * 0.7 / 10))
    # Wilson, z = 1.96: centre (0.3 + 0.19208) / 1.38416, half 1.96 sqrt(0.021 + 0.0096040) / 1.38416.
    assert (e.low, e.high) == pytest.approx((0.10779, 0.60322), abs=1e-5)
    zero = estimate([0.0] * 20)
    assert zero.low == 0.0 and zero.high == pytest.approx(0.16113, abs=1e-5)  # not the empty interval [0, 0]
    for n in range(1, 200):  # the bounds hold the mean exactly, rounding included (1.4e-17 > 0 was seen)
        for k in (0, n // 3, n):
            e = estimate([1.0] * k + [0.0] * (n - k))
            assert 0.0 <= e.low <= e.mean <= e.high <= 1.0


def test_other_scores_get_the_sample_standard_error():
    e = estimate([0.5, 1.5, 1.0, 1.0])
    se = math.sqrt((0.25 + 0.25) / 3) / 2
    assert (e.mean, e.stderr) == (1.0, pytest.approx(se))
    assert (e.low, e.high) == pytest.approx((1 - 1.959964 * se, 1 + 1.959964 * se))
    with pytest.raises(ValueError):
        estimate([])


def test_paired_change_by_hand():
    change, se = paired_change([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])  # differences 0, -1, 0, 1, 0
    assert change == 0.0 and se == pytest.approx(math.sqrt(0.5) / math.sqrt(5))
    with pytest.raises(ValueError):
        paired_change([1], [1, 0])


# -- the collapse check on held-out numbers, and stopWhen.collapse ------------------------------------------------


def evaluation(t: int, before: float, after: float, se: float, logp_before: float, logp_after: float) -> dict:
    return {
        "iteration": t,
        "score_previous": before,
        "score": after,
        "score_change": after - before,
        "score_change_stderr": se,
        "logps/real_previous": logp_before,
        "logps/real": logp_after,
        "logps/real_change": logp_after - logp_before,
    }


def test_a_score_drop_beyond_two_paired_standard_errors_warns():
    (warning,) = heldout_collapse(evaluation(2, 0.96, 0.805, 0.02, -0.1, -0.4), nats=1.0)
    assert "iteration 2: the held-out score fell from 0.9600 (M_1) to 0.8050" in warning
    assert heldout_collapse(evaluation(2, 0.96, 0.93, 0.02, -0.1, -0.4), nats=1.0) == []  # 1.5 SE: noise
    assert heldout_collapse(evaluation(2, 0.5, 0.6, 0.0, -0.1, -0.4), nats=1.0) == []  # a rise never warns


def test_a_fall_of_heldout_log_p_real_warns_past_collapse_warn_nats():
    (warning,) = heldout_collapse(evaluation(1, 0.5, 0.5, 0.01, -1.66, -3.52), nats=1.0)
    assert "held-out log p(real answer) fell by 1.86 nats (-1.66 under M_0 -> -3.52)" in warning
    assert heldout_collapse(evaluation(1, 0.5, 0.5, 0.01, -1.66, -3.52), nats=2.0) == []
    assert heldout_collapse({"iteration": 1}, nats=1.0) == []  # an older eval.json: nothing to compare


def test_stop_when_collapse_ends_the_run_only_when_asked():
    history = {1: {"score": 0.6, "collapse": 0.0}, 2: {**evaluation(2, 0.6, 0.4, 0.02, -1, -1.2), "collapse": 1.0}}
    reason = stop_reason(history, StopRule(collapse=True))
    assert reason and "evaluation of iteration 2 warned of a collapse" in reason and "0.6000 -> 0.4000" in reason
    assert stop_reason(history, StopRule()) is None
    assert stop_reason({1: history[1]}, StopRule(collapse=True)) is None


def test_the_planner_stops_on_a_collapse_with_stop_when_collapse(tmp_path):
    spec = parse(document(tmp_path, {"scorer": "spin_core.demo:score", "stopWhen": {"collapse": True}})).spec
    collapsed = {1: {**evaluation(1, 0.6, 0.4, 0.02, -1, -1.2), "collapse": 1.0}}
    progress = Progress({1: frozenset({0})}, frozenset({1}), collapsed)
    step = plan(spec, progress)
    assert (step.kind, step.iteration) == ("done", 1) and "warned of a collapse" in step.reason
    off = parse(document(tmp_path, {"scorer": "spin_core.demo:score"})).spec
    assert plan(off, progress).kind == "generate"  # warned, but the run goes on: the rule is opt-in
    assert off.evaluation.stop_when.collapse is False


# -- the starting model as iteration 0: summary table and report ----------------------------------------------------


def published_run(tmp_path: Path) -> Store:
    """A run whose 2 iterations are trained and evaluated on 10 prompts: 3 -> 6 -> 9 correct."""
    run = parse(document(tmp_path, {"scorer": "spin_core.demo:score"}, sftWeight=1.0))
    store = Store.open(run.spec.storage.uri)
    store.publish_json(layout.RUN, run.to_document())
    scores = {0: [1.0] * 3 + [0.0] * 7, 1: [1.0] * 6 + [0.0] * 4, 2: [1.0] * 9 + [0.0]}
    for it in (1, 2):
        e = {"iteration": it, "heldout": 10, "logps/real_previous": -3.0 + it, "logps/real": -2.0 + it}
        for prefix, values in (("score", scores[it]), ("score_previous", scores[it - 1])):
            s = estimate(values)
            e.update({prefix: s.mean, f"{prefix}_ci95_low": s.low, f"{prefix}_ci95_high": s.high})
        e.update(scores=scores[it], scores_previous=scores[it - 1], warnings=[], collapse=0.0)
        store.publish_json(layout.evaluation(it), e)
        final = {"loss": 0.5, "pairs/total": 10, "logps/real": -2.0}
        store.publish_json(layout.metrics(it), {"steps": [], "final": final, "warnings": []})
        store.publish(layout.checkpoint(it), _marker(tmp_path))
    return store


def _marker(tmp_path: Path) -> dict[str, Path]:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    return {"weights.bin": path}


def test_heldout_points_put_the_start_first_as_iteration_0(tmp_path):
    store = published_run(tmp_path)
    evals = {it: store.read_json(layout.evaluation(it)) for it in (1, 2)}
    points = heldout_points(evals)
    assert [(p.iteration, p.score, p.logp_real) for p in points] == [(0, 0.3, -2.0), (1, 0.6, -1.0), (2, 0.9, 0.0)]
    assert format_score(points[0]) == "0.3000 [0.1078, 0.6032]"
    older = heldout_points({1: {"baseline_score": 0.25, "score": 0.5}})  # an eval.json from before intervals
    assert [(p.iteration, p.score, p.low) for p in older] == [(0, 0.25, None), (1, 0.5, None)]
    assert format_score(older[0]) == "0.2500"


def test_summary_table_shows_iteration_0_and_the_interval(tmp_path):
    store = published_run(tmp_path)
    runner = LocalRunner(parse(store.read_json(layout.RUN)))
    console = Console(record=True, width=250)
    console.print(runner.summary_table(runner.progress()))
    text = console.export_text()
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert rows[0].split("│")[1].strip() == "0" and "0.3000 [0.1078, 0.6032]" in rows[0]
    assert f"file://{tmp_path}/model" in rows[0]
    assert rows[2].split("│")[1].strip() == "2" and "0.9000 [0.5958, 0.9821]" in rows[2]
    # Under it: start -> last, and the paired change (6 of 10 prompts gained, none lost: sd sqrt(0.24 * 10 / 9)).
    assert "0.3000 [0.1078, 0.6032] at the start -> 0.9000 [0.5958, 0.9821] at iteration 2" in text
    assert "change +0.6000 ± 0.1633 (paired SE)" in text


def test_report_plots_and_tabulates_iteration_0(tmp_path):
    store = published_run(tmp_path)
    png, md = write_report(store.uri, tmp_path / "out")
    text = md.read_text()
    assert "| 0 (start) | - | - | - | - | - | - | - | - | 0.3000 [0.1078, 0.6032] | -2 |" in text
    assert "| 2 | 0.5000 | - | - | -2 | - | - | - | - | 0.9000 [0.5958, 0.9821] | 0.0000 |" in text
    assert png.read_bytes().startswith(b"\x89PNG")
