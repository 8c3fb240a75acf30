"""Distillation stages, one package each: data/ (audio, sources, batches), cache/ (the target cache),
training/ (the Accelerate loop, checkpoints, faults, validation), evaluation/ (similarity, probes,
cost), runs/ (everything about a run folder: layout, lock, staged export, log trimming); at the
top the recipe (config.py), builders, export, fit_teacher, inspect, the CLI, and shipped.py (the
recipes and demo corpus inside the package)."""

from .config import RecipeConfig, RecipeError, load_recipe

__version__ = "0.1.0"  # the distribution's version (pyproject.toml reads it from here)

__all__ = ["__version__", "RecipeConfig", "RecipeError", "load_recipe", "train", "export_run"]


def __getattr__(name: str):
    # The trainer pulls in Accelerate, transformers and both model packages; import it on use so
    # `fusion-distill --help` and recipe validation stay fast.
    if name == "train":
        from .training.loop import train

        return train
    if name == "export_run":
        from .export import export_run

        return export_run
    raise AttributeError(name)
