"""End-to-end training through the real CLI, in real processes, on the shipped demo recipe."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
FAST = [
    "teacher.pca_max_utterances=8",
    "data.max_crop_seconds=1.0",
    "training.logging_steps=1",
    "training.report_to=none",
]
pytestmark = pytest.mark.slow


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distill", *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / f"checkpoint-{step}" / "model.safetensors")


def test_train_then_export_gives_a_stock_hf_folder(tmp_path):
    run = tmp_path / "run"
    result = _cli(
        "train", "demo", "--output-dir", str(run), "training.max_steps=4", "training.save_steps=2", *FAST, "training.report_to=tensorboard"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "processes=1 device=cpu mixed_precision=no effective_batch_size=4" in result.stdout
    assert "AutoModel.from_pretrained" in result.stdout
    # save_total_limit=2 keeps the two newest checkpoints; no partial folder is left behind.
    assert sorted(p.name for p in run.glob("*checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["loss"] > 0 for r in log)
    assert {"l1/0", "cos/2", "loss/1"} <= set(log[-1])
    assert list((run / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"

    out = tmp_path / "exported"
    console = shutil.which("fusion-distill", path=str(Path(sys.executable).parent))
    export = subprocess.run([console, "export", str(run), str(out)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert export.returncode == 0, export.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}
    # The exported encoder is the trained one: equal to the checkpoint's encoder.* tensors.
    exported = load_file(out / "model.safetensors")
    trained = {k[len("encoder."):]: v for k, v in _weights(run, 4).items() if k.startswith("encoder.")}
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in exported)
    card = (out / "README.md").read_text()
    assert "chconv" in card and "random-init wavlm" in card


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    args = ["train", "demo", "training.max_steps=9", "training.save_steps=3", "training.save_total_limit=5", *FAST]
    full = _cli(*args, "--output-dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "distill", *args, "--output-dir", str(run)],
        cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not (run / "checkpoint-3" / "checkpoint_complete").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "checkpoint-9").exists()

    resumed = _cli(*args, "--output-dir", str(run), "--resume-from", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert re.search(r"resumed from .*checkpoint-(3|6) at step (3|6)", resumed.stdout)
    a, b = _weights(tmp_path / "full", 9), _weights(run, 9)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_unreadable_files_are_counted_not_fatal(tmp_path):
    data = tmp_path / "corpus"
    shutil.copytree(REPO / "data" / "demo", data)
    (data / "audio" / "broken.wav").write_bytes(b"RIFF not really audio")
    sf.write(data / "audio" / "empty.wav", torch.zeros(0).numpy(), 16000)
    with open(data / "metadata.csv", "a") as f:
        f.write("audio/broken.wav,broken,b,en-us,train\naudio/empty.wav,empty,e,en-us,train\naudio/gone.flac,gone,g,en-us,train\n")
    result = _cli("train", "demo", "--output-dir", str(tmp_path / "run"), f"data.dataset_name={data}", "training.max_steps=2", *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"skipped 3 utterances: corrupt=1 empty=1 missing=1", result.stderr)


def test_bad_recipe_override_is_a_one_line_error(tmp_path):
    result = _cli("train", "demo", "--output-dir", str(tmp_path), "training.max_stepz=3")
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if "error" in ln]
    assert lines == [lines[0]] and "training.max_stepz" in lines[0]


def _corpus_with_nan_files(root: Path, count: int = 16) -> Path:
    """The demo corpus plus `count` equal-length all-NaN files: their headers pass the duration
    filter, decoding fails, and length bucketing puts them together into all-bad batches."""
    data = root / "corpus"
    shutil.copytree(REPO / "data" / "demo", data)
    with open(data / "metadata.csv", "a") as f:
        for i in range(count):
            sf.write(data / "audio" / f"nan{i}.wav", torch.full((24000,), float("nan")).numpy(), 16000, subtype="FLOAT")
            f.write(f"audio/nan{i}.wav,nan,n,en-us,train\n")
    return data


@pytest.mark.parametrize("data", ["map-style", "streaming", "unreadable", "log-mel student"])
def test_two_cpu_processes_end_with_identical_weights(tmp_path, data):
    overrides = {
        "map-style": [],
        "streaming": ["data.streaming=true"],
        "unreadable": [f"data.dataset_name={_corpus_with_nan_files(tmp_path)}"],
        "log-mel student": ["student.arch=wav2vec2_bert", "student.preset=w2vbert_tiny"],
    }[data]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    result = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "distill", "train", "demo", "--output-dir", str(tmp_path / "run"),
         "training.max_steps=6", *overrides, *FAST],
        cwd=REPO, env={**_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes=2 device=cpu" in result.stdout
    digests = dict(re.findall(r"rank (\d): student weights sha256 (\w+)", result.stderr))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    if data == "unreadable":
        assert "non_finite=" in result.stdout + result.stderr


def test_cache_targets_then_train_without_the_teacher(tmp_path):
    cache = tmp_path / "cache"
    made = _cli("cache-targets", "demo", "--out", str(cache), "--shard-size", "16", *FAST)
    assert made.returncode == 0, made.stderr[-2000:]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and all(s["sha256"] for s in manifest["shards"])
    run = tmp_path / "run"
    result = _cli("train", "demo", "--output-dir", str(run), f"data.targets_cache={cache}", "training.max_steps=2", *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run / "student" / "model.safetensors").exists()
    # The run records the exact teacher that made its targets.
    assert (run / "teacher" / "fused_teacher.json").read_text() == (cache / "teacher" / "fused_teacher.json").read_text()


def test_fit_teacher_cli_saves_a_supervised_teacher(tmp_path):
    out = tmp_path / "fitted"
    result = _cli("fit-teacher", "demo", "--out", str(out), "--task", "classification", "--steps", "5", *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fused (3 upstreams)" in result.stdout and "accuracy" in result.stdout
    assert (out / "fused_teacher.json").exists() and (out / "fit_report.json").exists()


def test_reused_output_dir_with_another_teacher_is_refused(tmp_path):
    run = tmp_path / "run"
    first = _cli("train", "demo", "--output-dir", str(run), "training.max_steps=1", *FAST)
    assert first.returncode == 0, first.stderr[-2000:]
    again = _cli("train", "demo", "--output-dir", str(run), "training.max_steps=1", "teacher.target_layers=[1,3]", *FAST)
    assert again.returncode == 2
    errors = [line for line in again.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "already holds a run" in errors[0]  # its checkpoints: refused first (test_faults_round3)
    for checkpoint in run.glob("checkpoint-*"):  # a run killed before its first checkpoint keeps only its teacher
        shutil.rmtree(checkpoint)
    again = _cli("train", "demo", "--output-dir", str(run), "training.max_steps=1", "teacher.target_layers=[1,3]", *FAST)
    assert again.returncode == 2
    errors = [line for line in again.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "saved teacher differs from the recipe's in target_layers" in errors[0]
