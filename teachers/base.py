"""The upstream interface every teacher member implements, transformers model or not.

`Upstream` is what `teachers.upstream` (transformers encoders), `teachers.ge2e` and a user's own
encoder (`teachers.custom`) subclass; it lives apart from the loaders so that those modules and
the loaders do not import each other.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

__all__ = ["SAMPLING_RATE", "Upstream", "UpstreamOutput", "resolve_dtype"]

SAMPLING_RATE = 16000
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class UpstreamOutput:
    """Hidden states of one upstream for a batch.

    hidden_states: (L + 1, B, T, D) float32; layer 0 is the pre-transformer features;
        frames at and beyond `lengths[b]` are zeros.
    lengths: (B,) int64 valid frames per utterance.
    """

    hidden_states: torch.Tensor
    lengths: torch.Tensor


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """float32 or bfloat16 (given as a torch dtype or a name); float16 is refused."""
    if dtype in (torch.float16, "float16", "fp16", "half"):
        raise ValueError("dtype float16 is refused: large-norm teachers overflow in fp16; use float32 or bfloat16")
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    if dtype in (torch.float32, torch.bfloat16):
        return dtype
    raise ValueError(f"dtype {dtype!r} is not supported; expected float32 or bfloat16")


class Upstream(nn.Module, abc.ABC):
    """A frozen speech encoder: `forward(list of 1-D waveforms) -> UpstreamOutput`.

    `num_layers` counts transformer layers (hidden states have num_layers + 1), `frame_rate` is
    frames per second, `min_samples` the receptive field (shorter audio is refused).
    """

    def __init__(self, model: nn.Module, name: str, model_type: str, num_layers: int, hidden_size: int):
        super().__init__()
        self.model = model
        self.name = name
        self.model_type = model_type
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        _freeze(self.model)

    frame_rate: float
    min_samples: int

    @abc.abstractmethod
    def num_frames(self, num_samples: int) -> int:
        """Valid output frames for an utterance of `num_samples` samples."""

    @abc.abstractmethod
    def _encode(self, waves: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per utterance, hidden states (L + 1, T, D) in the model dtype."""

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> "Upstream":
        # A teacher never trains: dropout, layerdrop and SpecAugment stay off whatever the caller does.
        super().train(False)
        return self

    def forward(self, waveforms: list[torch.Tensor]) -> UpstreamOutput:
        waves = [self._check_wave(w, i) for i, w in enumerate(waveforms)]
        if not waves:
            raise ValueError(f"upstream {self.name}: got an empty batch, expected at least one waveform")
        with torch.inference_mode():
            states = self._encode(waves)
        # Filling a fresh tensor outside inference mode gives ordinary tensors that autograd may
        # save (a supervised fusion fit backpropagates through ops on these features).
        if states[0].shape[0] != self.num_layers + 1:
            raise ValueError(f"upstream {self.name}: model returned {states[0].shape[0]} hidden states, expected {self.num_layers + 1}")
        lengths = torch.tensor([s.shape[1] for s in states], dtype=torch.long)
        out = torch.zeros(self.num_layers + 1, len(states), int(lengths.max()), self.hidden_size, device=self.device)
        for b, s in enumerate(states):
            out[:, b, : s.shape[1]] = s.float()
        return UpstreamOutput(hidden_states=out, lengths=lengths)

    def _check_wave(self, wave: torch.Tensor, index: int) -> torch.Tensor:
        if not torch.is_tensor(wave) or wave.dim() != 1 or not wave.is_floating_point():
            what = f"{tuple(wave.shape)} {wave.dtype}" if torch.is_tensor(wave) else type(wave).__name__
            raise ValueError(f"upstream {self.name}: waveform {index} is {what}, expected a 1-D float tensor")
        if wave.numel() < self.min_samples:
            raise ValueError(
                f"upstream {self.name}: waveform {index} has {wave.numel()} samples, "
                f"fewer than the minimum {self.min_samples} ({1000 * self.min_samples / SAMPLING_RATE:.0f} ms)"
            )
        return wave.to(self.device, torch.float32)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layers={self.num_layers}, hidden={self.hidden_size}, frame_rate={self.frame_rate}"


def _freeze(model: nn.Module) -> None:
    model.eval()
    model.requires_grad_(False)
