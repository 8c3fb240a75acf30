"""Run folder -> stock Hugging Face student folder (and optionally the Hub).

The encoder is rebuilt from the run's recipe and loaded strictly from the newest checkpoint's
`model.safetensors` (heads dropped), then written by `students.export_student`, which reloads it
with plain `AutoModel` and fails on any missing or unexpected key.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from students import build_student, export_student, push_to_hub

from .build import student_config
from .checkpoint import find_checkpoint, load_weights_strict
from .config import load_recipe

__all__ = ["export_run", "card_data_for_run"]

_ENCODER_PREFIX = "encoder."


def export_run(run_dir: str | Path, out_dir: str | Path, student=None, push_to_hub_id: str | None = None) -> Path:
    """Export the run's student encoder; `student` (a DistillStudent) skips the checkpoint read."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").exists():
        raise FileNotFoundError(f"{run_dir}: not a training run (no recipe.yaml); expected the --output-dir of `fusion-distill train`")
    cfg = load_recipe(run_dir / "recipe.yaml")
    encoder = student.encoder if student is not None else _encoder_from_checkpoint(cfg, run_dir)
    folder = export_student(encoder, out_dir, card_data_for_run(cfg, run_dir))
    if push_to_hub_id:
        push_to_hub(folder, push_to_hub_id)
    return folder


def _encoder_from_checkpoint(cfg, run_dir: Path):
    checkpoint = find_checkpoint(run_dir, "latest")
    weights = load_file(checkpoint / "model.safetensors")
    encoder_state = {k[len(_ENCODER_PREFIX):]: v for k, v in weights.items() if k.startswith(_ENCODER_PREFIX)}
    encoder = build_student(student_config(cfg))
    load_weights_strict(encoder, encoder_state, f"{checkpoint}/model.safetensors")
    return encoder


def card_data_for_run(cfg, run_dir: Path) -> dict:
    """What the model card says: teachers, fusion, targets, data, steps, final losses, recipe."""
    last = {}
    log = run_dir / "train_log.jsonl"
    if log.exists():
        lines = log.read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    teachers = [u if isinstance(u, str) else f"random-init {u.get('config', {}).get('model_type', '?')} (config)" for u in cfg.teacher.upstreams]
    return {
        "teachers": teachers,
        "fusion": cfg.teacher.fusion,
        "projection": f"{cfg.teacher.projection_fit} to {cfg.teacher.projection_dim} dims",
        "target_layers": cfg.teacher.target_layers,
        "dataset": cfg.data.dataset_name,
        "steps": last.get("step"),
        "final_losses": {k: round(v, 4) for k, v in last.items() if k == "loss" or k.startswith(("loss/", "cos/"))},
        "recipe": (run_dir / "recipe.yaml").read_text(),
    }
