"""File hashing shared by checkpoints (distill/training/checkpoint.py) and target caches
(distill/cache/): one sha256 over the file's bytes, read in 4 MiB blocks."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

__all__ = ["sha256_file"]

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
