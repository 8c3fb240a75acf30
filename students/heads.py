"""Prediction heads that map student hidden states onto the teacher's target layers.

They live beside the encoder (never inside it) and are dropped at export.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["HEAD_MODES", "PredictionHeads"]

HEAD_MODES = ("predict", "layer_to_layer")


class PredictionHeads(nn.Module):
    """K heads, one per target layer.

    Modes:
        predict (DistilHuBERT): target k = MLP_k(last student hidden state), with
            MLP = Linear(hidden_size, inner_dim) -> GELU -> Linear(inner_dim, target_dim).
        layer_to_layer (FitHuBERT / DPHuBERT): target k = Linear_k(hidden_states[student_layers[k]]),
            where hidden-state index 0 is the pre-transformer features and i the output of layer i.

    Args:
        hidden_size: student width H.
        target_dim: teacher target width D.
        num_targets: number of target layers K.
        mode: "predict" or "layer_to_layer".
        student_layers: layer_to_layer only, K hidden-state indices (ascending not required).
        inner_dim: predict only, MLP width (default: hidden_size).
    """

    def __init__(
        self,
        hidden_size: int,
        target_dim: int,
        num_targets: int,
        mode: str = "predict",
        student_layers: Sequence[int] | None = None,
        inner_dim: int | None = None,
    ) -> None:
        super().__init__()
        _check_args(mode, num_targets, student_layers, inner_dim)
        self.mode = mode
        self.num_targets = num_targets
        self.student_layers = list(student_layers) if student_layers is not None else None
        if mode == "predict":
            inner_dim = inner_dim or hidden_size
            self.heads = nn.ModuleList(
                nn.Sequential(nn.Linear(hidden_size, inner_dim), nn.GELU(), nn.Linear(inner_dim, target_dim))
                for _ in range(num_targets)
            )
        else:
            self.heads = nn.ModuleList(nn.Linear(hidden_size, target_dim) for _ in range(num_targets))

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """hidden_states: the encoder's L+1 tensors of shape (B, T, H). Returns (K, B, T, D)."""
        if self.mode == "predict":
            last = hidden_states[-1]
            return torch.stack([head(last) for head in self.heads])
        too_deep = [i for i in self.student_layers if i >= len(hidden_states)]
        if too_deep:
            raise ValueError(
                f"student_layers {too_deep} out of range: the student has {len(hidden_states)} hidden states (0..{len(hidden_states) - 1})"
            )
        return torch.stack([head(hidden_states[i]) for head, i in zip(self.heads, self.student_layers)])

    def extra_repr(self) -> str:
        return f"mode={self.mode}, num_targets={self.num_targets}, student_layers={self.student_layers}"


def _check_args(mode: str, num_targets: int, student_layers: Sequence[int] | None, inner_dim: int | None) -> None:
    if mode not in HEAD_MODES:
        raise ValueError(f"student.head_mode={mode!r}: expected one of {', '.join(HEAD_MODES)}")
    if num_targets < 1:
        raise ValueError(f"num_targets={num_targets}: expected at least one target layer")
    if mode == "predict":
        if student_layers is not None:
            raise ValueError("student.student_layers is only used with head_mode=layer_to_layer")
        return
    if inner_dim is not None:
        raise ValueError("inner_dim is only used with head_mode=predict")
    if student_layers is None:
        raise ValueError("head_mode=layer_to_layer needs student.student_layers (one hidden-state index per target)")
    if len(student_layers) != num_targets:
        raise ValueError(f"student.student_layers has {len(student_layers)} entries, expected {num_targets} (one per target layer)")
    if any(int(i) != i or i < 0 for i in student_layers):
        raise ValueError(f"student.student_layers={list(student_layers)}: expected non-negative hidden-state indices")
