"""A run folder (`fusion-distill train --output-dir RUN`): the one place that knows its layout.

    RUN/recipe.yaml             the resolved recipe (rewritten on resume, with any accepted change)
    RUN/teacher/                the fused teacher the targets came from (FusedTeacher.save_pretrained)
    RUN/train_log.jsonl         one JSON line per logged step: step, loss, lr, audio_s_per_s, parts
    RUN/eval_log.jsonl          one JSON line per evaluation while training (training/validation.py)
    RUN/resume_log.jsonl        one JSON line per resume that changed the recipe
    RUN/best_checkpoint.json    the best eval checkpoint: {"step", "checkpoint", "eval"}
    RUN/checkpoint-STEP/        Accelerate save_state + recipe.yaml + checkpoint_complete (sha256 of
                                every file) [+ best_checkpoint] [+ diverged]
    RUN/student/                the exported stock HF student
    RUN/logs/                   TensorBoard (training.report_to)
    RUN/eval/                   `fusion-distill evaluate RUN` output

A fresh `train` (no --resume-from) into a folder that already holds checkpoints is refused at
start (`refuse_fresh_start`): its checkpoints would rotate the old run's and its logs would
interleave. `train --overwrite` deletes the entries above first (`clear_run`), and nothing else.

Writing checkpoints is training's job (distill/training/checkpoint.py); reading a run (which
checkpoints exist and verify, which one ships, the logs) is asked here by train, export,
evaluate and the CLI. The rule for what ships: the best eval checkpoint when the run recorded
one and `training.load_best_at_end` is not false, else the newest weights.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from ..checksums import sha256_file
from ..config import RecipeConfig, load_recipe

__all__ = [
    "RECIPE_FILE", "TEACHER_DIR", "STUDENT_DIR", "TRAIN_LOG", "EVAL_LOG", "RESUME_LOG", "BEST_FILE", "CHECKPOINT_PREFIX",
    "COMPLETE_MARKER", "BEST_MARKER", "DIVERGED_MARKER", "CHECKPOINT_CHOICES", "CheckpointError", "is_run", "read_recipe",
    "save_recipe", "append_log", "read_log", "read_eval_log", "checkpoint_dir", "checkpoint_info", "verify_checkpoint",
    "checkpoint_step", "list_checkpoints", "find_checkpoint", "read_best", "shipped_step", "shipped_checkpoint", "choose_checkpoint",
    "LOGS_DIR", "EVAL_DIR", "RunExistsError", "refuse_fresh_start", "clear_run",
]

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
TEACHER_DIR = "teacher"
STUDENT_DIR = "student"
TRAIN_LOG = "train_log.jsonl"
EVAL_LOG = "eval_log.jsonl"
RESUME_LOG = "resume_log.jsonl"
LOGS_DIR = "logs"
EVAL_DIR = "eval"
BEST_FILE = "best_checkpoint.json"  # in the run folder: which checkpoint, and its eval figures
CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "checkpoint_complete"
BEST_MARKER = "best_checkpoint"  # inside the checkpoint folder: rotation never deletes it
DIVERGED_MARKER = "diverged"  # inside a checkpoint whose weights gave only non-finite losses
CHECKPOINT_CHOICES = ("best", "latest")  # what `evaluate --checkpoint` may ask for
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class CheckpointError(OSError):
    """A checkpoint that could not be written or read; the message is one line naming the folder."""


class RunExistsError(FileExistsError):
    """A fresh train into a folder that holds a run's checkpoints; the message is one line."""


# --------------------------------------------------------------------------- recipe and logs


def is_run(folder: str | Path) -> bool:
    """Whether `folder` is a training run (it holds the run's recipe)."""
    return (Path(folder) / RECIPE_FILE).is_file()


def read_recipe(run: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """The run's recipe (with dotted overrides); one line when `run` is not a run folder."""
    if not is_run(run):
        raise FileNotFoundError(f"{run}: not a training run (no {RECIPE_FILE}); expected the --output-dir of `fusion-distill train`")
    return load_recipe(Path(run) / RECIPE_FILE, list(overrides))


def save_recipe(cfg: RecipeConfig, folder: str | Path) -> Path:
    """Write the resolved recipe into a run (or checkpoint) folder."""
    path = Path(folder) / RECIPE_FILE
    OmegaConf.save(OmegaConf.structured(cfg), path)
    return path


def append_log(run: str | Path, name: str, record: dict[str, Any]) -> None:
    """Append one JSON line to a run log (TRAIN_LOG, EVAL_LOG, RESUME_LOG); main process only."""
    with open(Path(run) / name, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def read_log(run: str | Path, name: str) -> list[dict[str, Any]]:
    """Every record of a run log, in file order ([] without the file)."""
    path = Path(run) / name
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_eval_log(run: str | Path) -> list[dict]:
    """The run's eval records in step order; a step evaluated twice (a resumed run) keeps its last record."""
    by_step = {record["step"]: record for record in read_log(run, EVAL_LOG)}
    return [by_step[step] for step in sorted(by_step)]


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dir(run: str | Path, step: int) -> Path:
    return Path(run) / f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_info(path: Path) -> dict:
    """The completion marker: {"step", "num_processes", "files"}; older markers hold just the step."""
    text = (Path(path) / COMPLETE_MARKER).read_text().strip()
    if text.isdigit():  # written before checksums were recorded
        return {"step": int(text), "num_processes": None, "files": None}
    try:
        info = json.loads(text)
        return {"step": int(info["step"]), "num_processes": info.get("num_processes"), "files": info.get("files")}
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}/{COMPLETE_MARKER}: damaged (neither a step nor the JSON checkpoint record)") from None


def verify_checkpoint(path: Path) -> Optional[str]:
    """None when every file matches the marker's sha256; else what is wrong, naming the file."""
    path = Path(path)
    try:
        files = checkpoint_info(path)["files"]
    except CheckpointError as err:
        return str(err)
    if files is None:
        return None  # an older checkpoint without checksums: nothing to compare against
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if sha256_file(file) != expected:
            return f"{file} is damaged (sha256 differs from the one recorded when it was saved)"
    return None


def refuse_fresh_start(run: str | Path) -> None:
    """Raise RunExistsError when `run` holds checkpoint folders (complete or not), naming the newest
    and the ways on; nothing is read beyond folder names and markers, nothing is written."""
    run = Path(run)
    found = sorted((int(m.group(1)), p) for p in run.glob(f"{CHECKPOINT_PREFIX}*") if (m := _NAME.match(p.name)) and p.is_dir())
    if not found:
        return
    complete = list_checkpoints(run, include_diverged=True)
    newest = complete[-1] if complete else found[-1][1]
    what = "newest checkpoint" if complete else "newest checkpoint folder, incomplete"
    raise RunExistsError(
        f"{run} already holds a run ({what}: {newest}); a fresh train would rotate its checkpoints and mix its logs: "
        f"continue it with --resume-from latest, train into a new --output-dir, or add --overwrite to delete that run first"
    )


def clear_run(run: str | Path) -> list[str]:
    """Delete what a previous train wrote into `run` (checkpoints, logs, recipe, teacher, student,
    eval); anything else in the folder stays. Returns the names removed."""
    run, removed = Path(run), []
    names = (RECIPE_FILE, TEACHER_DIR, STUDENT_DIR, TRAIN_LOG, EVAL_LOG, RESUME_LOG, BEST_FILE, LOGS_DIR, EVAL_DIR)
    for path in sorted(run.iterdir()) if run.is_dir() else []:
        if path.name in names or (_NAME.match(path.name) and path.is_dir()):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path.name)
    if removed:
        logger.info("%s: --overwrite removed the previous run's %s", run, ", ".join(removed))
    return removed


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder's name orders it by (the step itself is read from its marker)."""
    return int(_NAME.match(Path(path).name).group(1))


def list_checkpoints(run: str | Path, include_diverged: bool = False) -> list[Path]:
    """Complete checkpoints of a run, oldest first (without the diverged ones unless asked)."""
    found = []
    for path in Path(run).glob(f"{CHECKPOINT_PREFIX}*"):
        match = _NAME.match(path.name)
        if match and (path / COMPLETE_MARKER).exists() and (include_diverged or not (path / DIVERGED_MARKER).exists()):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_checkpoint(run: str | Path, which: str, verify: bool = True) -> Path:
    """`latest` -> the newest complete checkpoint that verifies (damaged newer ones are named in a
    warning); otherwise a checkpoint folder, which must verify. Errors are one line."""
    if which == "latest":
        checkpoints = list_checkpoints(run)
        if not checkpoints:
            diverged = list_checkpoints(run, include_diverged=True)
            hint = f" ({diverged[-1].name} is marked diverged; name it explicitly to use it anyway)" if diverged else ""
            raise FileNotFoundError(f"no complete checkpoint in {run}{hint}")
        damaged = []
        for path in reversed(checkpoints):
            problem = verify_checkpoint(path) if verify else None
            if problem is None:
                if damaged:
                    logger.warning("%s; using %s instead", "; ".join(damaged), path.name)
                return path
            damaged.append(problem)
        raise CheckpointError(f"no intact checkpoint in {run}: {'; '.join(damaged)}")
    path = Path(which)
    if not (path / COMPLETE_MARKER).exists():
        raise FileNotFoundError(f"{which}: not a complete checkpoint folder (no {COMPLETE_MARKER})")
    problem = verify_checkpoint(path) if verify else None
    if problem is not None:
        raise CheckpointError(problem)
    if (path / DIVERGED_MARKER).exists():
        logger.warning("%s: training diverged from these weights before (%s)", path, (path / DIVERGED_MARKER).read_text().strip())
    return path


# --------------------------------------------------------------------------- which checkpoint ships


def read_best(run: str | Path) -> dict | None:
    """The run's best_checkpoint.json ({"step", "checkpoint", "eval"}), or None without one."""
    path = Path(run) / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def shipped_step(cfg: RecipeConfig, best_step: Optional[int]) -> Optional[int]:
    """The best eval step when it is what ships, else None (the newest weights ship)."""
    return best_step if best_step is not None and cfg.training.load_best_at_end is not False else None


def shipped_checkpoint(cfg: RecipeConfig, run: str | Path) -> Path:
    """The checkpoint the run's student is exported from: the best eval one (when it ships and is
    still there), else the newest intact one."""
    run, best = Path(run), read_best(run)
    step = shipped_step(cfg, best["step"] if best is not None else None)
    if step is not None and (run / best["checkpoint"]).is_dir():
        return find_checkpoint(run, str(run / best["checkpoint"]))
    return find_checkpoint(run, "latest")


def choose_checkpoint(cfg: RecipeConfig, run: str | Path, which: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to score for `evaluate --checkpoint best|latest`, and its record for eval.json.

    "best" is the one that ships (`shipped_checkpoint`), so the scores are those of the exported
    student; "latest" is the newest intact one. The record: path, step, requested, picked
    ("best" when it is the run's best eval checkpoint, else "latest"), why (the reason for
    "latest"), best_step (None without evaluation while training), newest_step.
    """
    if which not in CHECKPOINT_CHOICES:
        raise ValueError(f"checkpoint {which!r}: expected one of {', '.join(CHECKPOINT_CHOICES)}")
    run = Path(run)
    source = shipped_checkpoint(cfg, run) if which == "best" else find_checkpoint(run, "latest")
    best, newest = read_best(run), list_checkpoints(run)
    picked = "best" if best is not None and source.name == best["checkpoint"] else "latest"
    if picked == "best":
        why = "the best eval checkpoint"
    elif best is None:
        why = "the run recorded no best eval checkpoint"
    elif which == "latest":
        why = "asked for"
    elif cfg.training.load_best_at_end is False:
        why = "training.load_best_at_end is false"
    else:
        why = f"the best eval checkpoint {best['checkpoint']} is gone"
    return source, {
        "path": str(source), "step": checkpoint_info(source)["step"], "requested": which, "picked": picked,
        "why": why, "best_step": best["step"] if best is not None else None,
        "newest_step": checkpoint_info(newest[-1])["step"] if newest else None,
    }
