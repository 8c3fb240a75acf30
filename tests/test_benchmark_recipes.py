"""The mini SUPERB benchmark's recipes name no machine's folders: local paths are written relative
to its --out folder, and the committed ones (results/*/recipes) hold no absolute path."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from benchmarks.mini_superb.config import load_config
from benchmarks.mini_superb.recipes import recipe, write_recipe

REPO = Path(__file__).resolve().parent.parent


def test_written_recipes_are_relative_to_the_out_folder(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    body = recipe(load_config(quick=True), cache / "corpus", [cache / "upstreams" / "a", cache / "upstreams" / "b"], out / "runs" / "fused")
    path = write_recipe(body, out / "sweep" / "recipes" / "fused-s.yaml", root=out)
    text = path.read_text()
    assert "cd OUT && fusion-distill train sweep/recipes/fused-s.yaml" in text and str(tmp_path) not in text
    written = OmegaConf.load(path)
    assert list(written.teacher.upstreams) == ["../cache/upstreams/a", "../cache/upstreams/b"]
    assert written.data.dataset_name == "../cache/corpus" and written.training.output_dir == "runs/fused"


def test_committed_recipes_hold_no_absolute_path():
    files = sorted((REPO / "benchmarks/mini_superb/results").glob("*/recipes/**/*.yaml"))
    assert files
    absolute = [f"{f.relative_to(REPO)}:{n}: {line}" for f in files for n, line in enumerate(f.read_text().splitlines(), 1)
                if re.search(r" /[A-Za-z]", line)]
    assert not absolute, absolute[:3]
