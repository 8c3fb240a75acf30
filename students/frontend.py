"""What each student family is fed: padded waveforms -> the encoder's keyword inputs and frames.

Every place that runs a student (training, evaluation, probes, ONNX export and parity, cost)
goes through `encoder_inputs`, so the two families cannot be fed differently in two places:

- raw-waveform students (HubertModel, WavLMModel, Wav2Vec2Model): `input_values`, each item
  normalised to zero mean and unit variance over its own samples, with a sample-level
  `attention_mask`; frames from the conv front-end's kernels and strides.
- log-mel students (Wav2Vec2BertModel): `input_features`, the 160-dim stacked filterbanks of
  `students.logmel`, with a frame-level `attention_mask`.

Both land on the wav2vec frame grid (49 frames for 1.0 s) that the teacher aligns to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import torch
from transformers import PretrainedConfig, Wav2Vec2FeatureExtractor
from transformers.feature_extraction_utils import FeatureExtractionMixin

from .logmel import log_mel_features, log_mel_num_frames, make_log_mel_extractor

__all__ = ["LOG_MEL_MODEL_TYPES", "EncoderInputs", "is_log_mel", "padding_invariant", "input_names", "encoder_inputs", "num_frames",
           "make_feature_extractor", "normalize_waveforms"]

LOG_MEL_MODEL_TYPES = ("wav2vec2-bert",)
SAMPLING_RATE = 16000
# Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm adds this to the variance.
_NORM_EPS = 1e-7

ConfigOrModel = Union[PretrainedConfig, Any]


@dataclass
class EncoderInputs:
    """inputs: the encoder's keyword arguments (`input_values` or `input_features`, and
    `attention_mask`); frame_lengths: (B,) long, valid output frames per item."""

    inputs: dict[str, torch.Tensor]
    frame_lengths: torch.Tensor


def _config(model_or_config: ConfigOrModel) -> PretrainedConfig:
    return getattr(model_or_config, "config", model_or_config)


def is_log_mel(model_or_config: ConfigOrModel) -> bool:
    """Whether the encoder reads log-mel `input_features` (else raw `input_values`)."""
    return getattr(_config(model_or_config), "model_type", None) in LOG_MEL_MODEL_TYPES


def padding_invariant(model_or_config: ConfigOrModel) -> bool:
    """Whether an item's valid frames do not depend on the zero padding of its batch (given the
    attention mask): log-mel students and layer-norm conv front-ends; group norm is not."""
    config = _config(model_or_config)
    return is_log_mel(config) or getattr(config, "feat_extract_norm", None) == "layer"


def input_names(model_or_config: ConfigOrModel) -> tuple[str, str]:
    """The encoder's two inputs, in the order the ONNX graph takes them."""
    return ("input_features" if is_log_mel(model_or_config) else "input_values", "attention_mask")


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


def encoder_inputs(model_or_config: ConfigOrModel, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderInputs:
    """Padded 16 kHz waveforms (B, S) with sample lengths (B,) -> the encoder's inputs, on
    `waveforms`' device, and its valid output frames per item."""
    if waveforms.dim() != 2 or lengths.shape != waveforms.shape[:1]:
        raise ValueError(f"expected waveforms (B, S) and lengths (B,), got {tuple(waveforms.shape)} and {tuple(lengths.shape)}")
    lengths = lengths.to(waveforms.device)
    if is_log_mel(model_or_config):
        features, mask = log_mel_features(waveforms, lengths)
        return EncoderInputs({"input_features": features, "attention_mask": mask}, mask.sum(dim=1))
    values, mask = normalize_waveforms(waveforms, lengths)
    return EncoderInputs({"input_values": values, "attention_mask": mask}, num_frames(model_or_config, lengths))


def num_frames(model_or_config: ConfigOrModel, num_samples: Union[int, torch.Tensor]) -> torch.Tensor:
    """Output frames of the encoder for `num_samples` samples (an int or a tensor of them)."""
    config = _config(model_or_config)
    samples = torch.as_tensor(num_samples).long()
    if is_log_mel(config):
        if getattr(config, "add_adapter", False):
            raise ValueError("log-mel students with add_adapter=True are not supported (the adapter halves the frame rate)")
        return log_mel_num_frames(samples)
    if getattr(config, "add_adapter", False):
        raise ValueError("students with add_adapter=True are not supported (the adapter changes the frame grid)")
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        samples = torch.div(samples - kernel, stride, rounding_mode="floor") + 1
    return samples.clamp(min=0)


def make_feature_extractor(model_or_config: ConfigOrModel) -> FeatureExtractionMixin:
    """The preprocessor an exported student ships: what `encoder_inputs` reproduces.

    Log-mel students: `SeamlessM4TFeatureExtractor`. Raw-waveform students:
    `Wav2Vec2FeatureExtractor`; following the wav2vec2 convention, group-norm models are fed
    without an attention mask (they were trained on unpadded crops), layer-norm models with it.
    """
    config = _config(model_or_config)
    if is_log_mel(config):
        return make_log_mel_extractor()
    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLING_RATE, padding_value=0.0, do_normalize=True,
                                    return_attention_mask=getattr(config, "feat_extract_norm", "layer") == "layer")
