"""Run folder -> stock Hugging Face student folder (and optionally the Hub).

The encoder is rebuilt from the run's recipe and loaded strictly from a checkpoint's
`model.safetensors` (heads dropped): the one `distill.runs.shipped_checkpoint` names (the best
eval checkpoint when the run evaluated while training and `training.load_best_at_end` is not
false, else the newest). Then it is written by `students.export_student`, which reloads it
with plain `AutoModel` and fails on any missing or unexpected key.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from students import add_onnx, build_student, export_student, push_to_hub
from students.export import EXPORT_FILES
from students.onnx import require_onnx

from .build import student_config
from .config import DataConfig
from .data.loader import make_eval_batches
from .data.signals import speech_like
from .data.sources import load_audio_dataset
from .runs import (
    RECIPE_FILE, TRAIN_LOG, checkpoint_info, find_checkpoint, is_run, read_best, read_eval_log, read_log, read_recipe,
    shipped_checkpoint,
)
from .runs.staged_export import staged_export
from .training.checkpoint import load_weights_strict, nonfinite_weights

__all__ = ["export_run", "export_student_folder", "parity_waveforms", "card_data_for_run"]

_ENCODER_PREFIX = "encoder."
logger = logging.getLogger(__name__)


def export_run(
    run_dir: str | Path, out_dir: str | Path, student=None, push_to_hub_id: str | None = None, checkpoint: str | Path | None = None,
    *, onnx: bool = False, quantize: str | None = None, parity_data: str | None = None, overwrite: bool = False,
) -> Path:
    """Export the run's student encoder; `student` (a DistillStudent, the final one) skips the
    checkpoint read; `checkpoint` names the folder to read (default: `runs.shipped_checkpoint`).

    onnx: also write model.onnx (and with quantize="int8" model_int8.onnx) beside the HF files,
    checked against PyTorch on a few utterances of `parity_data` (default: the run's dataset).
    The folder is written aside and renamed into place (distill/runs/staged_export.py); overwrite:
    replace a non-empty `out_dir` that is not a previous export."""
    if onnx:
        require_onnx()  # before minutes of loading, not after
    run_dir = Path(run_dir)
    cfg = read_recipe(run_dir)
    if student is not None:
        encoder, step = student.encoder, None
    else:
        source = find_checkpoint(run_dir, str(checkpoint)) if checkpoint else shipped_checkpoint(cfg, run_dir)
        encoder, step = _encoder_from_checkpoint(cfg, source), checkpoint_info(source)["step"]
    bad, first = nonfinite_weights(encoder)
    if bad:  # NaN != NaN: the reload check would fail with a traceback; a NaN model is no product anyway
        raise ValueError(f"{run_dir}: export refused: the student has {bad} non-finite weights (first: {first}); "
                         f"resume from an earlier checkpoint with a lower training.learning_rate")
    with staged_export(out_dir, overwrite=overwrite, protect=(run_dir,)) as stage:
        export_student(encoder, stage, card_data_for_run(cfg, run_dir, step))
        if onnx:
            add_onnx(stage, encoder, *parity_waveforms(_parity_data_config(parity_data, cfg.data)), quantize=quantize,
                     repo_id=push_to_hub_id)
    folder = Path(out_dir)
    if push_to_hub_id:
        push_to_hub(folder, push_to_hub_id)
    return folder


def _encoder_from_checkpoint(cfg, checkpoint: Path):
    weights = load_file(checkpoint / "model.safetensors")
    encoder_state = {k[len(_ENCODER_PREFIX):]: v for k, v in weights.items() if k.startswith(_ENCODER_PREFIX)}
    encoder = build_student(student_config(cfg))
    load_weights_strict(encoder, encoder_state, f"{checkpoint}/model.safetensors")
    return encoder


def card_data_for_run(cfg, run_dir: Path, exported_step: int | None = None) -> dict:
    """What the model card says: teachers, fusion, targets, data, steps, final losses, recipe,
    and, for a run that evaluated while training, the exported step's eval figures.

    exported_step: the step whose weights ship (None: the last one)."""
    log = read_log(run_dir, TRAIN_LOG)
    last = log[-1] if log else {}
    teachers = [u if isinstance(u, str) else f"random-init {u.get('config', {}).get('model_type', '?')} (config)" for u in cfg.teacher.upstreams]
    card = {
        "teachers": teachers,
        "fusion": cfg.teacher.fusion,
        "projection": f"{cfg.teacher.projection_fit} to {cfg.teacher.projection_dim} dims",
        "target_layers": cfg.teacher.target_layers,
        "dataset": cfg.data.dataset_name,
        "steps": last.get("step"),
        "final_losses": {k: round(v, 4) for k, v in last.items() if k == "loss" or k.startswith(("loss/", "cos/"))},
        "recipe": (run_dir / RECIPE_FILE).read_text(),
    }
    card.update(_eval_card(cfg, run_dir, exported_step if exported_step is not None else last.get("step")))
    return card


def _eval_card(cfg, run_dir: Path, step: int | None) -> dict:
    """Eval figures of the exported step, and whether it is the best one (empty without eval)."""
    records = {r["step"]: r for r in read_eval_log(run_dir)}
    if step not in records:
        return {}
    record, best = records[step], read_best(run_dir)
    which = "best eval loss" if best is not None and best["step"] == step else "last step"
    metrics = {f"eval {name} ({cfg.data.eval_split_name})": round(value, 4) for name, value in record.items()
               if name == "loss" or name.startswith(("loss/", "cos/", "l1/"))}
    return {
        "exported_checkpoint": f"step {step} ({which}; {len(records)} evaluations, the last at step {max(records)})",
        "eval_utterances": record["utterances"],
        "metrics": metrics,
    }


# ----------------------------------------------------------------------------- ONNX
_PARITY_UTTERANCES = 4  # shortest, longest and two between: the graph's time axis is exercised
_PARITY_CANDIDATES = 32  # utterances read to choose them from


def export_student_folder(
    student_dir: str | Path, out_dir: str | Path, *, onnx: bool = True, quantize: str | None = None,
    parity_data: str | None = None, push_to_hub_id: str | None = None, overwrite: bool = False,
) -> Path:
    """An exported student folder -> the same folder with its ONNX graphs (in place when
    out_dir is student_dir, else the HF files are copied first). Parity utterances: `parity_data`,
    else the dataset of the run the folder sits in (RUN/student), else synthetic speech-like
    signals (said so in the card)."""
    from transformers import AutoModel

    if onnx:
        require_onnx()
    student_dir, out = Path(student_dir), Path(out_dir)
    if not (student_dir / "config.json").is_file():
        raise FileNotFoundError(f"{student_dir}: neither a training run ({RECIPE_FILE}) nor an exported student (config.json)")
    in_place = out.resolve() == student_dir.resolve()
    with staged_export(out, overwrite=overwrite, protect=() if in_place else (student_dir,)) as stage:
        for name in EXPORT_FILES:  # in place too: the folder is rebuilt aside, then swapped in
            if (student_dir / name).is_file():
                shutil.copy2(student_dir / name, stage / name)
        encoder = AutoModel.from_pretrained(stage).eval()
        if onnx:
            run = student_dir.parent
            run_data = read_recipe(run).data if is_run(run) else None
            add_onnx(stage, encoder, *parity_waveforms(_parity_data_config(parity_data, run_data)), quantize=quantize,
                     repo_id=push_to_hub_id)
    if push_to_hub_id:
        push_to_hub(out, push_to_hub_id)
    return out


def _parity_data_config(parity_data: str | None, run_data: DataConfig | None) -> DataConfig | None:
    if parity_data is not None:
        return DataConfig(dataset_name=parity_data, eval_split_name="dev")
    return run_data


def parity_waveforms(data: DataConfig | None, count: int = _PARITY_UTTERANCES) -> tuple[list[torch.Tensor], str]:
    """`count` utterances of several lengths from `data`'s eval split (else its train split), and
    where they came from; without data, synthetic speech-like signals of 1, 2.5 and 4 s."""
    if data is None:
        logger.warning("ONNX parity on synthetic signals: pass --parity-data DATASET to check on real speech")
        return [speech_like(seconds, seed) for seed, seconds in enumerate((1.0, 2.5, 4.0))], "synthetic speech-like signals"
    split = data.eval_split_name or data.train_split_name
    try:
        dataset = load_audio_dataset(data, split)
    except (ValueError, KeyError) as err:  # a named split the source lacks: fall back to the training split
        if split == data.train_split_name:
            raise
        logger.info("parity data: no %s split (%s); using %s", split, err, data.train_split_name)
        split = data.train_split_name
        dataset = load_audio_dataset(data, split)
    waves = [batch["waveforms"][0] for batch in make_eval_batches(dataset, data, 1, _PARITY_CANDIDATES) if batch["ids"]]
    if not waves:
        raise ValueError(f"ONNX parity: no readable utterance in {data.dataset_name} [{split}]")
    waves.sort(key=len)
    picks = sorted({round(i * (len(waves) - 1) / max(count - 1, 1)) for i in range(count)})
    return [waves[i] for i in picks], f"{data.dataset_name} [{split}]"
