"""Held-out evaluation while training: fixed eval crops, teacher targets once, student forwards only.

Every `training.eval_steps` optimizer steps (and at the end) the student is scored on
`data.eval_split_name` against the teacher's targets: per target layer the L1, the cosine and
the loss of distill.training.losses.distill_loss, pooled over the VALID frames of every eval utterance
and of every rank (sums of frame-weighted figures and frame counts are reduced, never means of
means). The crops never change: whole utterances up to `data.max_crop_seconds`, longer ones cut
at a frame-aligned start drawn from a generator seeded with the recipe seed and the row index,
so they are the same on any number of processes and touch no training RNG (a run with
evaluation trains exactly the same weights as one without).

The teacher runs once per run over the eval crops and the targets stay in RAM on the CPU; with
`data.eval_targets_cache` (a `cache-targets --split EVAL_SPLIT` folder) they are read from that
cache instead. Each evaluation appends one JSON line to RUN/eval_log.jsonl:
{"step", "loss", "l1/k", "cos/k", "loss/k" per target k, "utterances", "frames", "best"}.
The history that decides the best checkpoint, early stopping and the convergence report lives in
TrainState, so a resumed run continues it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from accelerate import Accelerator

from students import num_frames, padding_invariant
from teachers import FusedTeacher

from ..data.audio import HOP, crop_length
from ..cache.writer import TargetCache
from ..config import RecipeConfig
from ..runs import EVAL_LOG, append_log
from ..data.loader import load_audio_dataset, make_eval_batches
from .losses import distill_loss

__all__ = [
    "EvalSet",
    "Evaluator",
    "fixed_crops",
    "relative_slope",
    "evals_since_best",
    "convergence_report",
]

logger = logging.getLogger(__name__)

_CROP_STREAM = 0xE7A1  # mixed into the crop seed, so eval crops never share a stream with training


# --------------------------------------------------------------------------- the eval set


def fixed_crops(
    dataset, data_cfg, max_items: int, min_samples: int, seed: int
) -> tuple[list[tuple[str, torch.Tensor, int]], dict[str, int]]:
    """(id, wave, start sample) for the first `max_items` usable rows, and the skip counts.

    Utterances up to max_crop_seconds are kept whole (start 0); a longer one is cut to the
    longest frame-aligned crop at a start on the 320-sample grid drawn from
    numpy.default_rng([seed, _CROP_STREAM, i]) (i: the item's index among the kept ones): the
    same crops every time and on any number of ranks.
    """
    max_crop = int(data_cfg.max_crop_seconds * data_cfg.sampling_rate)
    items, skipped = [], Counter()
    # batch_size 1: whole utterances come back unpadded, one per "batch".
    for row, batch in enumerate(make_eval_batches(dataset, data_cfg, 1, max_items, min_samples)):
        skipped.update(batch["skipped"])
        if not batch["ids"]:
            continue
        wave = batch["waveforms"][0]
        start = 0
        if len(wave) > max_crop:
            crop = crop_length(max_crop)
            rng = np.random.default_rng([seed % 2**32, _CROP_STREAM, len(items)])
            start = HOP * int(rng.integers(0, (len(wave) - crop) // HOP + 1))
            wave = wave[start : start + crop]
        items.append((batch["ids"][0], wave.clone(), start))
    return items, dict(skipped)


@dataclass
class EvalSet:
    """This rank's share of the eval crops, padded into batches, with their teacher targets.

    batches: (waveforms (B, S) zero-padded, lengths (B,) samples, targets (K, B, T, D) zero-padded
    beyond each item's frames), all on the CPU. utterances: eval utterances over all ranks.
    """

    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    utterances: int
    skipped: dict[str, int]
    num_targets: int

    @property
    def megabytes(self) -> float:
        return sum(t.numel() * t.element_size() for _, _, t in self.batches) / 2**20


def build_eval_set(
    cfg: RecipeConfig,
    accelerator: Accelerator,
    encoder,
    teacher: Optional[FusedTeacher],
    train_cache: Optional[TargetCache],
) -> EvalSet:
    """Read the eval split, crop it, compute (or read) the targets of this rank's share once."""
    data, t = cfg.data, cfg.training
    with accelerator.main_process_first():
        dataset = load_audio_dataset(data, data.eval_split_name)
    if teacher is not None:
        min_samples, num_targets = teacher.min_samples, len(teacher.target_layer_ids)
    else:
        min_samples, num_targets = train_cache.min_samples, len(train_cache.layer_ids)
    items, skipped = fixed_crops(dataset, data, t.eval_max_items, min_samples, t.seed)
    if not items:
        raise ValueError(f"training.eval_steps: no usable utterance in {data.dataset_name}[{data.eval_split_name}] (skipped: {skipped or 'none'})")
    share = items[accelerator.process_index :: accelerator.num_processes]
    frames = [int(num_frames(encoder, len(w))) for _, w, _ in share]
    targets = _eval_targets(cfg, accelerator, share, frames, teacher, train_cache)
    # A group-norm front-end changes under zero padding even with an attention mask: one by one.
    batch_size = t.per_device_train_batch_size if padding_invariant(encoder) else 1
    return EvalSet(_pad_batches(share, targets, batch_size), len(items), skipped, num_targets)


def _eval_targets(cfg, accelerator, share, frames, teacher, train_cache) -> list[torch.Tensor]:
    if cfg.data.eval_targets_cache:
        # Every rank hashes the shards it reads, at their first read (TargetCache.open checks sizes only).
        return _cached_targets(cfg, share, frames, teacher, train_cache, verify=True)
    if teacher is None:  # training from a cache: its saved teacher runs once over the eval crops
        logger.info("eval targets: running the cache's teacher once (cache-targets --split %s avoids it)", cfg.data.eval_split_name)
        teacher = FusedTeacher.from_pretrained(train_cache.teacher_dir).to(accelerator.device).eval()
    targets = []
    for first in range(0, len(share), 8):
        group = share[first : first + 8]
        # A list: the teacher runs every item unpadded (batch invariance).
        out = teacher.targets([w for _, w, _ in group], num_frames=frames[first : first + 8])
        targets += [out.layers[:, b, : frames[first + b]].float().cpu() for b in range(len(group))]
    return targets


def _cached_targets(cfg, share, frames, teacher, train_cache, verify: bool) -> list[torch.Tensor]:
    # The eval targets must come from the teacher the student trains against.
    expected = train_cache.teacher_hash if train_cache is not None else teacher.config_hash()
    cache = TargetCache.open(cfg.data.eval_targets_cache, teacher_hash=expected, layer_ids=cfg.teacher.target_layers, verify=verify)
    return [cache.crops([uid], [start], n)[:, 0] for (uid, _, start), n in zip(share, frames)]


def _pad_batches(share, targets, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    order = sorted(range(len(share)), key=lambda i: len(share[i][1]))  # similar lengths: little padding
    batches = []
    for first in range(0, len(order), batch_size):
        chosen = order[first : first + batch_size]
        lengths = torch.tensor([len(share[i][1]) for i in chosen])
        waves = torch.zeros(len(chosen), int(lengths.max()))
        k, _, d = targets[chosen[0]].shape
        padded = torch.zeros(k, len(chosen), max(targets[i].shape[1] for i in chosen), d)
        for b, i in enumerate(chosen):
            waves[b, : lengths[b]] = share[i][1]
            padded[:, b, : targets[i].shape[1]] = targets[i]
        batches.append((waves, lengths, padded))
    return batches


# --------------------------------------------------------------------------- one evaluation


def evaluate_student(accelerator: Accelerator, student, eval_set: EvalSet, cos_weight: float) -> dict[str, float]:
    """Frame-pooled eval figures over every rank's share; the student goes back to its mode."""
    model = accelerator.unwrap_model(student)  # no DDP hooks: a forward without a backward
    was_training = model.training
    model.eval()  # no dropout: eval consumes no random numbers
    sums: Optional[torch.Tensor] = None  # per target: l1, cos, loss sums weighted by frames; then frames
    try:
        with torch.no_grad(), accelerator.autocast():
            for waves, lengths, targets in eval_set.batches:
                out = model(waves.to(accelerator.device), lengths.to(accelerator.device))
                steps = out.predictions.shape[2]
                _, parts = distill_loss(out.predictions, _fit_frames(targets, steps).to(accelerator.device), out.lengths, cos_weight)
                batch_sums = _weighted(parts, int(out.lengths.sum()), targets.shape[0], accelerator.device)
                sums = batch_sums if sums is None else sums + batch_sums
    finally:
        model.train(was_training)
    num_targets = eval_set.num_targets
    if sums is None:  # this rank's share is empty (fewer eval utterances than ranks)
        sums = torch.zeros(3 * num_targets + 1, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    return _record(sums.cpu(), num_targets, eval_set.utterances)


def _fit_frames(targets: torch.Tensor, steps: int) -> torch.Tensor:
    if targets.shape[2] >= steps:
        return targets[:, :, :steps]
    return torch.nn.functional.pad(targets, (0, 0, 0, steps - targets.shape[2]))


def _weighted(parts: dict[str, torch.Tensor], frames: int, num_targets: int, device) -> torch.Tensor:
    # distill_loss gives means over this batch's valid frames; times the frames makes them sums.
    values = [parts[f"{name}/{k}"].double() * frames for name in ("l1", "cos", "loss") for k in range(num_targets)]
    return torch.stack([*values, torch.tensor(float(frames), dtype=torch.float64, device=device)]).to(device)


def _record(sums: torch.Tensor, num_targets: int, utterances: int) -> dict[str, float]:
    frames = float(sums[-1])
    means = (sums[:-1] / max(frames, 1.0)).tolist()
    record: dict[str, Any] = {"loss": sum(means[2 * num_targets :])}
    for i, name in enumerate(("l1", "cos", "loss")):
        record.update({f"{name}/{k}": means[i * num_targets + k] for k in range(num_targets)})
    record.update(utterances=utterances, frames=int(frames))
    return record


# --------------------------------------------------------------------------- history and reports


def relative_slope(losses: Sequence[float]) -> float:
    """Least-squares slope of `losses` per evaluation, relative to their mean (-0.02: -2%/eval)."""
    if len(losses) < 2:
        raise ValueError(f"relative_slope: need at least 2 losses, got {len(losses)}")
    y = np.asarray(losses, dtype=np.float64)
    x = np.arange(len(y), dtype=np.float64)
    x -= x.mean()
    slope = float((x * (y - y.mean())).sum() / (x * x).sum())
    return slope / max(abs(float(y.mean())), 1e-12)


def evals_since_best(history: Sequence[Sequence[float]], best_step: Optional[int]) -> int:
    """Evaluations after the best one (history: [step, loss] pairs in step order)."""
    return sum(1 for step, _ in history if best_step is None or step > best_step)


def convergence_report(history: Sequence[Sequence[float]], window: int, min_slope: float, best_step: Optional[int] = None) -> str:
    """One line: is the eval loss still falling over the last `window` evaluations?

    Still improving (relative slope below -min_slope per eval): the student has not converged,
    raise training.max_steps. Flat: it has, at this learning rate. Rising: the best checkpoint
    came earlier.
    """
    if len(history) < 3:
        return f"convergence: {len(history)} evaluation(s) are too few to judge; lower training.eval_steps or raise training.max_steps"
    last = list(history[-window:])
    slope = relative_slope([loss for _, loss in last])
    where = f"({100 * slope:+.1f}%/eval over the last {len(last)} evals, steps {int(last[0][0])}-{int(last[-1][0])})"
    if slope < -min_slope:
        return f"eval loss still improving {where}: the student has not converged; raise training.max_steps"
    if slope > min_slope:
        return f"eval loss rising {where}: the best eval loss was at step {best_step}; more steps at this learning rate will not help"
    return f"eval loss flat {where}: the student has converged at this learning rate (best at step {best_step})"


# --------------------------------------------------------------------------- the trainer's view


@dataclass
class EvalOutcome:
    record: dict
    is_best: bool
    stop: bool  # early stopping: patience used up


class Evaluator:
    """What the training loop calls: evaluate at a step, log it, track the best and patience."""

    def __init__(self, cfg: RecipeConfig, eval_set: EvalSet, out: Path) -> None:
        self.cfg, self.eval_set, self.out = cfg, eval_set, out

    @classmethod
    def build(cls, cfg, accelerator, student, teacher, train_cache, out: Path) -> "Evaluator":
        encoder = accelerator.unwrap_model(student).encoder
        eval_set = build_eval_set(cfg, accelerator, encoder, teacher, train_cache)
        accelerator.print(
            f"evaluating every {cfg.training.eval_steps} steps on {cfg.data.eval_split_name}: {eval_set.utterances} utterances"
            + (f" (skipped {eval_set.skipped})" if eval_set.skipped else "")
            + f"; rank 0 holds {eval_set.megabytes:.1f} MB of targets"
        )
        return cls(cfg, eval_set, out)

    def due(self, step: int) -> bool:
        t = self.cfg.training
        return step % t.eval_steps == 0 or step == t.max_steps

    def forget_after(self, accelerator: Accelerator, step: int) -> None:
        """On resume: drop eval-log lines the killed run wrote past the checkpoint (they are redone)."""
        path = self.out / EVAL_LOG
        if accelerator.is_main_process and path.is_file():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def __call__(self, accelerator: Accelerator, student, state) -> EvalOutcome:
        """Evaluate at state.step; update state's eval history, best step and loss; log everywhere."""
        record = {"step": state.step, **evaluate_student(accelerator, student, self.eval_set, self.cfg.loss.cos_weight)}
        is_best = state.best_loss is None or record["loss"] < state.best_loss
        if is_best:
            state.best_step, state.best_loss = state.step, record["loss"]
        state.eval_history.append([state.step, record["loss"]])
        record["best"] = is_best
        patience = self.cfg.training.early_stopping_patience
        stop = patience is not None and evals_since_best(state.eval_history, state.best_step) >= patience
        accelerator.log({f"eval/{k}": v for k, v in record.items() if k not in ("step", "best")}, step=state.step)
        if accelerator.is_main_process:
            append_log(self.out, EVAL_LOG, record)
        return EvalOutcome(record, is_best, stop)

    def report(self, state) -> str:
        t = self.cfg.training
        return convergence_report(state.eval_history, t.convergence_window, t.convergence_min_slope, state.best_step)
