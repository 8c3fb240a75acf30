"""Run folder -> stock Hugging Face student folder (and optionally the Hub).

The encoder is rebuilt from the run's recipe and loaded strictly from a checkpoint's
`model.safetensors` (heads dropped): the best eval checkpoint when the run evaluated while
training and `training.load_best_at_end` is not false, else the newest. Then it is written by `students.export_student`, which reloads it
with plain `AutoModel` and fails on any missing or unexpected key.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from students import build_student, export_student, push_to_hub

from .build import student_config
from .checkpoint import COMPLETE_MARKER, find_checkpoint, load_weights_strict, read_best
from .config import load_recipe
from .validation import read_eval_log

__all__ = ["export_run", "card_data_for_run"]

_ENCODER_PREFIX = "encoder."


def export_run(
    run_dir: str | Path, out_dir: str | Path, student=None, push_to_hub_id: str | None = None, checkpoint: str | Path | None = None
) -> Path:
    """Export the run's student encoder; `student` (a DistillStudent, the final one) skips the
    checkpoint read; `checkpoint` names the folder to read (default: `export_checkpoint`)."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").exists():
        raise FileNotFoundError(f"{run_dir}: not a training run (no recipe.yaml); expected the --output-dir of `fusion-distill train`")
    cfg = load_recipe(run_dir / "recipe.yaml")
    if student is not None:
        encoder, step = student.encoder, None
    else:
        source = find_checkpoint(run_dir, str(checkpoint)) if checkpoint else export_checkpoint(cfg, run_dir)
        encoder, step = _encoder_from_checkpoint(cfg, source), int((source / COMPLETE_MARKER).read_text())
    folder = export_student(encoder, out_dir, card_data_for_run(cfg, run_dir, step))
    if push_to_hub_id:
        push_to_hub(folder, push_to_hub_id)
    return folder


def export_checkpoint(cfg, run_dir: Path) -> Path:
    """The best eval checkpoint when the run has one and load_best_at_end is not false, else the newest."""
    best = read_best(run_dir)
    if best is not None and cfg.training.load_best_at_end is not False and (run_dir / best["checkpoint"]).is_dir():
        return find_checkpoint(run_dir, str(run_dir / best["checkpoint"]))
    return find_checkpoint(run_dir, "latest")


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
    last = {}
    log = run_dir / "train_log.jsonl"
    if log.exists():
        lines = log.read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    teachers = [u if isinstance(u, str) else f"random-init {u.get('config', {}).get('model_type', '?')} (config)" for u in cfg.teacher.upstreams]
    card = {
        "teachers": teachers,
        "fusion": cfg.teacher.fusion,
        "projection": f"{cfg.teacher.projection_fit} to {cfg.teacher.projection_dim} dims",
        "target_layers": cfg.teacher.target_layers,
        "dataset": cfg.data.dataset_name,
        "steps": last.get("step"),
        "final_losses": {k: round(v, 4) for k, v in last.items() if k == "loss" or k.startswith(("loss/", "cos/"))},
        "recipe": (run_dir / "recipe.yaml").read_text(),
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
