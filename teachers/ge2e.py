"""GE2E: the pretrained speaker encoder PyPI `resemblyzer` ships, as an upstream.

The model (Wan et al., "Generalized End-to-End Loss for Speaker Verification", 2018; weights from
resemblyzer 0.1.4, Apache-2.0) is a 3-layer, 256-wide LSTM over a 40-band mel POWER spectrogram
(25 ms Hann windows every 10 ms at 16 kHz: librosa's `melspectrogram(n_fft=400, hop_length=160,
n_mels=40)`, Slaney mel scale and norm, centred frames with zero padding), trained on utterances
whose volume was raised to -30 dBFS. Its utterance embedding is the L2-normed ReLU(Linear) of the
last LSTM state, averaged over 1.6 s partial windows (`embed_utterance`).

As an upstream it exposes 4 hidden states at 100 frames/s: layer 0 the input mel (log10, zero-
padded from 40 to 256 features, so every layer has one width; the power spectrum's dynamic range
would otherwise put one loud band in every direction of a PCA), layers 1-3 the LSTM layers' outputs.
Utterances of different lengths share a batch: the STFT's own centring pads with zeros, so zero
padding in a batch leaves each utterance's frames unchanged, and the LSTM runs on packed sequences.

Nothing of `resemblyzer` is imported (its package needs `webrtcvad` and `librosa`): the weights are
found with importlib.metadata and read with `torch.load(weights_only=True)`, or from a folder
written by `save_ge2e` (config.json + model.safetensors).
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .base import SAMPLING_RATE, Upstream

__all__ = ["GE2E", "GE2EUpstream", "load_ge2e", "save_ge2e", "ge2e_embedding", "MODEL_TYPE"]

MODEL_TYPE = "ge2e"
N_FFT, HOP, N_MELS, WIDTH, LAYERS = 400, 160, 40, 256, 3
TARGET_DBFS = -30.0  # resemblyzer raises quieter utterances to this level (never lowers louder ones)
PARTIAL_FRAMES = 160  # 1.6 s partial utterances in embed_utterance
_DISTRIBUTION, _WEIGHTS_FILE = "resemblyzer", "resemblyzer/pretrained.pt"


def mel_filter_bank() -> torch.Tensor:
    """(201, 40) Slaney-scale, Slaney-normalised filters over 0-8 kHz, as librosa.filters.mel builds them."""
    from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank

    filters = hf_mel_filter_bank(num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=N_MELS, min_frequency=0.0,
                                 max_frequency=SAMPLING_RATE / 2, sampling_rate=SAMPLING_RATE, norm="slaney",
                                 mel_scale="slaney")
    return torch.as_tensor(filters, dtype=torch.float32)


class GE2E(nn.Module):
    """The network: mel front-end, three stacked LSTM layers (40 -> 256 -> 256 -> 256) and the
    embedding projection. The layers are separate modules because nn.LSTM returns only its last
    layer's outputs; `load_state_dict` maps resemblyzer's `lstm.*_l{k}` keys onto them."""

    def __init__(self) -> None:
        super().__init__()
        self.lstms = nn.ModuleList(nn.LSTM(N_MELS if k == 0 else WIDTH, WIDTH, batch_first=True) for k in range(LAYERS))
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.register_buffer("mel_filters", mel_filter_bank(), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)

    def mel(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, samples) zero-padded audio -> (B, 1 + samples // 160, 40) mel power spectrogram."""
        stft = torch.stft(batch, N_FFT, HOP, window=self.window, center=True, pad_mode="constant", return_complex=True)
        return (self.mel_filters.T @ (stft.abs() ** 2)).transpose(1, 2)

    def layers(self, mel: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Per LSTM layer its outputs (B, T, 256); packed sequences, so no valid frame sees padding
        and frames past `lengths` are zero."""
        outputs, x = [], mel
        for lstm in self.lstms:
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            x, _ = nn.utils.rnn.pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=mel.shape[1])
            outputs.append(x)
        return outputs

    def embed(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, T, 40) equal-length partials -> (B, 256) L2-normed d-vectors (ReLU(Linear) of the last state)."""
        x = mel
        for lstm in self.lstms:
            x, (hidden, _) = lstm(x)
        raw = torch.relu(self.linear(hidden[-1]))
        return raw / raw.norm(dim=1, keepdim=True)


def raise_volume(wave: torch.Tensor) -> torch.Tensor:
    """Gain up to TARGET_DBFS (RMS of int16-scaled samples), never down: resemblyzer's normalize_volume."""
    rms = torch.sqrt(torch.mean((wave * 32767) ** 2))
    change = TARGET_DBFS - 20 * torch.log10(rms / 32767)
    return wave * 10 ** (change.clamp(min=0) / 20) if rms > 0 else wave


class GE2EUpstream(Upstream):
    """GE2E behind the Upstream interface: 3 layers of 256 at 100 frames/s (hop 160, centred STFT)."""

    def __init__(self, model: GE2E, name: str):
        super().__init__(model, name, MODEL_TYPE, LAYERS, WIDTH)
        self.frame_rate = SAMPLING_RATE / HOP
        self.min_samples = N_FFT // 2 + 1  # the centred STFT's constant padding needs half a window

    def num_frames(self, num_samples: int) -> int:
        return 1 + int(num_samples) // HOP

    def _encode(self, waves: list[torch.Tensor]) -> list[torch.Tensor]:
        waves = [raise_volume(w) for w in waves]
        batch = nn.utils.rnn.pad_sequence(waves, batch_first=True).to(self.dtype)
        lengths = torch.tensor([self.num_frames(w.numel()) for w in waves])
        mel = self.model.mel(batch)
        log_mel = nn.functional.pad(torch.log10(mel + 1e-6), (0, WIDTH - N_MELS))
        stacked = torch.stack([log_mel, *self.model.layers(mel, lengths)])  # (4, B, T, 256)
        return [stacked[:, b, : int(n)] for b, n in enumerate(lengths)]


def ge2e_embedding(model: GE2E, wave: torch.Tensor, rate: float = 1.3, min_coverage: float = 0.75) -> torch.Tensor:
    """The utterance d-vector as resemblyzer's `embed_utterance` computes it (on already
    preprocessed audio): 1.6 s partials every 1/rate s covering the utterance, the last one kept
    if at least `min_coverage` of it is audio, the L2-normed mean of their embeddings."""
    frames = 1 + wave.numel() // HOP
    step = int(round(SAMPLING_RATE / rate / HOP))
    starts = list(range(0, max(1, frames - PARTIAL_FRAMES + step + 1), step))
    coverage = (wave.numel() - starts[-1] * HOP) / (PARTIAL_FRAMES * HOP)
    if coverage < min_coverage and len(starts) > 1:
        starts = starts[:-1]
    needed = (starts[-1] + PARTIAL_FRAMES) * HOP
    padded = nn.functional.pad(wave, (0, max(0, needed - wave.numel())))
    with torch.inference_mode():
        mel = model.mel(padded[None].to(model.linear.weight.dtype))[0]
        partials = model.embed(torch.stack([mel[s: s + PARTIAL_FRAMES] for s in starts]))
    mean = partials.mean(0)
    return mean / mean.norm()


# ----------------------------------------------------------------------------- weights
def resemblyzer_weights() -> Path:
    """The pretrained.pt file of the installed `resemblyzer` distribution (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("GE2E weights: package resemblyzer is not installed; "
                                "`pip install --no-deps resemblyzer==0.1.4` (its own dependencies are not needed)") from None
    path = Path(dist.locate_file(_WEIGHTS_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"GE2E weights: {path} is missing from the installed resemblyzer {dist.version}")
    return path


def _from_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """resemblyzer's checkpoint (`model_state`: lstm.* and linear.*) as GE2E's state dict."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("model_state") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"GE2E weights {path}: expected a checkpoint with a `model_state` dict")
    out = {}
    for key, value in state.items():
        module, _, param = key.partition(".")
        if module == "lstm":  # weight_ih_l2 -> lstms.2.weight_ih_l0
            name, _, layer = param.rpartition("_l")
            out[f"lstms.{layer}.{name}_l0"] = value
        elif module == "linear":
            out[key] = value
    return out  # similarity_weight/bias scale the training loss only


def load_ge2e(source: Optional[Union[str, Path]] = None) -> GE2E:
    """GE2E with pretrained weights from a `save_ge2e` folder, a resemblyzer `.pt` checkpoint, or
    (None) the installed resemblyzer package. Strict: every weight present, nothing unknown."""
    path = resemblyzer_weights() if source is None else Path(source)
    if path.is_dir():
        state = load_file(str(path / "model.safetensors"))
    elif path.is_file():
        state = _from_checkpoint(path)
    else:
        raise FileNotFoundError(f"GE2E weights {path}: no such file or folder")
    model = GE2E()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unknown or shapes:
        raise ValueError(f"GE2E weights {path}: missing {missing[:3]}, unknown {unknown[:3]}, wrong shape {shapes[:3]}; "
                         "expected resemblyzer's 3 x 256 LSTM speaker encoder")
    model.load_state_dict(state, strict=True)
    return model


def save_ge2e(folder: Union[str, Path], source: Optional[Union[str, Path]] = None) -> Path:
    """Convert the weights once to `folder/model.safetensors` + `config.json` (model_type ge2e);
    `load_upstream(folder)` loads it."""
    folder = Path(folder)
    model = load_ge2e(source)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    config = {"model_type": MODEL_TYPE, "num_layers": LAYERS, "hidden_size": WIDTH, "n_mels": N_MELS,
              "n_fft": N_FFT, "hop_length": HOP, "sampling_rate": SAMPLING_RATE,
              "source": "resemblyzer 0.1.4 pretrained.pt (Apache-2.0)"}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
