"""Distil the fused teacher into the student with Accelerate.

Read top to bottom: build, one `prepare`, resume, loop, export. Accelerate does the devices,
mixed precision, gradient accumulation, checkpoint state and trackers; the loop stays visible.

    fusion-distill train recipes/demo.yaml --output-dir runs/demo
    accelerate launch -m distill train RECIPE        # many GPUs (or ACCELERATE_USE_CPU=1 --multi_gpu)

Faults (distill/training/faults.py, distill/training/checkpoint.py): a step with a non-finite loss or gradient norm
is not applied, and too many in a row stop the run naming the newest good checkpoint; SIGTERM or
SIGINT finishes the optimizer step, saves and exits 143/130; a resume refuses recipe changes that
would make it differ from an uninterrupted run; a damaged newest checkpoint is passed over.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, send_to_device, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..build import build_distill_student, build_teacher
from ..cache.writer import TargetCache
from ..runs import (
    RESUME_LOG, STUDENT_DIR, TEACHER_DIR, TRAIN_LOG, CheckpointError, append_log, checkpoint_dir, find_checkpoint, save_recipe,
    shipped_step,
)
from .checkpoint import any_rank, check_resume_recipe, describe_changes, mark_best, save_checkpoint
from ..config import RecipeConfig, RecipeError
from ..data.loader import SkipCounter, load_audio_dataset, make_train_dataloader, rank_share
from ..export import export_run
from .faults import StepHealth, StopSignals, check_writable, count_nonfinite_step, errno_name, preempt
from .losses import distill_loss
from .validation import Evaluator

__all__ = ["TrainState", "train", "loss_step"]

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Counters saved with every checkpoint (via register_for_checkpointing), never parsed from names."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batches_in_epoch: int = 0  # dataloader batches this process consumed in the current epoch
    samples_seen: int = 0  # per process
    skipped: dict = field(default_factory=dict)  # reason -> utterances skipped so far
    # Evaluation while training: saved here so a resumed run keeps its best and its patience.
    eval_history: list = field(default_factory=list)  # [step, eval loss] per evaluation
    best_step: Optional[int] = None
    best_loss: Optional[float] = None
    # Steps not applied because the loss or gradient norm was NaN/inf: in all, and in a row now.
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def loss_step(student, teacher, batch: dict, cos_weight: float) -> tuple[torch.Tensor, dict]:
    """One forward: student predictions vs teacher targets (online, or from the target cache)."""
    out = student(batch["waveforms"], batch["lengths"])
    if "targets" in batch:  # read from the cache that `cache-targets` wrote
        targets = batch["targets"]
    else:
        # clone(): inference-mode tensors cannot be saved for the student's backward.
        targets = teacher.targets(batch["waveforms"], lengths=batch["lengths"], num_frames=out.lengths.tolist()).layers.clone()
    return distill_loss(out.predictions, targets.to(out.predictions.device), out.lengths, cos_weight)


def train(cfg: RecipeConfig, resume_from: str | None = None, allow_recipe_change: Sequence[str] = ()) -> Path:
    """Run the recipe; return the folder of the exported student.

    resume_from: `latest` or a checkpoint folder; allow_recipe_change: recipe keys (or
    `num_processes`) whose change since that checkpoint is forced rather than refused.
    Raises Preempted (exit 143/130) after a stop signal, TrainingDiverged after
    training.max_nonfinite_steps non-finite steps in a row.
    """
    t = cfg.training
    out = Path(t.output_dir)
    trackers = None if t.report_to in (None, "none") else t.report_to
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    check_writable(out, accelerator.process_index)  # every rank: a failure is its own one line, no rank waits
    if allow_recipe_change and not resume_from:
        raise RecipeError(f"--allow-recipe-change {','.join(allow_recipe_change)}: only applies with --resume-from")
    # Before anything is built: a refused resume fails in seconds, not after the teacher's fit.
    checkpoint, changes = _resume_checkpoint(accelerator, out, resume_from, cfg, allow_recipe_change) if resume_from else (None, {})
    set_seed(t.seed)
    if accelerator.is_main_process and checkpoint is None:
        save_recipe(cfg, out)

    # --- build: data, teacher (fitted once, saved with the run), student ---
    with accelerator.main_process_first():  # one rank downloads and reads headers; the rest reuse its cache
        train_set = load_audio_dataset(cfg.data, cfg.data.train_split_name)
    streaming = isinstance(train_set, datasets.IterableDataset)
    if streaming:  # each rank streams its own part; Accelerate cannot dispatch string ids
        train_set = rank_share(train_set, accelerator.process_index, accelerator.num_processes)
    if cfg.data.targets_cache:  # targets precomputed by `cache-targets`: no teacher forward
        TargetCache.check_data(cfg.data)  # cached targets are keyed by map-style row ids
        # Sizes now; each rank hashes a shard the first time it reads from it (no idle start on a large cache).
        cache = TargetCache.open(cfg.data.targets_cache, layer_ids=cfg.teacher.target_layers, verify=True)
        cache.check_recipe(cfg.teacher)
        if accelerator.is_main_process:
            shutil.copytree(cache.teacher_dir, out / TEACHER_DIR, dirs_exist_ok=True)
        teacher, min_samples = None, cache.min_samples
        student = build_distill_student(
            cfg, target_dim=cache.target_dim, num_targets=len(cache.layer_ids), upstream_specs=cache.teacher_config["upstreams"]
        )
    else:
        cache = None
        with accelerator.main_process_first():  # rank 0 fits and saves; the others load that file
            teacher = build_teacher(cfg, train_set, out / TEACHER_DIR, device=accelerator.device)
        min_samples = teacher.min_samples
        student = build_distill_student(cfg, teacher)
    optimizer = torch.optim.AdamW(student.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    # The prepared scheduler steps once per process per optimizer step, so scale the schedule.
    scheduler = get_scheduler(
        t.lr_scheduler_type,
        optimizer,
        num_warmup_steps=t.warmup_steps * accelerator.num_processes,
        num_training_steps=t.max_steps * accelerator.num_processes,
    )
    loader = make_train_dataloader(train_set, cfg.data, t.per_device_train_batch_size, t.seed, min_samples=min_samples)
    if streaming:
        student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    else:
        student, optimizer, loader, scheduler = accelerator.prepare(student, optimizer, loader, scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    # Teacher targets of the eval crops, once; after the student's init so no RNG draw moves.
    evaluator = Evaluator.build(cfg, accelerator, student, teacher, cache, out) if t.eval_steps else None

    # --- resume ---
    if checkpoint is not None:
        try:
            accelerator.load_state(str(checkpoint))
        except RuntimeError as err:  # a forced student change: torch lists every tensor on its own line
            lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
            detail = f"{len(lines) - 1} tensor(s) differ, e.g. {lines[1]}" if len(lines) > 1 else lines[0]
            raise CheckpointError(f"{checkpoint}: cannot be loaded into this recipe's student: {detail}") from None
        _apply_optimizer_recipe(optimizer, scheduler, t)
        if accelerator.is_main_process:  # only now: a resume that failed leaves the run's recipe as it was
            save_recipe(cfg, out)
            if changes:  # the run's history of recipe changes
                append_log(out, RESUME_LOG, {"checkpoint": checkpoint.name, "step": state.step, **changes})
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
        if evaluator is not None:
            evaluator.forget_after(accelerator, state.step)

    effective_batch = t.per_device_train_batch_size * accelerator.num_processes * t.gradient_accumulation_steps
    accelerator.print(
        f"processes={accelerator.num_processes} device={accelerator.device} "
        f"mixed_precision={accelerator.mixed_precision} effective_batch_size={effective_batch}"
    )
    if trackers:
        accelerator.init_trackers("fusion-distill", config=_flat_config(cfg))
    skipped = SkipCounter(state.skipped)
    progress = tqdm(total=t.max_steps, initial=state.step, disable=not accelerator.is_local_main_process, desc="distil")
    window_audio, window_start = 0.0, time.perf_counter()
    postfix: dict[str, str] = {}
    stopped = False
    loss_bad, parts_bad = False, {}  # non-finite flags of the current accumulation window

    # --- loop ---
    student.train()
    signals = StopSignals()
    scaler_skips_overflow = accelerator.scaler is not None  # fp16: the grad scaler skips inf steps itself
    with signals:
        while state.step < t.max_steps and not stopped:
            (loader if hasattr(loader, "set_epoch") else loader.dataset).set_epoch(state.epoch)
            batches = accelerator.skip_first_batches(loader, state.batches_in_epoch) if state.batches_in_epoch else loader
            if streaming:
                batches = _stream_on_device(accelerator, batches)
            for batch in batches:
                state.batches_in_epoch += 1
                skipped.add(batch["skipped"])
                if any_rank(accelerator, batch["waveforms"].shape[0] == 0):
                    continue  # every utterance of some rank's batch was unreadable: all ranks skip it
                with accelerator.accumulate(student):
                    if cache is not None:
                        cache.add_targets(batch)
                    loss, parts = loss_step(student, teacher, batch, cfg.loss.cos_weight)
                    # Over the accumulation window: one bad micro-batch spoils the summed gradient.
                    loss_bad = loss_bad or not bool(torch.isfinite(loss.detach()))
                    parts_bad = {k: parts_bad.get(k, False) or not bool(torch.isfinite(v).all()) for k, v in parts.items()}
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(student.parameters(), t.max_grad_norm)
                        health = StepHealth.agree(accelerator, signals.received, loss_bad, grad_norm, parts_bad)
                        applied = health.finite or (scaler_skips_overflow and health.loss_ok)
                        if applied:  # skipped on every rank together: the replicas stay equal
                            optimizer.step()
                            scheduler.step()
                    optimizer.zero_grad()
                state.samples_seen += batch["waveforms"].shape[0]
                window_audio += batch["waveforms"].numel() / cfg.data.sampling_rate
                if not accelerator.sync_gradients:
                    continue
                loss_bad, parts_bad = False, {}
                if not applied:
                    count_nonfinite_step(accelerator, state, health, t.max_nonfinite_steps, out)
                    if health.signal is not None:  # the weights are those of state.step; the data moved on
                        preempt(accelerator, out, state, skipped, cfg, student, health.signal, progress, saved=False)
                    continue
                state.nonfinite_in_a_row = 0
                state.step += 1
                progress.update(1)
                if state.step % t.logging_steps == 0 or state.step == t.max_steps:
                    speed = window_audio / max(time.perf_counter() - window_start, 1e-9)
                    _log(accelerator, state, loss, parts, scheduler, speed, out)
                    postfix.update(loss=f"{loss.item():.4f}", audio_s_per_s=f"{speed:.1f}")
                    progress.set_postfix(postfix)
                    window_audio, window_start = 0.0, time.perf_counter()
                # Evaluate before saving: the checkpoint then holds this evaluation in its TrainState.
                outcome = evaluator(accelerator, student, state) if evaluator is not None and evaluator.due(state.step) else None
                if outcome is not None:
                    postfix.update(eval_loss=f"{outcome.record['loss']:.4f}", best_step=str(state.best_step))
                    progress.set_postfix(postfix)
                    stopped = outcome.stop
                saved = False
                if state.step % t.save_steps == 0 or state.step == t.max_steps or (outcome and (outcome.is_best or outcome.stop)):
                    state.skipped = skipped.counts
                    saved = save_checkpoint(accelerator, out, state.step, t.save_total_limit, cfg, student) is not None
                if outcome is not None and outcome.is_best and saved and accelerator.is_main_process:
                    mark_best(out, state.step, outcome.record, t.save_total_limit)
                if health.signal is not None:
                    preempt(accelerator, out, state, skipped, cfg, student, health.signal, progress, saved)
                if stopped:
                    accelerator.print(
                        f"early stopping at step {state.step}: no eval-loss improvement in {t.early_stopping_patience} "
                        f"evaluations (best {state.best_loss:.4f} at step {state.best_step})"
                    )
                if state.step >= t.max_steps or stopped:
                    break
            else:  # the epoch ran out before max_steps
                if skipped.counts:
                    logger.warning("epoch %d: %s", state.epoch, skipped.summary())
                state.epoch += 1
                state.batches_in_epoch = 0
    progress.close()
    accelerator.wait_for_everyone()
    # Every rank reports its weights' digest: equal lines show DDP kept the replicas in sync.
    logger.info("rank %d: student weights sha256 %s", accelerator.process_index, _weights_digest(accelerator.unwrap_model(student)))
    if skipped.counts:
        accelerator.print(skipped.summary())
    if evaluator is not None:
        accelerator.print(evaluator.report(state))
    export_dir = out / STUDENT_DIR
    if accelerator.is_main_process:
        best = _best_to_export(cfg, state, out)
        try:
            if best is not None:
                export_run(out, export_dir, checkpoint=best)
            else:
                export_run(out, export_dir, student=accelerator.unwrap_model(student))
        except OSError as err:  # a half-written student folder would load as a broken model
            shutil.rmtree(export_dir, ignore_errors=True)
            raise CheckpointError(f"export to {export_dir} failed ({errno_name(err)}); partial folder removed, checkpoints untouched; "
                                  f"free space, then: fusion-distill export {out} {export_dir}") from None
        accelerator.print(f"student exported to {export_dir}" + (f" from the best eval checkpoint {best.name}" if best else ""))
    accelerator.end_training()
    return export_dir


def _best_to_export(cfg: RecipeConfig, state: TrainState, out: Path) -> Optional[Path]:
    """The checkpoint that ships when it is not the final student (the best eval one, by runs' rule)."""
    step = shipped_step(cfg, state.best_step)
    return None if step in (None, state.step) else checkpoint_dir(out, step)


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


def _resume_checkpoint(accelerator: Accelerator, out: Path, which: str, cfg: RecipeConfig, allow: Sequence[str]) -> tuple[Path, dict]:
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


def _stream_on_device(accelerator: Accelerator, batches: Iterable[dict]) -> Iterator[dict]:
    """Batches of a per-rank stream, moved to the device, ending on every rank together.

    Split streams can run out a batch apart; a rank that went on alone would wait forever in
    the gradient all-reduce, so each step the ranks agree (one tiny all-reduce) to go on.
    """
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if any_rank(accelerator, batch is None):
            return
        yield send_to_device(batch, accelerator.device)


def _log(accelerator: Accelerator, state: TrainState, loss, parts: dict, scheduler, speed: float, out: Path) -> None:
    loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
    record = {"step": state.step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "audio_s_per_s": speed,
              "nonfinite_steps": state.nonfinite_steps}
    record.update({key: accelerator.reduce(v, reduction="mean").item() for key, v in parts.items()})
    accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=state.step)
    if accelerator.is_main_process:
        append_log(out, TRAIN_LOG, record)


def _weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _flat_config(cfg: RecipeConfig) -> dict:
    """TensorBoard hparams take scalars only: flatten sections, stringify lists."""
    flat = {}
    for section, values in asdict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
