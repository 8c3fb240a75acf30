"""Faults, round three (issue 24): a fresh train into a folder that holds a run, one writer for the
fit-teacher and evaluate output folders, the shipped recipes, a benchmark without its extra.

Refusals run the CLI in this process (they stop before anything is built); the one run that
trains (--overwrite) is marked slow.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from distill.cli import main
from distill.runs import COMPLETE_MARKER, RECIPE_FILE
from distill.runs.lock import LOCK_NAME
from conftest import cli_error

FAST = ["teacher.pca_max_utterances=8", "data.max_crop_seconds=1.0", "training.logging_steps=1", "training.report_to=none",
        "training.eval_steps=null"]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _old_run(run: Path) -> None:
    """A previous run's folder: a complete checkpoint, a newer partial one, its recipe and log."""
    for step, complete in ((10, True), (20, False)):
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"old weights")
        if complete:
            (folder / COMPLETE_MARKER).write_text(json.dumps({"step": step, "num_processes": 1, "files": {}}))
    (run / RECIPE_FILE).write_text("old: recipe\n")
    (run / "train_log.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
    (run / "notes.txt").write_text("the user's own file\n")


# --------------------------------------------------------------------------- a fresh train into a run


def test_a_fresh_train_into_a_folder_with_checkpoints_is_refused_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    _old_run(run)
    before = _digest(run)
    line = cli_error(capsys, "train", "demo", "--output-dir", run, *FAST)
    assert f"{run} already holds a run (newest checkpoint: {run / 'checkpoint-10'})" in line
    for way in ("--resume-from latest", "a new --output-dir", "--overwrite"):
        assert way in line
    assert _digest(run) == before  # nothing written, the lock file gone again

    (run / "checkpoint-10" / COMPLETE_MARKER).unlink()  # only partial checkpoint folders: still a run
    assert "newest checkpoint folder, incomplete" in cli_error(capsys, "train", "demo", "--output-dir", run, *FAST)
    assert "cannot go with --resume-from" in cli_error(capsys, "train", "demo", "--output-dir", run, "--overwrite",
                                                    "--resume-from", "latest", *FAST)


@pytest.mark.slow
def test_overwrite_starts_afresh_and_keeps_what_is_not_the_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # the demo corpus as a checkout has it
    run = tmp_path / "run"
    _old_run(run)
    assert main(["train", "demo", "--output-dir", str(run), "--overwrite", "training.max_steps=2", "training.save_steps=2", *FAST]) == 0
    names = sorted(p.name for p in run.iterdir())
    assert "checkpoint-10" not in names and "checkpoint-20" not in names and "checkpoint-2" in names
    assert "notes.txt" in names and LOCK_NAME not in names
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [1, 2]


# --------------------------------------------------------------------------- one writer per output folder


def test_fit_teacher_takes_the_lock_of_its_out_folder(tmp_path, capsys, foreign_holder):
    pid, lock = foreign_holder
    out = tmp_path / "fitted"
    lock(out, "fit-teacher")
    line = cli_error(capsys, "fit-teacher", "demo", "--out", out, "--steps", "1")
    assert f"teacher folder {out}: in use by `fusion-distill fit-teacher` (pid {pid}" in line
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written


def test_evaluate_takes_the_lock_of_its_output_folder_not_the_runs(tmp_path, capsys, foreign_holder):
    pid, lock = foreign_holder
    run = tmp_path / "run"
    run.mkdir()
    (run / RECIPE_FILE).write_text("not read: the lock is taken first\n")
    lock(run / "eval", "evaluate")  # the default output folder of a run
    line = cli_error(capsys, "evaluate", run, "--no-probe", "--no-cost")
    assert f"eval folder {run / 'eval'}: in use by `fusion-distill evaluate` (pid {pid}" in line
    out = tmp_path / "scores"
    lock(out, "evaluate")
    assert f"eval folder {out}: in use by" in cli_error(capsys, "evaluate", run, "--out-dir", out, "--no-probe", "--no-cost")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


# --------------------------------------------------------------------------- shipped recipes, version


def test_recipes_lists_and_copies_out_the_shipped_ones(tmp_path, capsys):
    from distill.shipped import recipe_names

    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    assert recipe_names() and all(name in listed for name in recipe_names())
    assert main(["recipes", "cp", "demo", str(tmp_path)]) == 0  # into a folder: DEST/demo.yaml
    from distill.config import load_recipe

    assert load_recipe(tmp_path / "demo.yaml").data.dataset_name == "data/demo"
    assert "already exists" in cli_error(capsys, "recipes", "cp", "demo", tmp_path / "demo.yaml")
    assert "no shipped recipe 'nope'" in cli_error(capsys, "recipes", "cp", "nope", tmp_path / "x.yaml")


def test_version(capsys):
    import distill

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"fusion-distill {distill.__version__}"


def test_the_demo_corpus_is_found_outside_a_checkout_and_a_local_folder_wins(tmp_path, monkeypatch):
    from distill.shipped import shipped_dataset

    monkeypatch.chdir(tmp_path)
    assert (shipped_dataset("data/demo") / "metadata.csv").is_file()
    assert shipped_dataset("elsewhere/demo") is None
    (tmp_path / "data" / "demo").mkdir(parents=True)
    assert shipped_dataset("data/demo") is None  # the working directory's folder is read as it is


# --------------------------------------------------------------------------- benchmarks without their extra


def test_a_benchmark_without_its_package_ends_in_one_line(monkeypatch, capsys):
    import importlib.util

    from benchmarks import run_main
    from benchmarks.pretrained_whisper import KNOWN_MODELS, packaged_model_bin

    name = sorted(KNOWN_MODELS)[0]
    missing = KNOWN_MODELS[name].packages[0]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *a: None if module == missing else real(module, *a))
    # What the real-model benchmark (mini_superb real.yaml) meets first without the extra.
    assert run_main(lambda: packaged_model_bin(name), "python -m benchmarks.mini_superb") == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"python -m benchmarks.mini_superb: error: {name}: package {missing} is not installed")

    def needs_matplotlib():
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    assert run_main(needs_matplotlib, "python -m benchmarks.x") == 1
    err = capsys.readouterr().err
    assert err.strip() == "python -m benchmarks.x: error: cannot import matplotlib: it is not installed; pip install -e '.[plots]'"
