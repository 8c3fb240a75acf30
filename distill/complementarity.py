"""`fusion-distill compare-upstreams RECIPE`: which of the recipe's upstreams are worth fusing, before
paying for the fusion.

The recipe's teacher is built but never fitted: its `features` (each upstream aligned to the common
layer count and the wav2vec frame grid, layer-normalised: exactly what the fusion sees) run over
`max_utterances` training utterances, the same seeded sample `train` fits the PCA on. Frames go to
a bounded sample (teachers.complementarity.FrameSample) and to the running covariance PCA uses;
then, for every pair of upstreams, linear CKA and held-out ridge R² per aligned layer pair, and per
upstream its share of the fused variance and what the recipe's PCA projection would keep of it.

Writes OUT/complementarity.json and one heatmap PNG per pair (CKA and R² both ways; skipped with a
note when matplotlib is absent); returns the printed report (tables and one sentence per upstream).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Optional

import torch
from tqdm.auto import tqdm

from teachers import FusedTeacher
from teachers.complementarity import ComplementarityReport, FrameSample, PairReport, compare
from teachers.inputs import iter_batches
from teachers.pca import CovarianceAccumulator, retained_variance

from .build import pca_waveforms, upstream_names
from .config import RecipeConfig
from .data import load_audio_dataset

__all__ = ["compare_upstreams", "complementarity_of", "format_complementarity", "write_report", "plot_pair", "REPORT_NAME"]

logger = logging.getLogger(__name__)

REPORT_NAME = "complementarity.json"
DEFAULT_MAX_FRAMES = 20000
DEFAULT_MAX_MEMORY_MB = 1024


def compare_upstreams(cfg: RecipeConfig, out_dir: Optional[str | Path] = None, max_utterances: int = 200,
                      max_frames: int = DEFAULT_MAX_FRAMES, max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
                      batch_size: int = 8, ridge: float = 1e-3, seed: int = 0) -> dict:
    """Build the recipe's teacher, read `max_utterances` training utterances, write the report to
    `out_dir` (default: training.output_dir/complementarity). Returns the report as a dict, with
    `out_dir` and `seconds` added."""
    start = time.perf_counter()
    if len(cfg.teacher.upstreams) < 2:  # before minutes of model loading
        raise ValueError(f"compare-upstreams: the recipe's teacher has {len(cfg.teacher.upstreams)} upstream; need two or more")
    with tqdm(total=len(cfg.teacher.upstreams), desc="loading upstreams", unit="model", disable=None) as bar:
        teacher = FusedTeacher.from_config(asdict(cfg.teacher), progress=lambda *_: bar.update(1))
    # The sample train fits the PCA on: a seeded shuffle of the training split.
    train_set = load_audio_dataset(cfg.data, cfg.data.train_split_name).shuffle(seed=cfg.training.seed)
    waves = pca_waveforms(train_set, max_utterances, cfg.data.sampling_rate, teacher.min_samples)
    report = complementarity_of(teacher, waves, max_frames=max_frames, max_memory_mb=max_memory_mb,
                                batch_size=batch_size, ridge=ridge, seed=seed, sampling_rate=cfg.data.sampling_rate)
    out = Path(out_dir) if out_dir else Path(cfg.training.output_dir) / "complementarity"
    return write_report(report, out, seconds=round(time.perf_counter() - start, 1))


def write_report(report: ComplementarityReport, out: Path, **extra) -> dict:
    """OUT/complementarity.json (the report, `out_dir` and `extra`) and one heatmap PNG per pair."""
    out.mkdir(parents=True, exist_ok=True)
    for pair in report.pairs:
        pair.heatmap = plot_pair(pair, out / f"{_slug(pair.a)}__{_slug(pair.b)}.png")
    result = {**report.to_dict(), "out_dir": str(out), **extra}
    (out / REPORT_NAME).write_text(json.dumps(result, indent=2) + "\n")
    return result


def complementarity_of(teacher: FusedTeacher, waveforms: Iterable[torch.Tensor], max_frames: int = DEFAULT_MAX_FRAMES,
                       max_memory_mb: float = DEFAULT_MAX_MEMORY_MB, batch_size: int = 8, ridge: float = 1e-3,
                       seed: int = 0, sampling_rate: int = 16000, names: Optional[list[str]] = None) -> ComplementarityReport:
    """The report for a built teacher over 1-D waveforms. The frame sample holds at most
    `max_frames` frames and at most `max_memory_mb` MB (the smaller wins)."""
    layers, total = teacher.num_aligned_layers, sum(teacher.dims)
    width = layers * total
    by_memory = int(max_memory_mb * 2**20 // (2 * width))  # FrameSample stores bfloat16
    frames = min(max_frames, by_memory)
    if frames < max_frames:
        logger.info("compare-upstreams: %d frames fit in %g MB (%d layers x %d features each), not %d",
                    frames, max_memory_mb, layers, total, max_frames)
    sample = FrameSample(width, frames, seed=seed)
    stats = CovarianceAccumulator(total)  # what fit_pca pools: every aligned layer's frames
    for batch in iter_batches(waveforms, batch_size):
        with torch.no_grad():
            features, lengths = teacher.features(batch, sampling_rate)
        for b, n in enumerate(lengths.tolist()):
            rows = features[:, b, :n]  # (L, n, sum D)
            stats.update(rows.reshape(-1, total))
            sample.add(rows.transpose(0, 1).reshape(n, width))
    if stats.count == 0:
        raise ValueError("compare-upstreams: no audio was read (every utterance unreadable or too short)")
    covariance = stats.covariance().cpu()
    variances = [float(block.sum()) for block in torch.split(torch.diagonal(covariance), teacher.dims)]
    shares = [v / max(sum(variances), 1e-300) for v in variances]
    kept = None
    if teacher.target_mode == "chconv" and teacher.projection_fit == "pca" and stats.count >= teacher.target_dim:
        weight, _ = stats.principal_projection(teacher.target_dim, teacher.dims, teacher.projection_balance)
        kept = retained_variance(covariance, weight, teacher.dims)[0]
    per_half = min(len(h) for h in sample.halves())
    if per_half < 4 * max(teacher.dims):
        logger.warning("compare-upstreams: %d frames per half against features up to %d wide: held-out R² is biased low "
                       "and CKA high; read more utterances (--max-utterances) or allow more frames", per_half, max(teacher.dims))
    report = compare(sample, names or upstream_names(teacher), teacher.dims, layers, ridge=ridge,
                     variance_share=shares, pca_kept=kept)
    report.frames.update(pooled_for_pca=stats.count, sample_mb=round(sample.nbytes / 2**20, 1))
    report.settings.update(projection_dim=teacher.target_dim if kept is not None else None,
                           projection_balance=teacher.projection_balance, seed=seed)
    return report


def format_complementarity(result: dict) -> str:
    """Tables (pairs, most complementary first; upstreams) and one sentence per upstream."""
    frames = result["frames"]
    lines = [f"{frames['utterances']} utterances, {sum(frames['seen'])} frames ({sum(frames['sampled'])} sampled, "
             f"fitted on one half of the utterances and scored on the other, both ways)",
             "", f"{'pair (a | b)':<44} {'best CKA (layers)':>18} {'b from a':>9} {'a from b':>9} {'complementarity':>16}"]
    for p in result["pairs"]:
        layers = "{},{}".format(*p["best_cka_layers"])
        lines.append(f"{(p['a'] + ' | ' + p['b'])[:44]:<44} {p['best_cka']:>11.3f} ({layers:>4}) "
                     f"{p['b_from_a']:>9.3f} {p['a_from_b']:>9.3f} {p['complementarity']:>16.3f}")
    lines += ["", f"{'upstream':<28} {'width':>6} {'variance':>9} {'PCA kept':>9} {'adds beyond':>12}  most predictable from"]
    for u in result["upstreams"]:
        kept = "-" if u["pca_kept"] is None else f"{u['pca_kept']:.1%}"
        lines.append(f"{u['name'][:28]:<28} {u['width']:>6} {u['variance_share']:>9.1%} {kept:>9} "
                     f"{u['adds_beyond']:>12.3f}  {u['predictable_from']} (layer {u['source_layer']})")
    settings = result["settings"]
    if settings.get("projection_dim"):
        lines.append(f"PCA kept: of each upstream's own variance, what the recipe's PCA projection "
                     f"({settings['projection_balance']} balance, {settings['projection_dim']} dims) fitted on these frames keeps")
    lines += ["", *(u["sentence"] for u in result["upstreams"])]
    first, last = result["pairs"][0], result["pairs"][-1]
    lines.append(f"most complementary pair: {first['a']} + {first['b']} ({first['complementarity']:.3f})")
    if len(result["pairs"]) > 1:
        lines.append(f"least complementary pair: {last['a']} + {last['b']} ({last['complementarity']:.3f}): "
                     "fusing both adds the least")
    seconds = f" ({result['seconds']:.0f} s)" if "seconds" in result else ""
    lines.append(f"report: {Path(result['out_dir']) / REPORT_NAME}{seconds}")
    return "\n".join(lines)


def plot_pair(pair: PairReport, path: Path) -> Optional[str]:
    """CKA and R² both ways as three heatmaps in one PNG; None (and a logged note) without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: skipping %s (pip install 'fusion-distill[plots]')", path.name)
        return None
    panels = [(pair.cka, "linear CKA", f"{pair.a} layer", f"{pair.b} layer"),
              (pair.r2_a_to_b, f"R² of {pair.b} from {pair.a}", f"{pair.a} layer (source)", f"{pair.b} layer (target)"),
              (pair.r2_b_to_a, f"R² of {pair.a} from {pair.b}", f"{pair.b} layer (source)", f"{pair.a} layer (target)")]
    fig = Figure(figsize=(13, 4.6), layout="constrained")
    for ax, (matrix, title, rows, cols) in zip(fig.subplots(1, 3), panels):
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", origin="lower")
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if value > 0.6 else "white")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(rows)
        ax.set_xlabel(cols)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"{pair.a} | {pair.b}: complementarity {pair.complementarity:.3f}")
    fig.savefig(path, dpi=110)
    return str(path)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "upstream"
