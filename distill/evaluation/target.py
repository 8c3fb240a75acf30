"""What `fusion-distill evaluate` scores: a run folder at one of its checkpoints (encoder + heads,
its teacher and data), or an exported student folder (encoder only, and its ONNX graphs)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import PreTrainedModel

from students import DistillStudent
from students.onnx import INT8_FILE, ONNX_FILE
from teachers import FusedTeacher

from ..build import build_distill_student
from ..config import DataConfig
from ..runs import CHECKPOINT_CHOICES, TEACHER_DIR, choose_checkpoint, is_run, read_recipe
from ..training.checkpoint import load_weights_strict
from .plots import format_checkpoint

__all__ = ["EvalTarget", "load_target"]

logger = logging.getLogger(__name__)


@dataclass
class EvalTarget:
    """What is evaluated, resolved from a run folder or an exported student folder.

    kind: "run" or "student"; encoder: the stock HF encoder (what ships); normalize: whether it
    expects zero-mean unit-variance audio (None: its folder's preprocessor_config.json decides,
    as distill.evaluation.extractors.hf_encoder_extractor reads it); student: encoder +
    heads (runs only); teacher and data: None when neither the run nor the caller names them;
    source: the checkpoint or folder the weights came from; checkpoint (runs only): which
    checkpoint that is and why, as eval.json records it (see `distill.runs.choose_checkpoint`).
    """

    kind: str
    path: Path
    encoder: PreTrainedModel
    normalize: bool | None
    source: Path
    student: DistillStudent | None = None
    teacher: FusedTeacher | None = None
    data: DataConfig | None = None
    # ONNX graphs of an exported folder (students.onnx), by precision: "fp32", "int8".
    onnx: dict[str, Path] = dataclasses.field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None


def load_target(
    target: str | Path, teacher: str | Path | None = None, data: str | None = None, overrides: Sequence[str] = (),
    checkpoint: str | None = None,
) -> EvalTarget:
    """A run folder (recipe.yaml) or an exported student folder (config.json) -> EvalTarget.

    `teacher` replaces the run's saved teacher (a FusedTeacher.save_pretrained folder); `data`
    replaces data.dataset_name; `overrides` are dotted recipe overrides (data.eval_split_name=dev).
    `checkpoint` (run folders only): "best" (default: the checkpoint the exported student came
    from) or "latest" (the newest). An exported folder inside a run (RUN/student) takes the run's
    recipe and teacher.
    """
    path = Path(target)
    if checkpoint is not None and checkpoint not in CHECKPOINT_CHOICES:
        raise ValueError(f"checkpoint {checkpoint!r}: expected one of {', '.join(CHECKPOINT_CHOICES)}")
    if is_run(path):
        cfg = read_recipe(path, overrides)
        fused = FusedTeacher.from_pretrained(teacher or path / TEACHER_DIR)
        # The checkpoint overwrites every weight, and a --teacher with other upstreams could not
        # give the initial copy anyway.
        cfg.student.init_from_upstream = None
        student = build_distill_student(cfg, fused)
        source, record = choose_checkpoint(cfg, path, checkpoint or "best")
        logger.info("%s", format_checkpoint(record))
        _load_strict(student, source / "model.safetensors", fused)
        student.eval()
        cfg.data.dataset_name = data or cfg.data.dataset_name
        return EvalTarget("run", path, student.encoder, True, source, student, fused, cfg.data, checkpoint=record)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: neither a training run (recipe.yaml) nor an exported student (config.json)")
    if checkpoint is not None:
        raise ValueError(f"{path}: an exported student has no checkpoints to choose from; "
                         f"--checkpoint applies to a run folder (e.g. {path.parent})")
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(path).eval()
    run = path.parent if is_run(path.parent) else None
    if run is not None:
        data_cfg = read_recipe(run, overrides).data
        data_cfg.dataset_name = data or data_cfg.dataset_name
        teacher = teacher or (run / TEACHER_DIR if (run / TEACHER_DIR).is_dir() else None)
    else:
        data_cfg = _bare_data_config(data, overrides)
    fused = FusedTeacher.from_pretrained(teacher) if teacher else None
    graphs = {precision: path / name for precision, name in (("fp32", ONNX_FILE), ("int8", INT8_FILE)) if (path / name).is_file()}
    return EvalTarget("student", path, encoder, None, path, None, fused, data_cfg, graphs)


def _load_strict(student: DistillStudent, weights_path: Path, teacher: FusedTeacher) -> None:
    hint = (
        f" with heads for {len(teacher.target_layer_ids)} targets of width {teacher.target_dim}"
        " (a --teacher must have the run's target layers and width)"
    )
    load_weights_strict(student, load_file(str(weights_path)), str(weights_path), hint)


def _bare_data_config(data: str | None, overrides: Sequence[str]) -> DataConfig | None:
    if data is None:
        return None
    other = [o for o in overrides if not o.startswith("data.")]
    if other:
        raise ValueError(f"overrides {other}: without a recipe only data.* keys apply")
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig(dataset_name=data)),
                             OmegaConf.from_dotlist([o[len("data."):] for o in overrides]))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]
