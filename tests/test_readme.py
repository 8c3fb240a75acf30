"""The README's Python blocks run as written, on the demo data, with fewer steps.

Every ```python block of README.md is executed in order in one namespace, in a scratch folder
that sees the repository's data/ (the demo recipe reads data/demo relative to the working
directory). Only the step counts are shrunk, by exact text substitutions that must each match
once, so a README edit that drops them fails here instead of silently training for minutes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
# README text -> what the test runs instead: same calls, fewer steps, no TensorBoard.
SHRINK = {
    '"training.max_steps=60"': '"training.max_steps=4", "training.eval_steps=2", "training.save_steps=2", '
                               '"teacher.pca_max_utterances=8", "data.max_crop_seconds=1.0", "training.report_to=none"',
    "steps=200)": "steps=5)",
}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_python_blocks_are_found():
    blocks = python_blocks("intro\n```python\na = 1\n```\ntext\n```bash\nls\n```\n```python\nb = a + 1\n```\n")
    assert blocks == ["a = 1\n", "b = a + 1\n"]


def test_readme_python_api_runs_on_the_demo_data(tmp_path, monkeypatch, capsys):
    code = "\n".join(python_blocks(README.read_text()))
    assert "from distill import" in code and "train(cfg)" in code, "the README lost its Python API block"
    for old, new in SHRINK.items():
        assert code.count(old) == 1, f"README: expected {old!r} once, found {code.count(old)} times"
        code = code.replace(old, new)
    (tmp_path / "data").symlink_to(REPO / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), namespace)

    # What the README promises about the objects it makes.
    student_dir = Path(namespace["student_dir"])
    assert student_dir == Path("runs/api/student") and (student_dir / "config.json").is_file()
    assert type(namespace["model"]).__name__ == "HubertModel"
    assert (tmp_path / "runs/api/exported/model.safetensors").is_file()
    out, teacher = namespace["out"], namespace["teacher"]
    assert out.layers.shape[:2] == (len(teacher.target_layer_ids), namespace["train_b"][0]["waveforms"].shape[0])
    assert set(namespace["results"]) == {"ctc:phonemes", "classification:label"}
    printed = capsys.readouterr().out
    assert re.search(r"^student \{'ctc:phonemes': [0-9.]+, 'classification:label': [0-9.]+\}$", printed, flags=re.M)
    assert re.search(r"^teacher \{", printed, flags=re.M)


def test_public_names_are_the_functions_not_modules_of_the_same_name():
    # `from distill import train` once gave the module distill/train.py: the import system binds a
    # submodule to its package attribute when it loads it. So no module may share a public name.
    import distill

    for package in (distill, distill.training, distill.evaluation):
        folder = Path(package.__file__).parent
        clashes = [name for name in package.__all__ if (folder / f"{name}.py").exists() or (folder / name).is_dir()]
        assert not clashes, f"{package.__name__}: modules named like public names: {clashes}"
    result = subprocess.run([sys.executable, "-c", "from distill import load_recipe, train, export_run; "
                             "import distill.training.loop; from distill import train as again; "
                             "assert callable(train) and again is train and callable(export_run)"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
