"""Allowed ranges of every numeric recipe field, checked where the recipe is loaded.

A number out of range used to surface far from its key: `per_device_train_batch_size=0` as a
ZeroDivisionError traceback, a seed above 2**32 inside numpy, a target layer the teacher lacks
after the PCA fit. `number_problem(cfg)` names the first such key in one line: the key, its value
and what is allowed. `RANGES` holds one entry per numeric field of the schema (a test walks them
all), so a new numeric field without a range fails that test rather than reaching users.

Upper bounds are far above any real run; they catch typos (an extra three zeros) before they
become an out-of-memory kill. Fields that depend on the teacher or the student (target layers,
projection width, which upstream to copy, student layer indices) are checked against the
upstream configs when these are known without a download: inline `config:` specs and local
folders. A hub id is checked when the teacher is built.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["Range", "RANGES", "numeric_fields", "number_problem"]


@dataclass(frozen=True)
class Range:
    lo: float
    hi: float
    lo_open: bool = False  # lo itself not allowed (learning rate 0)
    null: str = ""  # for Optional fields: what null means
    why: str = ""

    def allows(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return (value > self.lo if self.lo_open else value >= self.lo) and value <= self.hi

    def text(self) -> str:
        low = f"> {_fmt(self.lo)}" if self.lo_open else f">= {_fmt(self.lo)}"
        text = f"{_fmt(self.lo)}" if self.lo == self.hi else f"{low} and <= {_fmt(self.hi)}"
        extra = "; ".join(x for x in (f"or null: {self.null}" if self.null else "", self.why) if x)
        return f"{text} ({extra})" if extra else text


_BIG = 10**9  # steps: a billion optimizer steps is beyond any run
RANGES: dict[str, Range] = {
    "teacher.projection_dim": Range(1, 65536, null="no projection"),
    "teacher.target_layers": Range(0, 1024, null="three evenly spaced layers",
                                   why="indices into the aligned layer axis, 0 = front-end output"),
    "teacher.pca_max_utterances": Range(1, 10**7),
    "student.num_hidden_layers": Range(1, 256, null="the preset's"),
    "student.hidden_size": Range(1, 65536, null="the preset's"),
    "student.num_attention_heads": Range(1, 1024, null="the preset's"),
    "student.intermediate_size": Range(1, 262144, null="the preset's"),
    "student.conv_dim": Range(1, 65536, null="the preset's", why="channels of each conv layer"),
    "student.init_from_upstream": Range(0, 1024, null="random init", why="an index into teacher.upstreams"),
    "student.student_layers": Range(0, 256, null="none (head_mode=predict)", why="student hidden-state indices, 0 = front-end output"),
    "data.min_duration_in_seconds": Range(0.0, 86400.0),
    "data.max_duration_in_seconds": Range(0.025, 86400.0, why="at least one 400-sample frame"),
    "data.max_crop_seconds": Range(0.025, 3600.0, why="at least one 400-sample frame"),
    "data.sampling_rate": Range(16000, 16000, why="the students' and teachers' frame grid is 16 kHz; audio is resampled to it"),
    "data.bucket_size": Range(1, 10**6),
    "data.dataloader_num_workers": Range(0, 256),
    "loss.cos_weight": Range(0.0, 1e6),
    "training.seed": Range(0, 2**32 - 1, why="numpy's seed range"),
    "training.max_steps": Range(1, _BIG),
    "training.learning_rate": Range(0.0, 1e6, lo_open=True),
    "training.weight_decay": Range(0.0, 1e3),
    "training.warmup_steps": Range(0, _BIG),
    "training.per_device_train_batch_size": Range(1, 65536),
    "training.gradient_accumulation_steps": Range(1, 65536),
    "training.max_grad_norm": Range(0.0, 1e9, lo_open=True),
    "training.logging_steps": Range(1, _BIG),
    "training.save_steps": Range(1, _BIG),
    "training.save_total_limit": Range(0, 10**6, null="keep every checkpoint", why="0 keeps every checkpoint too"),
    "training.max_nonfinite_steps": Range(1, 10**6),
    "training.eval_steps": Range(1, _BIG, null="no evaluation while training"),
    "training.eval_max_items": Range(1, 10**7),
    "training.early_stopping_patience": Range(1, 10**6, null="never stop early"),
    "training.convergence_window": Range(2, 10**6, why="a slope needs two evaluations"),
    "training.convergence_min_slope": Range(0.0, 1.0, why="a relative change per evaluation"),
}


def _fmt(value: Any) -> str:
    if isinstance(value, float) and (abs(value) >= 1e5 or (value and abs(value) < 1e-3)):
        return f"{value:g}"
    return str(value)


def _is_numeric(hint: Any) -> bool:
    args = typing.get_args(hint)
    if hint in (int, float):
        return True
    return bool(args) and any(a in (int, float) or _is_numeric(a) for a in args if a is not type(None))


def numeric_fields(schema: type) -> list[str]:
    """Dotted names of every int/float field (also Optional and list ones) of the recipe schema."""
    names = []
    for section in fields(schema):
        section_type = typing.get_type_hints(schema)[section.name]
        if not is_dataclass(section_type):
            continue
        hints = typing.get_type_hints(section_type)
        names += [f"{section.name}.{f.name}" for f in fields(section_type) if _is_numeric(hints[f.name])]
    return names


def number_problem(cfg, student_config: Optional[Callable[[], Any]] = None) -> Optional[str]:
    """One line about the first numeric field out of range, or None when all are fine.

    student_config: builds the student's stock HF config (`distill.config.student_config`), called
    only once every number is in range; None skips the checks against the student. Passed in, so
    this table never imports the student builder (which imports the recipe schema).
    """
    for key, allowed in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:
            if allowed.null:
                continue
            return f"{key}=null, expected {allowed.text()}"
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        bad = next((v for v in values if isinstance(v, bool) or not allowed.allows(v)), None)
        if bad is not None or (isinstance(value, (list, tuple)) and not values):
            return _out_of_range(key, value, bad, allowed.text())
    return _cross_field_problem(cfg) or _teacher_problem(cfg) or _student_problem(cfg, student_config)


def _out_of_range(key: str, value: Any, bad: Any, allowed: str) -> str:
    if isinstance(value, (list, tuple)):
        if bad is None:
            return f"{key}=[], expected at least one entry"
        return f"{key}={list(value)}: entry {_fmt(bad)} out of range, expected {allowed}"
    return f"{key}={_fmt(value)}, expected {allowed}"


def _cross_field_problem(cfg) -> Optional[str]:
    d = cfg.data
    if d.min_duration_in_seconds > d.max_duration_in_seconds:
        return (f"data.min_duration_in_seconds={_fmt(d.min_duration_in_seconds)} is above data.max_duration_in_seconds="
                f"{_fmt(d.max_duration_in_seconds)}: no utterance could be kept")
    return None


# --------------------------------------------------------------------------- against the teacher


def _upstream_shape(spec: Any) -> Optional[tuple[int, int]]:
    """(transformer layers, width) of an upstream, or None when it cannot be known without a download."""
    if isinstance(spec, dict):
        kwargs = dict(spec.get("config") or {})
        model_type = kwargs.pop("model_type", None)
        try:
            from transformers import AutoConfig

            config = AutoConfig.for_model(model_type, **kwargs).to_dict()
        except Exception:  # an unknown model_type: the teacher build says so, in its own words
            return None
    elif isinstance(spec, str) and (Path(spec) / "config.json").is_file():
        try:
            config = json.loads((Path(spec) / "config.json").read_text())
        except (OSError, ValueError):
            return None
    else:
        return None
    if config.get("model_type") == "whisper":
        layers, width = config.get("encoder_layers"), config.get("d_model")
    else:
        layers, width = config.get("num_hidden_layers"), config.get("hidden_size")
    return (int(layers), int(width)) if isinstance(layers, int) and isinstance(width, int) else None


def _teacher_problem(cfg) -> Optional[str]:
    t, s = cfg.teacher, cfg.student
    if s.init_from_upstream is not None and s.init_from_upstream >= len(t.upstreams):
        return (f"student.init_from_upstream={s.init_from_upstream}, expected >= 0 and <= {len(t.upstreams) - 1} "
                f"(an index into teacher.upstreams, which has {len(t.upstreams)})")
    if t.target_mode == "chconv" and t.projection_dim is None:
        return ("teacher.projection_dim=null, expected >= 1 (target_mode=chconv projects the concatenation; "
                "null only with target_mode concat or average)")
    shapes = [_upstream_shape(spec) for spec in t.upstreams]
    if any(shape is None for shape in shapes):
        return None  # a hub id: the teacher build checks these once it has the configs
    aligned = max(layers for layers, _ in shapes) + 1
    bad = [i for i in t.target_layers or [] if i > aligned - 1]
    if bad:
        return (f"teacher.target_layers={list(t.target_layers)}: entry {bad[0]} out of range, expected >= 0 and <= {aligned - 1} "
                f"(the fused teacher has {aligned} aligned layers, 0 = front-end output)")
    width = sum(w for _, w in shapes)
    if t.target_mode == "chconv" and t.projection_dim is not None and t.projection_dim > width:
        return (f"teacher.projection_dim={t.projection_dim}, expected >= 1 and <= {width} "
                f"(the concatenated width of the {len(shapes)} upstreams)")
    return None


def _student_problem(cfg, student_config: Optional[Callable[[], Any]]) -> Optional[str]:
    s = cfg.student
    if student_config is None:
        return None
    try:  # the stock HF config's own checks (head divisibility, conv lengths), as one line
        config = student_config()
    except ValueError as err:
        return str(err).splitlines()[0]
    except ImportError:
        return None
    if s.student_layers is not None and s.head_mode != "layer_to_layer":
        return (f"student.student_layers={list(s.student_layers)}, expected null with student.head_mode={s.head_mode} "
                f"(only layer_to_layer uses it)")
    top = config.num_hidden_layers
    bad = [i for i in s.student_layers or [] if i > top]
    if bad:
        return (f"student.student_layers={list(s.student_layers)}: entry {bad[0]} out of range, expected >= 0 and <= {top} "
                f"(the student has {top} layers; hidden state 0 is the front-end output)")
    return None
