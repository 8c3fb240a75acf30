"""`fusion-distill inspect-teacher`: what the recipe's teacher is, what one forward costs, and how
much of each upstream its projection keeps (a saved teacher's diagnostics, or with `fit_pca` a PCA
fitted here on the recipe's training audio)."""

from __future__ import annotations

from dataclasses import asdict

from tqdm.auto import tqdm

from teachers import FusedTeacher, describe

from .build import pca_waveforms
from .config import RecipeConfig
from .data.loader import load_audio_dataset
from .evaluation.plots import format_projection

__all__ = ["inspect_teacher", "format_teacher_report"]


def inspect_teacher(cfg: RecipeConfig, seconds: float = 10.0, fit_pca: bool = False) -> str:
    """Build the teacher (a progress bar while upstreams load) and return the printed report.

    fit_pca: fit the PCA projection on up to `teacher.pca_max_utterances` training utterances
    (as `train` does) to report what each upstream keeps; off by default, since with base-size
    upstreams on a CPU that takes minutes.
    """
    tcfg = asdict(cfg.teacher)
    with tqdm(total=len(cfg.teacher.upstreams), desc="loading upstreams", unit="model") as bar:
        teacher = FusedTeacher.from_config(tcfg, progress=lambda *_: bar.update(1))
    pca = cfg.teacher.projection_fit == "pca" and teacher.projection is not None
    if fit_pca and pca:
        # The same sample train fits on: a seeded shuffle of the training split.
        train_set = load_audio_dataset(cfg.data, cfg.data.train_split_name).shuffle(seed=cfg.training.seed)
        teacher.fit_pca(pca_waveforms(train_set, cfg.teacher.pca_max_utterances, cfg.data.sampling_rate,
                                      teacher.min_samples))
    # Timing needs a usable projection; an unfitted PCA is timed as fitted (the cost is the same).
    teacher.fitted = True
    report = format_teacher_report(describe(teacher, seconds=seconds))
    if teacher.projection_report is not None:
        return report + "\n" + format_projection(teacher.projection_report)
    if pca:
        return report + "\nprojection: PCA not fitted here; --fit-pca fits it on the training audio and shows how much of each upstream it keeps"
    return report


def format_teacher_report(info: dict) -> str:
    lines = [f"{'upstream':<40} {'type':<15} {'layers':>6} {'width':>6} {'frames/s':>8} {'params':>10} {'forward':>10}"]
    for row in info["upstreams"]:
        lines.append(
            f"{row['name'][:40]:<40} {row['model_type']:<15} {row['num_layers']:>6} {row['hidden_size']:>6} "
            f"{row['frame_rate']:>8.2f} {row['num_parameters'] / 1e6:>9.2f}M {row.get('forward_ms', float('nan')):>8.0f}ms"
        )
    layers, frames, width = info["aligned_shape"]
    lines += [
        f"aligned: {layers} layers x {frames} frames x {width} features ({info['seconds']:g} s of audio)",
        f"fusion: {info['fusion']} (targets: {info['target_mode']}, layers {info['target_layer_ids']}, dim {info['target_dim']})",
        f"projection parameters: {info['projection_parameters']:,}; interface parameters: {info['interface_parameters']:,} "
        f"(output {info['interface_output_dim']})",
    ]
    if "forward_ms" in info:
        lines.append(f"one forward on {info['seconds']:g} s: {info['forward_ms']:.0f} ms (fusion {info['fusion_ms']:.1f} ms)")
    return "\n".join(lines)
