"""Audio without torchcodec: decode with soundfile, resample with soxr, assemble padding-free crops.

datasets 5.x decodes `Audio` columns with torchcodec + FFmpeg, and the PyPI torchcodec does not
import on CPU-only torch. So datasets only ever hands us `{"path", "bytes"}` (`Audio(decode=False)`)
and everything here works from that: mono, 16 kHz, float32. Nothing in this module knows about
`datasets`; distill/data/sources.py does the loading and distill/data/loader.py the batching.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import soundfile as sf
import soxr
import torch

from teachers.align import WAV2VEC_HOP, WAV2VEC_RECEPTIVE_FIELD

__all__ = [
    "HOP",
    "RECEPTIVE_FIELD",
    "BadAudio",
    "SkipCounter",
    "audio_duration",
    "header_durations",
    "decode_audio",
    "crop_length",
    "crop_batch",
]

# The wav2vec-style conv front-end: one frame every HOP (320) samples, each seeing RECEPTIVE_FIELD
# (400) samples, so n frames need 320 n + 80 samples.
HOP, RECEPTIVE_FIELD = WAV2VEC_HOP, WAV2VEC_RECEPTIVE_FIELD

AudioRef = Union[str, Path, Mapping[str, Any]]

# What libsndfile and its wrapper raise on unreadable input; anything else is a bug of ours.
_READ_ERRORS = (sf.SoundFileError, RuntimeError, ValueError, EOFError, OSError)


class BadAudio(ValueError):
    """An utterance that cannot be used. `reason` is a short token for skip counts."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class SkipCounter:
    """Per-reason counts of skipped utterances, e.g. summed over the `skipped` dicts of batches."""

    def __init__(self, counts: Optional[Mapping[str, int]] = None) -> None:
        self._counts: Counter[str] = Counter()
        self.add(counts or {})

    def add(self, skipped: Union[Mapping[str, int], str], n: int = 1) -> None:
        """Add a batch's `skipped` dict, or `n` utterances skipped for one reason."""
        items = skipped.items() if isinstance(skipped, Mapping) else [(skipped, n)]
        for reason, count in items:
            if count:
                self._counts[reason] += int(count)

    @property
    def counts(self) -> dict[str, int]:
        """A plain sorted dict: JSON-able and safe to keep in checkpoint state."""
        return dict(sorted(self._counts.items()))

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def summary(self) -> str:
        """One line: 'skipped 3 utterances: corrupt=1 too_short=2'."""
        noun = "utterance" if self.total == 1 else "utterances"
        parts = " ".join(f"{reason}={n}" for reason, n in self.counts.items())
        return f"skipped {self.total} {noun}" + (f": {parts}" if parts else "")


def _open_source(audio: AudioRef) -> tuple[Any, str]:
    """A path or BytesIO for soundfile, plus a name for messages; raises missing / empty."""
    if isinstance(audio, Mapping):
        data, path = audio.get("bytes"), audio.get("path")
        if data is not None:  # embedded bytes win: hub parquet "paths" are often bare names
            if len(data) == 0:
                raise BadAudio("empty", str(path or "<bytes>"))
            return io.BytesIO(data), str(path or "<bytes>")
        if not path:
            raise BadAudio("missing", "neither bytes nor path")
        audio = path
    path = Path(audio)
    if not path.is_file():
        raise BadAudio("missing", str(path))
    if path.stat().st_size == 0:
        raise BadAudio("empty", str(path))
    return str(path), str(path)


def audio_duration(audio: AudioRef) -> float:
    """Seconds, from the file header only (cheap); raises BadAudio like decode_audio."""
    source, name = _open_source(audio)
    try:
        info = sf.info(source)
    except _READ_ERRORS as err:
        raise BadAudio("corrupt", f"{name}: {_first_line(err)}") from None
    if info.samplerate <= 0:
        raise BadAudio("corrupt", f"{name}: sample rate {info.samplerate}")
    return info.frames / info.samplerate


def header_durations(audios: list[AudioRef]) -> dict[str, list]:
    """{"duration": seconds, "unreadable": BadAudio reason or ""} per item, from headers only
    (unreadable items get duration 0). Shaped for a batched `datasets.map`."""
    durations, unreadable = [], []
    for audio in audios:
        try:
            durations.append(audio_duration(audio))
            unreadable.append("")
        except BadAudio as err:
            durations.append(0.0)
            unreadable.append(err.reason)
    return {"duration": durations, "unreadable": unreadable}


def decode_audio(audio: AudioRef, sampling_rate: int = 16000) -> np.ndarray:
    """Decode `{"path", "bytes"}` or a path to mono float32 at `sampling_rate`.

    Channels are averaged; other rates go through soxr (HQ). Raises `BadAudio` with reason
    missing | empty | corrupt | non_finite. Whether an item is too short is the caller's call.
    """
    source, name = _open_source(audio)
    try:
        data, rate = sf.read(source, dtype="float32", always_2d=True)
    except _READ_ERRORS as err:
        raise BadAudio("corrupt", f"{name}: {_first_line(err)}") from None
    if data.shape[0] == 0:
        raise BadAudio("empty", f"{name}: no samples")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    # Check before resampling: soxr would smear one NaN over its whole filter length.
    if not np.isfinite(mono).all():
        raise BadAudio("non_finite", f"{name}: NaN or inf samples")
    if rate != sampling_rate:
        mono = soxr.resample(mono, rate, sampling_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def crop_length(max_samples: int) -> int:
    """Largest 320 n + 80 <= max_samples (n >= 1): a crop of exactly n wav2vec frames."""
    n = (int(max_samples) - (RECEPTIVE_FIELD - HOP)) // HOP
    if n < 1:
        raise ValueError(f"{max_samples} samples is shorter than one frame ({RECEPTIVE_FIELD} samples)")
    return HOP * n + RECEPTIVE_FIELD - HOP


def crop_batch(ids: list[str], waves: list[np.ndarray], rng: np.random.Generator, max_crop: int, skipped: dict) -> dict:
    """Crop every wave to ONE frame-aligned length, no padding; starts are random multiples of HOP.

    Frame j of a crop starting at sample s covers samples [s + 320 j, s + 320 j + 400), so a
    cached target frame s / 320 + j lines up with it. Every wave must hold >= 400 samples.
    """
    if not waves:  # the whole batch was unusable: B = 0, the skip counts still travel
        none = torch.zeros(0, dtype=torch.long)
        return {"waveforms": torch.zeros(0, 0), "lengths": none, "ids": [], "starts": none.clone(), "skipped": skipped}
    crop = crop_length(min(max_crop, min(len(wave) for wave in waves)))
    starts = [HOP * int(rng.integers(0, (len(wave) - crop) // HOP + 1)) for wave in waves]
    return {
        "waveforms": torch.from_numpy(np.stack([wave[s : s + crop] for wave, s in zip(waves, starts)])),
        "lengths": torch.full((len(waves),), crop, dtype=torch.long),
        "ids": list(ids),
        "starts": torch.tensor(starts, dtype=torch.long),
        "skipped": skipped,
    }


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
