"""Recipe sections -> the fused teacher and the distillation student.

Shared by every stage (train, cache-targets, evaluate, fit-teacher) so they all build the
same objects from the same recipe.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch

from students import DistillStudent, PredictionHeads, build_student, init_from_upstream
from teachers import CONFIG_NAME, FusedTeacher, Upstream, canonical_spec, load_upstream, read_saved_config

from .data.audio import RECEPTIVE_FIELD
from .config import RecipeConfig, TeacherConfig, student_config
from .data.loader import BadAudio, decode_audio

__all__ = ["build_teacher", "teacher_config_diffs", "build_distill_student", "student_config", "pca_waveforms", "single_upstream_teacher", "upstream_names"]

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
        diffs = teacher_config_diffs(read_saved_config(save_dir), cfg.teacher)
        if diffs:  # an output folder reused with another teacher: never train on its targets
            raise ValueError(
                f"{save_dir}: the run's saved teacher differs from the recipe's in {', '.join(diffs)}; "
                "use a new --output-dir (or delete that folder to refit)"
            )
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


def teacher_config_diffs(saved: dict, recipe: TeacherConfig) -> list[str]:
    """Keys in which a saved teacher config (fused_teacher.json) differs from a recipe's teacher."""
    diffs = []
    if [canonical_spec(s) for s in recipe.upstreams] != [canonical_spec(s) for s in saved["upstreams"]]:
        diffs.append("upstreams")
    diffs += [k for k in ("fusion", "target_mode", "normalize", "dtype") if getattr(recipe, k) != saved[k]]
    if recipe.target_mode == "chconv" and recipe.projection_dim != saved["projection_dim"]:
        diffs.append("projection_dim")
    if recipe.target_layers is not None and list(recipe.target_layers) != list(saved["target_layers"]):
        diffs.append("target_layers")
    # Teachers saved before the option existed were plain PCA.
    if recipe.projection_fit == "pca" and recipe.projection_balance != saved.get("projection_balance", "none"):
        diffs.append("projection_balance")
    if recipe.position_reference != saved.get("position_reference", "none"):
        diffs.append("position_reference")
    return diffs


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


def single_upstream_teacher(teacher: FusedTeacher, index: int, fit: bool = False) -> FusedTeacher:
    """Upstream `index` of `teacher` alone, behind the teacher's own front half (frame alignment
    to the wav2vec grid, per-layer normalisation); it shares the loaded module.

    fit=False: no projection (concatenation, weighted sum): exactly the features this upstream
    contributes to the fusion, to probe; Whisper needs no separate extractor. fit=True: the
    teacher's fusion settings over this upstream (projection width capped at its width), with a
    supervised projection to train, for a like-for-like comparison with the fused fit.
    """
    upstream, spec = teacher.upstreams[index], teacher.specs[index]
    if not fit:
        return FusedTeacher([upstream], specs=[spec], fusion="weighted_sum", projection_dim=None,
                            projection_fit="none", target_mode="concat", normalize=teacher.normalize,
                            position_reference=teacher.position_reference)
    projection_dim = teacher.projection_dim
    if teacher.target_mode == "chconv" and projection_dim:
        projection_dim = min(int(projection_dim), upstream.hidden_size)
    return FusedTeacher([upstream], specs=[spec], fusion=teacher.fusion, projection_dim=projection_dim,
                        projection_fit="supervised", normalize=teacher.normalize, target_mode=teacher.target_mode,
                        position_reference=teacher.position_reference)


def upstream_names(teacher: FusedTeacher) -> list[str]:
    """Table names of the teacher's upstreams: local folders by their last part, hub ids and
    random-init configs as they are; repeats of one name get a position suffix ("name #1")."""
    names = [_upstream_name(u) for u in teacher.upstreams]
    counts = Counter(names)
    return [f"{n} #{i}" if counts[n] > 1 else n for i, n in enumerate(names)]


def _upstream_name(upstream: Upstream) -> str:
    # Saved specs hold local folders as absolute paths (a moved folder is no longer a dir, hence
    # is_absolute); a relative folder given directly is a dir.
    path = Path(upstream.name)
    return path.name if path.is_absolute() or path.is_dir() else upstream.name
