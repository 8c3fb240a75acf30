"""Training that survives faults (issue 7): non-finite steps, changed recipes on resume, damaged
checkpoints, preemption, full disks; one-line errors for the other stages.

The pieces are tested in process on a tiny model; the faults end to end through the real CLI in
real processes on the demo recipe (a few steps each).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from distill.runs import (
    COMPLETE_MARKER, DIVERGED_MARKER, CheckpointError, checkpoint_info, find_checkpoint, list_checkpoints, verify_checkpoint,
)
from distill.training.checkpoint import (
    SAFE_TO_CHANGE, _hash_files, check_resume_recipe, mark_diverged, nonfinite_weights, save_checkpoint,
)
from distill.config import RecipeError, load_recipe
from distill.training.faults import check_writable

REPO = Path(__file__).resolve().parent.parent
FAST = ["teacher.pca_max_utterances=8", "data.max_crop_seconds=1.0", "training.logging_steps=1", "training.report_to=none",
        "training.eval_steps=null"]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args, timeout: int = 300, prefix: tuple[str, ...] = ("-m", "distill")) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *prefix, *map(str, args)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error:" in line]


def _one_error(result: subprocess.CompletedProcess) -> str:
    errors = _errors(result)
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --------------------------------------------------------------------------- checkpoints, in process


@pytest.fixture
def tiny(tmp_path):
    """An Accelerator with a prepared tiny model and optimizer, and the demo recipe."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, load_recipe("demo")


def test_marker_records_every_file_and_a_damaged_one_is_named(tiny, tmp_path, caplog):
    accelerator, model, cfg = tiny
    older = save_checkpoint(accelerator, tmp_path, 1, 5, cfg, model)
    newest = save_checkpoint(accelerator, tmp_path, 2, 5, cfg, model)
    info = checkpoint_info(newest)
    assert info["step"] == 2 and info["num_processes"] == 1
    assert {"model.safetensors", "optimizer.bin", "recipe.yaml"} <= set(info["files"])
    assert verify_checkpoint(newest) is None

    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated, as by a full disk or a killed copy
    assert "model.safetensors is damaged" in verify_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="distill.runs"):
        assert find_checkpoint(tmp_path, "latest") == older
    assert any("checkpoint-2/model.safetensors is damaged" in r.message and "using checkpoint-1" in r.message for r in caplog.records)
    with pytest.raises(CheckpointError, match=r"checkpoint-2/model.safetensors is damaged") as err:
        find_checkpoint(tmp_path, str(newest))
    assert "\n" not in str(err.value)

    (older / "optimizer.bin").unlink()
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*optimizer.bin is missing"):
        find_checkpoint(tmp_path, "latest")


def test_old_step_only_markers_still_resume(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / COMPLETE_MARKER).write_text("3\n")
    assert checkpoint_info(tmp_path / "checkpoint-3") == {"step": 3, "num_processes": None, "files": None}
    assert find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-3"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_failed_save_removes_its_folder_and_keeps_the_others(tiny, tmp_path, monkeypatch, code):
    accelerator, model, cfg = tiny
    first = save_checkpoint(accelerator, tmp_path, 1, 1, cfg, model)

    def fails_half_way(output_dir, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(accelerator, "save_state", fails_half_way)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(accelerator, tmp_path, 2, 1, cfg, model)
    message = str(err.value)
    assert "\n" not in message and "checkpoint-2" in message and errno.errorcode[code] in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # no partial folder, nothing rotated
    assert verify_checkpoint(first) is None


def test_non_finite_weights_are_never_saved(tiny, tmp_path):
    accelerator, model, cfg = tiny
    save_checkpoint(accelerator, tmp_path, 1, 1, cfg, model)
    with torch.no_grad():
        accelerator.unwrap_model(model).weight[0, 0] = float("nan")
    assert nonfinite_weights(accelerator.unwrap_model(model)) == (1, "weight")
    assert save_checkpoint(accelerator, tmp_path, 2, 1, cfg, model) is None
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]  # rotation did not run either


def test_a_diverged_checkpoint_is_not_latest(tiny, tmp_path):
    accelerator, model, cfg = tiny
    for step in (2, 4):
        save_checkpoint(accelerator, tmp_path, step, 5, cfg, model)
    mark_diverged(tmp_path, 4, "10 non-finite steps in a row from these weights")
    assert find_checkpoint(tmp_path, "latest").name == "checkpoint-2"
    assert (tmp_path / "checkpoint-4" / DIVERGED_MARKER).exists()
    save_checkpoint(accelerator, tmp_path, 6, 5, cfg, model)  # a newer good one: the diverged one goes
    assert not (tmp_path / "checkpoint-4").exists() and (tmp_path / "checkpoint-2").exists()


def test_unwritable_output_dir_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match=r"training.output_dir .*a_file/run: not writable \(ENOTDIR") as err:
        check_writable(blocker / "run", 0)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- resume: recipe changes


def _saved(tmp_path: Path, overrides=(), num_processes: int = 1) -> Path:
    """A checkpoint folder holding the demo recipe (with overrides) and a marker."""
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.structured(load_recipe("demo", list(overrides))), folder / "recipe.yaml")
    (folder / COMPLETE_MARKER).write_text(json.dumps({"step": 5, "num_processes": num_processes, "files": _hash_files(folder)}))
    return folder


REFUSED = [
    ("student.hidden_size=64", "student.hidden_size: null -> 64"),
    ("teacher.target_layers=[1,3]", "teacher.target_layers: [1, 2, 3] -> [1, 3]"),
    ("loss.cos_weight=0.5", "loss.cos_weight: 1.0 -> 0.5"),
    ("data.dataset_name=elsewhere", "data.dataset_name: \"data/demo\" -> \"elsewhere\""),
    ("data.train_split_name=dev", "data.train_split_name"),
    ("data.max_crop_seconds=3.0", "data.max_crop_seconds: 2.0 -> 3.0"),
    ("data.max_duration_in_seconds=5.0", "data.max_duration_in_seconds"),
    ("data.bucket_size=8", "data.bucket_size: 16 -> 8"),
    ("training.seed=1", "training.seed: 0 -> 1"),
    ("training.per_device_train_batch_size=2", "training.per_device_train_batch_size: 4 -> 2"),
    ("training.gradient_accumulation_steps=2", "training.gradient_accumulation_steps: 1 -> 2"),
    ("training.learning_rate=0.001", "training.learning_rate: 0.003 -> 0.001"),
    ("training.lr_scheduler_type=constant", "training.lr_scheduler_type: \"linear\" -> \"constant\""),
    ("training.warmup_steps=0", "training.warmup_steps: 6 -> 0"),
]


@pytest.mark.parametrize("override,named", REFUSED, ids=[o.split("=")[0] for o, _ in REFUSED])
def test_changes_to_what_is_trained_are_refused_in_one_line(tmp_path, override, named):
    checkpoint = _saved(tmp_path)
    with pytest.raises(RecipeError) as err:
        check_resume_recipe(checkpoint, load_recipe("demo", [override]), 1)
    message = str(err.value)
    assert "\n" not in message and named in message
    assert f"--allow-recipe-change {override.split('=')[0]}" in message
    # Forcing it by name lets the resume go on, and reports the change as forced.
    safe, forced = check_resume_recipe(checkpoint, load_recipe("demo", [override]), 1, allow=[override.split("=")[0]])
    assert list(forced) == [override.split("=")[0]] and not safe


def test_every_refused_key_is_listed_together_and_the_process_count_counts(tmp_path):
    checkpoint = _saved(tmp_path, num_processes=2)
    with pytest.raises(RecipeError) as err:
        check_resume_recipe(checkpoint, load_recipe("demo", ["training.seed=3", "student.hidden_size=64"]), 1)
    message = str(err.value)
    assert "num_processes: 2 -> 1" in message and "training.seed: 0 -> 3" in message and "student.hidden_size" in message
    with pytest.raises(RecipeError, match="unknown key.*training.learning_rat"):
        check_resume_recipe(checkpoint, load_recipe("demo"), 2, allow=["training.learning_rat"])


SAFE = ["training.max_steps=90", "training.save_steps=7", "training.save_total_limit=4", "training.logging_steps=3",
        "training.report_to=none", "data.dataloader_num_workers=2"]


def test_safe_changes_are_accepted_and_reported(tmp_path):
    checkpoint = _saved(tmp_path)
    safe, forced = check_resume_recipe(checkpoint, load_recipe("demo", SAFE), 1)
    assert set(safe) == {o.split("=")[0] for o in SAFE} <= SAFE_TO_CHANGE and not forced
    assert safe["training.max_steps"] == (60, 90)


# --------------------------------------------------------------------------- end to end (CLI)

# Runs the CLI with loss_step poisoned once: the loss of the 3rd batch is NaN, as a batch with a
# NaN target (one bad utterance in a cache) would make it.
_ONE_NAN_BATCH = """
import sys
import distill.training.loop as train
real, calls = train.loss_step, [0]
def loss_step(*args, **kwargs):
    loss, parts = real(*args, **kwargs)
    calls[0] += 1
    return (loss * float("nan") if calls[0] == 3 else loss), parts
train.loss_step = loss_step
from distill.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_one_nan_batch_is_skipped_and_counted(tmp_path):
    run = tmp_path / "run"
    result = _cli("train", "demo", "--output-dir", run, "training.max_steps=4", "training.save_steps=100", *FAST,
                  prefix=("-c", _ONE_NAN_BATCH))
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"step 3: non-finite loss and gradient norm; update skipped \(1 in a row, 1 in all\)", result.stderr)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # four applied steps; the bad batch was not one of them
    assert log[-1]["nonfinite_steps"] == 1 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert nonfinite_weights(_weights(run / "checkpoint-4")) == (0, None)


@pytest.mark.slow
def test_diverging_run_stops_names_the_good_checkpoint_and_resumes_with_a_forced_lr(tmp_path):
    run = tmp_path / "run"
    args = ["train", "demo", "--output-dir", run, "training.save_steps=2", "training.save_total_limit=3", *FAST]
    diverged = _cli(*args, "training.learning_rate=1e6", "training.max_steps=30")
    line = _one_error(diverged)
    assert re.search(r"stopped at step \d+: 10 steps in a row with a non-finite loss", line), line
    assert "training.max_nonfinite_steps=10" in line and "parts: l1/0" in line
    good = Path(re.search(r"newest good checkpoint: (\S+);", line).group(1))
    assert find_checkpoint(run, "latest") == good  # the diverged one (if saved) is passed over
    assert nonfinite_weights(_weights(good)) == (0, None)
    assert not list(run.glob(".checkpoint-*"))

    refused = _one_error(_cli(*args, "training.learning_rate=1e-3", "training.max_steps=6", "--resume-from", "latest"))
    assert "training.learning_rate: 1000000.0 -> 0.001" in refused and "training.max_steps" not in refused
    resumed = _cli(*args, "training.learning_rate=1e-3", "training.max_steps=6", "--resume-from", "latest",
                   "--allow-recipe-change", "training.learning_rate")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {good}" in resumed.stdout and "FORCED changes training.learning_rate" in resumed.stdout
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 6 and log[-1]["lr"] < 1e-3  # the forced rate took effect
    assert nonfinite_weights(_weights(run / "checkpoint-6")) == (0, None)
    assert json.loads((run / "resume_log.jsonl").read_text().splitlines()[-1])["forced"] == {"training.learning_rate": [1e6, 1e-3]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[str]]:
    """An uninterrupted 6-step run (checkpoints 2, 4, 6) and its arguments."""
    args = ["train", "demo", "training.max_steps=6", "training.save_steps=2", "training.save_total_limit=3", *FAST]
    run = tmp_path_factory.mktemp("reference") / "run"
    result = _cli(*args, "--output-dir", run)
    assert result.returncode == 0, result.stderr[-3000:]
    return run, args


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_resume_equals_uninterrupted(reference, tmp_path):
    full, args = reference
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "distill", *args, "--output-dir", str(run)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    log = run / "train_log.jsonl"
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, "run ended before step 3"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    stop = re.search(r"SIGTERM: stopped at step (\d); checkpoint (\S+); resume with: .*--resume-from latest", stdout)
    assert stop, stdout[-2000:]
    step = int(stop.group(1))
    assert 3 <= step < 6 and Path(stop.group(2)) == run / f"checkpoint-{step}"
    assert verify_checkpoint(run / f"checkpoint-{step}") is None and not (run / "student").exists()

    resumed = _cli(*args, "--output-dir", run, "--resume-from", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stdout
    assert _max_diff(_weights(full / "checkpoint-6"), _weights(run / "checkpoint-6")) <= 1e-6


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_and_still_ends_equal(reference, tmp_path):
    full, args = reference
    run = tmp_path / "run"
    shutil.copytree(full, run)
    weights = run / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    explicit = _one_error(_cli(*args, "--output-dir", run, "--resume-from", run / "checkpoint-6"))
    assert "checkpoint-6/model.safetensors is damaged" in explicit

    resumed = _cli(*args, "--output-dir", run, "--resume-from", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warnings = [ln for ln in resumed.stderr.splitlines() if ln.startswith("WARNING distill.runs")]
    assert len(warnings) == 1 and "checkpoint-6/model.safetensors" in warnings[0] and "using checkpoint-4" in warnings[0]
    assert "resumed from" in resumed.stdout and "checkpoint-4 at step 4" in resumed.stdout
    assert _max_diff(_weights(full / "checkpoint-6"), _weights(run / "checkpoint-6")) <= 1e-6


@pytest.mark.slow
def test_export_and_evaluate_refuse_in_one_line(reference, tmp_path):
    full, _ = reference
    as_file = tmp_path / "a_file"
    as_file.write_text("")
    assert "a_file: is a file" in _one_error(_cli("export", full, as_file))

    empty = tmp_path / "no_checkpoints"
    empty.mkdir()
    shutil.copy(full / "recipe.yaml", empty / "recipe.yaml")
    assert "no complete checkpoint in" in _one_error(_cli("export", empty, tmp_path / "out"))

    nan_run = tmp_path / "nan_run"
    shutil.copytree(full, nan_run)
    checkpoint = nan_run / "checkpoint-6"
    weights = _weights(checkpoint)
    name = next(k for k in weights if k.startswith("encoder."))
    weights[name][...] = float("nan")
    save_file(weights, str(checkpoint / "model.safetensors"))
    info = checkpoint_info(checkpoint)  # re-record the checksums: NaN weights, not a damaged file
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps({**info, "files": _hash_files(checkpoint)}))
    (nan_run / "best_checkpoint.json").unlink(missing_ok=True)
    line = _one_error(_cli("export", nan_run, tmp_path / "nan_out"))
    assert "export refused: the student has" in line and "non-finite weights" in line

    nothing = tmp_path / "nothing"
    nothing.mkdir()
    assert "neither a training run (recipe.yaml) nor an exported student" in _one_error(_cli("evaluate", nothing, "--no-cost"))
    assert "not writable (ENOTDIR" in _one_error(_cli("train", "demo", "--output-dir", as_file / "run", *FAST))


@pytest.mark.slow
def test_sigterm_to_one_of_two_ranks_stops_both_and_resume_equals_uninterrupted(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "-m", "distill", "train", "demo", "training.max_steps=6", "training.save_steps=100", *FAST]
    env = {**_env(), "ACCELERATE_USE_CPU": "1"}
    full = subprocess.run([*launch, "--output-dir", str(tmp_path / "full")], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert full.returncode == 0, full.stderr[-3000:]

    run = tmp_path / "run"
    proc = subprocess.Popen([*launch, "--output-dir", str(run)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, log = time.time() + 300, run / "train_log.jsonl"
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "run ended before step 2"
        time.sleep(0.05)
    workers = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert len(workers) == 2
    os.kill(max(workers), signal.SIGTERM)  # only one rank hears it (rank order of pids does not matter)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0  # the launcher reports its workers' 143 as a failure
    assert re.search(r"exitcode\s*:\s*143", stderr), stderr[-3000:]  # the worker's own code, in the launcher's report
    stop = re.search(r"SIGTERM: stopped at step (\d); checkpoint (\S+);", stdout)
    assert stop, stdout[-2000:] + stderr[-2000:]
    step = int(stop.group(1))
    assert step < 6 and verify_checkpoint(run / f"checkpoint-{step}") is None
    assert len(list((run / f"checkpoint-{step}").glob("random_states_*.pkl"))) == 2  # both ranks wrote their part

    resumed = subprocess.run([*launch, "--output-dir", str(run), "--resume-from", "latest"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _max_diff(_weights(tmp_path / "full" / "checkpoint-6"), _weights(run / "checkpoint-6")) <= 1e-6


def test_stop_signals_record_the_first_and_ignore_a_forwarded_repeat(tiny):
    from distill.training.faults import EXIT_CODES, StepHealth, StopSignals

    accelerator = tiny[0]
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / a background job
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # a launcher forwarding it: still one request, no exit
        health = StepHealth.agree(accelerator, signals.received, False, torch.tensor(1.0), {"l1/0": False})
    assert signals.received == signal.SIGINT and health.signal == signal.SIGINT and health.finite
    assert EXIT_CODES[health.signal] == 130
    assert signal.getsignal(signal.SIGINT) == before  # restored on exit
    bad = StepHealth.agree(accelerator, None, True, torch.tensor(float("inf")), {"l1/0": True, "cos/0": False})
    assert (bad.signal, bad.loss_ok, bad.grad_ok, bad.bad_parts) == (None, False, False, ["l1/0"])


_TWO_SIGNALS = """
import os, signal, time
from distill.training.faults import StopSignals
with StopSignals():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1.5)
    os.kill(os.getpid(), signal.SIGTERM)  # a second request, not a forwarded copy: exit at once
    time.sleep(30)
"""


def test_a_second_signal_exits_at_once():
    started = time.time()
    result = _cli(prefix=("-c", _TWO_SIGNALS), timeout=60)
    assert result.returncode == 143 and time.time() - started < 25
    assert "second SIGTERM: exiting now without a checkpoint" in result.stderr


@pytest.mark.slow
def test_cache_targets_killed_by_sigterm_resumes_where_it_stopped(tmp_path):
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "distill", "cache-targets", "demo", "--out", str(cache), "--shard-size", "4", *FAST]
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, manifest = time.time() + 240, cache / "manifest.json"
    while not (manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2):
        assert proc.poll() is None and time.time() < deadline, "cache-targets ended before its second shard"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    done = {e["file"]: (cache / e["file"]).stat().st_mtime_ns for e in json.loads(manifest.read_text())["shards"]}
    assert not json.loads(manifest.read_text()).get("complete")

    again = _cli("cache-targets", "demo", "--out", cache, "--shard-size", "4", *FAST)
    assert again.returncode == 0, again.stderr[-3000:]
    final = json.loads(manifest.read_text())
    assert final["complete"] and len(final["shards"]) == 8  # 32 demo utterances in shards of 4
    assert all((cache / name).stat().st_mtime_ns == mtime for name, mtime in done.items())  # not redone


@pytest.mark.slow
def test_a_forced_student_change_that_cannot_load_is_one_line_and_changes_nothing(reference, tmp_path):
    full, args = reference
    run = tmp_path / "run"
    shutil.copytree(full, run)
    recipe = (run / "recipe.yaml").read_text()
    line = _one_error(_cli(*args, "--output-dir", run, "student.hidden_size=64", "--resume-from", "latest",
                           "--allow-recipe-change", "student.hidden_size"))
    assert "checkpoint-6: cannot be loaded into this recipe's student:" in line and "tensor(s) differ" in line
    assert (run / "recipe.yaml").read_text() == recipe and not (run / "resume_log.jsonl").exists()
