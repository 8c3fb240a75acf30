"""Distillation stages, one package each: data/ (audio, sources, batches), cache/ (the target cache),
training/ (the Accelerate loop, checkpoints, faults, validation), evaluation/ (similarity, probes,
cost); at the top the recipe (config.py), builders, export, fit_teacher, inspect, the CLI, and
runs.py, the one place that knows a run folder's layout."""

from .config import RecipeConfig, RecipeError, load_recipe

__all__ = ["RecipeConfig", "RecipeError", "load_recipe", "train", "export_run"]


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
