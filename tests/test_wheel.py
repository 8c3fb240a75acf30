"""Installed like a library: build the sdist and the wheel, check their metadata, install the wheel
into a scratch venv and run the quick start from an empty folder, as a new user would.

The scratch venv sees the test venv's packages through a .pth line (torch and the rest are not
installed twice, and nothing is downloaded), but not the checkout: it runs with no PYTHONPATH
from an empty folder, and the test asserts that `distill` is imported from the installed wheel.
The .pth adds a plain path, so the test venv's editable install (its own .pth) is not processed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO = ["training.max_steps=3", "training.save_steps=3", "training.eval_steps=null", "teacher.pca_max_utterances=8",
        "data.max_crop_seconds=1.0", "training.report_to=none"]


def _run(cmd: list, cwd: Path, timeout: int = 600, scratch: bool = True) -> subprocess.CompletedProcess:
    """scratch: as a new user's shell would (no PYTHONPATH, no active venv)."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") if scratch else ()
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> Path:
    """sdist and wheel, the wheel built from the sdist (so the sdist must carry the data too)."""
    if importlib.util.find_spec("build.__main__") is None:  # not a stray ./build folder of an earlier `pip wheel .`
        pytest.skip("python -m build is not installed: pip install -e '.[test]' (build, twine)")
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the test venv's setuptools (test extra), nothing downloaded.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, REPO], cwd=out, scratch=False)
    return out


@pytest.mark.slow
def test_the_sdist_and_wheel_carry_the_recipes_and_the_demo_corpus_and_pass_twine_check(dists):
    pytest.importorskip("twine", reason="pip install -e '.[test]' (build, twine)")
    (wheel,), (sdist,) = dists.glob("*.whl"), dists.glob("*.tar.gz")
    names = zipfile.ZipFile(wheel).namelist()
    shipped_recipes = sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))
    assert sorted(Path(n).name for n in names if n.startswith("distill/recipes/")) == shipped_recipes
    corpus = [n for n in names if n.startswith("distill/demo_corpus/")]
    assert "distill/demo_corpus/metadata.csv" in corpus
    assert len([n for n in corpus if n.endswith(".flac")]) == len(list((REPO / "data/demo/audio").glob("*.flac")))
    result = _run([sys.executable, "-m", "twine", "check", "--strict", wheel, sdist], cwd=dists, scratch=False)
    assert result.stdout.count("PASSED") == 2, result.stdout


@pytest.mark.slow
def test_the_demo_runs_from_an_empty_folder_after_a_wheel_install(dists, tmp_path):
    (wheel,) = dists.glob("*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).stdout.strip())
    (site / "_test_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co, not installed twice
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp_path)

    empty = tmp_path / "empty"
    empty.mkdir()
    where = _run([python, "-c", "import distill; print(distill.__file__)"], cwd=empty).stdout.strip()
    assert where.startswith(str(site)), where  # the wheel's copy, not the checkout
    cli = venv / "bin" / "fusion-distill"
    assert _run([cli, "--version"], cwd=empty).stdout.startswith("fusion-distill ")
    assert "demo" in _run([cli, "recipes"], cwd=empty).stdout
    _run([cli, "recipes", "cp", "demo", "my_recipe.yaml"], cwd=empty)
    assert "dataset_name: data/demo" in (empty / "my_recipe.yaml").read_text()

    result = _run([cli, "train", "demo", "--output-dir", "run", *DEMO], cwd=empty)
    assert "reading the corpus shipped with fusion-distill" in result.stderr
    assert (empty / "run" / "student" / "config.json").is_file() and (empty / "run" / "checkpoint-3").is_dir()
    assert sorted(p.name for p in empty.iterdir()) == ["my_recipe.yaml", "run"]  # nothing written beside the run
