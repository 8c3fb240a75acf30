"""Layer-fusion interfaces: modules over stacked hidden states (L, B, T, D) -> (B, T, D_out).

Every interface treats frames independently, so padded frames never affect valid ones.

- WeightedSum: softmax over zero-initialised per-layer weights (SUPERB).
- HConv (Shih & Harwath, Interspeech 2024): per frame, a stack of Conv1d over the LAYER axis
  with D channels (kernel 5, stride 3, padding 2), ReLU after each; depth floor(log_3 L); the
  last conv maps D -> D // L_final channels; output is flattened channel-major to
  (D // L_final) * L_final. 13 x 768 -> layers 13, 5, 2 -> output 768.
- CHConv: concatenate models on features, one Linear(sum D_i -> D_f) applied to every layer, HConv.
- AddHConv: elementwise sum of models (each projected to D_f first when widths differ), HConv.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["WeightedSum", "HConv", "CHConv", "AddHConv", "hconv_layer_counts"]

Stacked = Union[torch.Tensor, Sequence[torch.Tensor]]


class WeightedSum(nn.Module):
    """Softmax-weighted sum over layers; starts as the plain layer average."""

    def __init__(self, num_layers: int, dim: Optional[int] = None):
        super().__init__()
        self.num_layers = num_layers
        self.output_dim = dim  # the width is preserved; None when the caller did not say it
        self.weights = nn.Parameter(torch.zeros(num_layers))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        _check_layers(self, hidden, self.num_layers)
        weights = torch.softmax(self.weights, dim=0).to(hidden.dtype)
        return torch.einsum("l,lbtd->btd", weights, hidden)


def hconv_layer_counts(num_layers: int, kernel_size: int = 5, stride: int = 3) -> list[int]:
    """Layer counts after each HConv conv, starting with the input: 13 -> [13, 5, 2]."""
    # Depth is floor(log_stride L), counted in integers: the float log misfires on exact
    # powers (log(243) / log(3) = 4.999...).
    depth, power = 0, stride
    while power <= num_layers:
        depth, power = depth + 1, power * stride
    counts, padding = [num_layers], kernel_size // 2
    for _ in range(depth):
        counts.append((counts[-1] + 2 * padding - kernel_size) // stride + 1)
    return counts


class HConv(nn.Module):
    """Hierarchical convolution over the layer axis, shared by all frames."""

    def __init__(self, num_layers: int, dim: int, kernel_size: int = 5, stride: int = 3):
        super().__init__()
        counts = hconv_layer_counts(num_layers, kernel_size, stride)
        if len(counts) < 2:
            raise ValueError(f"HConv: needs at least {stride} layers (stride {stride}), got {num_layers}")
        self.num_layers, self.dim, self.layer_counts = num_layers, dim, counts
        final_channels = dim // counts[-1]
        channels = [dim] * (len(counts) - 2) + [final_channels]  # one conv per step, the last narrows
        self.convs = nn.ModuleList(
            nn.Conv1d(dim, out, kernel_size, stride=stride, padding=kernel_size // 2) for out in channels
        )
        self.output_dim = final_channels * counts[-1]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        _check_layers(self, hidden, self.num_layers)
        layers, batch, frames, dim = hidden.shape
        x = hidden.permute(1, 2, 3, 0).reshape(batch * frames, dim, layers)  # frames become the batch
        for conv in self.convs:
            x = torch.relu(conv(x))
        return x.reshape(batch, frames, self.output_dim)  # channel-major flatten of (C, L_final)


class CHConv(nn.Module):
    """Concatenate models on features, project every layer with one Linear, then HConv."""

    def __init__(self, num_layers: int, in_dims: Sequence[int], proj_dim: int, kernel_size: int = 5, stride: int = 3):
        super().__init__()
        self.in_dims = list(in_dims)
        self.projection = nn.Linear(sum(self.in_dims), proj_dim)
        self.hconv = HConv(num_layers, proj_dim, kernel_size, stride)
        self.output_dim = self.hconv.output_dim

    def forward(self, hidden: Stacked) -> torch.Tensor:
        """hidden: a list of (L, B, T, D_i), or their concatenation (L, B, T, sum D_i)."""
        concat = hidden if torch.is_tensor(hidden) else torch.cat(list(hidden), dim=-1)
        if concat.shape[-1] != self.projection.in_features:
            raise ValueError(f"CHConv: got width {concat.shape[-1]}, expected sum of {self.in_dims}")
        return self.hconv(self.projection(concat))


class AddHConv(nn.Module):
    """Sum models elementwise (projecting each to proj_dim when widths differ), then HConv."""

    def __init__(
        self, num_layers: int, in_dims: Sequence[int], proj_dim: Optional[int] = None, kernel_size: int = 5, stride: int = 3
    ):
        super().__init__()
        self.in_dims = list(in_dims)
        needs_projection = proj_dim is not None or len(set(self.in_dims)) > 1
        if needs_projection and proj_dim is None:
            raise ValueError(f"AddHConv: widths {self.in_dims} differ, give proj_dim to project them to one width")
        width = proj_dim if needs_projection else self.in_dims[0]
        self.projections = nn.ModuleList(nn.Linear(d, width) for d in self.in_dims) if needs_projection else None
        self.hconv = HConv(num_layers, width, kernel_size, stride)
        self.output_dim = self.hconv.output_dim

    def forward(self, hidden: Stacked) -> torch.Tensor:
        """hidden: a list of (L, B, T, D_i), or their concatenation (L, B, T, sum D_i)."""
        if torch.is_tensor(hidden) and hidden.shape[-1] == sum(self.in_dims):
            hidden = torch.split(hidden, self.in_dims, dim=-1)
        parts = [hidden] if torch.is_tensor(hidden) else list(hidden)
        if [p.shape[-1] for p in parts] != self.in_dims:
            raise ValueError(f"AddHConv: got widths {[p.shape[-1] for p in parts]}, expected {self.in_dims}")
        if self.projections is not None:
            parts = [proj(p) for proj, p in zip(self.projections, parts)]
        return self.hconv(torch.stack(parts).sum(dim=0))


def _check_layers(module: nn.Module, hidden: torch.Tensor, num_layers: int) -> None:
    if hidden.dim() != 4 or hidden.shape[0] != num_layers:
        raise ValueError(
            f"{type(module).__name__}: got shape {tuple(hidden.shape)}, expected (L={num_layers}, B, T, D)"
        )
