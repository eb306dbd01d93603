"""The planner: a pure function both executors share."""

from hypothesis import given
from hypothesis import strategies as st

from spin_core import layout
from spin_core.planner import Progress, Step, latest_checkpoint, plan, training_iterations
from spin_core.spec import SpinRunSpec


def make_spec(iterations: int = 3, shards: int = 2, mix: int = 1) -> SpinRunSpec:
    return SpinRunSpec.model_validate(
        {
            "model": {"uri": "file:///m"},
            "dataset": {"uri": "file:///d.jsonl"},
            "storage": {"uri": "file:///s"},
            "iterations": iterations,
            "mixPreviousIterations": mix,
            "generation": {"shards": shards},
        }
    )


def test_fresh_run_generates_every_shard_of_iteration_one():
    assert plan(make_spec(), Progress()) == Step("generate", 1, (0, 1))


def test_only_missing_shards_are_generated():
    progress = Progress(generated={1: frozenset({1})})
    assert plan(make_spec(), progress) == Step("generate", 1, (0,))


def test_all_shards_published_means_train():
    progress = Progress(generated={1: frozenset({0, 1})})
    assert plan(make_spec(), progress) == Step("train", 1)


def test_next_iteration_after_training():
    progress = Progress(generated={1: frozenset({0, 1})}, trained=frozenset({1}))
    assert plan(make_spec(), progress) == Step("generate", 2, (0, 1))


def test_done_when_every_iteration_is_trained_and_more_iterations_continue():
    progress = Progress(trained=frozenset({1, 2, 3}))
    assert plan(make_spec(iterations=3), progress) == Step("done", 3)
    assert plan(make_spec(iterations=4), progress) == Step("generate", 4, (0, 1))


def test_progress_from_store_keys_ignores_other_shard_counts_and_scratch():
    keys = [
        layout.shard(1, 0, 2),
        layout.shard(1, 1, 2),
        layout.shard(2, 0, 3),  # a different shard count: not ours
        layout.train_state(2, 10),
        layout.checkpoint(1),
        "run.json",
    ]
    progress = Progress.from_published(keys, shards=2)
    assert progress.generated == {1: frozenset({0, 1})}
    assert progress.trained == frozenset({1})
    assert plan(make_spec(), progress) == Step("generate", 2, (0, 1))
    assert latest_checkpoint(progress) == "iter-1/checkpoint"
    assert latest_checkpoint(Progress()) is None


def test_training_mixes_previous_iterations():
    assert training_iterations(make_spec(mix=1), 1) == [1]
    assert training_iterations(make_spec(mix=1), 3) == [2, 3]
    assert training_iterations(make_spec(mix=0), 3) == [3]
    assert training_iterations(make_spec(iterations=5, mix=2), 4) == [2, 3, 4]


@given(
    iterations=st.integers(1, 6),
    shards=st.integers(1, 5),
    order=st.randoms(use_true_random=False),
)
def test_executing_the_plan_alternates_generate_and_train_until_done(iterations, shards, order):
    """Executing steps one shard at a time (in any order) always ends done, each iteration generated then trained."""
    spec = make_spec(iterations=iterations, shards=shards)
    generated: dict[int, set[int]] = {}
    trained: set[int] = set()
    history: list[tuple[str, int]] = []
    for _ in range(iterations * (shards + 1) + 1):
        step = plan(spec, Progress({t: frozenset(s) for t, s in generated.items()}, frozenset(trained)))
        if step.kind == "done":
            break
        history.append((step.kind, step.iteration))
        if step.kind == "generate":
            generated.setdefault(step.iteration, set()).add(order.choice(step.shards))
        else:
            assert generated[step.iteration] == set(range(shards))
            assert all(t in trained for t in range(1, step.iteration))
            trained.add(step.iteration)
    assert step.kind == "done"
    assert trained == set(range(1, iterations + 1))
    assert [t for kind, t in history if kind == "train"] == list(range(1, iterations + 1))


def with_evaluation(iterations: int = 4, **stop_when) -> SpinRunSpec:
    spec = make_spec(iterations=iterations, shards=1).model_dump(by_alias=True)
    spec["evaluation"] = {"heldoutFraction": 0.1, "scorer": "spin_core.demo:score", "stopWhen": stop_when}
    return SpinRunSpec.model_validate(spec)


def test_each_trained_iteration_is_evaluated_before_the_next_starts():
    spec = with_evaluation()
    progress = Progress(generated={1: frozenset({0})}, trained=frozenset({1}))
    assert plan(spec, progress) == Step("evaluate", 1)
    progress = Progress(progress.generated, progress.trained, {1: {"score": 0.5}})
    assert plan(spec, progress) == Step("generate", 2, (0,))


def test_the_stop_rule_ends_the_run_early_with_a_reason():
    spec = with_evaluation(patience=1)
    trained = frozenset({1, 2})
    generated = {1: frozenset({0}), 2: frozenset({0})}
    improving = Progress(generated, trained, {1: {"score": 0.5, "baseline_score": 0.4}, 2: {"score": 0.6}})
    assert plan(spec, improving) == Step("generate", 3, (0,))
    worse = Progress(generated, trained, {1: {"score": 0.5, "baseline_score": 0.4}, 2: {"score": 0.45}})
    step = plan(spec, worse)
    assert step.kind == "done" and step.iteration == 2
    assert "best 0.5000 at iteration 1" in step.reason
    # Worse than the starting model already at iteration 1.
    step = plan(spec, Progress({1: frozenset({0})}, frozenset({1}), {1: {"score": 0.3, "baseline_score": 0.4}}))
    assert step.kind == "done" and step.iteration == 1 and "iteration 0" in step.reason
