"""Shared fixtures: tiny random-init upstream models built from configs, saved locally.

Nothing here downloads anything: every model is built from a config, written with
`save_pretrained`, and loaded back from the folder by the code under test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from threads, and on shared cores extra threads cost 10-50x.
torch.set_num_threads(1)

from distill.data.signals import speech_like
from distill.runs.lock import LOCK_NAME, _process_start
from teachers.configs import TINY

# Tiny random-init upstreams (teachers/configs.py: 2 layers, 32 wide, the real frame grids).
TINY_CONFIGS: dict[str, dict] = {kind: TINY[kind] for kind in ("wavlm", "hubert", "wav2vec2", "data2vec-audio", "whisper")}


def tiny_config(kind: str, **overrides) -> dict:
    """A `{"config": {...}}` upstream spec for a tiny random-init model."""
    return {"config": {**TINY_CONFIGS[kind], **overrides}}


def _save_tiny(kind: str, folder) -> str:
    from transformers import AutoConfig, AutoModel

    cfg = dict(TINY_CONFIGS[kind])
    model_type = cfg.pop("model_type")
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.for_model(model_type, **cfg))
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_upstream_dirs(tmp_path_factory) -> dict[str, str]:
    """Local folders of tiny saved upstreams, keyed by model type."""
    root = tmp_path_factory.mktemp("upstreams")
    return {kind: _save_tiny(kind, root / kind) for kind in TINY_CONFIGS}


def make_wave(seconds: float, seed: int = 0, sr: int = 16000) -> torch.Tensor:
    """A deterministic speech-like test signal (distill/data/signals.py)."""
    return speech_like(seconds, seed, sr)


@pytest.fixture
def wave():
    return make_wave


@pytest.fixture
def foreign_holder():
    """A live process of this host, and a lock record naming it, for any folder."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])

    def lock(folder: Path, command: str = "train") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        record = {"pid": proc.pid, "host": socket.gethostname(), "command": command, "started": "2026-01-01T00:00:00Z",
                  "process_start": _process_start(proc.pid), "token": "foreign"}
        (folder / LOCK_NAME).write_text(json.dumps(record) + "\n")

    yield proc.pid, lock
    proc.kill()
    proc.wait()


def cli_error(capsys, *args) -> str:
    """Run the CLI in this process; it must exit 2 with one error line and no traceback. Returns that line."""
    from distill.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]
