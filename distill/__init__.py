"""Distillation stages: recipe -> config, data, losses, Accelerate trainer, export, CLI."""

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
