"""Resuming a run: pick and check the checkpoint (before anything is built), load it, and put the
recipe's optimizer settings back over the checkpoint's.

A resume refuses recipe changes that would make it differ from an uninterrupted run unless they
are forced (`--allow-recipe-change`, checkpoint.check_resume_recipe); a damaged newest checkpoint
is passed over (runs.find_checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..config import RecipeConfig
from ..runs import RESUME_LOG, CheckpointError, append_log, find_checkpoint, save_recipe
from .checkpoint import check_resume_recipe, describe_changes

__all__ = ["resume_checkpoint", "load_checkpoint", "record_resume"]


def resume_checkpoint(accelerator: Accelerator, out: Path, which: str, cfg: RecipeConfig, allow: Sequence[str]) -> tuple[Path, dict]:
    """The checkpoint to resume from, the same on every rank, after the recipe check, and the
    accepted changes ({"safe": ..., "forced": ...}, empty when none).

    The main process verifies the checksums (hashing once, not once per rank) and sends its
    choice, or its one-line error, to the others, so every rank resumes or fails alike.
    """
    found: list[Optional[str]] = [None, None]
    if accelerator.is_main_process:
        try:
            found[0] = str(find_checkpoint(out, which))
        except (OSError, ValueError) as err:
            found[1] = str(err)
    if accelerator.num_processes > 1:
        broadcast_object_list(found)
    if found[1] is not None:
        raise CheckpointError(found[1])
    checkpoint = Path(found[0])
    safe, forced = check_resume_recipe(checkpoint, cfg, accelerator.num_processes, allow)
    if safe:
        accelerator.print(f"resuming with changed {describe_changes(safe)} (safe: same weights and batches)")
    if forced:
        accelerator.print(f"resuming with FORCED changes {describe_changes(forced)}: this run no longer follows one recipe "
                          "and is not reproducible from recipe.yaml (see resume_log.jsonl)")
    return checkpoint, ({"safe": safe, "forced": forced} if safe or forced else {})


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, optimizer, scheduler, t) -> None:
    """accelerator.load_state, then the recipe's learning rate and weight decay (`t`: cfg.training)."""
    try:
        accelerator.load_state(str(checkpoint))
    except RuntimeError as err:  # a forced student change: torch lists every tensor on its own line
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        detail = f"{len(lines) - 1} tensor(s) differ, e.g. {lines[1]}" if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{checkpoint}: cannot be loaded into this recipe's student: {detail}") from None
    _apply_optimizer_recipe(optimizer, scheduler, t)


def record_resume(out: Path, cfg: RecipeConfig, checkpoint: Path, step: int, changes: dict) -> None:
    """Main process, after a successful load: the run's recipe becomes this one, and a changed
    recipe is logged (a resume that failed leaves the run's recipe as it was)."""
    save_recipe(cfg, out)
    if changes:  # the run's history of recipe changes
        append_log(out, RESUME_LOG, {"checkpoint": checkpoint.name, "step": step, **changes})


def _apply_optimizer_recipe(optimizer, scheduler, t) -> None:
    """After load_state: the recipe's learning rate and weight decay, not the checkpoint's.

    The optimizer state carries its own lr and weight_decay and the scheduler its base lrs, so
    without this a forced `training.learning_rate` change would silently do nothing. Unchanged
    values are rewritten to what they already were. The schedule's shape (warmup, max_steps,
    type) is rebuilt from the recipe anyway: a LambdaLR does not save its lambdas.
    """
    inner = getattr(scheduler, "scheduler", scheduler)
    if not isinstance(inner, torch.optim.lr_scheduler.LambdaLR):
        return  # transformers' schedules are all LambdaLR; another keeps the checkpoint's rates
    inner.base_lrs = [t.learning_rate for _ in inner.base_lrs]
    for group, fn in zip(optimizer.param_groups, inner.lr_lambdas):
        group["initial_lr"] = t.learning_rate
        group["lr"] = t.learning_rate * fn(inner.last_epoch)
        group["weight_decay"] = t.weight_decay
    inner._last_lr = [group["lr"] for group in optimizer.param_groups]
