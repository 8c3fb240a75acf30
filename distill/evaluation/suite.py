"""Evaluate a distilled student against its fused teacher: similarity, probes, cost.

    fusion-distill evaluate RUN_DIR [--checkpoint best|latest] [--teacher DIR] [--data DATASET] [--no-probe] [--no-cost]

A run folder is scored at one checkpoint, the same for all three parts: by default (`best`) the one
`fusion-distill export` reads, i.e. the one the run's exported student came from: the best eval
checkpoint when the run evaluated while training (RUN/best_checkpoint.json) and
`training.load_best_at_end` is not false, else the newest; `latest` scores the newest. eval.json
names it ("checkpoint": path, step, which rule picked it, the run's best and newest steps).

1. Prediction similarity: per target layer, the cosine similarity and L1 distance between the
   student's head predictions and the teacher's targets, over VALID frames of whole held-out
   utterances (the recipe's eval split), pooled over frames. It needs the prediction heads, which
   only a run folder has (in its checkpoints); an exported student folder has none, so the
   section is skipped there and says so.
2. Probes (SUPERB style, distill/evaluation/probe.py): frozen features + weighted sum + small head, for each
   task in `probe_tasks` ("kind:column", any column of the dataset; kind ctc, classification or
   verification: speaker verification on unseen speakers, scored by EER), for the student, the fused
   teacher and every single upstream, with one budget (steps, learning rate, seed) for all; each
   model's features are extracted once for all tasks. An exported folder with `model.onnx` also
   probes its int8 graph (`model_int8.onnx`, quantised into OUT when absent), so the table shows
   what int8 costs in task score.
3. Cost (distill/evaluation/cost.py): params, GFLOPs and median CPU latency on `cost_seconds` of audio for
   the same models (and an exported folder's ONNX graphs under ONNX Runtime), all in fp32 on the CPU (a bf16 or GPU teacher is cast and moved for the
   measurement and put back afterwards), with speed-up and size ratios against the fused teacher.

Everything goes to OUT/eval.json (default RUN_DIR/eval/) plus OUT/layer_similarity.png and
OUT/probe_scores.png (every model's probe score per task, side by side); the
`format_*` helpers turn the result into the tables the CLI prints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from students import DistillStudent, padding_invariant
from students.onnx import INT8_FILE, quantize_int8, require_onnx
from teachers import FusedTeacher, frame_mask

from ..build import single_upstream_teacher, upstream_names
from ..config import DataConfig
from ..data.audio import RECEPTIVE_FIELD
from ..runs import is_run, read_eval_log
from ..runs.lock import locked
from .cost import (Cost, audio_encoder_job, fused_teacher_job, measure_jobs, onnx_student_job, ratios, student_job,
                   upstream_job, whisper_encoder_job)
from ..data.loader import load_audio_dataset, make_eval_batches
# The format_* helpers are re-exported here: `evaluate` and its tables are one surface for the CLI.
from .plots import format_checkpoint, format_cost, format_probes, format_report, format_similarity, plot_layer_similarity, plot_probe_scores
from .extractors import hf_encoder_extractor, onnx_extractor, teacher_extractor
from .probe import run_probes
from .target import EvalTarget, load_target
from .tasks import KINDS, ProbeTask, is_missing
from .verification import split_speakers

__all__ = [
    "EvalTarget", "load_target", "evaluate", "prediction_similarity", "probe_all", "cost_all",
    "format_similarity", "format_probes", "format_cost", "format_checkpoint", "format_report",
    "STUDENT", "TEACHER", "STUDENT_ONNX_INT8", "STUDENT_ONNX_FP32", "DEFAULT_PROBE_TASKS",
]

logger = logging.getLogger(__name__)

STUDENT, TEACHER = "student", "fused teacher"
STUDENT_ONNX_INT8, STUDENT_ONNX_FP32 = "student (ONNX int8)", "student (ONNX fp32)"
DEFAULT_PROBE_TASKS = ("ctc:text", "classification:label")
PLOT_NAME, JSON_NAME = "layer_similarity.png", "eval.json"
PROBE_PLOT_NAME = "probe_scores.png"


# ----------------------------------------------------------------------------- the three parts
def prediction_similarity(student: DistillStudent, teacher: FusedTeacher, batches: Iterable[dict]) -> dict[str, Any]:
    """Per-target-layer cosine and L1 of student predictions vs teacher targets on valid frames.

    Both are pooled over every valid frame of every utterance (long utterances weigh more), the
    L1 being the mean absolute difference over features, as in the training loss.
    """
    device = next(student.parameters()).device
    num_targets = len(teacher.target_layer_ids)
    cos_sum, l1_sum = torch.zeros(num_targets, dtype=torch.float64), torch.zeros(num_targets, dtype=torch.float64)
    frames, utterances, skipped = 0, 0, Counter()
    for batch in batches:
        skipped.update(batch["skipped"])
        if not batch["ids"]:
            continue
        with torch.inference_mode():
            out = student(batch["waveforms"].to(device), batch["lengths"].to(device))
            # The teacher runs every item unpadded, on the student's frame grid.
            targets = teacher.targets(batch["waveforms"], lengths=batch["lengths"], num_frames=out.lengths.tolist())
        steps = targets.layers.shape[2]
        predictions, target_layers = out.predictions[:, :, :steps].float(), targets.layers.to(device).float()
        mask = frame_mask(out.lengths, steps).to(predictions.dtype)
        cos = F.cosine_similarity(predictions, target_layers, dim=-1)
        l1 = (predictions - target_layers).abs().mean(dim=-1)
        cos_sum += (cos * mask).sum(dim=(1, 2)).double().cpu()
        l1_sum += (l1 * mask).sum(dim=(1, 2)).double().cpu()
        frames += int(mask.sum())
        utterances += len(batch["ids"])
    if not frames:
        raise ValueError(f"prediction similarity: no usable utterances (skipped: {dict(skipped) or 'none'})")
    layers = [
        {"target": k, "teacher_layer": int(layer), "cosine": float(cos_sum[k] / frames), "l1": float(l1_sum[k] / frames)}
        for k, layer in enumerate(teacher.target_layer_ids)
    ]
    return {
        "utterances": utterances, "frames": frames, "skipped_utterances": dict(skipped), "layers": layers,
        "mean_cosine": sum(r["cosine"] for r in layers) / len(layers), "mean_l1": sum(r["l1"] for r in layers) / len(layers),
    }


def probe_all(
    target: EvalTarget, tasks: Sequence[str] = DEFAULT_PROBE_TASKS, *, steps: int = 200, learning_rate: float = 1e-3,
    seed: int = 0, interface: str = "weighted_sum", max_items: int | None = 200, batch_size: int = 8,
) -> dict[str, Any]:
    """SUPERB-style probes of the student, the fused teacher and each upstream, one budget for all.

    `tasks` are "kind:column" with any column of the dataset. Probe heads train on the recipe's
    train split and are scored on its eval split (at most `max_items` utterances of each). Each
    model's features are extracted once for all tasks; a row without a value for a task is left
    out of that task only and counted ("missing"); a task whose column the dataset lacks, or that
    has no labelled row in a split, is skipped and says so; so is a verification task whose
    batches have too few seen or unseen speakers (verification.split_speakers).
    """
    data = target.data
    specs = list(dict.fromkeys(tasks))
    columns = [spec.partition(":")[2] for spec in specs]
    train_set = load_audio_dataset(data, data.train_split_name, columns)
    dev_set = load_audio_dataset(data, _eval_split(data), columns)
    min_samples = _min_samples(target.teacher)
    # Materialised once: every model and task trains on exactly the same batches (and the CTC
    # vocabulary / class list comes from them, not from the whole training split).
    train_batches = list(make_eval_batches(train_set, data, batch_size, max_items, min_samples))
    dev_batches = list(make_eval_batches(dev_set, data, batch_size, max_items, min_samples))
    budget = {"steps": steps, "learning_rate": learning_rate, "seed": seed, "interface": interface}
    section: dict[str, Any] = {"budget": budget, "train_utterances": sum(len(b["ids"]) for b in train_batches),
                               "dev_utterances": sum(len(b["ids"]) for b in dev_batches), "tasks": {}}
    probe_tasks = {}
    for spec in specs:
        kind, _, column = spec.partition(":")
        reason = _unusable(column, train_batches, dev_batches) or _unverifiable(kind, column, train_batches, dev_batches)
        if reason:
            section["tasks"][spec] = {"skipped": reason}
            logger.warning("probe %s skipped: %s", spec, reason)
            continue
        probe_tasks[spec] = ProbeTask.from_batches(train_batches, kind, column)
        section["tasks"][spec] = {"rows": []}
    for name, extract in _probe_extractors(target).items():
        if not probe_tasks:
            break
        logger.info("probes of %s: %s", name, ", ".join(probe_tasks))
        results = run_probes(extract, train_batches, dev_batches, list(probe_tasks.values()), **budget)
        for spec, task in probe_tasks.items():
            section["tasks"][spec]["rows"].append({"model": name, **results[task.name].to_dict()})
    for spec in probe_tasks:
        rows = section["tasks"][spec]["rows"]
        section["tasks"][spec] = {"metric": rows[0]["metric"], "lower_is_better": rows[0]["lower_is_better"],
                                  "missing": {"train": rows[0]["missing_train"], "dev": rows[0]["missing_dev"]},
                                  "rows": rows}
    return section


def _unusable(column: str, train_batches: list[dict], dev_batches: list[dict]) -> str | None:
    """Why a column cannot be probed (absent, or no labelled row in a split), else None."""
    # Labels ride in the batches ("texts", "labels", extra columns), present only when the dataset has the column.
    if not any(key in batch for batch in train_batches for key in (column, column + "s")):
        return f"the dataset has no {column!r} column"
    for split, batches in (("train", train_batches), ("dev", dev_batches)):
        values = [v for batch in batches for v in (batch.get(column) or batch.get(column + "s") or [])]
        if not any(not is_missing(v) for v in values):
            return f"no {split} utterance has a {column!r} value"
    return None


def _unverifiable(kind: str, column: str, train_batches: list[dict], dev_batches: list[dict]) -> str | None:
    """Why a verification task cannot be scored (too few seen / unseen speakers), from the labels alone."""
    if kind != "verification":
        return None
    labels = [[v for batch in batches for v in (batch.get(column) or batch.get(column + "s") or [])]
              for batches in (train_batches, dev_batches)]
    try:
        split_speakers(*labels, name=f"verification:{column}")
    except ValueError as err:
        return str(err)
    return None


def _probe_extractors(target: EvalTarget) -> dict[str, Any]:
    models = {STUDENT: hf_encoder_extractor(target.encoder, normalize=target.normalize)}
    if "int8" in target.onnx:  # what int8 costs in task score, beside the fp32 student
        models[STUDENT_ONNX_INT8] = onnx_extractor(target.onnx["int8"], normalize=True)
    if target.teacher is not None:
        models[TEACHER] = teacher_extractor(target.teacher)
        for index, name in enumerate(upstream_names(target.teacher)):
            models[name] = teacher_extractor(single_upstream_teacher(target.teacher, index))
    return models


def cost_all(target: EvalTarget, seconds: float = 10.0, repeats: int = 3, threads: int | None = None) -> list[Cost]:
    """Cost rows for the student (encoder only: the heads do not ship), the fused teacher and
    each upstream, all on the CPU in fp32 on the same `seconds` of audio. The models are cast and
    moved there for the measurement and put back (device and dtype of every weight) afterwards."""
    teacher = target.teacher
    if teacher is not None and seconds > 30 and any(u.model_type == "whisper" for u in teacher.upstreams):
        raise ValueError(f"cost: {seconds} s of audio, but a Whisper upstream is costed on one 30 s window; use <= 30 s")
    generator = torch.Generator().manual_seed(0)
    wave = 0.1 * torch.randn(int(seconds * 16000), generator=generator)  # content does not change the cost
    with _on_cpu_fp32([target.encoder, teacher]):
        jobs = [student_job(STUDENT, target.encoder, wave)]
        onnx_threads = threads or torch.get_num_threads()
        for precision, name in (("fp32", STUDENT_ONNX_FP32), ("int8", STUDENT_ONNX_INT8)):
            if precision in target.onnx:
                jobs.append(onnx_student_job(name, target.onnx[precision], wave, target.encoder, onnx_threads))
        if teacher is not None:
            jobs.append(fused_teacher_job(TEACHER, teacher, wave))
            for name, upstream in zip(upstream_names(teacher), teacher.upstreams):
                if upstream.model_type == "whisper":
                    jobs.append(whisper_encoder_job(name, upstream.model, wave))
                elif hasattr(upstream.model, "config"):  # a transformers wav2vec-family model
                    jobs.append(audio_encoder_job(name, upstream.model, wave))
                else:
                    jobs.append(upstream_job(name, upstream, wave))
        return measure_jobs(jobs, repeats=repeats, threads=threads)


@contextmanager
def _on_cpu_fp32(modules: Sequence[torch.nn.Module | None]) -> Iterator[None]:
    """Every floating weight of `modules` in float32 on the CPU inside the block; each parameter
    and buffer back on its own device and dtype afterwards (a bf16 upstream next to an fp32
    projection keeps both; bf16 -> fp32 -> bf16 is exact)."""
    present = [m for m in modules if m is not None]
    placements = [{name: (t.device, t.dtype) for name, t in (*m.named_parameters(), *m.named_buffers())}
                  for m in present]
    for module in present:
        module.to("cpu", torch.float32)
    try:
        yield
    finally:
        for module, placement in zip(present, placements):
            for name, param in module.named_parameters():
                param.data = param.data.to(*placement[name])
            for name, buffer in list(module.named_buffers()):
                owner, _, leaf = name.rpartition(".")
                setattr(module.get_submodule(owner), leaf, buffer.to(*placement[name]))


def _cost_section(costs: list[Cost], seconds: float) -> dict[str, Any]:
    reference = next((c for c in costs if c.name == TEACHER), costs[0])
    rows = []
    for c in costs:
        speedup, size_ratio = ratios(c, reference)
        rows.append({**c.as_dict(), "speedup": speedup, "size_ratio": size_ratio})
    return {"seconds": seconds, "device": "cpu", "dtype": "float32", "reference": reference.name, "rows": rows}


def _check_tasks(specs: Sequence[str]) -> None:
    # Fail on a typo before minutes of model loading, not after the similarity pass.
    for spec in specs:
        kind, _, column = spec.partition(":")
        if kind not in KINDS or not column:
            raise ValueError(f"probe task {spec!r}: expected ctc:COLUMN or classification:COLUMN or verification:COLUMN")


def _eval_split(data: DataConfig) -> str:
    if not data.eval_split_name:
        raise ValueError("no held-out split: set data.eval_split_name (override data.eval_split_name=SPLIT)")
    return data.eval_split_name


def _min_samples(teacher: FusedTeacher | None) -> int:
    # Shorter audio is refused by an upstream, or gives no frame.
    return teacher.min_samples if teacher is not None else RECEPTIVE_FIELD


# ----------------------------------------------------------------------------- the whole report
def eval_folder(target: str | Path, out_dir: str | Path | None = None) -> Path:
    """Where evaluate writes: out_dir, else RUN/eval for a run folder, else STUDENT_DIR-eval beside an
    exported folder (not inside it: files there would ship and upload with the model)."""
    target = Path(target)
    return Path(out_dir) if out_dir else (target / "eval" if is_run(target) else target.with_name(target.name + "-eval"))


# One writer per folder: the output folder's lock, never the run's (evaluating a run that is still
# training is fine; two evaluations into one folder would interleave their files).
@locked("evaluate", lambda target, teacher=None, data=None, out_dir=None, *args, **kwargs: eval_folder(target, out_dir),
        kind="eval folder")
def evaluate(
    target: str | Path, teacher: str | Path | None = None, data: str | None = None, out_dir: str | Path | None = None,
    probe_tasks: Sequence[str] = DEFAULT_PROBE_TASKS, probe_steps: int = 200, max_items: int | None = 200, *,
    probe: bool = True, cost: bool = True, probe_learning_rate: float = 1e-3, probe_seed: int = 0,
    probe_interface: str = "weighted_sum", batch_size: int = 8, cost_seconds: float = 10.0, cost_repeats: int = 3,
    cost_threads: int | None = None, overrides: Sequence[str] = (), device: str | None = None,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Evaluate a run folder (or an exported student folder); write OUT/eval.json and the plot.

    `max_items` caps the utterances read from each split (None: all). `checkpoint` picks a run
    folder's checkpoint: "best" (default; the exported student's) or "latest". Returns what
    eval.json holds: target, weights and checkpoint (which one was scored; None for an exported
    folder), similarity, probes, cost (a skipped part holds {"skipped": reason}), files.
    """
    _check_tasks(probe_tasks if probe else ())
    t = load_target(target, teacher, data, overrides, checkpoint)
    out = eval_folder(target, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for module in (t.student if t.student is not None else t.encoder, t.teacher):
        if module is not None:
            module.to(run_device)
    _quantise_for_eval(t, out)
    result: dict[str, Any] = {
        "target": str(t.path), "kind": t.kind, "weights": str(t.source), "checkpoint": t.checkpoint,
        "teacher": t.teacher.config if t.teacher is not None else None,
        # How much of each upstream the teacher's projection keeps: read beside the probes.
        "projection": t.teacher.projection_report if t.teacher is not None else None,
        "dataset": dataclasses.asdict(t.data) if t.data is not None else None, "max_items": max_items,
        "files": {"eval_json": str(out / JSON_NAME), "plot": None, "probe_plot": None},
    }
    result["similarity"] = _similarity_part(t, max_items, batch_size)
    if "layers" in result["similarity"]:
        # A run that evaluated while training adds its eval curve (eval_log.jsonl) beside the bars.
        result["training_eval"] = read_eval_log(t.path) if t.kind == "run" else []
        plot = plot_layer_similarity(result["similarity"]["layers"], out / PLOT_NAME, f"{t.path.name}: student vs teacher",
                                     eval_history=result["training_eval"])
        result["files"]["plot"] = str(plot) if plot else None
    if not probe:
        result["probes"] = {"skipped": "probes switched off"}
    elif t.data is None:
        result["probes"] = {"skipped": "no dataset: pass data (--data)"}
    else:
        result["probes"] = probe_all(t, probe_tasks, steps=probe_steps, learning_rate=probe_learning_rate, seed=probe_seed,
                                     interface=probe_interface, max_items=max_items, batch_size=batch_size)
        probe_plot = plot_probe_scores(result["probes"], out / PROBE_PLOT_NAME, f"{t.path.name}: probes")
        result["files"]["probe_plot"] = str(probe_plot) if probe_plot else None
    if cost:
        result["cost"] = _cost_section(cost_all(t, cost_seconds, cost_repeats, cost_threads), cost_seconds)
    else:
        result["cost"] = {"skipped": "cost switched off"}
    (out / JSON_NAME).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _quantise_for_eval(t: EvalTarget, out: Path) -> None:
    """An exported folder with model.onnx but no int8 graph: quantise one into the eval folder
    (not the student folder, whose files ship), so the int8 probe and cost rows are there."""
    if "fp32" not in t.onnx or "int8" in t.onnx:
        return
    try:
        require_onnx()
    except ImportError as err:
        logger.warning("ONNX rows skipped: %s", err)
        t.onnx.clear()
        return
    t.onnx["int8"] = quantize_int8(t.onnx["fp32"], out / INT8_FILE)


def _similarity_part(t: EvalTarget, max_items: int | None, batch_size: int) -> dict[str, Any]:
    if t.student is None:
        return {"skipped": "an exported student has no prediction heads; evaluate its run folder for prediction similarity"}
    if t.data is None:
        return {"skipped": "no dataset: pass data (--data)"}
    data = t.data
    # A group-norm front-end changes under zero padding even with an attention mask: one by one.
    if not padding_invariant(t.encoder):
        batch_size = 1
    batches = make_eval_batches(load_audio_dataset(data, _eval_split(data)), data, batch_size, max_items,
                                _min_samples(t.teacher))
    return {"split": data.eval_split_name, **prediction_similarity(t.student, t.teacher, batches)}
