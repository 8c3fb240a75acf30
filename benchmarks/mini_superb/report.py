"""Criteria, the markdown table and the bar chart of a benchmark run (results.json's content)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FUSED = "fused teacher: CHConv-PCA"  # the teacher the fused student is distilled from
RETENTION = 0.90  # criterion (b): the fused student keeps this share of the teacher, per task
SHORT = {"ctc:phonemes": "PR (1-PER)", "classification:speaker": "SID", "classification:language": "LID",
         "classification:style": "style", "verification:speaker": "ASV (1-EER)"}


def mean_value(row: dict) -> float:
    values = [t["value"] for t in row["tasks"].values()]
    return sum(values) / len(values)


def retention_of(student: dict, teacher: dict) -> float | None:
    """Student value / teacher value; None when the teacher scores (almost) nothing on the task,
    where a ratio would say nothing."""
    return student["value"] / teacher["value"] if teacher["value"] >= 0.01 else None


def percent(ratio: float | None) -> str:
    # One decimal, rounded down: a retention of 89.96% must not print as the 90% it fails.
    return "n/a" if ratio is None else f"{math.floor(ratio * 1000 + 1e-9) / 10:.1f}%"


def criteria(rows: list[dict]) -> tuple[dict[str, bool], list[str], dict[str, float]]:
    """(a) fused teacher beats every upstream on the mean; (b) the fused student keeps >= 90% of
    the fused teacher on every task (error rates as 1 - PER, 1 - EER); (c) the fused student beats every
    single-upstream student on the mean. Returns the verdicts, PASS/FAIL lines, retention."""
    by_name = {r["name"]: r for r in rows}
    fused, student = by_name[FUSED], by_name["student of fused teacher"]
    upstreams = [r for r in rows if r["group"] == "upstream"]
    singles = [r for r in rows if r["group"] == "student" and r["name"] != student["name"]]
    retention = {task: retention_of(student["tasks"][task], fused["tasks"][task]) for task in fused["tasks"]}
    verdict = {
        "a": all(mean_value(fused) > mean_value(u) for u in upstreams),
        "b": all(r is not None and r >= RETENTION for r in retention.values()),
        "c": all(mean_value(student) > mean_value(s) for s in singles),
    }
    best_up = max(upstreams, key=mean_value)
    best_single = max(singles, key=mean_value)
    lines = [
        f"{'PASS' if verdict['a'] else 'FAIL'} (a) fused teacher mean {mean_value(fused):.3f} vs best upstream "
        f"{mean_value(best_up):.3f} ({best_up['name']})",
        f"{'PASS' if verdict['b'] else 'FAIL'} (b) fused student keeps "
        + ", ".join(f"{SHORT.get(t, t)} {percent(r)}" for t, r in retention.items()) + f" of the fused teacher (>= {RETENTION:.0%} each)",
        f"{'PASS' if verdict['c'] else 'FAIL'} (c) fused student mean {mean_value(student):.3f} vs best single-teacher "
        f"student {mean_value(best_single):.3f} ({best_single['name']})",
    ]
    return verdict, lines, retention


def markdown(result: dict[str, Any]) -> str:
    rows, tasks = result["rows"], list(result["rows"][0]["tasks"])
    reference = next(r for r in rows if r["name"] == FUSED)
    head = ["model", *[SHORT.get(t, t) for t in tasks], "mean", "params (M)", "latency 10 s (ms)", "speedup vs fused"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"]] + [f"{r['tasks'][t]['value']:.3f} ± {r['tasks'][t]['stderr']:.3f}" for t in tasks]
        speed = reference["latency_ms"] / r["latency_ms"] if r.get("latency_ms") else None
        cells += [f"{mean_value(r):.3f}", f"{r['params'] / 1e6:.2f}", f"{r['latency_ms']:.0f}" if r.get("latency_ms") else "-",
                  f"{speed:.1f}x" if speed else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n"
    if result.get("finetune"):
        out += "\nDrop-in fine-tuning (`AutoModelForCTC.from_pretrained(student)`, phoneme CTC, same budget), test PER:\n\n"
        out += "| student | test PER | minutes |\n|---|---|---|\n"
        for name, f in result["finetune"].items():
            out += f"| {name} | {f['per']:.3f} ± {f['stderr']:.3f} | {f['minutes']:.1f} |\n"
    projection = result.get("projection")
    if projection:
        kept = ", ".join(f"{Path(u['upstream']).name.split('-')[0]} {u['kept']:.0%}" for u in projection["upstreams"])
        out += (f"\nThe fused teacher's PCA projection ({projection['balance']} balance, {projection['projection_dim']} dims) keeps "
                f"{projection['explained_variance']:.0%} of the variance; of each upstream's own: {kept}.\n")
    trained = [r for r in rows if r.get("training", {}).get("final_layer_cosine")]
    if trained:
        out += "\nWhat each distillation run said about itself (held-out eval during training):\n\n"
        out += "| student | per-layer cosine at the end | best step | convergence |\n|---|---|---|---|\n"
        for r in trained:
            t = r["training"]
            out += f"| {r['name']} | {' / '.join(f'{c:.3f}' for c in t['final_layer_cosine'])} | {t['best_step']} | {t['convergence']} |\n"
    out += "\n" + "\n".join(result["criteria_lines"]) + "\n"
    return out


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Grouped bars: one group per task (and the mean), one bar per model."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("matplotlib is not installed: no %s (pip install -e '.[plots]')", path.name)
        return None
    rows, tasks = result["rows"], list(result["rows"][0]["tasks"])
    groups = [SHORT.get(t, t) for t in tasks] + ["mean"]
    fig = Figure(figsize=(12, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        values = [r["tasks"][t]["value"] for t in tasks] + [mean_value(r)]
        errors = [r["tasks"][t]["stderr"] for t in tasks] + [0.0]
        ax.bar([g + i * width for g in range(len(groups))], values, width, yerr=errors, label=r["name"], capsize=2)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    ax.set_ylabel("score (accuracy, 1 - PER or 1 - EER)")
    ax.set_ylim(0, 1)
    ax.set_title(f"mini SUPERB ({result['config']['name']}): upstreams, fused teachers, students")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
