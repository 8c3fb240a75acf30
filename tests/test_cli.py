"""The CLI surface: subcommands, inspect-teacher, one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "distill", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_help_lists_every_stage():
    result = _run("--help")
    assert result.returncode == 0
    for command in ("inspect-teacher", "cache-targets", "fit-teacher", "train", "evaluate", "export"):
        assert command in result.stdout


@pytest.mark.slow
def test_inspect_teacher_reports_upstreams_alignment_and_time():
    result = _run("inspect-teacher", "demo", "--seconds", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for name in ("wavlm(random-init)", "hubert(random-init)", "whisper(random-init)"):
        assert name in out
    # 3 upstreams with 2, 3 and 2 layers align to 4 layers; 1 s is 49 wav2vec frames; 64+48+64 dims.
    assert "aligned: 4 layers x 49 frames x 176 features (1 s of audio)" in out
    assert "fusion: chconv" in out and "one forward on 1 s:" in out
    assert "loading upstreams" in result.stderr  # the progress bar


@pytest.mark.slow
def test_unreachable_hub_id_is_a_one_line_error():
    result = _run("inspect-teacher", "demo", "teacher.upstreams=[no-such-org/no-such-model]")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "offline or unreachable" in errors[0] and "local folder" in errors[0]


@pytest.mark.slow
def test_export_of_a_folder_that_is_not_a_run_is_a_one_line_error(tmp_path):
    result = _run("export", str(tmp_path), str(tmp_path / "out"))
    assert result.returncode == 2
    assert "not a training run (no recipe.yaml)" in result.stderr
