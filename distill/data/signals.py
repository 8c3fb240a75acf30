"""A speech-like test signal: no data needed, spectra like voiced speech.

Harmonics of a random f0 (110-150 Hz) under a syllable-rate (3 Hz) envelope, plus noise, peak 0.3.
Used where real audio is not at hand: ONNX parity without a dataset (distill/export.py), the
cost and throughput benchmarks, and tests. Content never changes a cost; it does make parity
and padding checks meaningful where white noise would not.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["speech_like"]


def speech_like(seconds: float, seed: int = 0, sampling_rate: int = 16000) -> torch.Tensor:
    """A deterministic 1-D float32 waveform of `seconds` at `sampling_rate` (same seed, same signal)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    f0 = 110 + 40 * rng.random()
    voiced = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t + rng.random())
    signal = voiced * envelope + 0.05 * rng.standard_normal(t.shape)
    return torch.from_numpy((0.3 * signal / np.abs(signal).max()).astype(np.float32))
