"""`spin report RUN_URI`: a PNG of the run's metrics and a short Markdown summary beside it."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from spin_core import layout
from spin_core.errors import SpinError
from spin_core.store import NotPublished, Store

STEP_PANELS = [
    ("loss", "loss"),
    ("rewards/margins", "reward margin (real - generated)"),
    ("rewards/accuracies", "reward accuracy"),
    ("logps/real", "log p(real answer) — collapse shows here"),
]
SUMMARY = ["loss", "rewards/accuracies", "rewards/margins", "logps/real", "logps/generated", "pairs/identical"]


def collect(store: Store) -> tuple[dict[str, Any], dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """(run document, metrics per iteration, evaluation per iteration) from a run's store."""
    try:
        run = store.read_json(layout.RUN)
    except NotPublished:
        raise SpinError(f"{store.uri} holds no run (no {layout.RUN}): is this the run's storage.uri?") from None
    metrics, evals = {}, {}
    for t in range(1, int(run["spec"].get("iterations", 0)) + 1):
        for key, target in ((layout.metrics(t), metrics), (layout.evaluation(t), evals)):
            with contextlib.suppress(NotPublished):
                target[t] = store.read_json(key)
    return run, metrics, evals


def plot(metrics: dict[int, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, label) in zip(axes.flat, STEP_PANELS, strict=True):
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
    axes.flat[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


Metrics = dict[int, dict[str, Any]]


def markdown(run: dict[str, Any], metrics: Metrics, evals: Metrics, png: str) -> str:
    spec = run["spec"]
    name = run.get("metadata", {}).get("name", "?")
    lines = [
        f"# SpinRun `{name}`",
        "",
        f"- model: `{spec['model']['uri']}`  dataset: `{spec['dataset']['uri']}`",
        f"- iterations: {len(metrics)}/{spec.get('iterations')} trained; loss `{spec['training'].get('loss')}`, "
        f"beta {spec['training'].get('beta')}, learning rate {spec['training'].get('learningRate')}",
        "",
        f"![metrics]({png})",
        "",
        "| iteration | " + " | ".join(SUMMARY) + " | eval score |",
        "|---" * (len(SUMMARY) + 2) + "|",
    ]
    for t in sorted(set(metrics) | set(evals)):
        final = metrics.get(t, {}).get("final", {})
        cells = [_cell(final.get(k)) for k in SUMMARY]
        lines.append(f"| {t} | " + " | ".join(cells) + f" | {_cell(evals.get(t, {}).get('score'))} |")
    lines.append("")
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
    plot(metrics, png, f"SpinRun {name}")
    md.write_text(markdown(run, metrics, evals, png.name))
    return png, md
