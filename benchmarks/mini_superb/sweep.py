"""`--sweep`: retention against student size (params, CPU latency) and against distillation steps.

For each teacher in `sweep.teachers` (the fused one and a single upstream), extra students are
distilled at `sweep.sizes` (default steps) and at `sweep.steps` (default size), through the same
`fusion-distill train` path, and probed with the same budget. Retention is a student's task value
over the FUSED teacher's (the same denominator for fused- and single-teacher students), so the
curves show what a user gets for each size and budget. The default point is the main run's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from .config import BenchmarkConfig
from .recipes import recipe, write_recipe
from .report import FUSED, SHORT, mean_value, percent, retention_of
from .stages import distil, latency, probe, student_extractor

logger = logging.getLogger(__name__)


def points(cfg: BenchmarkConfig) -> list[tuple[str, BenchmarkConfig]]:
    """(tag, config) of every sweep student besides the main run's, sizes first."""
    out = []
    for name, size in cfg.sweep.sizes.items():  # sizes of the main student's family (student.arch)
        out.append((f"size-{name}", dataclasses.replace(cfg, student=dataclasses.replace(size, arch=cfg.student.arch))))
    for steps in cfg.sweep.steps:
        if steps != cfg.distill.steps:
            out.append((f"steps-{steps}", dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, steps=steps))))
    return out


def run_sweep(cfg: BenchmarkConfig, out: Path, corpus: Path, sources: dict[str, list[Path]], targets: dict[str, Path | None],
              main: dict, data: tuple) -> dict:
    """Distil and probe every sweep point; write sweep.json, sweep.md and two PNGs."""
    fused = next(r for r in main["rows"] if r["name"] == FUSED)
    probed, models = [], {}
    for teacher in cfg.sweep.teachers:
        main_row = next(r for r in main["rows"] if r.get("teacher") == teacher)
        probed.append((teacher, "default", cfg, main_row["tasks"]))
        models[f"{teacher} default"] = ("student", student_extractor(Path(main_row["folder"]))[1])
        for tag, point_cfg in points(cfg):
            run_dir = out / "sweep" / f"{teacher}-{tag}"
            body = recipe(point_cfg, corpus, sources[teacher], run_dir)
            file = write_recipe(body, out / "sweep" / "recipes" / f"{teacher}-{tag}.yaml", root=out)
            folder = distil(file, run_dir, targets[teacher], root=out)
            extract, model = student_extractor(folder)
            models[f"{teacher} {tag}"] = ("student", model)
            probed.append((teacher, tag, point_cfg, probe(f"{teacher} {tag}", extract, "weighted_sum", data, point_cfg)))
    costs = latency(models, repeats=5)  # every sweep student in the same interleaved rounds
    entries = [_entry(teacher, tag, c, tasks, costs[f"{teacher} {tag}"]["params"], costs[f"{teacher} {tag}"]["latency_ms"], fused)
               for teacher, tag, c, tasks in probed]
    result = {"reference": FUSED, "entries": entries}
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "sweep.md").write_text(sweep_markdown(entries))
    _plot(entries, out)
    return result


def _entry(teacher: str, tag: str, cfg: BenchmarkConfig, tasks: dict, params: int, latency_ms: float, fused: dict) -> dict:
    retention = {t: retention_of(tasks[t], fused["tasks"][t]) for t in tasks}
    return {"teacher": teacher, "point": tag, "steps": cfg.distill.steps, "student": dataclasses.asdict(cfg.student),
            "params": params, "latency_ms": latency_ms, "tasks": tasks, "retention": retention,
            "mean_value": mean_value({"tasks": tasks})}


def sweep_markdown(entries: list[dict[str, Any]]) -> str:
    tasks = list(entries[0]["retention"])
    head = ["teacher", "point", "steps", "params (M)", "latency 10 s (ms)", *[SHORT.get(t, t) for t in tasks], "mean score"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in sorted(entries, key=lambda e: (e["teacher"], e["params"], e["steps"])):
        lines.append("| " + " | ".join([e["teacher"], e["point"], str(e["steps"]), f"{e['params'] / 1e6:.2f}",
                                        f"{e['latency_ms']:.0f}", *[percent(e["retention"][t]) for t in tasks],
                                        f"{e['mean_value']:.3f}"]) + " |")
    return "Retention = student score / fused-teacher score, per task.\n\n" + "\n".join(lines) + "\n"


def _plot(entries: list[dict], out: Path) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("matplotlib is not installed: no sweep plots")
        return
    tasks = list(entries[0]["retention"])
    for axis, key, label in (("size", "params", "student parameters (M)"), ("steps", "steps", "distillation steps")):
        fig = Figure(figsize=(4 * len(tasks), 3.6))
        for i, task in enumerate(tasks):
            ax = fig.add_subplot(1, len(tasks), i + 1)
            for teacher in sorted({e["teacher"] for e in entries}):
                pts = sorted((e[key] / (1e6 if key == "params" else 1), e["retention"][task]) for e in entries
                             if e["teacher"] == teacher and e["retention"][task] is not None
                             and (e["point"] == "default" or e["point"].startswith(axis)))
                if not pts:
                    continue
                ax.plot(*zip(*pts), marker="o", label=f"student of {teacher}")
            ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
            ax.set_title(SHORT.get(task, task))
            ax.set_xlabel(label)
            ax.set_ylabel("retention of the fused teacher")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"sweep_{axis}.png", dpi=100)
