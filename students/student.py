"""The trainable student: a stock HF encoder plus prediction heads kept beside it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from .frontend import encoder_inputs, normalize_waveforms
from .heads import PredictionHeads

__all__ = ["StudentOutput", "DistillStudent", "normalize_waveforms"]


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


class DistillStudent(nn.Module):
    """`encoder` (a stock HubertModel / WavLMModel / Wav2Vec2Model / Wav2Vec2BertModel) and `heads`.

    Only `encoder` is exported; keeping the heads out of it keeps the export a plain HF model.
    """

    def __init__(self, encoder: PreTrainedModel, heads: PredictionHeads) -> None:
        super().__init__()
        if not isinstance(encoder, PreTrainedModel):
            raise TypeError(f"DistillStudent: encoder must be a transformers PreTrainedModel, got {type(encoder).__name__}")
        self.encoder = encoder
        self.heads = heads

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> StudentOutput:
        """waveforms: (B, S) raw 16 kHz audio, padded after lengths[b]; lengths: (B,) long samples.

        The encoder's inputs (normalised audio or log-mel features) are computed here, batched on
        the waveforms' device, by `students.frontend.encoder_inputs`.
        """
        fed = encoder_inputs(self.encoder.config, waveforms, lengths)
        # The mask is always passed: with a layer-norm front-end (and for log-mel features) it makes
        # every item's valid frames independent of the padding. Group-norm students should get
        # equal-length crops.
        out = self.encoder(**fed.inputs, output_hidden_states=True, return_dict=True)
        frame_lengths = fed.frame_lengths.long()
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
