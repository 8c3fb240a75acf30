"""benchmarks/gpu_check.sh: on a machine without CUDA it still runs, writes its results, says it skipped."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _load_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_run_writes_results_and_says_gpu_skipped(tmp_path):
    out = tmp_path / "gpu"
    # CUDA hidden, so a CI machine with a GPU takes the same path; the venv's python, not a bare python3.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    env.pop("PEAK_TFLOPS", None)
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    markdown = (out / "results.md").read_text()
    assert result["cuda"] == "cuda: not available, GPU measurements skipped"
    assert "cuda: not available, GPU measurements skipped" in markdown
    names = [row["name"] for row in result["teacher"] + result["student"]]
    assert names[:4] == ["WavLM Base+", "HuBERT Base", "Whisper Small enc", "fused 3-up teacher"]
    for row in result["teacher"] + result["student"]:
        assert row["ms_median"] > 0 and row["audio_s_per_s"] > 0, row["name"]
        assert row["gflops"] > 0, row["name"]  # the FLOP counter saw the forward (and the backward)
        assert row["mfu"] is None  # no peak for a CPU
    cached, online = result["student"]
    assert online["gflops"] > cached["gflops"]  # the online step also pays the teacher's forward


def test_usage_error_without_out_dir():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_peak_table_and_override(monkeypatch):
    gpu_check = _load_module()
    monkeypatch.delenv("PEAK_TFLOPS", raising=False)
    assert gpu_check.peak_tflops(torch.device("cpu"))[0] is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert gpu_check.peak_tflops(torch.device("cuda"))[0] == pytest.approx(989.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert gpu_check.peak_tflops(torch.device("cuda"))[0] == pytest.approx(756.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert gpu_check.peak_tflops(torch.device("cuda"))[0] == pytest.approx(989.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert gpu_check.peak_tflops(torch.device("cuda")) == (None, "unknown device 'Some Future GPU'; set PEAK_TFLOPS")
    monkeypatch.setenv("PEAK_TFLOPS", "500")
    assert gpu_check.peak_tflops(torch.device("cuda")) == (500.0, "PEAK_TFLOPS")
