"""Upstream adapters: one frozen Hugging Face speech encoder behind one interface.

An `Upstream` takes raw 16 kHz float waveforms and returns every hidden state of the stock
`AutoModel` (`output_hidden_states=True`; index 0 = the pre-transformer features). The adapter
owns feature extraction, so callers never touch processors:

- wav2vec family (WavLM, HuBERT, Wav2Vec2, Data2VecAudio and any model with a wav2vec-style conv
  `feature_extractor`): per-utterance zero-mean/unit-variance normalisation when the model
  expects it. A folder or hub id with a preprocessor config decides via its `do_normalize`;
  otherwise we follow fairseq pre-training: layer-norm conv front-ends (large models,
  Data2VecAudio) were trained on normalised audio, group-norm ones (base models) on raw audio.
- Whisper: the encoder of a `WhisperModel` on log-mel features computed here in torch, padded to
  the fixed window the encoder requires (3000 mel frames = 30 s), trimmed to the true length
  afterwards; longer audio runs as consecutive windows whose outputs are stitched.

Padding reaches a wav2vec-family model only where it cannot change the valid frames
(`padding_invariant`): wav2vec2, HuBERT and WavLM with a layer-norm conv front-end run
utterances of different lengths as one zero-padded batch with `attention_mask`, each output
trimmed to its own frame count (measured on tiny random-init models in float32: every hidden
state within 4e-6 of a run alone). Group-norm front-ends normalise over the whole padded time
axis and Data2VecAudio's stacked positional convs carry padding into valid frames, even with an
attention mask (max diff 1.2-3.3), so for those and for any model type not verified only
equal-length utterances share a batch. Padding is used on accelerators only, where batching pays
(`Wav2VecUpstream.padded_batches`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .align import receptive_field_and_hop
from .base import SAMPLING_RATE, Upstream, UpstreamOutput, resolve_dtype
from .custom import is_custom_spec, load_custom_upstream

__all__ = ["Upstream", "UpstreamOutput", "load_upstream", "padding_invariant", "resolve_dtype", "SAMPLING_RATE"]

_NAMED = ("wavlm", "hubert", "wav2vec2", "data2vec-audio", "whisper")
_SUPPORTED = ", ".join(_NAMED) + " or any wav2vec-style encoder (conv_kernel/conv_stride config)"
# Model types whose encoder zeroes padded frames before ONE positional conv and masks them out of
# attention; with a per-frame (layer-norm) conv front-end nothing else sees the padding.
_PADDING_INVARIANT_TYPES = ("wav2vec2", "hubert", "wavlm")

UpstreamSpec = Union[str, Path, dict]


def padding_invariant(config: Any) -> bool:
    """Whether zero padding with `attention_mask` leaves a wav2vec-style model's valid frames unchanged.

    True for wav2vec2, HuBERT and WavLM with `feat_extract_norm="layer"`: their conv front-end
    and feature projection act frame by frame, and the encoder zeroes padded frames before its
    single positional conv and masks them out of attention (WavLM's relative position bias and
    gated attention included). False for group-norm front-ends, Data2VecAudio (stacked positional
    convs) and every model type not verified.
    """
    return config.model_type in _PADDING_INVARIANT_TYPES and getattr(config, "feat_extract_norm", None) == "layer"


class Wav2VecUpstream(Upstream):
    """WavLM, HuBERT, Wav2Vec2, Data2VecAudio and other conv-front-end encoders.

    `padding_invariant`: whether utterances of different lengths may share a padded batch (see
    module docstring). `padded_batches` decides whether they do: None (default) pads on
    accelerators only. Measured with `benchmarks/teacher_batching.py` (WavLM Base+ geometry, 8
    utterances of 2-10 s, one CPU thread), a padded batch ran at 0.48x the speed of one utterance
    at a time on a CPU, which is compute-bound already at batch 1 and only gains the padding;
    a GPU gains from the batch.
    """

    def __init__(self, model: nn.Module, name: str, do_normalize: bool):
        cfg = model.config
        super().__init__(model, name, cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size)
        self.do_normalize = do_normalize
        self.padding_invariant = padding_invariant(cfg)
        self.padded_batches: bool | None = None
        field, hop = receptive_field_and_hop(list(zip(cfg.conv_kernel, cfg.conv_stride)))
        self.min_samples = field
        self.frame_rate = SAMPLING_RATE / hop

    def num_frames(self, num_samples: int) -> int:
        return int(self.model._get_feat_extract_output_lengths(torch.tensor(int(num_samples))))

    def _encode(self, waves: list[torch.Tensor]) -> list[torch.Tensor]:
        states: list[torch.Tensor] = [torch.empty(0)] * len(waves)
        for indices in self._batches([w.numel() for w in waves]):
            stacked = self._run([self._normalise(waves[i]) for i in indices])  # (L + 1, b, T, D)
            for j, i in enumerate(indices):
                states[i] = stacked[:, j, : self.num_frames(waves[i].numel())]
        return states

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices per forward, longest first: all of them when padding, else equal lengths.

        One padded batch per call: callers bound its size, and `cache-targets` hands over rows of
        similar length, so padding stays small.
        """
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep their order
        if self.pads():
            return [order]
        batches: list[list[int]] = []
        for i in order:
            if batches and lengths[batches[-1][0]] == lengths[i]:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    def pads(self) -> bool:
        """Whether this call's utterances of different lengths share one padded batch."""
        wanted = self.device.type != "cpu" if self.padded_batches is None else self.padded_batches
        return self.padding_invariant and wanted

    def _run(self, waves: list[torch.Tensor]) -> torch.Tensor:
        longest = max(w.numel() for w in waves)
        if all(w.numel() == longest for w in waves):
            batch, kwargs = torch.stack(waves), {}  # nothing padded: no mask needed
        else:
            batch = torch.zeros(len(waves), longest, device=self.device)
            mask = torch.zeros(len(waves), longest, dtype=torch.long, device=self.device)
            for j, w in enumerate(waves):
                batch[j, : w.numel()] = w
                mask[j, : w.numel()] = 1
            # The sample-level mask: the model derives its frame mask from it.
            kwargs = {"attention_mask": mask}
        hidden = self.model(batch.to(self.dtype), output_hidden_states=True, **kwargs).hidden_states
        return torch.stack(hidden)

    def _normalise(self, wave: torch.Tensor) -> torch.Tensor:
        if not self.do_normalize:
            return wave
        # Same statistics as Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm (population variance).
        return (wave - wave.mean()) / torch.sqrt(wave.var(unbiased=False) + 1e-7)


class WhisperUpstream(Upstream):
    """The encoder of a WhisperModel, fed log-mel windows of the fixed length it requires.

    `subtract_silence`: subtract, at every layer and frame, the encoder's hidden states for a
    silent window. Whisper adds absolute sinusoidal positions to its input, so the same audio gives
    other features when it starts later in the window: measured on real tiny.en with speech
    delayed by 1 s of leading silence, the per-layer cosine to the undelayed features was 0.57,
    0.68, 0.88, 0.95, 0.74 (layers 0-4). A student trained on crops never sees where its crop
    began, so that part of the target is noise to it. Minus the silence response the same check
    gives 0.996, 0.984, 0.92, 0.93, 0.91 (layer 0 exactly position-free). Computed once per device.
    """

    def __init__(self, model: nn.Module, name: str, extractor: Any, subtract_silence: bool = False):
        cfg = model.config
        super().__init__(model, name, "whisper", cfg.encoder_layers, cfg.d_model)
        self.hop_length = extractor.hop_length
        self.n_fft = extractor.n_fft
        self.window_frames = 2 * cfg.max_source_positions  # the encoder asserts this mel length
        self.window_samples = self.window_frames * self.hop_length
        self.frame_rate = SAMPLING_RATE / (2 * self.hop_length)
        self.min_samples = self.hop_length  # one mel frame gives one encoder frame
        filters = torch.as_tensor(extractor.mel_filters, dtype=torch.float32)  # (n_freq, n_mels)
        self.register_buffer("mel_filters", filters, persistent=False)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
        self.subtract_silence = subtract_silence
        self._silence: Optional[torch.Tensor] = None  # (L + 1, window_frames // 2, D), lazily

    def num_frames(self, num_samples: int) -> int:
        return sum(self._window_frames(n) for n in self._window_sizes(int(num_samples)))

    def _window_sizes(self, num_samples: int) -> list[int]:
        full, rest = divmod(num_samples, self.window_samples)
        return [self.window_samples] * full + ([rest] if rest else [])

    def _window_frames(self, samples: int) -> int:
        return (samples // self.hop_length + 1) // 2

    def _encode(self, waves: list[torch.Tensor]) -> list[torch.Tensor]:
        # Every window has the same padded length, so all windows of all utterances share a batch.
        pieces, owners, frames = [], [], []
        for i, wave in enumerate(waves):
            for chunk in torch.split(wave, self.window_samples):
                if self._window_frames(chunk.numel()) == 0:
                    continue  # a tail shorter than one hop adds no frame
                pieces.append(nn.functional.pad(chunk, (0, self.window_samples - chunk.numel())))
                owners.append(i)
                frames.append(self._window_frames(chunk.numel()))
        stacked = self._hidden_states(torch.stack(pieces))  # (L + 1, n, T, D)
        if self.subtract_silence:
            stacked = stacked - self._silence_response()[:, None]
        per_wave: list[list[torch.Tensor]] = [[] for _ in waves]
        for j, (owner, n) in enumerate(zip(owners, frames)):
            per_wave[owner].append(stacked[:, j, :n])
        return [torch.cat(parts, dim=1) for parts in per_wave]

    def _hidden_states(self, windows: torch.Tensor) -> torch.Tensor:
        """(n, window_samples) audio -> (L + 1, n, window_frames // 2, D) hidden states."""
        mel = self._log_mel(windows).to(self.dtype)
        return torch.stack(self.model(mel, output_hidden_states=True).hidden_states)

    def _silence_response(self) -> torch.Tensor:
        if self._silence is None or self._silence.device != self.device:
            self._silence = self._hidden_states(torch.zeros(1, self.window_samples, device=self.device))[:, 0]
        return self._silence

    def _log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """(n, window_samples) -> (n, n_mels, window_frames), as WhisperFeatureExtractor computes it."""
        stft = torch.stft(audio, self.n_fft, self.hop_length, window=self.window, return_complex=True)
        power = stft[..., :-1].abs() ** 2  # the extractor drops the last STFT frame
        log_spec = (self.mel_filters.T @ power).clamp(min=1e-10).log10()
        # Dynamic range of 8 (log10) below each window's own peak.
        log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (log_spec + 4.0) / 4.0


def load_upstream(spec: UpstreamSpec, dtype: Union[str, torch.dtype] = torch.float32,
                  subtract_silence: bool = False) -> Upstream:
    """Load a frozen upstream from a hub id, a local folder, `{"config": {model_type, ...}}`, or a
    custom spec (`{"builtin": "ge2e"}`, `{"code": "pkg.mod:factory"}`: see teachers.custom).

    A config spec builds a random-init model under torch seed 0 (for tests and demos).
    subtract_silence: Whisper only (`WhisperUpstream`); other encoders have no absolute positions.
    """
    dtype = resolve_dtype(dtype)
    if is_custom_spec(spec):
        return _cast(load_custom_upstream(spec), dtype)
    if isinstance(spec, (str, Path)) and _folder_model_type(spec) == "ge2e":
        from .ge2e import GE2EUpstream, load_ge2e

        return _cast(GE2EUpstream(load_ge2e(spec), str(spec)), dtype)
    if isinstance(spec, dict):
        model, name, source = _from_config(spec), _config_name(spec), None
    elif isinstance(spec, (str, Path)):
        model, name, source = _from_pretrained(str(spec), dtype), str(spec), str(spec)
    else:
        raise ValueError(f"upstream spec {spec!r}: expected a hub id, a local folder or {{'config': {{...}}}}")
    model = model.to(dtype)
    if model.config.model_type == "whisper":
        return WhisperUpstream(model.get_encoder(), name, _whisper_extractor(model.config, source), subtract_silence)
    if not hasattr(model, "feature_extractor") or not hasattr(model, "_get_feat_extract_output_lengths"):
        raise ValueError(f"upstream {name}: {type(model).__name__} has no conv feature_extractor; supported: {_SUPPORTED}")
    return Wav2VecUpstream(model, name, _wants_normalised(model.config, source))


def _cast(upstream: Upstream, dtype: torch.dtype) -> Upstream:
    upstream.model.to(dtype)
    return upstream


def _folder_model_type(spec: Union[str, Path]) -> Optional[str]:
    """model_type of a local folder's config.json, without transformers (which refuses unknown types)."""
    import json

    path = Path(spec) / "config.json"
    try:
        return json.loads(path.read_text()).get("model_type") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def _config_name(spec: dict) -> str:
    return f"{spec.get('config', {}).get('model_type', '?')}(random-init)"


def _from_config(spec: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    kwargs = dict(spec.get("config") or {})
    model_type = kwargs.pop("model_type", None)
    if not model_type:
        raise ValueError(f"upstream spec {spec!r}: expected {{'config': {{'model_type': ..., ...}}}}")
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, KeyError) as err:
        raise ValueError(f"upstream {model_type}(random-init): unknown model_type; supported: {_SUPPORTED}") from err
    _check_supported(config, _config_name(spec))
    _no_layerdrop(config)
    # A fixed seed makes the same spec give the same model in every process (targets, hashes).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModel.from_config(config)


def _from_pretrained(source: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        if Path(source).is_dir():
            raise ValueError(f"upstream {source}: folder has no usable config.json ({type(err).__name__})") from None
        raise OSError(
            f"upstream {source}: not a local folder and the hub is offline or unreachable; "
            "download the model and point the spec at its local folder"
        ) from None
    _check_supported(config, source)
    _no_layerdrop(config)
    try:
        return AutoModel.from_pretrained(source, config=config, dtype=dtype)
    except OSError:
        if Path(source).is_dir():
            raise ValueError(f"upstream {source}: folder has no model weights (model.safetensors)") from None
        raise OSError(f"upstream {source}: weights not cached locally and the hub is offline or unreachable") from None


def _check_supported(config: Any, name: str) -> None:
    model_type = getattr(config, "model_type", None)
    wav2vec_style = hasattr(config, "conv_kernel") and hasattr(config, "conv_stride")
    if model_type not in _NAMED and not wav2vec_style:
        raise ValueError(f"upstream {name}: model_type {model_type!r} is not supported; supported: {_SUPPORTED}")


def _no_layerdrop(config: Any) -> None:
    # Layerdrop only acts in training mode, but a saved config should not claim it either.
    for key in ("layerdrop", "encoder_layerdrop"):
        if hasattr(config, key):
            setattr(config, key, 0.0)


def _load_extractor(source: str | None) -> Any:
    if source is None:
        return None
    from transformers import AutoFeatureExtractor

    try:
        return AutoFeatureExtractor.from_pretrained(source)
    except (OSError, ValueError, KeyError):
        return None  # no preprocessor config: fall back to the defaults below


def _wants_normalised(config: Any, source: str | None) -> bool:
    extractor = _load_extractor(source)
    if extractor is not None and hasattr(extractor, "do_normalize"):
        return bool(extractor.do_normalize)
    # Data2VecAudio has no feat_extract_norm: its conv front-end is always layer-normed.
    return getattr(config, "feat_extract_norm", "layer") == "layer"


def _whisper_extractor(config: Any, source: str | None) -> Any:
    from transformers import WhisperFeatureExtractor

    extractor = _load_extractor(source)
    if isinstance(extractor, WhisperFeatureExtractor):
        return extractor
    return WhisperFeatureExtractor(feature_size=config.num_mel_bins)
