"""`--attempts`: fused-teacher students varied from the default, to move criterion (b)'s boundary.

Each attempt is the fused student's recipe with a few dotted recipe overrides
(`attempts.variants` in the config, e.g. `training.learning_rate: 2.0e-3` or
`teacher.projection_balance: split`) at `attempts.steps` (the single-teacher students' budget),
trained through `fusion-distill train` and probed with the main run's budget. The table puts each
next to the fused student of the same steps with no override, so every idea gets a number:
retention of the fused teacher per task, the mean score, params, the run's own convergence line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from distill.config import load_recipe
from distill.evaluation.extractors import teacher_extractor
from teachers import FusedTeacher

from .config import BenchmarkConfig, config_hash
from .recipes import recipe, write_recipe
from .report import FUSED, RETENTION, SHORT, mean_value, percent, retention_of
from .stages import distil, probe, student_extractor, training_summary

logger = logging.getLogger(__name__)
BASELINE = "no-override"  # a folder name too


def attempt_recipes(cfg: BenchmarkConfig, out: Path, corpus: Path, upstreams: list[Path]) -> dict[str, Path]:
    """name -> recipe file of the baseline and every attempt. Each is read back as `train` reads
    it, so a misspelt key or a bad value fails here in one line, before any training."""
    steps = cfg.attempts.steps or cfg.distill.steps
    base = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, steps=steps))
    files = {}
    for name, overrides in {BASELINE: {}, **cfg.attempts.variants}.items():
        body = OmegaConf.create(recipe(base, corpus, upstreams, out / "attempts" / name))
        for key, value in overrides.items():
            OmegaConf.update(body, key, value, merge=False)
        files[name] = write_recipe(OmegaConf.to_container(body), out / "attempts" / "recipes" / f"{name}.yaml",
                                   root=out)
        load_recipe(files[name])
    return files


def run_attempts(cfg: BenchmarkConfig, out: Path, corpus: Path, upstreams: list[Path], main: dict, data: tuple) -> dict:
    """Distil and probe every attempt; write attempts.json and attempts.md."""
    fused = next(r for r in main["rows"] if r["name"] == FUSED)
    files = attempt_recipes(cfg, out, corpus, upstreams)
    main_recipe = load_recipe(out / "recipes" / "fused.yaml")
    finished = [d for folder in ("runs", "sweep") for d in sorted((out / folder).glob("*")) if d.is_dir()]
    entries = []
    for name, path in files.items():
        run = load_recipe(path)
        # Attempts that keep the main teacher and storage share its target cache; others get their own.
        key = {"teacher": dataclasses.asdict(run.teacher), "dtype": run.data.targets_cache_dtype}
        same = key == {"teacher": dataclasses.asdict(main_recipe.teacher), "dtype": main_recipe.data.targets_cache_dtype}
        targets = out / "targets" / ("fused" if same else f"attempt-{config_hash(key)}")
        student = distil(path, out / "attempts" / name, targets if cfg.distill.cache_targets else None, finished, root=out)
        extract, model = student_extractor(student)
        tasks = probe(f"attempt {name}", extract, "weighted_sum", data, cfg)
        entry = {
            "name": name, "overrides": cfg.attempts.variants.get(name, {}), "steps": run.training.max_steps,
            "params": sum(p.numel() for p in model.parameters()), "tasks": tasks,
            "retention": {t: retention_of(tasks[t], fused["tasks"][t]) for t in tasks},
            "mean_value": mean_value({"tasks": tasks}), "training": training_summary(student.parent),
        }
        if not same:  # another teacher: probe it too, so the student is also judged against what it learned from
            teacher = FusedTeacher.from_pretrained(student.parent / "teacher")
            own = probe(f"attempt {name}: its teacher", teacher_extractor(teacher), "weighted_sum", data, cfg,
                        out / "probes" / f"attempt_{name}_teacher.json", teacher.config_hash())
            entry["teacher_tasks"] = own
            entry["retention_of_own_teacher"] = {t: retention_of(tasks[t], own[t]) for t in tasks}
        entries.append(entry)
        _write(entries, out)  # after each attempt: a stopped run keeps what it measured
    logger.info("wrote %s and attempts.md", out / "attempts.json")
    return {"reference": FUSED, "entries": entries}


def _write(entries: list[dict], out: Path) -> None:
    (out / "attempts.json").write_text(json.dumps({"reference": FUSED, "entries": entries}, indent=2) + "\n")
    (out / "attempts.md").write_text(attempts_markdown(entries))


def attempts_markdown(entries: list[dict[str, Any]]) -> str:
    tasks = list(entries[0]["retention"])
    head = ["attempt", "overrides", "steps", "params (M)", *[SHORT.get(t, t) for t in tasks], "mean score", "passes (b)",
            "convergence"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        overrides = ", ".join(f"`{k}={v}`" for k, v in e["overrides"].items()) or "-"
        passes = all(r is not None and r >= RETENTION for r in e["retention"].values())
        verdict = (e["training"].get("convergence") or "").split(" (")[0]
        lines.append("| " + " | ".join([e["name"], overrides, str(e["steps"]), f"{e['params'] / 1e6:.2f}",
                                        *[percent(e["retention"][t]) for t in tasks], f"{e['mean_value']:.3f}",
                                        "yes" if passes else "no", verdict]) + " |")
    text = "Retention = student score / fused-teacher score, per task.\n\n" + "\n".join(lines) + "\n"
    own = [e for e in entries if "retention_of_own_teacher" in e]
    if own:  # attempts that change the teacher: their teacher probed too
        text += "\nAttempts with another teacher, against the main fused teacher and against their own:\n\n"
        text += "| attempt | " + " | ".join(f"teacher {SHORT.get(t, t)}" for t in tasks) + " | " + \
            " | ".join(f"kept of own {SHORT.get(t, t)}" for t in tasks) + " |\n|" + "---|" * (1 + 2 * len(tasks)) + "\n"
        for e in own:
            text += "| " + " | ".join([e["name"], *[f"{e['teacher_tasks'][t]['value']:.3f}" for t in tasks],
                                       *[percent(e["retention_of_own_teacher"][t]) for t in tasks]]) + " |\n"
    return text
