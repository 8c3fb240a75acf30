"""Hashing: files, shared by checkpoints (distill/training/checkpoint.py) and target caches
(distill/cache/), read in 4 MiB blocks; and a model's weights (the trainer's DDP sync check)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch

__all__ = ["sha256_file", "weights_digest"]

_BLOCK = 1 << 22


def sha256_file(path: str | Path, progress: Optional[Any] = None) -> str:
    """Hex sha256 of a file; `progress` (a tqdm bar counting bytes) is advanced as it reads."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
            if progress is not None:
                progress.update(len(block))
    return digest.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """First 16 hex digits of a sha256 over the state dict's names and float32 values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
