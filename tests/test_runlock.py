"""One writer per folder (issue 19): the lock file, in process.

The end-to-end cases (two `train` processes on one run folder, a killed writer's lock taken over,
two ranks refused together) are in tests/test_faults_round2.py.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from distill.runs.lock import LOCK_NAME, RunLock, RunLockError, _process_start, hold_lock, hold_lock_all_ranks, locked


def _write_holder(folder, **fields):
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": "train", "started": "2026-01-01T00:00:00Z",
              "process_start": _process_start(os.getpid()), "token": "someone-else", **fields}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(record) + "\n")
    return record


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_records_its_holder_and_goes_on_release(tmp_path):
    run = tmp_path / "run"
    with hold_lock(run, "train") as lock:
        record = json.loads((run / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["command"] == "train"
        assert record["started"].endswith("Z") and record["token"] == lock.record["token"]
        assert record["process_start"] == _process_start(os.getpid())
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # no private temp file left beside it
    assert not (run / LOCK_NAME).exists()


def test_a_second_writer_is_refused_in_one_line_naming_folder_and_holder(tmp_path):
    run = tmp_path / "run"
    with hold_lock(run, "train"):
        with pytest.raises(RunLockError) as err:
            RunLock(run, "export", "run folder").acquire()
        message = str(err.value)
        assert "\n" not in message and f"run folder {run}: in use by `fusion-distill train` (pid {os.getpid()}" in message
        assert f"kill {os.getpid()}" in message
        assert (run / LOCK_NAME).exists()  # the refused writer did not touch the holder's lock
    assert not (run / LOCK_NAME).exists()


def test_a_dead_holder_on_this_host_is_taken_over_with_one_warning(tmp_path, caplog):
    run = tmp_path / "run"
    pid = _dead_pid()
    _write_holder(run, pid=pid, process_start=None)
    with caplog.at_level(logging.WARNING, logger="distill.runs.lock"):
        with hold_lock(run, "train") as lock:
            assert json.loads((run / LOCK_NAME).read_text())["token"] == lock.record["token"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"taking over the lock of `fusion-distill train` (pid {pid}" in warnings[0]
    assert "no longer running" in warnings[0]


def test_a_reused_pid_is_recognised_by_its_start_time(tmp_path, caplog):
    # The pid is alive (it is this process) but started at another time: the holder is gone.
    run = tmp_path / "run"
    if _process_start(os.getpid()) is None:
        pytest.skip("no /proc: pid reuse cannot be told apart here")
    _write_holder(run, process_start="1")
    with caplog.at_level(logging.WARNING, logger="distill.runs.lock"), hold_lock(run, "train"):
        pass
    assert any("taking over" in r.getMessage() for r in caplog.records)


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    run = tmp_path / "run"
    _write_holder(run, host="node-17", pid=_dead_pid())
    with pytest.raises(RunLockError) as err:
        RunLock(run, "train", "run folder").acquire()
    message = str(err.value)
    assert "\n" not in message and "on host node-17" in message and "never taken over" in message
    assert f"remove {run / LOCK_NAME}" in message
    assert json.loads((run / LOCK_NAME).read_text())["host"] == "node-17"


def test_a_foreign_file_under_the_lock_name_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text("")
    with pytest.raises(RunLockError, match="exists but is not a fusion-distill lock record; remove it"):
        RunLock(run, "train").acquire()


def test_release_leaves_a_lock_that_is_no_longer_its_own(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run, "train").acquire()
    _write_holder(run, token="a-newer-holder")
    lock.release()
    assert json.loads((run / LOCK_NAME).read_text())["token"] == "a-newer-holder"


def test_an_unwritable_folder_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(RunLockError, match=r"a_file/run: not writable \(ENOTDIR") as err:
        RunLock(blocker / "run", "train").acquire()
    assert "\n" not in str(err.value)


def test_the_decorator_holds_the_lock_while_the_function_runs_and_releases_it_on_error(tmp_path):
    seen = []

    @locked("cache-targets", lambda folder, **kwargs: folder, kind="cache folder")
    def work(folder, fail=False):
        seen.append(json.loads((folder / LOCK_NAME).read_text())["command"])
        if fail:
            raise ValueError("boom")
        return "done"

    assert work(tmp_path / "cache") == "done"
    with pytest.raises(ValueError, match="boom"):
        work(tmp_path / "cache", fail=True)
    assert seen == ["cache-targets", "cache-targets"] and not (tmp_path / "cache" / LOCK_NAME).exists()
    with hold_lock_all_ranks(tmp_path / "cache", "train"):  # one process: it is the main one
        with pytest.raises(RunLockError, match="cache folder .*in use by `fusion-distill train`"):
            work(tmp_path / "cache")


def _race(folder, start_at, results):
    time.sleep(max(0.0, start_at - time.time()))
    try:
        with hold_lock(folder, "train"):
            results.put("held")
            time.sleep(1.0)
    except RunLockError:
        results.put("refused")


def test_processes_racing_for_a_dead_holders_lock_get_it_once(tmp_path):
    run = tmp_path / "run"
    _write_holder(run, pid=_dead_pid(), process_start=None)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    start_at = time.time() + 0.5
    procs = [ctx.Process(target=_race, args=(run, start_at, results)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == ["held", "refused", "refused", "refused"]
    assert not (run / LOCK_NAME).exists()


def test_folders_the_lock_created_go_again_when_nothing_was_written(tmp_path):
    with hold_lock(tmp_path / "a" / "b", "cache-targets"):
        pass
    assert not (tmp_path / "a").exists()  # a writer refused after taking the lock leaves no trace
    with hold_lock(tmp_path / "a" / "b", "cache-targets"):
        (tmp_path / "a" / "b" / "shard-0").write_text("x")
    assert (tmp_path / "a" / "b" / "shard-0").exists()
