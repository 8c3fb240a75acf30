"""Recipes the benchmark hands to `fusion-distill`: one fused teacher, one per single upstream.

They are ordinary recipe YAMLs (data only), written into the output folder so a reader can rerun
any one of them by hand: `cd OUT && fusion-distill train recipes/NAME.yaml`. Their local paths
(upstream folders, corpus, output folder) are written relative to OUT, the benchmark's --out folder,
so a committed recipe names no machine's folders, and the benchmark runs `fusion-distill` from OUT
too. Every student gets the same student, data, crops, steps, learning rate and seed; only
`teacher.upstreams` differs.
"""

from __future__ import annotations

import os
import json
from pathlib import Path

from omegaconf import OmegaConf

from .config import BenchmarkConfig, StudentSection


def recipe(cfg: BenchmarkConfig, corpus: Path, upstreams: list[Path], output_dir: Path) -> dict:
    s, d, t = cfg.student, cfg.distill, cfg.teacher
    training = {
        "output_dir": str(output_dir), "seed": 0, "max_steps": d.steps, "learning_rate": d.learning_rate,
        "warmup_steps": d.warmup_steps, "lr_scheduler_type": "linear", "per_device_train_batch_size": d.batch_size,
        "logging_steps": max(1, d.steps // 20), "save_steps": d.steps, "save_total_limit": 1, "report_to": "none",
    }
    if d.eval_steps:
        training["eval_steps"] = d.eval_steps
    return {
        "teacher": {
            "upstreams": [str(p) for p in upstreams], "fusion": t.fusion, "projection_dim": t.projection_dim,
            "projection_fit": "pca", "target_layers": _layers_within(t.target_layers, upstreams), "target_mode": "chconv",
            "normalize": True, "dtype": "float32", "pca_max_utterances": t.pca_max_utterances,
            "projection_balance": t.projection_balance,
        },
        "student": student_section(s),
        "data": {
            "dataset_name": str(corpus), "train_split_name": "train", "eval_split_name": "dev",
            "text_column_name": "phonemes", "label_column_name": "speaker",
            "min_duration_in_seconds": cfg.corpus.min_seconds, "max_duration_in_seconds": cfg.corpus.max_seconds,
            "max_crop_seconds": d.crop_seconds, "bucket_size": 32,
        },
        "loss": {"cos_weight": 1.0},
        "training": training,
    }


def _layers_within(layers: list[int], upstreams: list[Path]) -> list[int]:
    """The config's target layers that the teacher has: a teacher aligns to its deepest upstream,
    so a single shallower one (GE2E: mel + 3 LSTM layers) keeps the layers up to its own depth."""
    depths = [_num_layers(Path(u)) for u in upstreams]
    if None in depths:
        return list(layers)
    return [i for i in layers if i <= max(depths)]


def _num_layers(folder: Path) -> int | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None  # not a local folder: the teacher build checks the layers
    for key in ("encoder_layers", "num_hidden_layers", "num_layers"):  # Whisper, wav2vec family, GE2E
        if isinstance(config.get(key), int):
            return config[key]
    return None


def student_section(s: StudentSection) -> dict:
    """The recipe's `student:`: the tiny preset of the arch's family, resized by the benchmark's fields."""
    sizes = {"num_hidden_layers": s.num_hidden_layers, "hidden_size": s.hidden_size,
             "num_attention_heads": s.num_attention_heads, "intermediate_size": s.intermediate_size}
    if s.arch == "wav2vec2_bert":  # log-mel: no conv front-end to size; the presets' depthwise kernel (15)
        return {"arch": s.arch, "preset": "w2vbert_3l_112", **sizes, "head_mode": s.head_mode}
    return {"arch": s.arch, "preset": "tiny", **sizes, "conv_dim": [s.conv_channels] * 7, "head_mode": s.head_mode}


def write_recipe(body: dict, path: Path, root: Path | None = None) -> Path:
    """Write `body` to `path`. root: the benchmark's --out folder; the local paths (every upstream,
    the corpus, the output folder: the benchmark's are always folders, never hub ids) are then
    written relative to it, and the header says to run from there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if root is None:
        header = "# Written by python -m benchmarks.mini_superb; rerun with: fusion-distill train THIS_FILE\n"
    else:
        body = relative_paths(body, root)
        header = ("# Written by python -m benchmarks.mini_superb --out OUT; local paths are relative to OUT. Rerun with:\n"
                  f"#   cd OUT && fusion-distill train {_relative(path, root)}\n")
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create(body)))
    return path


def relative_paths(body: dict, root: Path | str) -> dict:
    """A recipe body with teacher.upstreams, data.dataset_name and training.output_dir relative to `root`."""
    body = OmegaConf.to_container(OmegaConf.create(body))
    body["teacher"]["upstreams"] = [_relative(p, root) for p in body["teacher"]["upstreams"]]
    body["data"]["dataset_name"] = _relative(body["data"]["dataset_name"], root)
    body["training"]["output_dir"] = _relative(body["training"]["output_dir"], root)
    return body


def _relative(path: Path | str, root: Path | str) -> str:
    # Both absolute, or both relative to this process's working directory.
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix()
