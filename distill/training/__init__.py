"""Stage train: the Accelerate loop (loop.py), losses, crash-safe checkpoints, faults, and the
held-out evaluation while training (validation.py).

Names are imported on use: the loop pulls in Accelerate, transformers and both model packages,
and export (which the loop calls at the end) reads checkpoints from here.
"""

from importlib import import_module

__all__ = ["train", "TrainState", "loss_step", "distill_loss"]

_HOME = {"train": "loop", "TrainState": "loop", "loss_step": "loop", "distill_loss": "losses"}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
