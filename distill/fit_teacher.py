"""Supervised fitting of the fused teacher (the seed paper's stage) and the fused-vs-single table.

With the upstreams frozen, the fusion projection + interface + a small task head are trained on
labels of the recipe's data (CTC on a text/phoneme column, or utterance classification) through
`distill.evaluation.probe.run_probe`; the upstream forwards run once per utterance and are cached, only the
projection onward runs per step. The fitted teacher is saved with `fitted=True`, so a recipe with

    teacher.projection_fit=supervised teacher.pretrained=OUT_DIR

builds it (distill.build.build_teacher) and produces targets without refitting.

For the comparison each upstream is also fitted alone: a one-upstream FusedTeacher with the same
fusion settings (projection width capped at that upstream's width), the same head, steps and seed
(`distill.build.single_upstream_teacher(..., fit=True)`). It shares the already loaded upstream
module, so nothing is loaded twice, but its features are computed again (its own layer alignment
differs from the fused one).

Memory: the frozen features of every train and dev utterance are held in CPU RAM, L x T x sum(D_i)
values each (for WavLM Base+ + Whisper Small about 4 MB per second of audio in fp32, ~50 MB per
LibriSpeech utterance), hence the caps: `max_items` train (default 1000) and `max_dev_items` dev
(default 200) utterances; the estimate is logged before the features are extracted. The upstreams
run on `device` (default: cuda when available).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Union

import torch

from teachers import FusedTeacher

from .build import single_upstream_teacher, upstream_names
from .config import DataConfig, RecipeConfig
from .data.loader import load_audio_dataset, make_eval_batches
from .evaluation.extractors import teacher_extractor
from .evaluation.probe import run_probe
from .evaluation.tasks import ProbeResult, ProbeTask
from .runs.lock import locked

__all__ = ["fit_teacher", "REPORT_NAME", "DEFAULT_MAX_ITEMS", "DEFAULT_MAX_DEV_ITEMS"]

logger = logging.getLogger(__name__)

REPORT_NAME = "fit_report.json"
DEFAULT_MAX_ITEMS, DEFAULT_MAX_DEV_ITEMS = 1000, 200  # train / dev utterances whose features are held in RAM
# load_audio_dataset renames the configured text/label columns to these canonical names.
_CANONICAL = {"ctc": "text", "classification": "label"}


@locked("fit-teacher", lambda cfg, out_dir, *args, **kwargs: out_dir, kind="teacher folder")  # one writer per folder
def fit_teacher(
    cfg: RecipeConfig,
    out_dir: Union[str, Path],
    task_kind: str = "ctc",
    column: Optional[str] = None,
    steps: int = 200,
    compare_single: bool = True,
    *,
    learning_rate: float = 1e-3,
    batch_size: Optional[int] = None,
    max_items: Optional[int] = DEFAULT_MAX_ITEMS,
    max_dev_items: Optional[int] = DEFAULT_MAX_DEV_ITEMS,
    seed: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    cache_dtype: torch.dtype = torch.float32,
) -> dict:
    """Fit the recipe's fused teacher on `column` labels, save it to `out_dir`, compare upstreams.

    column: the data column (default: the recipe's data.text_column_name for ctc,
    data.label_column_name for classification; any other, e.g. phonemes); it is read under its
    canonical name (text / label). Train on `data.train_split_name`, score on
    `data.eval_split_name`, reading at most `max_items` train and `max_dev_items` dev utterances
    (None: all; the features of all of them are held in memory). device: where the upstreams run
    (default cuda when available, else cpu). batch_size and seed default to the recipe's training
    values. Returns the report written to `out_dir/fit_report.json` plus "table" (text: rows fused
    and each upstream, dev metric).
    """
    if task_kind not in _CANONICAL:
        raise ValueError(f"fit_teacher: task_kind={task_kind!r}, expected one of {', '.join(_CANONICAL)}")
    if not cfg.data.eval_split_name:
        raise ValueError("fit_teacher: data.eval_split_name is not set; the dev split scores the fit")
    column = column or _recipe_column(cfg.data, task_kind)
    batch_size = batch_size or cfg.training.per_device_train_batch_size
    seed = cfg.training.seed if seed is None else seed
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data_cfg = _probe_data_config(cfg.data, task_kind, column)
    # Data before models: a missing column fails in seconds, not after loading the upstreams.
    splits = [load_audio_dataset(data_cfg, split) for split in (data_cfg.train_split_name, data_cfg.eval_split_name)]
    _check_column(splits[0], task_kind, column, data_cfg)

    teacher = FusedTeacher.from_config(_supervised_settings(cfg)).to(device)
    # Only the capped batches are ever read: the vocabulary comes from the train batches too.
    train_batches, dev_batches = (list(make_eval_batches(ds, data_cfg, batch_size, cap, teacher.min_samples))
                                  for ds, cap in zip(splits, (max_items, max_dev_items)))
    task = ProbeTask.from_batches(train_batches, task_kind, _CANONICAL[task_kind])
    _log_cache_size(teacher, train_batches + dev_batches, cache_dtype)
    probe = dict(steps=steps, learning_rate=learning_rate, seed=seed, batch_size=batch_size, cache_dtype=cache_dtype)
    fused = _fit_one(teacher, task, train_batches, dev_batches, probe)
    teacher.fitted = True
    out_dir = teacher.save_pretrained(out_dir)  # saved before the comparison: the fit is the product
    names = upstream_names(teacher)
    rows = [(f"fused ({len(teacher.upstreams)} upstreams)", names, fused)]
    if compare_single:
        for index, name in enumerate(names):
            single = single_upstream_teacher(teacher, index, fit=True).to(device)
            rows.append((name, [name], _fit_one(single, task, train_batches, dev_batches, probe)))

    report = {
        "task": {"kind": task_kind, "column": column, "vocab": task.vocab},
        "steps": steps, "learning_rate": learning_rate, "batch_size": batch_size, "seed": seed,
        "max_items": max_items, "max_dev_items": max_dev_items, "device": str(device),
        "num_train": fused.num_train, "num_dev": fused.num_dev,
        "skipped": {"train": _skipped(train_batches), "dev": _skipped(dev_batches)},
        "teacher_dir": str(out_dir), "config_hash": teacher.config_hash(),
        "results": [{"name": name, "upstreams": ups, **result.to_dict()} for name, ups, result in rows],
    }
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    report["table"] = _table(rows)
    logger.debug("fit-teacher dev scores:\n%s", report["table"])  # the CLI prints the table itself
    return report


def _recipe_column(data: DataConfig, task_kind: str) -> str:
    # The recipe's configured column; load_audio_dataset serves it under the canonical name.
    configured = data.text_column_name if task_kind == "ctc" else data.label_column_name
    return configured or _CANONICAL[task_kind]


def _probe_data_config(data: DataConfig, task_kind: str, column: str) -> DataConfig:
    # Only the probed column is kept, under its canonical name (text or label).
    text, label = (column, None) if task_kind == "ctc" else (None, column)
    return dataclasses.replace(data, text_column_name=text, label_column_name=label)


def _check_column(train_set: Any, task_kind: str, column: str, data_cfg: DataConfig) -> None:
    # Cheap when the column names are known; a stream with unknown features fails later, in
    # ProbeTask.from_batches, once its first batches are read.
    names = getattr(train_set, "column_names", None)
    if names is not None and _CANONICAL[task_kind] not in names:
        raise ValueError(f"fit_teacher: {data_cfg.dataset_name}[{data_cfg.train_split_name}] has no column {column!r}")


def _log_cache_size(teacher: FusedTeacher, batches: list[dict], cache_dtype: torch.dtype) -> None:
    samples = sum(int(batch["lengths"].sum()) for batch in batches)
    values = teacher.num_aligned_layers * sum(teacher.dims) * samples // 320  # ~ L x T x sum(D_i), 50 frames/s
    size = values * torch.empty((), dtype=cache_dtype).element_size()
    logger.info("fit-teacher: %d utterances (%.1f min of audio); their frozen features take ~%s of RAM",
                sum(len(batch["ids"]) for batch in batches), samples / 16000 / 60,
                f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB")


def _supervised_settings(cfg: RecipeConfig) -> dict:
    settings = dataclasses.asdict(cfg.teacher)
    # A fresh fit: the recipe's pretrained folder (if any) is what this stage writes, not its input.
    settings.update(projection_fit="supervised", pretrained=None)
    return settings


def _fit_one(teacher: FusedTeacher, task: ProbeTask, train_batches: list, dev_batches: list,
             probe: dict) -> ProbeResult:
    """Train projection + interface + head; the frozen concatenated features are cached."""
    projection = teacher.projection
    return run_probe(
        teacher_extractor(teacher, project=False), train_batches, dev_batches, task,
        interface=teacher.interface, transform=teacher.project, feature_grad=projection is not None,
        extra_parameters=list(projection.parameters()) if projection is not None else (), **probe,
    )


def _skipped(batches: list[dict]) -> dict:
    total: Counter = Counter()
    for batch in batches:
        total.update(batch.get("skipped", {}))
    return dict(total)


def _table(rows: list[tuple[str, list[str], ProbeResult]]) -> str:
    first = rows[0][2]
    header = ["model", f"dev {first.metric}", "train loss"]
    body = [[name, f"{r.score:.4f}", f"{r.train_loss:.4f}"] for name, _, r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(3)]
    lines = [f"{a.ljust(widths[0])}  {b.rjust(widths[1])}  {c.rjust(widths[2])}" for a, b, c in [header, *body]]
    better = "lower is better" if first.lower_is_better else "higher is better"
    return "\n".join(lines + [f"({first.metric}: {better}; {first.num_train} train / {first.num_dev} dev utterances)"])
