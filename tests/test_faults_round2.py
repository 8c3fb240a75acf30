"""Faults, round two (issue 19): one writer per run folder, exports that appear whole, resumed
logs without duplicates, a save failing on one rank.

Export staging is tested in process on plain folders; the rest end to end through the CLI on
the demo recipe (a few steps each), marked slow.
"""

from __future__ import annotations

import errno
import hashlib
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

from distill.runs.lock import LOCK_NAME, RunLockError, export_lock_path, hold_lock
from distill.runs.log_trim import drop_records_after
from distill.runs.staged_export import ExportError, staged_export
from conftest import cli_error

REPO = Path(__file__).resolve().parent.parent
FAST = ["teacher.pca_max_utterances=8", "data.max_crop_seconds=1.0", "training.logging_steps=1", "training.report_to=none"]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args, timeout: int = 300, prefix: tuple[str, ...] = ("-m", "distill")) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *prefix, *map(str, args)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _one_error(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- export staging, in process


def _write_export(folder: Path, text: str, extra: tuple[str, ...] = ()) -> None:
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", *extra):
        (folder / name).write_text(f"{name} {text}")


def test_an_export_appears_whole_and_leaves_nothing_beside_it(tmp_path):
    out = tmp_path / "student"
    with staged_export(out) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".student.export-")
        assert (tmp_path / ".student.lock").is_file() and not out.exists()  # nothing at the target while writing
        _write_export(stage, "new")
    assert (out / "config.json").read_text() == "config.json new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


@pytest.mark.parametrize("previous", [False, True])
def test_a_full_disk_leaves_the_target_as_it_was(tmp_path, previous):
    out = tmp_path / "student"
    if previous:
        out.mkdir()
        _write_export(out, "old")
    before = _digest(out) if previous else None
    with pytest.raises(ExportError) as err:
        with staged_export(out) as stage:
            (stage / "model.safetensors").write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    message = str(err.value)
    assert "\n" not in message and f"export to {out} failed (ENOSPC: No space left on device); nothing written" in message
    assert ("is as it was" if previous else "not created") in message
    assert sorted(p.name for p in tmp_path.iterdir()) == (["student"] if previous else [])
    if previous:
        assert _digest(out) == before


def test_a_previous_export_is_replaced_whole(tmp_path):
    out = tmp_path / "student"
    out.mkdir()
    _write_export(out, "old", extra=("model.onnx", "onnx_parity.json"))  # an earlier export --onnx
    with staged_export(out) as stage:
        _write_export(stage, "new")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert (out / "README.md").read_text() == "README.md new"  # no graph of the old student beside the new one


def test_a_link_to_an_export_folder_is_followed(tmp_path):
    real = tmp_path / "disk" / "student"
    real.mkdir(parents=True)
    _write_export(real, "old")
    (tmp_path / "student").symlink_to(real)
    with staged_export(tmp_path / "student") as stage:
        _write_export(stage, "new")
    assert (tmp_path / "student").is_symlink() and (real / "config.json").read_text() == "config.json new"


def test_a_folder_that_is_not_an_export_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    _write_export(out, "old")
    with pytest.raises(ExportError) as err:
        with staged_export(out) as stage:
            _write_export(stage, "new")
    message = str(err.value)
    assert "\n" not in message
    assert "not empty and not a previous export (holds README.md, config.json, model.safetensors and 2 more)" in message
    assert "--overwrite" in message and (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    with staged_export(out, overwrite=True) as stage:
        _write_export(stage, "new")
    assert not (out / "notes.txt").exists() and (out / "config.json").read_text() == "config.json new"


def test_a_target_holding_the_source_is_refused_even_with_overwrite(tmp_path):
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text("x")
    for target in (run, tmp_path / "runs"):
        with pytest.raises(ExportError, match="which the export reads; replacing it would delete that"):
            with staged_export(target, overwrite=True, protect=(run,)):
                pass
    assert (run / "recipe.yaml").read_text() == "x"


def test_a_killed_exports_leftovers_go_and_a_running_export_is_refused(tmp_path):
    out = tmp_path / "student"
    (tmp_path / ".student.export-999999").mkdir()  # from an export killed half way
    with hold_lock(out, "export", "export folder", path=export_lock_path(out)):
        with pytest.raises(RunLockError, match=f"export folder {out}: in use by `fusion-distill export` \\(pid {os.getpid()}"):
            with staged_export(out):
                pass
    with staged_export(out) as stage:
        _write_export(stage, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]
    with pytest.raises(FileExistsError, match="is a file; export needs a folder path"):
        (tmp_path / "a_file").write_text("")
        with staged_export(tmp_path / "a_file"):
            pass


def test_resumed_logs_keep_each_step_once(tmp_path):
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4, 5))
                                              + '{"step": 6, "lo')  # cut by the kill
    (tmp_path / "eval_log.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (2, 4)))
    assert drop_records_after(tmp_path, 4) == {"train_log.jsonl": 2, "eval_log.jsonl": 0}
    assert _steps(tmp_path / "train_log.jsonl") == [1, 2, 3, 4] and _steps(tmp_path / "eval_log.jsonl") == [2, 4]
    assert drop_records_after(tmp_path, 0) == {"train_log.jsonl": 4, "eval_log.jsonl": 2}
    assert (tmp_path / "train_log.jsonl").read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_log.jsonl", "train_log.jsonl"]  # no temp file left


# --------------------------------------------------------------------------- end to end (CLI)


# The first writer hangs in its 6th step (after checkpoint-4 and five log lines), as a run can
# while it waits on a stalled filesystem: it holds the lock for as long as the test needs.
_HANGS_AT_STEP_6 = """
import sys, time
import distill.training.loop as train
real, calls = train.loss_step, [0]
def loss_step(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 6:
        time.sleep(600)
    return real(*args, **kwargs)
train.loss_step = loss_step
from distill.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_writers_a_killed_holder_and_a_resume_with_each_log_line_once(tmp_path):
    run = tmp_path / "run"
    args = ["train", "demo", "--output-dir", run, "training.max_steps=8", "training.save_steps=4", "training.eval_steps=2", *FAST]
    first = subprocess.Popen([sys.executable, "-c", _HANGS_AT_STEP_6, *map(str, args)], cwd=REPO, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, lock, deadline = run / "train_log.jsonl", run / LOCK_NAME, time.time() + 240
    try:
        while not ((run / "checkpoint-4").is_dir() and log.exists() and len(log.read_text().splitlines()) >= 5):
            assert first.poll() is None and time.time() < deadline, "the first run ended before step 5"
            time.sleep(0.05)
        second = _one_error(_cli(*args))  # a double-click: same command, same folder
        assert f"run folder {run}: in use by `fusion-distill train` (pid {first.pid}" in second, second
        assert "one writer per folder" in second and first.poll() is None
        assert _steps(log) == [1, 2, 3, 4, 5]  # the second wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)  # OOM killer, lost node: no handler runs, the lock stays
        first.wait(30)
    assert lock.exists() and max(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*")) == 4

    resumed = _cli(*args, "--resume-from", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warnings = [ln for ln in resumed.stderr.splitlines() if ln.startswith("WARNING distill.runs.lock")]
    assert len(warnings) == 1 and f"taking over the lock of `fusion-distill train` (pid {first.pid}" in warnings[0]
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    assert "train_log.jsonl: dropped 1 line(s) past step 4" in resumed.stderr
    assert _steps(log) == [1, 2, 3, 4, 5, 6, 7, 8]  # step 5 once, though the killed run had logged it
    assert _steps(run / "eval_log.jsonl") == [2, 4, 6, 8]
    assert not lock.exists()


@pytest.mark.slow
def test_cache_targets_is_one_writer_per_cache_folder(tmp_path, foreign_holder):
    pid, lock = foreign_holder
    cache = tmp_path / "cache"
    lock(cache, "cache-targets")
    line = _one_error(_cli("cache-targets", "demo", "--out", cache, *FAST))
    assert f"cache folder {cache}: in use by `fusion-distill cache-targets` (pid {pid}" in line
    assert sorted(p.name for p in cache.iterdir()) == [LOCK_NAME]  # nothing written


@pytest.mark.slow
def test_both_ranks_of_a_launch_refuse_together_without_hanging(tmp_path, foreign_holder):
    pid, lock = foreign_holder
    run = tmp_path / "run"
    lock(run)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    started = time.time()
    result = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                             "--dynamo_backend", "no", "-m", "distill", "train", "demo", "--output-dir", str(run), *FAST],
                            cwd=REPO, env={**_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and time.time() - started < 240
    errors = re.findall(r"fusion-distill train: error: (.*?one writer per folder)", result.stderr)
    assert len(errors) == 2 and errors[0] == errors[1], result.stderr[-3000:]
    assert f"in use by `fusion-distill train` (pid {pid}" in errors[0]
    # Both lines printed: each rank got the main process's answer rather than waiting for it. Which
    # exit code the launcher then reports per rank is a race (2, or SIGTERM/SIGABRT while the
    # process group is torn down after the other rank has gone), so it is not asserted.
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]


_SAVE_FAILS_ON_RANK_1 = """
import errno, os, sys
from pathlib import Path
import torch
from accelerate import Accelerator
from distill.runs import CheckpointError
from distill.training.checkpoint import save_checkpoint
from distill.config import load_recipe

out, cfg = Path(sys.argv[1]), load_recipe("demo")
accelerator = Accelerator(cpu=True)
model, optimizer = accelerator.prepare(torch.nn.Linear(4, 3), torch.optim.AdamW(torch.nn.Linear(4, 3).parameters()))
save_checkpoint(accelerator, out, 1, 5, cfg, model)
real = accelerator.save_state
def save_state(output_dir, **kwargs):
    if accelerator.process_index == 1:  # this rank's disk (or quota) is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(output_dir, **kwargs)
accelerator.save_state = save_state
try:
    save_checkpoint(accelerator, out, 2, 5, cfg, model)
except CheckpointError as err:
    print(f"rank {accelerator.process_index}: {err}", flush=True)
    sys.exit(2)
"""


@pytest.mark.slow
def test_a_save_failing_on_one_rank_fails_it_on_every_rank_in_one_line(tmp_path):
    script = tmp_path / "save_fails.py"
    script.write_text(_SAVE_FAILS_ON_RANK_1)
    out = tmp_path / "run"
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    result = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                             "--dynamo_backend", "no", str(script), str(out)], cwd=REPO, env={**_env(), "ACCELERATE_USE_CPU": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    # The two ranks' prints may share a line of the launcher's output: find them by their ends.
    said = dict(re.findall(r"rank (\d): (checkpoint .*?then --resume-from latest)", result.stdout))
    assert sorted(said) == ["0", "1"], result.stdout[-2000:] + result.stderr[-3000:]
    assert said["0"] == said["1"]  # the same line on both ranks
    assert f"checkpoint {out / 'checkpoint-2'}: rank 1 of 2 could not write its part (ENOSPC: No space left on device); " \
           f"partial folder removed" in said["0"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("round2") / "run"
    result = _cli("train", "demo", "--output-dir", run, "training.max_steps=2", "training.save_steps=2", "training.eval_steps=null", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.mark.slow
def test_export_replaces_its_own_refuses_others_and_survives_a_full_disk(trained, tmp_path, foreign_holder, monkeypatch, capsys):
    import transformers

    from distill.cli import main

    out = tmp_path / "exported"
    assert main(["export", str(trained), str(out)]) == 0
    (out / "model.onnx").write_text("a graph of some older student")
    assert main(["export", str(trained), str(out)]) == 0
    assert "model.onnx" not in {p.name for p in out.iterdir()}  # replaced whole, nothing of the old one mixed in
    before = _digest(out)

    with monkeypatch.context() as patch:
        def disk_full(self, folder, *args, **kwargs):
            (Path(folder) / "model.safetensors").write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        patch.setattr(transformers.PreTrainedModel, "save_pretrained", disk_full)
        line = cli_error(capsys, "export", trained, out)
    assert f"export to {out} failed (ENOSPC: No space left on device); nothing written, {out} is as it was" in line
    assert _digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["exported"]

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "data.csv").write_text("a,b\n")
    assert "not empty and not a previous export (holds data.csv)" in cli_error(capsys, "export", trained, mixed)
    assert "which the export reads" in cli_error(capsys, "export", trained, trained.parent, "--overwrite")  # never the run itself
    assert main(["export", str(trained), str(mixed), "--overwrite"]) == 0 and not (mixed / "data.csv").exists()

    # Read-only commands do not take the run's lock; train does.
    pid, lock = foreign_holder
    lock(trained)
    try:
        assert main(["evaluate", str(trained), "--no-probe", "--no-cost", "--max-items", "2"]) == 0
        assert f"(pid {pid}" in cli_error(capsys, "train", "demo", "--output-dir", trained, "--resume-from", "latest", *FAST)
    finally:
        (trained / LOCK_NAME).unlink()
