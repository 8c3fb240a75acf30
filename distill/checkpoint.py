"""Crash-safe checkpoints: `OUTPUT_DIR/checkpoint-STEP/` in Accelerate's `save_state` format.

A checkpoint is written to a hidden temporary folder and renamed into place only once every
process has finished writing, so a kill during a save never leaves a folder that
`--resume-from latest` would pick up half-written. The step comes from the saved TrainState,
never from the folder name; names are only used to order checkpoints for rotation.

With evaluation during training, the checkpoint with the best eval loss holds a `best_checkpoint`
marker and the run folder a `best_checkpoint.json` (step, folder, eval figures); rotation keeps
the `save_total_limit` newest checkpoints plus that one, whatever its age.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

__all__ = [
    "CHECKPOINT_PREFIX", "BEST_FILE", "save_checkpoint", "list_checkpoints", "find_checkpoint", "mark_best",
    "read_best", "load_weights_strict",
]

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "checkpoint_complete"
BEST_MARKER = "best_checkpoint"  # inside the checkpoint folder: rotation never deletes it
BEST_FILE = "best_checkpoint.json"  # in the run folder: which checkpoint, and its eval figures
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, total_limit: int | None, cfg) -> Path:
    """Save model, optimizer, scheduler, RNG and TrainState; then rotate old checkpoints."""
    final = out / f"{CHECKPOINT_PREFIX}{step}"
    tmp = out / f".{CHECKPOINT_PREFIX}{step}.partial"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process writes its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        OmegaConf.save(OmegaConf.structured(cfg), tmp / "recipe.yaml")
        (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic on one filesystem: the checkpoint appears whole
        _rotate(out, total_limit)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    found = []
    for path in Path(out).glob(f"{CHECKPOINT_PREFIX}*"):
        match = _NAME.match(path.name)
        if match and (path / COMPLETE_MARKER).exists():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_checkpoint(out: Path, which: str) -> Path:
    """`latest` -> newest complete checkpoint of the run; otherwise a checkpoint folder."""
    if which == "latest":
        checkpoints = list_checkpoints(out)
        if not checkpoints:
            raise FileNotFoundError(f"--resume-from latest: no complete checkpoint in {out}")
        return checkpoints[-1]
    path = Path(which)
    if not (path / COMPLETE_MARKER).exists():
        raise FileNotFoundError(f"--resume-from {which}: not a complete checkpoint folder (no {COMPLETE_MARKER})")
    return path


def mark_best(out: Path, step: int, record: dict, total_limit: int | None) -> Path:
    """Mark checkpoint-STEP as the best (main process only); unmark the previous one and rotate."""
    best = out / f"{CHECKPOINT_PREFIX}{step}"
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


def read_best(out: Path) -> dict | None:
    """The run's best_checkpoint.json ({"step", "checkpoint", "eval"}), or None without one."""
    path = Path(out) / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


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
    for path in list_checkpoints(out)[:-total_limit]:
        if not (path / BEST_MARKER).exists():
            shutil.rmtree(path)
