"""Alignment of upstreams with different depths and frame rates (linear interpolation).

Layers: every upstream is resampled to the largest layer count with `align_corners=True`, so
the front-end output (layer 0) and the last layer are kept exactly and the rest interpolate.
Frames: each utterance's VALID frames are resampled to the requested count on its own, so
padding never leaks into the interpolation. Time uses `align_corners=False`: frames are
intervals that tile the utterance, and this maps the two tilings onto each other (equal counts
give the identity).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["align_layers", "align_frames", "wav2vec_num_frames", "WAV2VEC_CONV", "WAV2VEC_RECEPTIVE_FIELD", "WAV2VEC_HOP"]

# (kernel, stride) of the wav2vec 2.0 / HuBERT / WavLM conv front-end: 320-sample hop.
WAV2VEC_CONV = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))

FrameCounts = Union[int, Sequence[int], torch.Tensor]




def receptive_field_and_hop(conv: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(samples one output frame sees, samples between frames) of a stack of (kernel, stride) convs."""
    field, hop = 1, 1
    for kernel, stride in conv:
        field += (kernel - 1) * hop
        hop *= stride
    return field, hop


# Samples one wav2vec frame sees (400, 25 ms; shorter audio gives no frame) and between frames (320).
WAV2VEC_RECEPTIVE_FIELD, WAV2VEC_HOP = receptive_field_and_hop(WAV2VEC_CONV)


def wav2vec_num_frames(num_samples: int) -> int:
    """Frames the wav2vec conv front-end gives for `num_samples` samples (16000 -> 49)."""
    frames = int(num_samples)
    for kernel, stride in WAV2VEC_CONV:
        frames = max((frames - kernel) // stride + 1, 0)
    return frames


def align_layers(hidden: torch.Tensor, num_layers: int) -> torch.Tensor:
    """(L, B, T, D) -> (num_layers, B, T, D) by linear interpolation over the layer axis."""
    layers = hidden.shape[0]
    if layers == num_layers:
        return hidden
    if layers < 2:
        raise ValueError(f"align_layers: cannot interpolate {layers} layer to {num_layers}, need at least 2")
    flat = hidden.reshape(layers, -1).T.unsqueeze(0)  # (1, B*T*D, L): interpolate treats L as length
    out = F.interpolate(flat, size=num_layers, mode="linear", align_corners=True)
    return out.squeeze(0).T.reshape(num_layers, *hidden.shape[1:])


def align_frames(hidden: torch.Tensor, lengths: torch.Tensor, num_frames: FrameCounts) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample each item's valid frames to its target count.

    hidden: (L, B, T, D) with `lengths` (B,) valid frames; num_frames: one int for all items or
    one per item. Returns ((L, B, max(num_frames), D) zero-padded, new lengths (B,)).
    """
    layers, batch, _, dim = hidden.shape
    targets = _per_item(num_frames, batch)
    out = hidden.new_zeros(layers, batch, int(targets.max()), dim)
    for b in range(batch):
        valid, target = int(lengths[b]), int(targets[b])
        if valid < 1:
            raise ValueError(f"align_frames: item {b} has {valid} valid frames, expected at least 1")
        item = hidden[:, b, :valid]  # (L, T_b, D)
        if valid != target:  # equal counts are copied, so they stay exact
            item = F.interpolate(item.transpose(1, 2), size=target, mode="linear", align_corners=False).transpose(1, 2)
        out[:, b, :target] = item
    return out, targets


def _per_item(num_frames: FrameCounts, batch: int) -> torch.Tensor:
    if isinstance(num_frames, int):
        targets = torch.full((batch,), num_frames, dtype=torch.long)
    else:
        targets = torch.as_tensor(list(num_frames) if not torch.is_tensor(num_frames) else num_frames, dtype=torch.long).cpu()
    if targets.shape != (batch,):
        raise ValueError(f"align_frames: got {targets.numel()} frame counts for a batch of {batch}")
    if int(targets.min()) < 1:
        raise ValueError(f"align_frames: frame counts must be >= 1, got {targets.tolist()}")
    return targets
