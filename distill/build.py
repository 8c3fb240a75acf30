"""Recipe sections -> the fused teacher and the distillation student.

Shared by every stage (train, cache-targets, evaluate, fit-teacher) so they all build the
same objects from the same recipe.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch

from students import DistillStudent, PredictionHeads, build_student, build_student_config, init_from_upstream
from teachers import CONFIG_NAME, FusedTeacher, load_upstream

from .config import RecipeConfig
from .audio import RECEPTIVE_FIELD
from .data import BadAudio, decode_audio

__all__ = ["build_teacher", "build_distill_student", "student_config", "pca_waveforms"]

logger = logging.getLogger(__name__)


def build_teacher(
    cfg: RecipeConfig, train_set=None, save_dir: str | Path | None = None, device: str | torch.device | None = None
) -> FusedTeacher:
    """The recipe's fused teacher on `device`, ready to produce targets.

    A teacher already saved in `save_dir` is reused (resume, multi-process ranks, later stages),
    so the PCA projection is fitted once per run. `projection_fit: supervised` loads the folder
    written by `fit-teacher`; `pca` fits on up to `pca_max_utterances` training utterances, on
    `device` (thousands of utterances through 2-3 base-size upstreams take hours on a CPU).
    """
    if save_dir is not None and (Path(save_dir) / CONFIG_NAME).exists():
        logger.info("reusing the fused teacher saved in %s", save_dir)
        return FusedTeacher.from_pretrained(save_dir).to(device or "cpu")
    tcfg = cfg.teacher
    if tcfg.projection_fit == "supervised":
        teacher = FusedTeacher.from_pretrained(tcfg.pretrained).to(device or "cpu")
    else:
        teacher = FusedTeacher.from_config(asdict(tcfg)).to(device or "cpu")
        if tcfg.projection_fit == "pca" and teacher.projection is not None:
            if train_set is None:
                raise ValueError("teacher.projection_fit=pca needs training audio to fit the projection")
            # A seeded shuffle: corpora are often ordered by speaker, so the first N are few voices.
            sample = train_set.shuffle(seed=cfg.training.seed)
            teacher.fit_pca(pca_waveforms(sample, tcfg.pca_max_utterances, cfg.data.sampling_rate, teacher.min_samples))
    if save_dir is not None:
        teacher.save_pretrained(save_dir)
    return teacher


def pca_waveforms(
    dataset, max_utterances: int, sampling_rate: int = 16000, min_samples: int = RECEPTIVE_FIELD
) -> Iterator[torch.Tensor]:
    """Decoded training utterances for the label-free PCA fit; unreadable or too short ones are skipped."""
    used = 0
    for example in dataset:
        if used >= max_utterances:
            break
        try:
            audio = decode_audio(example["audio"], sampling_rate)
        except BadAudio as err:
            logger.warning("PCA fit: skipping %s: %s", example.get("id", "?"), err)
            continue
        if len(audio) < min_samples:
            logger.warning("PCA fit: skipping %s: %d samples, shorter than %d", example.get("id", "?"), len(audio), min_samples)
            continue
        used += 1
        yield torch.from_numpy(audio)


def build_distill_student(
    cfg: RecipeConfig,
    teacher: FusedTeacher | None = None,
    *,
    target_dim: int | None = None,
    num_targets: int | None = None,
    upstream_specs: list | None = None,
) -> DistillStudent:
    """A stock HF encoder plus prediction heads sized for the teacher's targets.

    Without a teacher (training from a target cache), the target shape comes from the cache and
    `init_from_upstream` loads just that one upstream from its spec.
    """
    if teacher is not None:
        target_dim, num_targets = teacher.target_dim, len(teacher.target_layer_ids)
    s = cfg.student
    config = student_config(cfg)
    encoder = build_student(config)
    if s.init_from_upstream is not None:
        if teacher is not None:
            upstream = teacher.upstreams[s.init_from_upstream].model
        else:
            upstream = load_upstream(upstream_specs[s.init_from_upstream]).model
        copied = init_from_upstream(encoder, upstream, num_layers=config.num_hidden_layers)
        logger.info("initialised %d student tensors from upstream %d", len(copied), s.init_from_upstream)
    heads = PredictionHeads(
        hidden_size=config.hidden_size,
        target_dim=target_dim,
        num_targets=num_targets,
        mode=s.head_mode,
        student_layers=s.student_layers,
    )
    return DistillStudent(encoder, heads)


def student_config(cfg: RecipeConfig):
    """The stock HF config of the recipe's student encoder (preset + architecture overrides)."""
    s = cfg.student
    overrides = {
        key: getattr(s, key)
        for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "conv_dim", "feat_extract_norm")
    }
    return build_student_config(s.arch, s.preset, **overrides)
