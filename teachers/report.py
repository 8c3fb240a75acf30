"""What a fused teacher costs: sizes, shapes and the time of one forward (for `inspect-teacher`)."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from .fused import FusedTeacher
from .inputs import resolve_frame_counts
from .upstream import SAMPLING_RATE

__all__ = ["describe"]


def describe(teacher: FusedTeacher, seconds: float = 10.0, timed: bool = True) -> dict:
    """A JSON-able summary of `teacher`.

    Per upstream: name, model type, layers, width, frame rate, frames and parameters, and (if
    `timed`) the milliseconds of its forward on `seconds` of audio; then the aligned shape, the
    fusion sizes and the time of the fusion itself. Each stage runs once, so the total forward
    time is the sum of the parts (the first call may include one-off warm-up costs).
    """
    samples = int(seconds * SAMPLING_RATE)
    frames = resolve_frame_counts(None, [samples])
    wave = _test_signal(samples, teacher.device)
    rows, outputs = [], []
    for upstream in teacher.upstreams:
        rows.append({
            "name": upstream.name,
            "model_type": upstream.model_type,
            "num_layers": upstream.num_layers,
            "hidden_size": upstream.hidden_size,
            "frame_rate": upstream.frame_rate,
            "num_frames": upstream.num_frames(samples),
            "num_parameters": upstream.num_parameters(),
            "dtype": str(upstream.dtype).replace("torch.", ""),
        })
        if timed:
            ms, out = _timed(lambda: upstream([wave]))
            rows[-1]["forward_ms"] = ms
            outputs.append(out)
    info = {
        "config_hash": teacher.config_hash(),
        "upstreams": rows,
        "upstream_parameters": sum(r["num_parameters"] for r in rows),
        "aligned_shape": [teacher.num_aligned_layers, frames[0], sum(teacher.dims)],
        "fusion": teacher.fusion,
        "target_mode": teacher.target_mode,
        "target_layer_ids": list(teacher.target_layer_ids),
        "target_dim": teacher.target_dim,
        "projection_parameters": teacher.projection_parameters,
        "interface_parameters": sum(p.numel() for p in teacher.interface.parameters()),
        "interface_output_dim": teacher.interface.output_dim,
        "fitted": teacher.fitted,
        "seconds": seconds,
    }
    if timed:
        with torch.no_grad():
            info["fusion_ms"], _ = _timed(lambda: teacher.interface(teacher.project(teacher._fuse(outputs, frames)[0])))
        info["forward_ms"] = info["fusion_ms"] + sum(r["forward_ms"] for r in rows)
    return info


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start), result


def _test_signal(samples: int, device: torch.device) -> torch.Tensor:
    # Timing does not depend on content; seeded noise keeps runs comparable.
    generator = torch.Generator().manual_seed(0)
    return (0.1 * torch.randn(samples, generator=generator)).to(device)
