"""`spin report RUN_URI`: a PNG of the run's metrics and a short Markdown summary beside it.

Both name the method (`variant_label`: "SPIN (paper)" or the regularised variant), show the held-out score per model
with its 95 % interval (the starting model as iteration 0) and the collapse diagnostics: log p(real answer) and
log p(generated answer) under the policy, their change against M_{t-1}, identical pairs, held-out log p(real), and
the trainer's and the evaluation's warnings."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from spin_core import layout
from spin_core.errors import SpinError
from spin_core.stopping import HeldoutPoint, format_score, heldout_points
from spin_core.store import NotPublished, Store
from spin_core.variants import variant_label

STEP_PANELS = [
    ("loss", "loss"),
    ("rewards/margins", "reward margin (real - generated)"),
    ("rewards/accuracies", "reward accuracy"),
    ("logps/real", "log p(real answer) — collapse shows here"),
    ("logps/generated", "log p(generated answer)"),
    ("logps/real_change", "log p(real) minus M_{t-1}'s, same pairs"),
]
SUMMARY = [
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "logps/real",
    "logps/generated",
    "logps/real_change_end",
    "pairs/identical",
    "pairs/identical_share",
]


def collect(store: Store) -> tuple[dict[str, Any], dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """(run document, metrics per iteration, evaluation per iteration) from a run's store."""
    try:
        run = store.read_json(layout.RUN)
    except NotPublished:
        raise SpinError(f"{store.uri} holds no run (no {layout.RUN}): is this the run's storage.uri?") from None
    metrics, evals = {}, {}
    # A continued run may go past run.json's iterations (spec.iterations may grow): read what is there.
    found = {
        int(head[len("iter-") :])
        for key, _ in store.backend.list("iter-")
        if (head := key.split("/", 1)[0])[len("iter-") :].isdigit() and key.count("/") == 1
    }
    for t in range(1, max([int(run["spec"].get("iterations", 0)), *found]) + 1):
        for key, target in ((layout.metrics(t), metrics), (layout.evaluation(t), evals)):
            with contextlib.suppress(NotPublished):
                target[t] = store.read_json(key)
    return run, metrics, evals


def plot(
    metrics: dict[int, dict[str, Any]], path: Path, title: str, evals: dict[int, dict[str, Any]] | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 7))
    step_axes = [*axes[0, :3], *axes[1, :3]]
    plot_heldout(axes[0, 3], axes[1, 3], heldout_points(evals or {}))
    for ax, (key, label) in zip(step_axes, STEP_PANELS, strict=True):
        offset = 0
        for t, m in sorted(metrics.items()):
            steps = [s for s in m.get("steps", []) if isinstance(s.get(key), int | float)]
            xs = [offset + s.get("step", i + 1) for i, s in enumerate(steps)]
            if xs:
                ax.plot(xs, [s[key] for s in steps], label=f"iteration {t}")
                offset = xs[-1]
        ax.set_title(label)
        ax.set_xlabel("optimizer step (cumulative)")
        ax.grid(alpha=0.3)
    if any(ax.lines for ax in step_axes):
        step_axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heldout(score_ax, logp_ax, points: list[HeldoutPoint]) -> None:
    """Per model (iteration 0 = the start): the held-out score with its 95 % interval, and held-out log p(real)."""
    scored = [p for p in points if p.score is not None]
    if scored:
        xs, ys = [p.iteration for p in scored], [p.score for p in scored]
        low = [p.score - p.low if p.low is not None else 0.0 for p in scored]
        high = [p.high - p.score if p.high is not None else 0.0 for p in scored]
        score_ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=4)
        for x, y in zip(xs, ys, strict=True):
            score_ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(6, 4))
    score_ax.set_title("held-out score (95 % interval); 0 = start")
    logged = [p for p in points if p.logp_real is not None]
    if logged:
        logp_ax.plot([p.iteration for p in logged], [p.logp_real for p in logged], marker="o")
    logp_ax.set_title("held-out log p(real answer); 0 = start")
    for ax in (score_ax, logp_ax):
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if points:
            ax.set_xticks(sorted({p.iteration for p in points}))


Metrics = dict[int, dict[str, Any]]


def method(run: dict[str, Any]) -> str:
    """The run's variant label; "unknown" when run.json's training settings do not parse (another version)."""
    try:
        return variant_label(run)
    except Exception:
        return "unknown"


def markdown(run: dict[str, Any], metrics: Metrics, evals: Metrics, png: str) -> str:
    spec = run["spec"]
    name = run.get("metadata", {}).get("name", "?")
    lines = [
        f"# SpinRun `{name}`",
        "",
        f"- method: **{method(run)}**",
        f"- model: `{spec['model']['uri']}`  dataset: `{spec['dataset']['uri']}`",
        f"- iterations: {len(metrics)}/{spec.get('iterations')} trained; loss `{spec['training'].get('loss')}`, "
        f"beta {spec['training'].get('beta')}, learning rate {spec['training'].get('learningRate')}",
        "",
        f"![metrics]({png})",
        "",
        "| iteration | " + " | ".join(SUMMARY) + " | held-out score [95 % CI] | held-out log p(real) |",
        "|---" * (len(SUMMARY) + 3) + "|",
    ]
    points = {p.iteration: p for p in heldout_points(evals)}
    for t in sorted(set(metrics) | set(evals) | set(points)):
        final = metrics.get(t, {}).get("final", {})
        cells = [_cell(final.get(k)) for k in SUMMARY]
        point = points.get(t)
        held = [format_score(point), _cell(point.logp_real)] if point else ["-", "-"]
        label = "0 (start)" if t == 0 else str(t)
        lines.append(f"| {label} | " + " | ".join(cells + held) + " |")
    lines.append("")
    lines.append(
        "`logps/*`: mean summed log-prob of the answers under the policy during the last epoch; "
        "`logps/real_change_end`: the policy's log p(real answer) minus M_{t-1}'s on the same pairs over the last "
        "quarter of the iteration's steps (strongly negative: collapse)."
    )
    lines.append("")
    warnings = [w for t in sorted(metrics) for w in metrics[t].get("warnings", [])]
    warnings += [w for t in sorted(evals) for w in evals[t].get("warnings", [])]
    if warnings:
        lines += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1):
        return str(int(value))
    return f"{value:.4f}" if isinstance(value, float) else "-"


def write_report(run_uri: str, out_dir: Path, endpoint: str | None = None) -> tuple[Path, Path]:
    store = Store.open(run_uri, endpoint)
    run, metrics, evals = collect(store)
    if not metrics:
        raise SpinError(f"{run_uri}: no iteration has published metrics yet")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = run.get("metadata", {}).get("name", "run")
    png, md = out_dir / f"{name}-report.png", out_dir / f"{name}-report.md"
    plot(metrics, png, f"SpinRun {name} · {method(run)}", evals)
    md.write_text(markdown(run, metrics, evals, png.name))
    return png, md
