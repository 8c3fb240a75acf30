"""Streaming PCA for the label-free fusion projection.

Feature rows arrive batch by batch; only their sum and X^T X (float64) are kept, so memory is
O(D^2) whatever the amount of audio. The projection keeps the top-k principal directions and a
bias that centres the projected features.

The rows are a concatenation of N upstream blocks (widths `dims`). Plain PCA keeps the directions
of largest variance, so an upstream whose variance is small, or spread over many directions, can
lose most of itself to another. `balance` changes that:
- "equal_variance": each block is scaled to the same total variance before PCA (the scale is
  folded into the projection weight, so the projection stays one Linear over the concatenation);
- "split": each upstream gets its own PCA with an equal share of the k outputs (a block-diagonal
  projection; a share beyond an upstream's width goes to the others).
`retained_variance` says how much of each upstream survives any projection: the share of the
block's variance that the best linear reconstruction from the projected features recovers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["CovarianceAccumulator", "BALANCES", "LOW_RETENTION", "retained_variance", "split_dims"]

BALANCES = ("none", "equal_variance", "split")
LOW_RETENTION = 0.5  # an upstream keeping less of its own variance than this is named in a warning


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

    def principal_projection(
        self, k: int, dims: Sequence[int] | None = None, balance: str = "none"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k principal directions as a Linear's (weight (k, D), bias (k,)), float64.

        dims: the upstream block widths (summing to D), needed by `balance` "equal_variance" |
        "split" (see the module docstring). Each direction's sign is fixed so its
        largest-magnitude coordinate is positive, making the result reproducible across runs and
        machines.
        """
        if k > self.dim:
            raise ValueError(f"PCA: projection_dim {k} exceeds the feature width {self.dim}")
        if self.count < k:
            raise ValueError(f"PCA: saw {self.count} feature rows, need at least projection_dim={k}; give more audio")
        dims = _check_dims(dims, self.dim, balance)
        covariance = self.covariance().cpu()
        if balance == "split":
            weight = torch.zeros(k, self.dim, dtype=torch.float64)
            row = col = 0
            for width, share in zip(dims, split_dims(k, dims)):
                block = covariance[col: col + width, col: col + width]
                weight[row: row + share, col: col + width] = _top_directions(block, share)
                row, col = row + share, col + width
        elif balance == "equal_variance":
            scale = _equal_variance_scale(covariance, dims)
            # PCA of the scaled rows S x; applied to the unscaled rows the projection is W S.
            weight = _top_directions(covariance * scale[:, None] * scale[None, :], k) * scale[None, :]
        else:
            weight = _top_directions(covariance, k)
        return weight, -(weight @ self.mean.cpu())

    def explained_variance_ratio(self, k: int) -> float:
        values = torch.linalg.eigvalsh(self.covariance().cpu())
        return float(values[-k:].sum() / values.sum().clamp(min=1e-300))


def _top_directions(covariance: torch.Tensor, k: int) -> torch.Tensor:
    """(k, D) top-k eigenvectors of a covariance, largest first, signs fixed."""
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    weight = vectors[:, -k:].flip(1).T.contiguous()
    pivots = weight.abs().argmax(dim=1)
    return weight * torch.sign(weight.gather(1, pivots[:, None]))


def _check_dims(dims: Sequence[int] | None, total: int, balance: str) -> list[int]:
    if balance not in BALANCES:
        raise ValueError(f"PCA: balance={balance!r}, expected one of {', '.join(BALANCES)}")
    if dims is None:
        if balance != "none":
            raise ValueError(f"PCA: balance={balance} needs the upstream widths (dims)")
        return [total]
    dims = [int(d) for d in dims]
    if sum(dims) != total or min(dims) < 1:
        raise ValueError(f"PCA: upstream widths {dims} do not add up to the feature width {total}")
    return dims


def _equal_variance_scale(covariance: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """(D,) per-feature factor that gives every block the mean block's total variance."""
    totals = torch.stack([block.sum() for block in torch.split(torch.diagonal(covariance), list(dims))])
    factors = (totals.mean() / totals.clamp(min=1e-12)).sqrt()  # a constant block stays as it is, not inf
    return torch.repeat_interleave(factors, torch.tensor(list(dims)))


def split_dims(k: int, dims: Sequence[int]) -> list[int]:
    """k outputs shared as equally as possible between blocks, none beyond a block's width;
    the first blocks take the remainder."""
    if not 1 <= k <= sum(dims):
        raise ValueError(f"PCA: projection_dim {k} must be in 1..{sum(dims)} to split over widths {list(dims)}")
    shares, left = [0] * len(dims), k
    open_blocks = list(range(len(dims)))
    while left:  # a block at its width drops out and its unused share goes round again
        per, extra = divmod(left, len(open_blocks))
        for rank, i in enumerate(open_blocks):
            take = min(per + (rank < extra), dims[i] - shares[i])
            shares[i] += take
            left -= take
        open_blocks = [i for i in open_blocks if shares[i] < dims[i]]
    return shares


def retained_variance(covariance: torch.Tensor, weight: torch.Tensor, dims: Sequence[int]) -> tuple[list[float], float]:
    """How much of each block a projection z = W x keeps: per block, the share of the block's own
    variance that the best linear reconstruction of x from z recovers; and the same over all of x.

    The reconstruction's covariance is C W^T (W C W^T)^+ W C. For plain PCA this is the explained
    variance ratio (per block and in total); it applies to any projection (balanced, supervised).
    """
    covariance, weight = covariance.double().cpu(), weight.double().cpu()
    cross = covariance @ weight.T  # (D, k) Cov(x, z)
    gain = cross @ torch.linalg.pinv(weight @ cross, hermitian=True)  # (D, k) regression of x on z
    kept = (gain * cross).sum(dim=1)  # diagonal of the reconstruction's covariance
    total = torch.diagonal(covariance)
    per_block = [float(k.sum() / t.sum().clamp(min=1e-300))
                 for k, t in zip(torch.split(kept, list(dims)), torch.split(total, list(dims)))]
    return per_block, float(kept.sum() / total.sum().clamp(min=1e-300))
