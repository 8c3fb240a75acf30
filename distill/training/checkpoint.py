"""Crash-safe checkpoints: `OUTPUT_DIR/checkpoint-STEP/` in Accelerate's `save_state` format.

A checkpoint is written to a hidden temporary folder and renamed into place only once every
process has finished writing, so a kill during a save never leaves a folder that
`--resume-from latest` would pick up half-written. The step comes from the saved TrainState,
never from the folder name; names are only used to order checkpoints for rotation.

With evaluation during training, the checkpoint with the best eval loss holds a `best_checkpoint`
marker and the run folder a `best_checkpoint.json` (step, folder, eval figures); rotation keeps
the `save_total_limit` newest checkpoints plus that one, whatever its age.

Faults (issue 7): the completion marker is JSON recording the step, the number of processes and
the sha256 of every file, hashed from disk after writing, so the newest checkpoint is a verified
one and `distill.runs.find_checkpoint` can tell a damaged one (truncated file, bit rot) from a good one. A save
that fails (full disk, permissions) removes its partial folder and leaves the others untouched; a
student with non-finite weights is never saved. A checkpoint whose weights made training diverge
gets a `diverged` marker and is no longer `latest`. Resuming compares the checkpoint's recipe with
the current one (`check_resume_recipe`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from accelerate import Accelerator

from ..checksums import sha256_file
from ..config import RecipeConfig, RecipeError, load_recipe
from ..runs import (
    BEST_FILE, BEST_MARKER, CHECKPOINT_PREFIX, COMPLETE_MARKER, DIVERGED_MARKER, RECIPE_FILE, CheckpointError, checkpoint_dir,
    checkpoint_info, checkpoint_step, list_checkpoints, save_recipe,
)

__all__ = [
    "CheckpointError", "save_checkpoint", "mark_best", "mark_diverged", "load_weights_strict", "nonfinite_weights",
    "any_rank", "recipe_changes", "check_resume_recipe", "describe_changes", "SAFE_TO_CHANGE",
]

logger = logging.getLogger(__name__)

# Written after the marker, so not covered by its checksums.
_UNHASHED = {COMPLETE_MARKER, BEST_MARKER, DIVERGED_MARKER}


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is True on one; a single process needs no collective."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item() > 0


def nonfinite_weights(module: torch.nn.Module | dict[str, torch.Tensor]) -> tuple[int, Optional[str]]:
    """(number of NaN/inf values, the first tensor holding one) over a module's or a dict's tensors."""
    tensors = module.state_dict() if isinstance(module, torch.nn.Module) else module
    count, first = 0, None
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        bad = int((~torch.isfinite(tensor.detach())).sum())
        if bad and first is None:
            first = name
        count += bad
    return count, first


def save_checkpoint(
    accelerator: Accelerator, out: Path, step: int, total_limit: int | None, cfg: RecipeConfig, model: torch.nn.Module
) -> Optional[Path]:
    """Save model, optimizer, scheduler, RNG and TrainState; then rotate old checkpoints.

    Returns None (and writes nothing) when `model` holds non-finite weights on any rank. Raises
    CheckpointError on every rank when any rank failed to write; the partial folder is removed.
    """
    final = checkpoint_dir(out, step)
    bad, first = nonfinite_weights(accelerator.unwrap_model(model))
    if any_rank(accelerator, bad > 0):
        # Such a checkpoint would be the newest, so `latest` and rotation would favour it over good ones.
        logger.warning("step %d: not saving %s: the student holds non-finite weights%s", step, final.name, f" (first: {first})" if first else "")
        return None
    tmp = out / f".{CHECKPOINT_PREFIX}{step}.partial"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    failure: Optional[OSError] = None
    try:  # no collective inside save_state (plain DDP): a rank that fails here cannot hang the others
        accelerator.save_state(str(tmp))  # every process writes its own RNG state
    except OSError as err:
        failure = err
    if any_rank(accelerator, failure is not None):
        _raise_save_failure(accelerator, tmp, final, failure)
    if accelerator.is_main_process:
        try:
            save_recipe(cfg, tmp)
            info = {"step": step, "num_processes": accelerator.num_processes, "files": _hash_files(tmp)}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(info, indent=1) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # atomic on one filesystem: the checkpoint appears whole
            _rotate(out, total_limit)
        except OSError as err:
            failure = err
    if any_rank(accelerator, failure is not None):
        _raise_save_failure(accelerator, tmp, final, failure)
    return final


def _raise_save_failure(accelerator: Accelerator, tmp: Path, final: Path, failure: Optional[OSError]) -> None:
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    # Every rank raises the same line, naming the rank that failed and why (issue 19).
    rank, failure = _first_failure(accelerator, failure)
    name = errno.errorcode.get(failure[0] or 0, "error")
    world = accelerator.num_processes
    who = f"rank {rank} of {world} could not write its part" if world > 1 else "could not be written"
    raise CheckpointError(
        f"checkpoint {final}: {who} ({name}: {failure[1]}); partial folder removed, "
        f"earlier checkpoints are untouched; free space or fix permissions, then --resume-from latest"
    )


def _first_failure(accelerator: Accelerator, failure: Optional[OSError]) -> tuple[int, tuple[Optional[int], str]]:
    """(rank, (errno, text)) of the lowest rank whose write failed, the same on every rank."""
    mine = None if failure is None else (failure.errno, str(failure.strerror or failure))
    if accelerator.num_processes == 1:
        return 0, mine
    from accelerate.utils import gather_object

    every = gather_object([mine])  # one entry per rank, in rank order
    return next((r, f) for r, f in enumerate(every) if f is not None)


def _hash_files(folder: Path) -> dict[str, str]:
    # Read back from disk after writing: what is hashed is what a resume will read.
    return {str(path.relative_to(folder)): sha256_file(path) for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name not in _UNHASHED}


def mark_diverged(out: Path, step: int, reason: str) -> Optional[Path]:
    """Mark checkpoint-STEP (main process only) so `latest` skips it; None when there is none."""
    path = checkpoint_dir(out, step)
    if not (path / COMPLETE_MARKER).exists():
        return None
    (path / DIVERGED_MARKER).write_text(reason + "\n")
    return path


def mark_best(out: Path, step: int, record: dict, total_limit: int | None) -> Path:
    """Mark checkpoint-STEP as the best (main process only); unmark the previous one and rotate."""
    best = checkpoint_dir(out, step)
    if not (best / COMPLETE_MARKER).exists():
        raise FileNotFoundError(f"{best}: no complete checkpoint to mark as the best")
    (best / BEST_MARKER).write_text(json.dumps(record) + "\n")
    for path in list_checkpoints(out):
        if path != best:
            (path / BEST_MARKER).unlink(missing_ok=True)
    tmp = out / f".{BEST_FILE}.tmp"
    tmp.write_text(json.dumps({"step": step, "checkpoint": best.name, "eval": record}, indent=1) + "\n")
    os.replace(tmp, out / BEST_FILE)
    _rotate(out, total_limit)
    return best


def load_weights_strict(module: torch.nn.Module, weights: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Load `weights` into `module`, or raise one line naming missing, unexpected and reshaped keys."""
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    reshaped = sorted(k for k in set(weights) & set(expected) if weights[k].shape != expected[k].shape)
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{source} does not match the recipe's student{hint}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, other shape {reshaped[:3]}"
        )
    module.load_state_dict(weights, strict=True)


def _rotate(out: Path, total_limit: int | None) -> None:
    # The newest `total_limit` stay (resume needs the latest); so does the best, however old.
    if not total_limit or total_limit < 1:
        return
    kept = list_checkpoints(out)
    for path in kept[:-total_limit]:
        if not (path / BEST_MARKER).exists():
            shutil.rmtree(path)
    # A diverged checkpoint older than the newest good one is of no further use.
    for path in list_checkpoints(out, include_diverged=True):
        if kept and (path / DIVERGED_MARKER).exists() and checkpoint_step(path) < checkpoint_step(kept[-1]):
            shutil.rmtree(path)


# --------------------------------------------------------------------------- resuming with a recipe

# Keys that change neither the trained weights nor which batches come next: accepted on resume and
# logged. Everything else (teacher, student, loss, data, optimiser and schedule, seed, batch
# shape, mixed precision, eval set) is refused unless named in --allow-recipe-change. max_steps is
# here because extending a run is what resuming is for, though a decaying schedule follows it.
SAFE_TO_CHANGE = frozenset({
    "training.output_dir", "training.max_steps", "training.save_steps", "training.save_total_limit",
    "training.logging_steps", "training.report_to", "training.max_nonfinite_steps", "data.dataloader_num_workers",
    # evaluation bookkeeping: when to evaluate, when to stop, what to export and report
    "training.eval_steps", "training.early_stopping_patience", "training.load_best_at_end",
    "training.convergence_window", "training.convergence_min_slope",
})
NUM_PROCESSES = "num_processes"  # not a recipe key, but it decides the batches like one


def _flat(cfg: RecipeConfig) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in asdict(cfg).items() for key, value in values.items()}


def recipe_changes(old: RecipeConfig, new: RecipeConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old value, new value) for every recipe key that differs."""
    a, b = _flat(old), _flat(new)
    return {key: (a.get(key), b.get(key)) for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)}


def check_resume_recipe(
    checkpoint: Path, cfg: RecipeConfig, num_processes: int, allow: Sequence[str] = ()
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """Compare the checkpoint's recipe (and process count) with this run's.

    Returns (safe changes, forced changes); raises one RecipeError line listing every other
    differing key with its old and new value. `allow`: dotted keys (or `num_processes`) whose
    change the user forces.
    """
    known = set(_flat(cfg)) | {NUM_PROCESSES}
    unknown = sorted(set(allow) - known)
    if unknown:
        raise RecipeError(f"--allow-recipe-change: unknown key(s) {', '.join(unknown)} (expected dotted recipe keys like training.learning_rate, or {NUM_PROCESSES})")
    saved = Path(checkpoint) / RECIPE_FILE
    if not saved.is_file():
        raise RecipeError(f"{saved}: missing; cannot tell whether the recipe changed since this checkpoint")
    changes = recipe_changes(load_recipe(saved), cfg)
    before = checkpoint_info(checkpoint)["num_processes"]
    if before is not None and before != num_processes:
        changes[NUM_PROCESSES] = (before, num_processes)
    safe = {k: v for k, v in changes.items() if k in SAFE_TO_CHANGE}
    forced = {k: v for k, v in changes.items() if k not in SAFE_TO_CHANGE and k in allow}
    refused = {k: v for k, v in changes.items() if k not in SAFE_TO_CHANGE and k not in allow}
    if refused:
        raise RecipeError(
            f"--resume-from {checkpoint}: the recipe differs from the checkpoint's in {describe_changes(refused)}; "
            f"resume with the checkpoint's values, or force with --allow-recipe-change {','.join(refused)} (the run is then not reproducible)"
        )
    return safe, forced


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """`key: old -> new, ...` in one line."""
    return ", ".join(f"{key}: {_short(a)} -> {_short(b)}" for key, (a, b) in changes.items())


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
