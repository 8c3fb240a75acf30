"""What ships inside the package: the recipes (`recipes/*.yaml`) and the demo corpus (`data/demo`).

In a checkout both are plain folders at the repository root. A built wheel carries them as the
data packages `distill.recipes` and `distill.demo_corpus` (pyproject's package-dir maps those
folders in), read here with importlib.resources, so `fusion-distill train demo` runs from any
folder after `pip install fusion-distill`. The checkout's folders win when both exist (an editable
install, or tests run from the repository root).

A recipe names the demo corpus as `data.dataset_name: data/demo`, a path relative to the working
directory. When the working directory has no `data/demo`, the data loader reads the shipped copy
instead (`shipped_dataset`), with one INFO line saying so; a folder of that name in the working
directory always wins.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Optional

__all__ = ["recipes_dir", "recipe_names", "recipe_summary", "shipped_dataset", "SHIPPED_DATASETS"]

logger = logging.getLogger(__name__)

_CHECKOUT = Path(__file__).resolve().parent.parent
# The recipe-relative name a shipped corpus goes by -> (its folder in a checkout, its data package in a wheel).
SHIPPED_DATASETS = {"data/demo": ("data/demo", "distill.demo_corpus")}
_announced: set[str] = set()  # one INFO line per corpus and process


def _folder(checkout_rel: str, package: str) -> Optional[Path]:
    """The checkout's folder when there is one, else the installed data package's folder."""
    local = _CHECKOUT / checkout_rel
    if local.is_dir():
        return local
    # `distill`'s own resources (the data packages have no __init__.py, and files() of a namespace
    # package is no plain folder); a wheel in site-packages is a real folder, a zipped install is not.
    found = resources.files("distill").joinpath(package.split(".", 1)[1])
    return Path(str(found)) if Path(str(found)).is_dir() else None


def recipes_dir() -> Path:
    folder = _folder("recipes", "distill.recipes")
    if folder is None:
        raise FileNotFoundError("no shipped recipes: neither a checkout's recipes/ nor the installed distill.recipes")
    return folder


def recipe_names() -> list[str]:
    """The shipped recipes, by the name `fusion-distill train NAME` takes."""
    try:
        return sorted(path.stem for path in recipes_dir().glob("*.yaml"))
    except FileNotFoundError:
        return []


def recipe_summary(name: str) -> str:
    """The recipe's first comment line (what it is for)."""
    for line in (recipes_dir() / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#") and line.strip("# "):
            return line.lstrip("# ").strip()
    return ""


def shipped_dataset(name: str) -> Optional[Path]:
    """The shipped corpus a recipe's relative `dataset_name` names, when the working directory lacks it."""
    key = str(PurePosixPath(name.replace("\\", "/")))
    if key not in SHIPPED_DATASETS or Path(name).exists():
        return None
    folder = _folder(*SHIPPED_DATASETS[key])
    if folder is not None and key not in _announced:
        _announced.add(key)
        logger.info("%s: not in the working directory; reading the corpus shipped with fusion-distill (%s)", name, folder)
    return folder
