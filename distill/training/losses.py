"""Distillation losses: pure functions of (predictions, targets, frame lengths).

DistilHuBERT's per-layer objective, L1 + lambda * mean(-logsigmoid(cos)), averaged over VALID
frames only. The s3prl distiller and DPHuBERT average over padded frames too, which lets the
amount of padding in a batch change the loss; the frame mask here is required.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from teachers import frame_mask

__all__ = ["distill_loss"]


def distill_loss(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    frame_lengths: torch.Tensor,
    cos_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over target layers of masked L1 + cos_weight * masked mean(-logsigmoid(cos)).

    Args:
        predictions: (K, B, T, D) student predictions of the K target layers.
        targets: (K, B, T, D) teacher targets on the same frame grid.
        frame_lengths: (B,) valid frames per item; frames at or beyond it are ignored.
        cos_weight: lambda, the weight of the cosine term (DistilHuBERT uses 1).

    Returns:
        The scalar loss and, per layer k, detached `l1/k`, `cos/k` (mean cosine similarity)
        and `loss/k` for logging.
    """
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} must have the same (K, B, T, D) shape")
    # In fp32 whatever the student ran in: under bf16 autocast the predictions come back bf16,
    # and a bf16 L1/cosine over many frames loses the small differences late training makes.
    predictions, targets = predictions.float(), targets.float()
    mask = frame_mask(frame_lengths.to(predictions.device), predictions.shape[2])
    num_valid = mask.sum().clamp(min=1)

    # (K, B, T): per-frame L1 (mean over features) and cosine similarity.
    l1 = (predictions - targets).abs().mean(dim=-1)
    cos = F.cosine_similarity(predictions, targets, dim=-1)
    l1_layer = (l1 * mask).sum(dim=(1, 2)) / num_valid
    cos_layer = (-F.logsigmoid(cos) * mask).sum(dim=(1, 2)) / num_valid
    per_layer_loss = l1_layer + cos_weight * cos_layer

    parts: dict[str, torch.Tensor] = {}
    mean_cos = (cos * mask).sum(dim=(1, 2)) / num_valid
    for k in range(predictions.shape[0]):
        parts[f"l1/{k}"] = l1_layer[k].detach()
        parts[f"cos/{k}"] = mean_cos[k].detach()
        parts[f"loss/{k}"] = per_layer_loss[k].detach()
    return per_layer_loss.sum(), parts
