"""Kaldi-style log-mel filterbanks in torch: what `SeamlessM4TFeatureExtractor` computes, batched.

The log-mel students (`Wav2Vec2BertModel`) read 80 log-mel bands every 10 ms (25 ms Povey
window, DC removal, pre-emphasis 0.97, 512-point FFT, Kaldi mel scale 20-8000 Hz), normalised
per band over each utterance's frames, then stacked by two into 160 features at 50 Hz.
transformers' extractor does this in numpy, one utterance at a time; here it runs batched on the
student's device, inside the training and evaluation step (on a CPU, on one thread: see
`_one_thread_on_cpu`), and matches the extractor to ~1e-6 (tests/test_logmel_student.py).

Frame grid: `ceil(mel_frames / 2)` stacked frames, which equals the wav2vec grid the teacher
aligns to (`1 + (samples - 400) // 320`, 49 for 1.0 s) for every length >= 400 samples. When
the number of mel frames is odd, the last stacked frame holds one mel frame and one padding
frame (zeros, the per-band mean after normalisation). `SeamlessM4TFeatureExtractor` produces
the same features but marks that half frame as padding in its `attention_mask`; the student
counts it as valid, so its frame count never falls one short of the teacher's.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import numpy as np
import torch
from transformers import SeamlessM4TFeatureExtractor
from transformers.audio_utils import mel_filter_bank

__all__ = ["NUM_MEL_BINS", "STRIDE", "FEATURE_SIZE", "log_mel_features", "log_mel_num_frames", "make_log_mel_extractor"]

SAMPLING_RATE = 16000
NUM_MEL_BINS, STRIDE = 80, 2
FEATURE_SIZE = NUM_MEL_BINS * STRIDE  # Wav2Vec2BertConfig.feature_projection_input_dim
_WINDOW, _HOP, _FFT = 400, 160, 512
_PREEMPHASIS = 0.97
_MEL_FLOOR = 1.192092955078125e-07  # float32 eps, as the extractor's log floor
_NORM_EPS = 1e-7


def make_log_mel_extractor() -> SeamlessM4TFeatureExtractor:
    """The preprocessor an exported log-mel student ships (preprocessor_config.json)."""
    return SeamlessM4TFeatureExtractor(feature_size=NUM_MEL_BINS, sampling_rate=SAMPLING_RATE,
                                       num_mel_bins=NUM_MEL_BINS, padding_value=0.0, stride=STRIDE)


def log_mel_num_frames(num_samples: torch.Tensor) -> torch.Tensor:
    """Stacked (50 Hz) frames for `num_samples` samples: ceil(mel frames / 2); 0 below 400 samples."""
    mel = _mel_frames(num_samples)
    return torch.div(mel + 1, STRIDE, rounding_mode="floor")


def log_mel_features(waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked, per-band normalised log-mel features of a padded batch.

    Args:
        waveforms: (B, S) 16 kHz audio in [-1, 1], padded (any value) after lengths[b] samples.
        lengths: (B,) valid samples per item.
    Returns:
        (features (B, T, 160) in the input dtype, zero at padding; attention_mask (B, T) long,
        1 for the `log_mel_num_frames(lengths)` valid frames), T = max of those counts.
    """
    if waveforms.dim() != 2 or lengths.shape != waveforms.shape[:1]:
        raise ValueError(f"expected waveforms (B, S) and lengths (B,), got {tuple(waveforms.shape)} and {tuple(lengths.shape)}")
    if waveforms.shape[1] < _WINDOW:
        raise ValueError(f"log_mel_features: {waveforms.shape[1]} samples, need at least {_WINDOW} (one 25 ms window)")
    with _one_thread_on_cpu(waveforms.device):
        return _log_mel_features(waveforms, lengths.to(waveforms.device))


def _log_mel_features(waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    device = waveforms.device
    # float64 up to the power spectrum, like the numpy extractor: in float32 the near-silent bands
    # drift (2.5e-3 max abs on the demo speech vs 7e-7); the mel projection and log are float32.
    x = waveforms.double() * 32768.0  # Kaldi works on 16-bit sample values
    num_frames = (x.shape[1] - _WINDOW) // _HOP + 1
    # Per frame, Kaldi removes the DC offset, then pre-emphasises: y[i] = x[i] - 0.97 x[i-1] - 0.03 mean
    # for i >= 1. That is the pre-emphasised signal framed, minus 0.03 mean; y[0] needs no special
    # case because the Povey window is 0 there. Frame means come from one cumulative sum.
    starts = torch.arange(num_frames, device=device) * _HOP
    cumsum = torch.nn.functional.pad(x.cumsum(dim=1), (1, 0))
    means = (cumsum[:, starts + _WINDOW] - cumsum[:, starts]) / _WINDOW  # (B, F)
    emphasised = torch.cat([x[:, :1], x[:, 1:] - _PREEMPHASIS * x[:, :-1]], dim=1)
    frames = emphasised.unfold(1, _WINDOW, _HOP)  # (B, F, 400), no centring: Kaldi's snip_edges
    window, mel_filters = _constants(device)
    windowed = (frames - (1 - _PREEMPHASIS) * means[..., None]) * window
    spectrum = torch.view_as_real(torch.fft.rfft(windowed, n=_FFT))  # complex abs() is 3x slower
    power = (spectrum[..., 0].square() + spectrum[..., 1].square()).float()  # (B, F, 257)
    log_mel = torch.log(torch.clamp(power @ mel_filters, min=_MEL_FLOOR))  # (B, F, 80)
    log_mel = _normalise_per_band(log_mel, _mel_frames(lengths).clamp(max=log_mel.shape[1]))
    if log_mel.shape[1] % STRIDE:  # pad to whole stacked frames, as the extractor's pad_to_multiple_of=2
        log_mel = torch.nn.functional.pad(log_mel, (0, 0, 0, STRIDE - log_mel.shape[1] % STRIDE))
    batch, mel_frames, bins = log_mel.shape
    features = log_mel.reshape(batch, mel_frames // STRIDE, bins * STRIDE)
    counts = log_mel_num_frames(lengths)
    mask = torch.arange(features.shape[1], device=device)[None, :] < counts[:, None]
    steps = int(counts.max()) if counts.numel() else 0
    return features[:, :steps].to(waveforms.dtype), mask[:, :steps].long()


@contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    # The filterbank is ~30 small memory-bound ops. On a shared CPU every multi-threaded op waits
    # at a barrier for a descheduled thread: with 2 threads under load it took 270 ms per 10 s
    # against 24 ms on 1 thread (same run, interleaved); on an idle machine threads gain ~3 ms.
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _mel_frames(num_samples: torch.Tensor) -> torch.Tensor:
    num_samples = torch.as_tensor(num_samples)
    return torch.where(num_samples >= _WINDOW, torch.div(num_samples - _WINDOW, _HOP, rounding_mode="floor") + 1, 0)


def _normalise_per_band(log_mel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    # Per utterance and band over its own frames (unbiased variance, as the extractor), so an
    # item's features do not depend on the padding of the batch; padding frames become 0.
    mask = (torch.arange(log_mel.shape[1], device=log_mel.device)[None, :] < valid[:, None])[..., None]
    count = valid.clamp(min=1).to(log_mel.dtype)[:, None, None]
    mean = log_mel.masked_fill(~mask, 0.0).sum(dim=1, keepdim=True) / count
    centred = (log_mel - mean).masked_fill(~mask, 0.0)
    var = centred.pow(2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
    return centred / torch.sqrt(var + _NORM_EPS)


def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    window, filters = _numpy_constants()
    return torch.from_numpy(window).to(device), torch.from_numpy(filters).float().to(device)


@lru_cache(maxsize=1)
def _numpy_constants() -> tuple[np.ndarray, np.ndarray]:
    # The extractor's own window and filters, so the two cannot drift apart.
    extractor = make_log_mel_extractor()
    return extractor.window.astype(np.float64), extractor.mel_filters.astype(np.float64)
