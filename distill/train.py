"""Distil the fused teacher into the student with Accelerate.

Read top to bottom: build, one `prepare`, resume, loop, export. Accelerate does the devices,
mixed precision, gradient accumulation, checkpoint state and trackers; the loop stays visible.

    fusion-distill train recipes/demo.yaml --output-dir runs/demo
    accelerate launch -m distill train RECIPE        # many GPUs (or ACCELERATE_USE_CPU=1 --multi_gpu)
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, send_to_device, set_seed
from datasets.distributed import split_dataset_by_node
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from transformers import get_scheduler

from .build import build_distill_student, build_teacher
from .cache import TargetCache
from .checkpoint import CHECKPOINT_PREFIX, find_checkpoint, mark_best, save_checkpoint
from .config import RecipeConfig
from .data import SkipCounter, load_audio_dataset, make_train_dataloader
from .export import export_run
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


def train(cfg: RecipeConfig, resume_from: str | None = None) -> Path:
    """Run the recipe; return the folder of the exported student."""
    t = cfg.training
    out = Path(t.output_dir)
    trackers = None if t.report_to in (None, "none") else t.report_to
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    set_seed(t.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(cfg), out / "recipe.yaml")

    # --- build: data, teacher (fitted once, saved with the run), student ---
    with accelerator.main_process_first():  # one rank downloads and reads headers; the rest reuse its cache
        train_set = load_audio_dataset(cfg.data, cfg.data.train_split_name)
    streaming = isinstance(train_set, datasets.IterableDataset)
    if streaming:  # each rank streams its own part; Accelerate cannot dispatch string ids
        train_set = split_dataset_by_node(train_set, rank=accelerator.process_index, world_size=accelerator.num_processes)
    if cfg.data.targets_cache:  # targets precomputed by `cache-targets`: no teacher forward
        TargetCache.check_data(cfg.data)  # cached targets are keyed by map-style row ids
        with accelerator.main_process_first():  # rank 0 hashes every shard; the others open after it
            cache = TargetCache.open(cfg.data.targets_cache, layer_ids=cfg.teacher.target_layers, verify=accelerator.is_main_process)
        cache.check_recipe(cfg.teacher)
        if accelerator.is_main_process:
            shutil.copytree(cache.teacher_dir, out / "teacher", dirs_exist_ok=True)
        teacher, min_samples = None, cache.min_samples
        student = build_distill_student(
            cfg, target_dim=cache.target_dim, num_targets=len(cache.layer_ids), upstream_specs=cache.teacher_config["upstreams"]
        )
    else:
        cache = None
        with accelerator.main_process_first():  # rank 0 fits and saves; the others load that file
            teacher = build_teacher(cfg, train_set, out / "teacher", device=accelerator.device)
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
    if resume_from:
        checkpoint = find_checkpoint(out, resume_from)
        accelerator.load_state(str(checkpoint))
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

    # --- loop ---
    student.train()
    while state.step < t.max_steps and not stopped:
        (loader if hasattr(loader, "set_epoch") else loader.dataset).set_epoch(state.epoch)
        batches = accelerator.skip_first_batches(loader, state.batches_in_epoch) if state.batches_in_epoch else loader
        if streaming:
            batches = _stream_on_device(accelerator, batches)
        for batch in batches:
            state.batches_in_epoch += 1
            skipped.add(batch["skipped"])
            if _any_rank(accelerator, batch["waveforms"].shape[0] == 0):
                continue  # every utterance of some rank's batch was unreadable: all ranks skip it
            with accelerator.accumulate(student):
                if cache is not None:
                    cache.add_targets(batch)
                loss, parts = loss_step(student, teacher, batch, cfg.loss.cos_weight)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(student.parameters(), t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state.samples_seen += batch["waveforms"].shape[0]
            window_audio += batch["waveforms"].numel() / cfg.data.sampling_rate
            if not accelerator.sync_gradients:
                continue
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
            if state.step % t.save_steps == 0 or state.step == t.max_steps or (outcome and (outcome.is_best or outcome.stop)):
                state.skipped = skipped.counts
                save_checkpoint(accelerator, out, state.step, t.save_total_limit, cfg)
            if outcome is not None and outcome.is_best and accelerator.is_main_process:
                mark_best(out, state.step, outcome.record, t.save_total_limit)
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
    export_dir = out / "student"
    if accelerator.is_main_process:
        best = _best_to_export(cfg, state, out)
        if best is not None:
            export_run(out, export_dir, checkpoint=best)
        else:
            export_run(out, export_dir, student=accelerator.unwrap_model(student))
        accelerator.print(f"student exported to {export_dir}" + (f" from the best eval checkpoint {best.name}" if best else ""))
    accelerator.end_training()
    return export_dir


def _best_to_export(cfg: RecipeConfig, state: TrainState, out: Path) -> Optional[Path]:
    """The best eval checkpoint when load_best_at_end asks for it and it is not the final student."""
    load_best = cfg.training.load_best_at_end
    if load_best is False or cfg.training.eval_steps is None or state.best_step in (None, state.step):
        return None
    return out / f"{CHECKPOINT_PREFIX}{state.best_step}"


def _any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is True on one; a single process needs no collective."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item() > 0


def _stream_on_device(accelerator: Accelerator, batches: Iterable[dict]) -> Iterator[dict]:
    """Batches of a per-rank stream, moved to the device, ending on every rank together.

    Split streams can run out a batch apart; a rank that went on alone would wait forever in
    the gradient all-reduce, so each step the ranks agree (one tiny all-reduce) to go on.
    """
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if _any_rank(accelerator, batch is None):
            return
        yield send_to_device(batch, accelerator.device)


def _log(accelerator: Accelerator, state: TrainState, loss, parts: dict, scheduler, speed: float, out: Path) -> None:
    loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
    record = {"step": state.step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "audio_s_per_s": speed}
    record.update({key: accelerator.reduce(v, reduction="mean").item() for key, v in parts.items()})
    accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=state.step)
    if accelerator.is_main_process:
        with open(out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


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
