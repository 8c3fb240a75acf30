"""The trainable student: a stock HF encoder plus prediction heads kept beside it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from .heads import PredictionHeads

__all__ = ["StudentOutput", "DistillStudent", "normalize_waveforms"]

# Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm adds this to the variance.
_NORM_EPS = 1e-7


@dataclass
class StudentOutput:
    """What one student forward returns (K target layers, B items, T frames).

    predictions: (K, B, T, D) head outputs, one slice per teacher target layer.
    lengths: (B,) long, valid frames per item; frames at index >= lengths[b] are padding.
    last_hidden_state: (B, T, H) the encoder's final output.
    hidden_states: L+1 tensors of shape (B, T, H); index 0 is the pre-transformer features.
    """

    predictions: torch.Tensor
    lengths: torch.Tensor
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]


def normalize_waveforms(waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero mean / unit variance per item over its valid samples; padding set to 0.

    Matches `Wav2Vec2FeatureExtractor(do_normalize=True)` applied to each unpadded waveform
    (population variance, eps 1e-7), so training sees what the exported preprocessor produces.

    Args:
        waveforms: (B, S) float, zero- or otherwise padded after lengths[b] samples.
        lengths: (B,) valid samples per item.
    Returns:
        (normalised (B, S) in the input dtype, sample mask (B, S) long).
    """
    mask = torch.arange(waveforms.shape[1], device=waveforms.device)[None, :] < lengths[:, None]
    # float64 statistics: a float32 sum over minutes of audio drifts from numpy's pairwise sum.
    x = waveforms.double().masked_fill(~mask, 0.0)
    count = lengths.clamp(min=1).double()[:, None]
    mean = x.sum(dim=1, keepdim=True) / count
    var = ((x - mean).masked_fill(~mask, 0.0) ** 2).sum(dim=1, keepdim=True) / count
    normed = ((x - mean) / torch.sqrt(var + _NORM_EPS)).masked_fill(~mask, 0.0)
    return normed.to(waveforms.dtype), mask.long()


class DistillStudent(nn.Module):
    """`encoder` (a stock HubertModel / WavLMModel / Wav2Vec2Model) and `heads`, side by side.

    Only `encoder` is exported; keeping the heads out of it keeps the export a plain HF model.
    """

    def __init__(self, encoder: PreTrainedModel, heads: PredictionHeads) -> None:
        super().__init__()
        if not isinstance(encoder, PreTrainedModel):
            raise TypeError(f"DistillStudent: encoder must be a transformers PreTrainedModel, got {type(encoder).__name__}")
        self.encoder = encoder
        self.heads = heads

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> StudentOutput:
        """waveforms: (B, S) raw 16 kHz audio, padded after lengths[b]; lengths: (B,) long samples."""
        if waveforms.dim() != 2 or lengths.shape != waveforms.shape[:1]:
            raise ValueError(f"expected waveforms (B, S) and lengths (B,), got {tuple(waveforms.shape)} and {tuple(lengths.shape)}")
        input_values, attention_mask = normalize_waveforms(waveforms, lengths)
        # The mask is always passed: with a layer-norm front-end it makes every item's valid frames
        # independent of the padding. Group-norm students should get equal-length crops.
        out = self.encoder(input_values, attention_mask=attention_mask, output_hidden_states=True, return_dict=True)
        frame_lengths = self.encoder._get_feat_extract_output_lengths(lengths).long()
        return StudentOutput(
            predictions=self.heads(out.hidden_states),
            lengths=frame_lengths,
            last_hidden_state=out.last_hidden_state,
            hidden_states=tuple(out.hidden_states),
        )

    def num_parameters(self, include_heads: bool = False) -> int:
        """Parameter count of the encoder (what ships), plus the heads if asked."""
        modules = [self.encoder, self.heads] if include_heads else [self.encoder]
        return sum(p.numel() for module in modules for p in module.parameters())
