"""Distil the fused teacher into the student with Accelerate.

`train` reads top to bottom: build, one `prepare`, resume, loop, finish (export). Accelerate does
the devices, mixed precision, gradient accumulation, checkpoint state and trackers; the loop
stays visible: `_loop` runs the epochs, `_micro_step` one batch under `accumulate` (the optimizer
step at the end of each accumulation window), `_after_step` the logging, evaluation and saving.

    fusion-distill train recipes/demo.yaml --output-dir runs/demo
    accelerate launch -m distill train RECIPE        # many GPUs (or ACCELERATE_USE_CPU=1 --multi_gpu)

Faults (faults.py, checkpoint.py, resume.py): a step with a non-finite loss or gradient norm is
not applied, and too many in a row stop the run naming the newest good checkpoint; SIGTERM or
SIGINT finishes the optimizer step, saves and exits 143/130; a resume refuses recipe changes that
would make it differ from an uninterrupted run; a damaged newest checkpoint is passed over.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, send_to_device, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from teachers import FusedTeacher

from ..build import build_distill_student, build_teacher
from ..cache.reader import TargetCache
from ..checksums import weights_digest
from ..config import RecipeConfig, RecipeError
from ..data.loader import SkipCounter, load_audio_dataset, make_train_dataloader, rank_share
from ..export import export_run
from ..runs import (
    STUDENT_DIR, TEACHER_DIR, TRAIN_LOG, CheckpointError, append_log, checkpoint_dir, clear_run, refuse_fresh_start, save_recipe,
    shipped_step,
)
from .checkpoint import any_rank, mark_best, save_checkpoint
from .faults import StepHealth, StopSignals, check_writable, count_nonfinite_step, errno_name, preempt
from .losses import distill_loss
from .resume import load_checkpoint, record_resume, resume_checkpoint
from ..runs.lock import locked
from ..runs.log_trim import drop_records_after
from ..runs.staged_export import ExportError
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


@dataclass
class _Run:
    """What `train` builds and the loop works on (student, optimizer, scheduler and loader prepared)."""

    cfg: RecipeConfig
    out: Path
    accelerator: Accelerator
    streaming: bool  # a per-rank stream: Accelerate does not dispatch its batches
    teacher: Optional[FusedTeacher]  # None when the targets come from the cache
    cache: Optional[TargetCache]
    student: Any
    optimizer: Any
    scheduler: Any
    loader: Any
    state: TrainState = field(default_factory=TrainState)
    evaluator: Optional[Evaluator] = None
    skipped: Optional[SkipCounter] = None  # unreadable utterances, by reason
    progress: Any = None  # the tqdm bar


@dataclass
class _Window:
    """The current logging window (audio seen since `start`) and accumulation window (non-finite
    flags of its micro-batches: one bad micro-batch spoils the summed gradient)."""

    audio: float = 0.0
    start: float = field(default_factory=time.perf_counter)
    loss_bad: bool = False
    parts_bad: dict = field(default_factory=dict)
    loss: Any = None  # the last micro-batch's loss and parts, for the log line
    parts: dict = field(default_factory=dict)
    postfix: dict = field(default_factory=dict)


@locked("train", lambda cfg, *args, **kwargs: cfg.training.output_dir, kind="run folder")  # one writer per run folder
def train(cfg: RecipeConfig, resume_from: str | None = None, allow_recipe_change: Sequence[str] = (),
          overwrite: bool = False) -> Path:
    """Run the recipe; return the folder of the exported student.

    resume_from: `latest` or a checkpoint folder; allow_recipe_change: recipe keys (or
    `num_processes`) whose change since that checkpoint is forced rather than refused. Without
    resume_from, a folder that holds checkpoints is refused (RunExistsError) unless overwrite,
    which deletes the previous run's files first (distill.runs.clear_run).
    Raises Preempted (exit 143/130) after a stop signal, TrainingDiverged after
    training.max_nonfinite_steps non-finite steps in a row.
    """
    t = cfg.training
    out = Path(t.output_dir)
    if overwrite and resume_from:
        raise ValueError("--overwrite starts afresh and deletes the run's checkpoints; it cannot go with --resume-from")
    if not resume_from and not overwrite:
        refuse_fresh_start(out)  # every rank, before anything is written: one line, exit 2
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=_trackers(cfg),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if overwrite:
        if accelerator.is_main_process:
            clear_run(out)
        accelerator.wait_for_everyone()
    check_writable(out, accelerator.process_index)  # every rank: a failure is its own one line, no rank waits
    if allow_recipe_change and not resume_from:
        raise RecipeError(f"--allow-recipe-change {','.join(allow_recipe_change)}: only applies with --resume-from")
    # Before anything is built: a refused resume fails in seconds, not after the teacher's fit.
    checkpoint, changes = resume_checkpoint(accelerator, out, resume_from, cfg, allow_recipe_change) if resume_from else (None, {})
    set_seed(t.seed)
    if accelerator.is_main_process and checkpoint is None:
        save_recipe(cfg, out)

    run = _build(cfg, accelerator, out)  # data, teacher (or its cached targets), student, optimizer, loader
    _prepare(run)  # one accelerator.prepare; the TrainState; the eval set
    if checkpoint is not None:
        _resume(run, checkpoint, changes)
    _start(run)
    _loop(run)
    return _finish(run)


def _trackers(cfg: RecipeConfig) -> Optional[str]:
    return None if cfg.training.report_to in (None, "none") else cfg.training.report_to


def _build(cfg: RecipeConfig, accelerator: Accelerator, out: Path) -> _Run:
    """Training data, the teacher (fitted once, saved with the run) or the target cache, the student,
    optimizer, scheduler and loader, in this order (the seeded RNG draws depend on it)."""
    t = cfg.training
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
    return _Run(cfg, out, accelerator, streaming, teacher, cache, student, optimizer, scheduler, loader)


def _prepare(run: _Run) -> None:
    """The single accelerator.prepare; the TrainState registered for checkpointing; the eval set."""
    accelerator = run.accelerator
    if run.streaming:
        run.student, run.optimizer, run.scheduler = accelerator.prepare(run.student, run.optimizer, run.scheduler)
    else:
        run.student, run.optimizer, run.loader, run.scheduler = accelerator.prepare(
            run.student, run.optimizer, run.loader, run.scheduler
        )
    accelerator.register_for_checkpointing(run.state)
    # Teacher targets of the eval crops, once; after the student's init so no RNG draw moves.
    if run.cfg.training.eval_steps:
        run.evaluator = Evaluator.build(run.cfg, accelerator, run.student, run.teacher, run.cache, run.out)


def _resume(run: _Run, checkpoint: Path, changes: dict) -> None:
    accelerator = run.accelerator
    load_checkpoint(accelerator, checkpoint, run.optimizer, run.scheduler, run.cfg.training)
    if accelerator.is_main_process:  # only now: a resume that failed leaves the run's recipe as it was
        record_resume(run.out, run.cfg, checkpoint, run.state.step, changes)
        drop_records_after(run.out, run.state.step)  # the killed run's lines past the checkpoint: they are redone
    accelerator.print(f"resumed from {checkpoint} at step {run.state.step}")
    if run.evaluator is not None:
        run.evaluator.forget_after(accelerator, run.state.step)


def _start(run: _Run) -> None:
    accelerator, t = run.accelerator, run.cfg.training
    effective_batch = t.per_device_train_batch_size * accelerator.num_processes * t.gradient_accumulation_steps
    accelerator.print(
        f"processes={accelerator.num_processes} device={accelerator.device} "
        f"mixed_precision={accelerator.mixed_precision} effective_batch_size={effective_batch}"
    )
    if _trackers(run.cfg):
        accelerator.init_trackers("fusion-distill", config=_flat_config(run.cfg))
    run.skipped = SkipCounter(run.state.skipped)
    run.progress = tqdm(total=t.max_steps, initial=run.state.step, disable=not accelerator.is_local_main_process, desc="distil")


def _loop(run: _Run) -> None:
    """Epochs until training.max_steps or early stopping; a stop signal or divergence raises."""
    state, max_steps = run.state, run.cfg.training.max_steps
    window, stopped = _Window(), False
    run.student.train()
    signals = StopSignals()
    with signals:
        while state.step < max_steps and not stopped:
            for batch in _epoch_batches(run):
                state.batches_in_epoch += 1
                run.skipped.add(batch["skipped"])
                if any_rank(run.accelerator, batch["waveforms"].shape[0] == 0):
                    continue  # every utterance of some rank's batch was unreadable: all ranks skip it
                end_of_window = _micro_step(run, batch, window, signals)
                if end_of_window is None:
                    continue  # accumulating
                stopped = _after_step(run, window, *end_of_window)
                if state.step >= max_steps or stopped:
                    break
            else:  # the epoch ran out before max_steps
                if run.skipped.counts:
                    logger.warning("epoch %d: %s", state.epoch, run.skipped.summary())
                state.epoch += 1
                state.batches_in_epoch = 0
    run.progress.close()


def _epoch_batches(run: _Run) -> Iterable[dict]:
    """This epoch's batches, after the ones a resumed run already consumed."""
    loader, state = run.loader, run.state
    (loader if hasattr(loader, "set_epoch") else loader.dataset).set_epoch(state.epoch)
    batches = run.accelerator.skip_first_batches(loader, state.batches_in_epoch) if state.batches_in_epoch else loader
    return _stream_on_device(run.accelerator, batches) if run.streaming else batches


def _micro_step(run: _Run, batch: dict, window: _Window, signals: StopSignals) -> Optional[tuple[StepHealth, bool]]:
    """Forward and backward of one batch under `accumulate`; at the end of an accumulation window,
    clip and step unless the window was non-finite on some rank. Returns (health, applied) at the
    end of a window, None inside one."""
    accelerator, t = run.accelerator, run.cfg.training
    with accelerator.accumulate(run.student):
        if run.cache is not None:
            run.cache.add_targets(batch)
        loss, parts = loss_step(run.student, run.teacher, batch, run.cfg.loss.cos_weight)
        window.loss_bad = window.loss_bad or not bool(torch.isfinite(loss.detach()))
        window.parts_bad = {k: window.parts_bad.get(k, False) or not bool(torch.isfinite(v).all()) for k, v in parts.items()}
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(run.student.parameters(), t.max_grad_norm)
            health = StepHealth.agree(accelerator, signals.received, window.loss_bad, grad_norm, window.parts_bad)
            # fp16: the grad scaler skips inf steps itself, so a finite loss with an inf norm is its business.
            applied = health.finite or (accelerator.scaler is not None and health.loss_ok)
            if applied:  # skipped on every rank together: the replicas stay equal
                run.optimizer.step()
                run.scheduler.step()
        run.optimizer.zero_grad()
    run.state.samples_seen += batch["waveforms"].shape[0]
    window.audio += batch["waveforms"].numel() / run.cfg.data.sampling_rate
    window.loss, window.parts = loss, parts
    if not accelerator.sync_gradients:
        return None
    window.loss_bad, window.parts_bad = False, {}
    return health, applied


def _after_step(run: _Run, window: _Window, health: StepHealth, applied: bool) -> bool:
    """After an accumulation window: count a skipped step, or log, evaluate and checkpoint the
    applied one; after a stop signal, save and exit. Returns True when early stopping ends the run."""
    accelerator, t, state = run.accelerator, run.cfg.training, run.state
    if not applied:
        count_nonfinite_step(accelerator, state, health, t.max_nonfinite_steps, run.out)
        if health.signal is not None:  # the weights are those of state.step; the data moved on
            preempt(accelerator, run.out, state, run.skipped, run.cfg, run.student, health.signal, run.progress, saved=False)
        return False
    state.nonfinite_in_a_row = 0
    state.step += 1
    run.progress.update(1)
    if state.step % t.logging_steps == 0 or state.step == t.max_steps:
        speed = window.audio / max(time.perf_counter() - window.start, 1e-9)
        _log(accelerator, state, window.loss, window.parts, run.scheduler, speed, run.out)
        window.postfix.update(loss=f"{window.loss.item():.4f}", audio_s_per_s=f"{speed:.1f}")
        run.progress.set_postfix(window.postfix)
        window.audio, window.start = 0.0, time.perf_counter()
    # Evaluate before saving: the checkpoint then holds this evaluation in its TrainState.
    due = run.evaluator is not None and run.evaluator.due(state.step)
    outcome = run.evaluator(accelerator, run.student, state) if due else None
    if outcome is not None:
        window.postfix.update(eval_loss=f"{outcome.record['loss']:.4f}", best_step=str(state.best_step))
        run.progress.set_postfix(window.postfix)
    saved = False
    if state.step % t.save_steps == 0 or state.step == t.max_steps or (outcome and (outcome.is_best or outcome.stop)):
        state.skipped = run.skipped.counts
        saved = save_checkpoint(accelerator, run.out, state.step, t.save_total_limit, run.cfg, run.student) is not None
    if outcome is not None and outcome.is_best and saved and accelerator.is_main_process:
        mark_best(run.out, state.step, outcome.record, t.save_total_limit)
    if health.signal is not None:
        preempt(accelerator, run.out, state, run.skipped, run.cfg, run.student, health.signal, run.progress, saved)
    stop = outcome is not None and outcome.stop
    if stop:
        accelerator.print(
            f"early stopping at step {state.step}: no eval-loss improvement in {t.early_stopping_patience} "
            f"evaluations (best {state.best_loss:.4f} at step {state.best_step})"
        )
    return stop


def _finish(run: _Run) -> Path:
    """Report, then export the student that ships (runs.shipped_step) to RUN/student."""
    accelerator, state = run.accelerator, run.state
    accelerator.wait_for_everyone()
    # Every rank reports its weights' digest: equal lines show DDP kept the replicas in sync.
    logger.info("rank %d: student weights sha256 %s", accelerator.process_index, weights_digest(accelerator.unwrap_model(run.student)))
    if run.skipped.counts:
        accelerator.print(run.skipped.summary())
    if run.evaluator is not None:
        accelerator.print(run.evaluator.report(state))
    export_dir = run.out / STUDENT_DIR
    if accelerator.is_main_process:
        best = _best_to_export(run.cfg, state, run.out)
        try:
            if best is not None:
                export_run(run.out, export_dir, checkpoint=best)
            else:
                export_run(run.out, export_dir, student=accelerator.unwrap_model(run.student))
        except OSError as err:  # written aside and renamed (staged_export): export_dir is as it was
            if isinstance(err, ExportError):  # already one line saying so
                raise
            raise CheckpointError(f"export to {export_dir} failed ({errno_name(err)}); nothing written there, checkpoints untouched; "
                                  f"free space, then: fusion-distill export {run.out} {export_dir}") from None
        accelerator.print(f"student exported to {export_dir}" + (f" from the best eval checkpoint {best.name}" if best else ""))
    accelerator.end_training()
    return export_dir


def _best_to_export(cfg: RecipeConfig, state: TrainState, out: Path) -> Optional[Path]:
    """The checkpoint that ships when it is not the final student (the best eval one, by runs' rule)."""
    step = shipped_step(cfg, state.best_step)
    return None if step in (None, state.step) else checkpoint_dir(out, step)


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


def _flat_config(cfg: RecipeConfig) -> dict:
    """TensorBoard hparams take scalars only: flatten sections, stringify lists."""
    flat = {}
    for section, values in asdict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
