"""Rendering an evaluation result (distill/evaluation/suite.py's dict): markdown tables and the figure.

Tables are plain strings (the CLI prints them). matplotlib is optional (the `plots` extra):
figures are drawn on a bare `matplotlib.figure.Figure` (Agg canvas), never through pyplot, so
no GUI backend is needed and the caller's global matplotlib state is left alone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cost import Cost, cost_table

__all__ = ["plot_layer_similarity", "plot_probe_scores", "format_similarity", "format_probes", "format_cost",
           "format_projection", "format_checkpoint", "format_report"]

logger = logging.getLogger(__name__)

_SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}


def plot_layer_similarity(
    layers: Sequence[dict[str, Any]], path: str | Path, title: str = "", eval_history: Sequence[dict[str, Any]] = ()
) -> Path | None:
    """Cosine similarity and L1 distance per target layer, side by side, written to `path` (PNG).

    `layers` are the rows of eval.json's similarity section (keys teacher_layer, cosine, l1).
    `eval_history`: the run's evaluations while training (eval_log.jsonl records, keys step and
    cos/k); when given, a third panel draws each layer's cosine against the step.
    Returns the path, or None when matplotlib is not installed (a note is logged instead).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: skipping %s (pip install 'fusion-distill[plots]')", Path(path).name)
        return None
    labels = [str(row["teacher_layer"]) for row in layers]
    positions = list(range(len(layers)))
    fig = Figure(figsize=(12 if eval_history else 8, 3.2), layout="constrained")
    cos_ax, l1_ax, *curve_ax = fig.subplots(1, 3 if eval_history else 2)
    cos_ax.bar_label(cos_ax.bar(positions, [row["cosine"] for row in layers], color="tab:blue"), fmt="%.3f")
    # Cosine lives in [-1, 1]; a fixed range keeps plots of different runs comparable.
    cos_ax.set_ylim(min(0.0, *(row["cosine"] for row in layers)) - 0.05, 1.0)
    cos_ax.set_title("cosine similarity (higher is better)")
    l1_ax.bar_label(l1_ax.bar(positions, [row["l1"] for row in layers], color="tab:orange"), fmt="%.3f")
    l1_ax.set_title("L1 distance (lower is better)")
    for ax in (cos_ax, l1_ax):
        ax.set_xticks(positions, labels)
        ax.set_xlabel("teacher target layer")
        ax.grid(axis="y", alpha=0.3)
    if curve_ax:
        _eval_curve(curve_ax[0], eval_history, labels)
    return _save(fig, path, title)


def _save(fig, path: str | Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _eval_curve(ax, history: Sequence[dict[str, Any]], labels: Sequence[str]) -> None:
    """Per target layer, the held-out cosine at each evaluation; the best eval loss is marked."""
    steps = [record["step"] for record in history]
    for k, label in enumerate(labels):
        ax.plot(steps, [record[f"cos/{k}"] for record in history], marker=".", label=f"layer {label}")
    best = min(history, key=lambda record: record["loss"])
    ax.axvline(best["step"], color="grey", linestyle="--", linewidth=1, label=f"best eval loss (step {best['step']})")
    ax.set_title("eval cosine while training (flat = learned)")
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_probe_scores(section: dict[str, Any], path: str | Path, title: str = "") -> Path | None:
    """Probe scores side by side: one panel per probed task, one bar per model (student, fused
    teacher, each upstream), written to `path` (PNG).

    `section` is eval.json's probes section. Returns the path; None when no task was probed or
    matplotlib is not installed (a note is logged instead).
    """
    done = {spec: task for spec, task in section.get("tasks", {}).items() if "rows" in task}
    if not done:
        return None
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: skipping %s (pip install 'fusion-distill[plots]')", Path(path).name)
        return None
    fig = Figure(figsize=(max(4.0, 3.2 * len(done)), 3.6), layout="constrained")
    axes = fig.subplots(1, len(done), squeeze=False)[0]
    colors = {}  # one colour per model across panels, so the eye can follow a model
    for ax, (spec, task) in zip(axes, done.items()):
        models = [row["model"] for row in task["rows"]]
        for model in models:
            colors.setdefault(model, f"C{len(colors) % 10}")
        positions = list(range(len(models)))
        bars = ax.bar(positions, [row["score"] for row in task["rows"]], color=[colors[m] for m in models])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_xticks(positions, models, rotation=30, ha="right", fontsize=8)
        better = "lower" if task["lower_is_better"] else "higher"
        ax.set_title(f"{spec}\n{task['metric']} ({better} is better)", fontsize=9)
        # Every metric (accuracy, CER, EER) is a rate; a fixed [0, 1] keeps tasks and runs comparable (a CER can exceed 1).
        ax.set_ylim(0.0, max(1.0, *(row["score"] for row in task["rows"])) * 1.08)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path, title)


def format_similarity(section: dict[str, Any]) -> str:
    """Markdown table of the similarity section: one row per target layer, then the mean."""
    if "skipped" in section:
        return f"prediction similarity: skipped ({section['skipped']})"
    lines = [f"prediction similarity on {section['split']}: {section['utterances']} utterances, {section['frames']} valid frames",
             "| target | teacher layer | cosine | L1 |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['target']} | {r['teacher_layer']} | {r['cosine']:.4f} | {r['l1']:.4f} |" for r in section["layers"]]
    lines.append(f"| mean | | {section['mean_cosine']:.4f} | {section['mean_l1']:.4f} |")
    return "\n".join(lines)


def format_probes(section: dict[str, Any]) -> str:
    """Markdown table of the probes: one row per model, one column per task (its metric)."""
    if "skipped" in section:
        return f"probes: skipped ({section['skipped']})"
    done = {spec: task for spec, task in section["tasks"].items() if "rows" in task}
    b = section["budget"]
    lines = [f"probes ({b['interface']}, {b['steps']} steps, lr {b['learning_rate']:g}, seed {b['seed']}; "
             f"{section['train_utterances']} train / {section['dev_utterances']} dev utterances)"]
    lines += [f"{spec}: skipped ({task['skipped']})" for spec, task in section["tasks"].items() if "skipped" in task]
    lines += [f"{spec}: {task['missing']['train']} train / {task['missing']['dev']} dev utterances without a value, "
              "left out of this task" for spec, task in done.items() if any(task.get("missing", {}).values())]
    lines += [_verification_line(spec, task["rows"][0]) for spec, task in done.items() if task["metric"] == "eer"]
    if done:
        heads = [f"{spec} ({task['metric']}, {'lower' if task['lower_is_better'] else 'higher'} is better)"
                 for spec, task in done.items()]
        lines.append("| model | " + " | ".join(heads) + " |")
        lines.append("|---|" + "---:|" * len(done))
        models = [row["model"] for row in next(iter(done.values()))["rows"]]
        scores = {spec: {row["model"]: row["score"] for row in task["rows"]} for spec, task in done.items()}
        lines += ["| " + " | ".join([m] + [f"{scores[spec][m]:.4f}" for spec in done]) + " |" for m in models]
    return "\n".join(lines)


def _verification_line(spec: str, row: dict[str, Any]) -> str:
    # The EER's meaning depends on the trials: say which speakers and how many pairs.
    return (f"{spec}: head trained on {row['seen_speakers']} seen speakers ({row['num_train']} utterances); EER over "
            f"{row['trials']} trials ({row['target_trials']} same-speaker) of {row['unseen_speakers']} unseen speakers' "
            f"{row['num_dev']} dev utterances; 1 - EER is the higher-is-better score")


def format_projection(report: dict[str, Any] | None) -> str:
    """The fused teacher's projection diagnostics (FusedTeacher.projection_report): the share of
    each upstream's own variance the projection keeps, and a warning line under the threshold."""
    if not report:
        return "projection: no diagnostics (not a PCA-fitted projection, or fitted before they existed)"
    lines = [f"projection ({report['fit']}, balance {report['balance']}, {report['projection_dim']} dims, "
             f"{report['frames']} frames): keeps {report['explained_variance']:.1%} of the variance",
             "| upstream | width | share of variance | kept |", "|---|---:|---:|---:|"]
    low = []
    for row in report["upstreams"]:
        name = Path(row["upstream"]).name if Path(row["upstream"]).is_absolute() else row["upstream"]
        lines.append(f"| {name} | {row['width']} | {row['variance_share']:.1%} | {row['kept']:.1%} |")
        if row["kept"] < report["threshold"]:
            low.append(name)
    if low:
        lines.append(f"warning: the projection keeps less than {report['threshold']:.0%} of {', '.join(low)}; "
                     "try teacher.projection_balance=equal_variance or split, or a larger projection_dim")
    return "\n".join(lines)


def format_cost(section: dict[str, Any]) -> str:
    """Markdown cost table (distill.evaluation.cost.cost_table) with ratios against the reference row."""
    if "skipped" in section:
        return f"cost: skipped ({section['skipped']})"
    fields = {f.name for f in dataclasses.fields(Cost)}
    costs = [Cost(**{k: tuple(v) if k == "latencies_ms" else v for k, v in row.items() if k in fields}) for row in section["rows"]]
    # evaluate.cost_all casts and moves every model there; sections saved before that field default to it.
    where = f"{section.get('device', 'cpu').upper()}, {_SHORT_DTYPE.get(section.get('dtype', 'float32'), section.get('dtype'))}"
    return f"cost on {section['seconds']:g} s of audio ({where})\n" + cost_table(costs, section["reference"])


def format_checkpoint(record: dict[str, Any]) -> str:
    """One line: which checkpoint of the run was scored, and how it relates to the best and newest."""
    head = f"scored {Path(record['path']).name} (step {record['step']})"
    best, newest, step = record["best_step"], record["newest_step"], record["step"]
    if record["picked"] == "best":
        return head + (": the best eval checkpoint and the newest" if newest == step
                       else f": the best eval checkpoint; the newest is step {newest}")
    tail = f"; the best eval checkpoint is step {best}" if best is not None else ""
    return head + f": the newest checkpoint ({record['why']}){tail}"


def format_report(result: dict[str, Any]) -> str:
    """The three tables and where the files went, as the CLI prints them."""
    files = result["files"]
    written = [files["eval_json"]] + [files[k] for k in ("plot", "probe_plot") if files.get(k)]
    parts = [format_similarity(result["similarity"]), format_probes(result["probes"])]
    if result.get("checkpoint"):  # a run folder (eval.json files written before this have none)
        parts.insert(0, format_checkpoint(result["checkpoint"]))
    if result.get("teacher") is not None:  # eval.json files written before the diagnostics have no "projection"
        parts.append(format_projection(result.get("projection")))
    parts += [format_cost(result["cost"]), "wrote " + ", ".join(written)]
    return "\n\n".join(parts)
