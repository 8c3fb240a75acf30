"""Evaluation while training (distill/training/validation.py): records, best checkpoint, early stopping,
exactness and resume, through the real CLI on the demo recipe; plus the pure pieces."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.data.audio import HOP, crop_length
from distill.runs import BEST_FILE, BEST_MARKER, COMPLETE_MARKER, read_eval_log
from distill.training.checkpoint import _rotate, mark_best
from distill.config import RecipeError, load_recipe
from distill.data.loader import load_audio_dataset
from distill.training.validation import convergence_report, evals_since_best, fixed_crops, relative_slope

REPO = Path(__file__).resolve().parent.parent
FAST = ["teacher.pca_max_utterances=8", "data.max_crop_seconds=1.0", "training.logging_steps=1", "training.report_to=none"]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "distill", *map(str, args)], cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=timeout)
    return result


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _encoder(path: Path) -> dict[str, torch.Tensor]:
    weights = load_file(path)
    return {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")} or weights


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --------------------------------------------------------------------------- end to end (CLI)

@pytest.mark.slow
def test_eval_records_at_eval_steps_and_the_same_weights_as_without_eval(tmp_path):
    args = ["train", "demo", "training.max_steps=5", "training.save_steps=100", *FAST]
    out = _ok(_cli(*args, "--output-dir", tmp_path / "eval", "training.eval_steps=2"))
    _ok(_cli(*args, "--output-dir", tmp_path / "plain", "training.eval_steps=null"))

    records = read_eval_log(tmp_path / "eval")
    assert [r["step"] for r in records] == [2, 4, 5]  # every eval_steps, and at the end
    assert all(r["utterances"] == 8 and r["frames"] > 0 for r in records)
    last = records[-1]
    assert last["loss"] == pytest.approx(sum(last[f"loss/{k}"] for k in range(3)))
    assert all(-1 <= last[f"cos/{k}"] <= 1 and last[f"l1/{k}"] > 0 for k in range(3))
    assert re.search(r"eval loss (still improving|flat|rising) \([+-]\d+\.\d%/eval over the last 3 evals, steps 2-5\)", out)
    assert "evaluating every 2 steps on dev: 8 utterances" in out
    assert not (tmp_path / "plain" / "eval_log.jsonl").exists()
    # Evaluation draws no training random numbers: dropout and data order are untouched.
    with_eval = load_file(tmp_path / "eval" / "checkpoint-5" / "model.safetensors")
    without = load_file(tmp_path / "plain" / "checkpoint-5" / "model.safetensors")
    assert _max_diff(with_eval, without) <= 1e-6


@pytest.mark.slow
def test_early_stopping_keeps_and_exports_the_best_checkpoint(tmp_path):
    run = tmp_path / "run"
    # A far too high constant learning rate: the eval loss is best after step 1, then worse.
    out = _ok(_cli("train", "demo", "--output-dir", run, "training.max_steps=8", "training.eval_steps=1",
                   "training.save_steps=1", "training.save_total_limit=1", "training.early_stopping_patience=2",
                   "training.learning_rate=0.3", "training.warmup_steps=0", "training.lr_scheduler_type=constant", *FAST))
    records = read_eval_log(run)
    assert [(r["step"], r["best"]) for r in records] == [(1, True), (2, False), (3, False)]
    assert "early stopping at step 3: no eval-loss improvement in 2 evaluations" in out
    assert "eval loss rising" in out and "best eval loss was at step 1" in out
    # save_total_limit=1 keeps the newest checkpoint (written before stopping) and the best one.
    assert sorted(p.name for p in run.glob("*checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]
    assert (run / "checkpoint-1" / BEST_MARKER).exists() and not (run / "checkpoint-3" / BEST_MARKER).exists()
    assert json.loads((run / BEST_FILE).read_text())["step"] == 1
    exported = load_file(run / "student" / "model.safetensors")
    assert _max_diff(exported, _encoder(run / "checkpoint-1" / "model.safetensors")) == 0
    assert "from the best eval checkpoint checkpoint-1" in out
    card = (run / "student" / "README.md").read_text()
    assert "step 1 (best eval loss; 3 evaluations, the last at step 3)" in card
    assert f"| eval loss (dev) | {records[0]['loss']:.4g} |" in card


@pytest.mark.slow
def test_eval_figures_match_the_evaluate_command(tmp_path):
    run = tmp_path / "run"
    # Crops of 4 s keep every dev utterance whole, as `evaluate` scores them.
    _ok(_cli("train", "demo", "--output-dir", run, "training.max_steps=3", "training.eval_steps=3", *FAST,
             "data.max_crop_seconds=4.0"))
    record = read_eval_log(run)[-1]
    _ok(_cli("evaluate", run, "--no-probe", "--no-cost"))
    result = json.loads((run / "eval" / "eval.json").read_text())
    similarity = result["similarity"]
    assert similarity["utterances"] == record["utterances"] and similarity["frames"] == record["frames"]
    for k, row in enumerate(similarity["layers"]):
        assert row["cosine"] == pytest.approx(record[f"cos/{k}"], abs=1e-4)
        assert row["l1"] == pytest.approx(record[f"l1/{k}"], abs=1e-4)
    assert [r["step"] for r in result["training_eval"]] == [3]
    assert (run / "eval" / "layer_similarity.png").stat().st_size > 0


@pytest.mark.slow
def test_resume_continues_the_eval_history(tmp_path):
    args = ["train", "demo", "training.max_steps=6", "training.eval_steps=2", "training.save_steps=2",
            "training.save_total_limit=5", *FAST]
    full_out = _ok(_cli(*args, "--output-dir", tmp_path / "full"))
    # A run killed after step 4's checkpoint, restarted from step 2's: what it logged past step 2 is redone.
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", run)
    shutil.rmtree(run / "checkpoint-6")
    shutil.rmtree(run / "student")
    out = _ok(_cli(*args, "--output-dir", run, "--resume-from", run / "checkpoint-2"))
    full, resumed = read_eval_log(tmp_path / "full"), read_eval_log(run)
    assert [r["step"] for r in resumed] == [2, 4, 6] and len((run / "eval_log.jsonl").read_text().splitlines()) == 3
    assert all(a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["best"] == b["best"] for a, b in zip(full, resumed))
    # The convergence line spans all three evaluations: the history came back with the checkpoint.
    line = re.search(r"eval loss .*over the last 3 evals, steps 2-6.*", full_out).group(0)
    assert line in out
    assert json.loads((run / BEST_FILE).read_text())["step"] == json.loads((tmp_path / "full" / BEST_FILE).read_text())["step"]
    assert _max_diff(load_file(run / "checkpoint-6" / "model.safetensors"),
                     load_file(tmp_path / "full" / "checkpoint-6" / "model.safetensors")) <= 1e-6


@pytest.mark.slow
def test_eval_targets_from_a_cache_of_the_eval_split(tmp_path):
    _ok(_cli("cache-targets", "demo", "--out", tmp_path / "cache", *FAST))
    out = _ok(_cli("cache-targets", "demo", "--split", "dev", "--teacher", tmp_path / "cache" / "teacher",
                   "--out", tmp_path / "cache-dev", *FAST))
    assert "data.eval_targets_cache=" in out
    manifest = json.loads((tmp_path / "cache-dev" / "manifest.json").read_text())
    assert manifest["dataset"]["split"] == "dev" and manifest["totals"]["utterances"] == 8
    run = tmp_path / "run"
    _ok(_cli("train", "demo", "--output-dir", run, f"data.targets_cache={tmp_path / 'cache'}",
             f"data.eval_targets_cache={tmp_path / 'cache-dev'}", "training.max_steps=2", "training.eval_steps=1", *FAST))
    records = read_eval_log(run)
    assert [r["step"] for r in records] == [1, 2] and records[0]["utterances"] == 8
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


@pytest.mark.slow
def test_eval_settings_without_an_eval_split_fail_before_training(tmp_path):
    result = _cli("train", "demo", "--output-dir", tmp_path, "training.eval_steps=5", "data.eval_split_name=null")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "needs data.eval_split_name" in errors[0]
    assert not list(tmp_path.iterdir())  # refused before anything was built


# --------------------------------------------------------------------------- pure pieces

@pytest.mark.parametrize("override, message", [
    ("training.eval_steps=0", "training.eval_steps=0, expected >= 1"),
    ("training.eval_max_items=0", "training.eval_max_items=0, expected >= 1"),
    ("training.convergence_window=1", "convergence_window=1"),
])
def test_bad_eval_settings_are_recipe_errors(override, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe("demo", [override])


def test_early_stopping_and_load_best_need_eval_steps():
    for key in ("training.early_stopping_patience=3", "training.load_best_at_end=true"):
        with pytest.raises(RecipeError, match="needs training.eval_steps"):
            load_recipe("demo", ["training.eval_steps=null", key])
    assert load_recipe("demo", ["training.eval_steps=null"]).training.load_best_at_end is None


def test_relative_slope_is_the_least_squares_slope_over_the_mean():
    assert relative_slope([4.0, 3.0, 2.0]) == pytest.approx(-1.0 / 3.0)
    assert relative_slope([2.0, 2.0]) == 0.0
    assert relative_slope([1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8 / 2.5)  # slope 4 / 5 over the mean 2.5
    with pytest.raises(ValueError):
        relative_slope([1.0])


def test_convergence_report_says_improving_flat_or_rising():
    improving = [[100, 2.0], [200, 1.9], [300, 1.8], [400, 1.7], [500, 1.6]]
    line = convergence_report(improving, window=4, min_slope=0.005, best_step=500)  # -0.1 per eval / mean 1.75
    assert line.startswith("eval loss still improving (-5.7%/eval over the last 4 evals, steps 200-500)")
    assert "raise training.max_steps" in line
    flat = [[1, 1.0], [2, 1.002], [3, 0.999], [4, 1.001]]
    assert convergence_report(flat, 4, 0.005, 3).startswith("eval loss flat")
    rising = [[1, 1.0], [2, 1.1], [3, 1.3]]
    assert "best eval loss was at step 1" in convergence_report(rising, 4, 0.005, 1)
    assert "too few" in convergence_report(rising[:2], 4, 0.005, 1)


def test_evals_since_best_counts_evaluations_after_the_best_step():
    history = [[2, 3.0], [4, 2.0], [6, 2.5], [8, 2.1]]
    assert evals_since_best(history, 4) == 2
    assert evals_since_best(history, 8) == 0
    assert evals_since_best([], None) == 0


def _fake_checkpoints(out: Path, steps: list[int]) -> None:
    for step in steps:
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / COMPLETE_MARKER).write_text(f"{step}\n")


def test_rotation_never_deletes_the_best_checkpoint(tmp_path):
    _fake_checkpoints(tmp_path, [2, 4])
    mark_best(tmp_path, 2, {"step": 2, "loss": 1.0}, total_limit=1)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    _fake_checkpoints(tmp_path, [6])
    _rotate(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6"]
    # A new best takes the marker; the old one becomes ordinary and rotates away.
    mark_best(tmp_path, 6, {"step": 6, "loss": 0.5}, total_limit=1)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6"]
    assert json.loads((tmp_path / BEST_FILE).read_text()) == {"step": 6, "checkpoint": "checkpoint-6", "eval": {"step": 6, "loss": 0.5}}
    with pytest.raises(FileNotFoundError):
        mark_best(tmp_path, 8, {}, total_limit=1)


def test_eval_crops_are_fixed_frame_aligned_and_seeded():
    cfg = load_recipe("demo", ["data.max_crop_seconds=2.0"])
    dev = load_audio_dataset(cfg.data, "dev")
    items, skipped = fixed_crops(dev, cfg.data, 200, 400, seed=0)
    again, _ = fixed_crops(dev, cfg.data, 200, 400, seed=0)
    assert len(items) == 8 and skipped == {}
    assert [(uid, start) for uid, _, start in items] == [(uid, start) for uid, _, start in again]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(items, again))
    crop = crop_length(32000)
    long_ones = [(wave, start) for _, wave, start in items if len(wave) == crop]
    assert long_ones and all(start % HOP == 0 for _, start in long_ones)
    short = [(wave, start) for _, wave, start in items if len(wave) != crop]
    assert short and all(start == 0 and len(wave) <= 32000 for wave, start in short)  # whole utterances
    other = [start for _, _, start in fixed_crops(dev, cfg.data, 200, 400, seed=1)[0]]
    assert other != [start for _, _, start in items]
    assert len(fixed_crops(dev, cfg.data, 3, 400, seed=0)[0]) == 3
