"""Input handling shared by the teacher: waveform batches, frame-count specs, frame masks.

Accepts what callers naturally have (a list of 1-D tensors, or a padded (B, S) batch with
sample lengths) and turns it into unpadded float32 waveforms, refusing anything ambiguous.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

from .align import wav2vec_num_frames
from .upstream import SAMPLING_RATE

__all__ = ["FrameSpec", "Waveforms", "as_waveform_list", "resolve_frame_counts", "frame_mask", "iter_batches"]

FrameSpec = Union[None, int, Sequence[int], Callable[[int], int]]
Waveforms = Union[torch.Tensor, Sequence[torch.Tensor]]


def as_waveform_list(waveforms: Waveforms, sampling_rate: int, lengths: Optional[torch.Tensor]) -> list[torch.Tensor]:
    if sampling_rate != SAMPLING_RATE:
        raise ValueError(f"FusedTeacher: sampling_rate must be {SAMPLING_RATE}, got {sampling_rate}; resample first")
    if torch.is_tensor(waveforms):
        if waveforms.dim() != 2:
            raise ValueError(f"FusedTeacher: waveforms of shape {tuple(waveforms.shape)}, expected (B, S) or a list of 1-D tensors")
        full = torch.full((waveforms.shape[0],), waveforms.shape[1])
        lengths = full if lengths is None else torch.as_tensor(lengths).cpu()
        if lengths.shape != full.shape or bool((lengths < 1).any() | (lengths > full).any()):
            raise ValueError(f"FusedTeacher: lengths {lengths.tolist()} do not fit a batch of shape {tuple(waveforms.shape)}")
        waves = [waveforms[b, : int(n)] for b, n in enumerate(lengths)]
    elif isinstance(waveforms, (list, tuple)):
        if lengths is not None:
            raise ValueError("FusedTeacher: lengths are only for a padded (B, S) tensor; a list carries its own")
        waves = [w if torch.is_tensor(w) else torch.as_tensor(w) for w in waveforms]
    else:
        raise ValueError(f"FusedTeacher: waveforms is {type(waveforms).__name__}, expected a list of 1-D tensors or (B, S)")
    for i, wave in enumerate(waves):
        if wave.dim() != 1 or not wave.is_floating_point():
            raise ValueError(f"FusedTeacher: waveform {i} is {tuple(wave.shape)} {wave.dtype}, expected 1-D float in [-1, 1]")
    return [w.float() for w in waves]


def resolve_frame_counts(num_frames: FrameSpec, sizes: list[int]) -> list[int]:
    if num_frames is None:
        counts = [wav2vec_num_frames(n) for n in sizes]
    elif callable(num_frames):
        counts = [int(num_frames(n)) for n in sizes]
    elif isinstance(num_frames, numbers.Integral):
        counts = [int(num_frames)] * len(sizes)
    else:
        counts = [int(n) for n in num_frames]
    if len(counts) != len(sizes):
        raise ValueError(f"FusedTeacher: got {len(counts)} frame counts for {len(sizes)} waveforms")
    for i, (n, size) in enumerate(zip(counts, sizes)):
        if n < 1:
            raise ValueError(f"FusedTeacher: waveform {i} ({size} samples) maps to {n} target frames, expected >= 1")
    return counts


def frame_mask(lengths: torch.Tensor, frames: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """(B, frames) bool, True where the frame index is below the item's length."""
    device = lengths.device if device is None else device
    return torch.arange(frames, device=device)[None, :] < lengths.to(device)[:, None]


def iter_batches(waveforms: Iterable[Any], batch_size: int) -> Iterable[list[torch.Tensor]]:
    batch: list[torch.Tensor] = []
    for item in waveforms:
        batch.extend(item if isinstance(item, (list, tuple)) else [item])
        while len(batch) >= batch_size:
            yield batch[:batch_size]
            batch = batch[batch_size:]
    if batch:
        yield batch
