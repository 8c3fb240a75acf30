"""Streaming PCA for the label-free fusion projection.

Feature rows arrive batch by batch; only their sum and X^T X (float64) are kept, so memory is
O(D^2) whatever the amount of audio. The projection keeps the top-k principal directions and a
bias that centres the projected features.
"""

from __future__ import annotations

import torch

__all__ = ["CovarianceAccumulator"]


class CovarianceAccumulator:
    """Running first and second moments of D-dimensional rows."""

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, rows: torch.Tensor) -> None:
        """rows: (N, D), any float dtype; accumulated in float64 on the rows' device."""
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"CovarianceAccumulator: got rows of shape {tuple(rows.shape)}, expected (N, {self.dim})")
        # Summing where the features are avoids copying every batch to the host.
        self.total, self.gram = self.total.to(rows.device), self.gram.to(rows.device)
        rows = rows.detach().to(torch.float64)
        self.count += rows.shape[0]
        self.total += rows.sum(dim=0)
        self.gram += rows.T @ rows

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        mean = self.mean
        return self.gram / self.count - torch.outer(mean, mean)

    def principal_projection(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k principal directions as a Linear's (weight (k, D), bias (k,)), float64.

        Each direction's sign is fixed so its largest-magnitude coordinate is positive, making
        the result reproducible across runs and machines.
        """
        if k > self.dim:
            raise ValueError(f"PCA: projection_dim {k} exceeds the feature width {self.dim}")
        if self.count < k:
            raise ValueError(f"PCA: saw {self.count} feature rows, need at least projection_dim={k}; give more audio")
        _, vectors = torch.linalg.eigh(self.covariance().cpu())  # ascending eigenvalues
        weight = vectors[:, -k:].flip(1).T.contiguous()
        pivots = weight.abs().argmax(dim=1)
        signs = torch.sign(weight.gather(1, pivots[:, None]))
        weight = weight * signs
        return weight, -(weight @ self.mean.cpu())

    def explained_variance_ratio(self, k: int) -> float:
        values = torch.linalg.eigvalsh(self.covariance().cpu())
        return float(values[-k:].sum() / values.sum().clamp(min=1e-300))
