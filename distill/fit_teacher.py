"""Supervised fitting of the fused teacher (the seed paper's stage) and the fused-vs-single table.

With the upstreams frozen, the fusion projection + interface + a small task head are trained on
labels of the recipe's data (CTC on a text/phoneme column, or utterance classification) through
`distill.probe.run_probe`; the upstream forwards run once per utterance and are cached, only the
projection onward runs per step. The fitted teacher is saved with `fitted=True`, so a recipe with

    teacher.projection_fit=supervised teacher.pretrained=OUT_DIR

builds it (distill.build.build_teacher) and produces targets without refitting.

For the comparison each upstream is also fitted alone: a one-upstream FusedTeacher with the same
fusion settings (projection width capped at that upstream's width), the same head, steps and seed.
It shares the already loaded upstream module, so nothing is loaded twice, but its features are
computed again (its own layer alignment differs from the fused one).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Union

import torch

from teachers import FusedTeacher, Upstream

from .config import DataConfig, RecipeConfig
from .data import load_audio_dataset, make_eval_batches
from .probe import ProbeResult, ProbeTask, run_probe, teacher_extractor

__all__ = ["fit_teacher", "REPORT_NAME"]

logger = logging.getLogger(__name__)

REPORT_NAME = "fit_report.json"
_DEFAULT_COLUMN = {"ctc": "text", "classification": "label"}
# load_audio_dataset renames the configured text/label columns to these canonical names.
_CANONICAL = {"ctc": "text", "classification": "label"}


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
    max_items: Optional[int] = None,
    seed: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    cache_dtype: torch.dtype = torch.float32,
) -> dict:
    """Fit the recipe's fused teacher on `column` labels, save it to `out_dir`, compare upstreams.

    column: the data column (default text for ctc, label for classification; e.g. phonemes).
    Train on `data.train_split_name`, score on `data.eval_split_name`; `max_items` caps the
    utterances read from each split (features of all of them are held in memory). batch_size and
    seed default to the recipe's training values. Returns the report written to
    `out_dir/fit_report.json` plus "table" (text: rows fused and each upstream, dev metric).
    """
    if task_kind not in _DEFAULT_COLUMN:
        raise ValueError(f"fit_teacher: task_kind={task_kind!r}, expected one of {', '.join(_DEFAULT_COLUMN)}")
    if not cfg.data.eval_split_name:
        raise ValueError("fit_teacher: data.eval_split_name is not set; the dev split scores the fit")
    column = column or _DEFAULT_COLUMN[task_kind]
    batch_size = batch_size or cfg.training.per_device_train_batch_size
    seed = cfg.training.seed if seed is None else seed
    data_cfg = _probe_data_config(cfg.data, task_kind, column)
    # Data before models: a missing column fails in seconds, not after loading the upstreams.
    splits = [_limit(load_audio_dataset(data_cfg, split), max_items)
              for split in (data_cfg.train_split_name, data_cfg.eval_split_name)]
    task = _task(splits[0], task_kind, column, data_cfg)

    teacher = FusedTeacher.from_config(_supervised_settings(cfg)).to(device or "cpu")
    min_samples = max(u.min_samples for u in teacher.upstreams)  # shorter audio is refused by an upstream
    train_batches, dev_batches = (list(make_eval_batches(ds, data_cfg, batch_size, min_samples=min_samples))
                                  for ds in splits)
    probe = dict(steps=steps, learning_rate=learning_rate, seed=seed, batch_size=batch_size, cache_dtype=cache_dtype)
    fused = _fit_one(teacher, task, train_batches, dev_batches, probe)
    teacher.fitted = True
    out_dir = teacher.save_pretrained(out_dir)  # saved before the comparison: the fit is the product
    rows = [(f"fused ({len(teacher.upstreams)} upstreams)", [_display_name(u) for u in teacher.upstreams], fused)]
    if compare_single:
        for upstream, spec in zip(teacher.upstreams, teacher.specs):
            single = _single_teacher(teacher, upstream, spec).to(teacher.device)
            result = _fit_one(single, task, train_batches, dev_batches, probe)
            rows.append((_display_name(upstream), [_display_name(upstream)], result))

    report = {
        "task": {"kind": task_kind, "column": column, "vocab": task.vocab},
        "steps": steps, "learning_rate": learning_rate, "batch_size": batch_size, "seed": seed,
        "num_train": fused.num_train, "num_dev": fused.num_dev,
        "skipped": {"train": _skipped(train_batches), "dev": _skipped(dev_batches)},
        "teacher_dir": str(out_dir), "config_hash": teacher.config_hash(),
        "results": [{"name": name, "upstreams": ups, **result.to_dict()} for name, ups, result in rows],
    }
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    report["table"] = _table(rows)
    logger.info("fit-teacher dev scores:\n%s", report["table"])
    return report


def _probe_data_config(data: DataConfig, task_kind: str, column: str) -> DataConfig:
    # Only the probed column is kept, under its canonical name (text or label).
    text, label = (column, None) if task_kind == "ctc" else (None, column)
    return dataclasses.replace(data, text_column_name=text, label_column_name=label)


def _limit(dataset: Any, max_items: Optional[int]) -> Any:
    if max_items is None:
        return dataset
    if hasattr(dataset, "take") and not hasattr(dataset, "select"):  # a streamed dataset
        return dataset.take(max_items)
    return dataset.select(range(min(max_items, len(dataset))))


def _task(train_set: Any, task_kind: str, column: str, data_cfg: DataConfig) -> ProbeTask:
    canonical = _CANONICAL[task_kind]
    names = getattr(train_set, "column_names", None)
    if names is not None and canonical not in names:
        raise ValueError(f"fit_teacher: {data_cfg.dataset_name}[{data_cfg.train_split_name}] has no column {column!r}")
    return ProbeTask.from_dataset(train_set, task_kind, canonical)


def _supervised_settings(cfg: RecipeConfig) -> dict:
    settings = dataclasses.asdict(cfg.teacher)
    # A fresh fit: the recipe's pretrained folder (if any) is what this stage writes, not its input.
    settings.update(projection_fit="supervised", pretrained=None)
    return settings


def _single_teacher(fused: FusedTeacher, upstream: Upstream, spec: Any) -> FusedTeacher:
    """The fused teacher's settings over one upstream (its own layer count, projection <= its width)."""
    projection_dim = fused.projection_dim
    if fused.target_mode == "chconv" and projection_dim:
        projection_dim = min(int(projection_dim), upstream.hidden_size)
    return FusedTeacher(
        [upstream], specs=[spec], fusion=fused.fusion, projection_dim=projection_dim, projection_fit="supervised",
        normalize=fused.normalize, target_mode=fused.target_mode,
    )


def _fit_one(teacher: FusedTeacher, task: ProbeTask, train_batches: list, dev_batches: list,
             probe: dict) -> ProbeResult:
    """Train projection + interface + head; the frozen concatenated features are cached."""
    projection = teacher.projection
    return run_probe(
        teacher_extractor(teacher, project=False), train_batches, dev_batches, task,
        interface=teacher.interface, transform=teacher.project, feature_grad=projection is not None,
        extra_parameters=list(projection.parameters()) if projection is not None else (), **probe,
    )


def _display_name(upstream: Upstream) -> str:
    # Local folders are absolute paths in specs; their last part names them well enough in a table.
    return Path(upstream.name).name if Path(upstream.name).is_dir() else upstream.name


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
