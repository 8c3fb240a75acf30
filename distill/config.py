"""Recipe -> typed config.

A recipe YAML maps one to one onto the dataclasses below (OmegaConf structured configs):
unknown keys, wrong types and missing sections are one-line `RecipeError`s naming the key.
Command-line overrides are dotted `section.key=value` pairs, type-checked the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .recipe_ranges import number_problem
from .shipped import recipe_names, recipes_dir

__all__ = [
    "RecipeError",
    "TeacherConfig",
    "StudentConfig",
    "DataConfig",
    "LossConfig",
    "TrainingConfig",
    "RecipeConfig",
    "load_recipe",
    "student_config",
    "resolve_recipe_path",
]



class RecipeError(ValueError):
    """A recipe that cannot be used; the message is one line naming the file and key."""


@dataclass
class TeacherConfig:
    # Hub ids, local folders, or {config: {model_type: ..., ...}} for random-init models.
    upstreams: list[Any] = MISSING
    fusion: str = "chconv"  # weighted_sum | hconv | chconv | add_hconv
    projection_dim: Optional[int] = 768
    projection_fit: str = "pca"  # pca | supervised | none
    # Folder written by `fit-teacher` / `save_pretrained`; used when projection_fit=supervised.
    pretrained: Optional[str] = None
    target_layers: Optional[list[int]] = None  # indices into the aligned layer axis
    target_mode: str = "chconv"  # chconv | concat | average
    normalize: bool = True
    dtype: str = "float32"  # float32 | bfloat16 (never float16: large-norm teachers overflow)
    pca_max_utterances: int = 64
    # PCA only. none: top variance directions of the concatenation (an upstream with little or
    # widely spread variance can be squeezed out); equal_variance: every upstream scaled to the
    # same total variance first; split: each upstream its own PCA on an equal share of projection_dim.
    projection_balance: str = "none"
    # silence: Whisper upstreams subtract their response to a silent window at every layer and
    # frame, removing most of what their features owe to absolute position in the 30 s window,
    # which a student trained on crops cannot see (teachers/upstream.py WhisperUpstream).
    position_reference: str = "none"


@dataclass
class StudentConfig:
    # hubert | wavlm | wav2vec2 (raw audio, conv front-end) | wav2vec2_bert (log-mel Conformer,
    # the w2vbert_* presets: a fraction of the CPU time, README "Students")
    arch: str = "hubert"
    preset: Optional[str] = None  # a name from students.presets.PRESETS
    num_hidden_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    conv_dim: Optional[list[int]] = None  # raw-audio archs only
    feat_extract_norm: Optional[str] = None  # "layer" is batch-invariant with attention_mask
    init_from_upstream: Optional[int] = None  # index into teacher.upstreams, when shapes match
    head_mode: str = "predict"  # predict (DistilHuBERT) | layer_to_layer (FitHuBERT)
    # layer_to_layer only: student hidden-state index for each target layer.
    student_layers: Optional[list[int]] = None


@dataclass
class DataConfig:
    dataset_name: str = MISSING  # hub id, local audio folder, or a .csv/.jsonl manifest
    dataset_config_name: Optional[str] = None
    train_split_name: str = "train"
    eval_split_name: Optional[str] = None
    audio_column_name: str = "audio"
    text_column_name: Optional[str] = "text"
    label_column_name: Optional[str] = "label"
    streaming: bool = False
    min_duration_in_seconds: float = 0.5
    max_duration_in_seconds: float = 30.0
    max_crop_seconds: float = 4.0  # crops start on 320-sample frame boundaries
    sampling_rate: int = 16000
    bucket_size: int = 64  # utterances per length bucket (streaming: shuffle buffer)
    dataloader_num_workers: int = 0
    targets_cache: Optional[str] = None  # folder written by `cache-targets`
    # Storage of targets written by `cache-targets` (its --dtype overrides): float16, or int8 with a
    # float16 absmax scale per frame vector: D + 2 bytes a frame vector instead of 2 D, i.e. about
    # half the disk (README: measured size and error vs float16). Reading takes either.
    targets_cache_dtype: str = "float16"
    # `cache-targets --split EVAL_SPLIT` folder: eval targets for training.eval_steps read from
    # disk (large eval sets); without it the teacher computes them once per run and keeps them in RAM.
    eval_targets_cache: Optional[str] = None


@dataclass
class LossConfig:
    cos_weight: float = 1.0  # lambda in L1 + lambda * mean(-logsigmoid(cos))


@dataclass
class TrainingConfig:
    output_dir: str = "runs/demo"
    seed: int = 0
    max_steps: int = 200
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 10.0
    mixed_precision: str = "no"  # no | bf16 | fp16 (student and heads only)
    logging_steps: int = 10
    save_steps: int = 100
    save_total_limit: Optional[int] = 2
    report_to: Optional[str] = "tensorboard"  # tensorboard | none
    # A step whose loss or gradient norm is NaN/inf is not applied; after this many in a row the
    # run stops and names the newest good checkpoint (a diverged run rarely recovers by itself).
    max_nonfinite_steps: int = 10
    # Held-out evaluation during training (distill/training/validation.py): every eval_steps optimizer
    # steps and at the end, on data.eval_split_name. None: no evaluation while training.
    eval_steps: Optional[int] = None
    eval_max_items: int = 200  # eval utterances (the same crops every time); their targets stay in RAM
    # Export the checkpoint with the best eval loss instead of the last one. None: true when evaluating.
    load_best_at_end: Optional[bool] = None
    # Stop when the eval loss has not improved for this many evaluations (a checkpoint is written first).
    early_stopping_patience: Optional[int] = None
    # Convergence report: the eval-loss slope is fitted over the last convergence_window evals;
    # a relative drop faster than convergence_min_slope per eval means "still improving" (at
    # 0.5%/eval, four more evals would still gain about 2%).
    convergence_window: int = 4
    convergence_min_slope: float = 0.005


@dataclass
class RecipeConfig:
    teacher: TeacherConfig = MISSING
    student: StudentConfig = MISSING
    data: DataConfig = MISSING
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A path, or the name of a shipped recipe (`demo` -> recipes/demo.yaml, inside the package
    once installed; `fusion-distill recipes` lists them)."""
    path = Path(recipe)
    if path.is_file():  # a file wins; a folder named like a shipped recipe (./demo/) does not
        return path
    names = recipe_names()
    if str(recipe) in names:
        return recipes_dir() / f"{recipe}.yaml"
    raise RecipeError(f"recipe not found: {recipe} (a YAML path, or one of {names})")


def load_recipe(recipe: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """Load a YAML recipe, apply `a.b=value` overrides, validate, return typed config."""
    path = resolve_recipe_path(recipe)
    schema = OmegaConf.structured(RecipeConfig)
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as err:  # multi-line context; keep the problem and where it is
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}: not valid YAML: {problem}{where}") from None
    try:
        merged = OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as err:
        raise RecipeError(f"{path}: {_one_line(err)}") from None
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r}: expected section.key=value")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise RecipeError(f"override: {_one_line(err)}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise RecipeError(f"{path}: missing required key(s): {', '.join(missing)}")
    cfg: RecipeConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    _check_choices(cfg, path)
    problem = number_problem(cfg, lambda: student_config(cfg))  # every numeric field: key, value and allowed range in one line
    if problem:
        raise RecipeError(f"{path}: {problem}")
    return cfg


def student_config(cfg: RecipeConfig):
    """The stock HF config of the recipe's student encoder (preset + architecture overrides)."""
    from students import build_student_config  # on use: it loads transformers

    s = cfg.student
    overrides = {
        key: getattr(s, key)
        for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "conv_dim", "feat_extract_norm")
    }
    return build_student_config(s.arch, s.preset, **overrides)


_CHOICES = {
    ("teacher", "dtype"): ("float32", "bfloat16"),
    ("student", "head_mode"): ("predict", "layer_to_layer"),
    ("training", "mixed_precision"): ("no", "bf16", "fp16"),
}


def _choices() -> dict[tuple[str, str], tuple[str, ...]]:
    """Allowed values per (section, key): the teacher's settings and the student archs come from
    the packages that implement them (imported here, on use: they load torch and transformers)."""
    from students import ARCHS
    from teachers.fused import CHOICES

    teacher = {("teacher", key): tuple(CHOICES[key]) for key in ("fusion", "projection_fit", "target_mode", "projection_balance",
                                                                            "position_reference")}
    return {**teacher, **_CHOICES, ("student", "arch"): tuple(ARCHS)}


def _check_choices(cfg: RecipeConfig, path: Path) -> None:
    for (section, key), allowed in _choices().items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise RecipeError(f"{path}: {section}.{key}={value!r}, expected one of {', '.join(allowed)}")
    if cfg.teacher.projection_fit == "supervised" and not cfg.teacher.pretrained:
        raise RecipeError(f"{path}: teacher.projection_fit=supervised needs teacher.pretrained (a folder from fit-teacher)")
    if not cfg.teacher.upstreams:
        raise RecipeError(f"{path}: teacher.upstreams is empty, expected at least one model")
    if cfg.training.max_nonfinite_steps < 1:
        raise RecipeError(f"{path}: training.max_nonfinite_steps={cfg.training.max_nonfinite_steps}, expected >= 1")
    _check_eval(cfg, path)


def _check_eval(cfg: RecipeConfig, path: Path) -> None:
    """Evaluation settings that could only fail hours into a run are refused when the recipe loads."""
    t = cfg.training
    positive = {"eval_steps": t.eval_steps, "eval_max_items": t.eval_max_items, "early_stopping_patience": t.early_stopping_patience}
    for key, value in positive.items():
        if value is not None and value < 1:
            raise RecipeError(f"{path}: training.{key}={value}, expected >= 1")
    if t.convergence_window < 2:
        raise RecipeError(f"{path}: training.convergence_window={t.convergence_window}, expected >= 2 (a slope needs two evaluations)")
    if t.eval_steps is None:
        needs_eval = [k for k in ("early_stopping_patience", "load_best_at_end") if getattr(t, k)]
        if needs_eval:
            raise RecipeError(f"{path}: training.{needs_eval[0]} needs training.eval_steps (evaluation while training)")
        return
    if not cfg.data.eval_split_name:
        raise RecipeError(f"{path}: training.eval_steps={t.eval_steps} needs data.eval_split_name (the held-out split to evaluate on)")


def _one_line(err: OmegaConfBaseException) -> str:
    # OmegaConf messages span lines ("full_key: ...", "object_type=..."); keep what names the key.
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
    head = lines[0] if lines else type(err).__name__
    return f"{key}: {head}" if key and key not in head else head
