"""Checkpoint discovery ignores partial folders; strict weight loading fails in one line."""

import pytest
import torch

from distill.runs import COMPLETE_MARKER, find_checkpoint, list_checkpoints
from distill.training.checkpoint import _rotate, load_weights_strict


def _checkpoint(run, step, complete=True, name=None):
    folder = run / (name or f"checkpoint-{step}")
    folder.mkdir()
    if complete:
        (folder / COMPLETE_MARKER).write_text(f"{step}\n")
    return folder


def test_latest_skips_partial_and_unmarked_folders(tmp_path):
    _checkpoint(tmp_path, 2)
    newest_complete = _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 12, name=".checkpoint-12.partial")  # killed while saving
    _checkpoint(tmp_path, 14, complete=False)  # a folder without the marker
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert find_checkpoint(tmp_path, "latest") == newest_complete
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        find_checkpoint(tmp_path, str(tmp_path / "checkpoint-14"))


def test_latest_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint in"):
        find_checkpoint(tmp_path, "latest")


def test_rotation_keeps_the_newest_by_step_not_by_name(tmp_path):
    for step in (9, 10, 100):
        _checkpoint(tmp_path, step)
    _rotate(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-100"]


def test_strict_loading_names_every_kind_of_mismatch_in_one_line():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    weights = {"0.weight": torch.zeros(4, 3), "0.bias": torch.zeros(5), "extra": torch.zeros(1)}
    with pytest.raises(ValueError) as err:
        load_weights_strict(module, weights, "ckpt/model.safetensors")
    message = str(err.value)
    assert "\n" not in message and message.startswith("ckpt/model.safetensors does not match")
    assert "'1.weight'" in message and "'extra'" in message and "'0.bias'" in message
    good = {k: torch.full_like(v, 0.5) for k, v in module.state_dict().items()}
    load_weights_strict(module, good, "ok")
    assert all(torch.equal(v, good[k]) for k, v in module.state_dict().items())
