"""One writer per folder: the lock that `train`, `cache-targets` and `export` hold while they write.

Two processes writing one run folder (a double-click, a re-submitted job) rotate each other's
checkpoints and interleave their log lines. So a writer first creates FOLDER/fusion-distill.lock,
a JSON record of who holds it (pid, host, when it was taken, the command, the process's own start
time) and removes it when it ends, however it ends short of being killed. A second writer exits 2
in one line naming the folder and the holder. Read-only commands (`evaluate`, `verify-cache`,
`inspect-teacher`) never look at it.

A killed writer (SIGKILL, OOM, a lost node) leaves its lock behind. On the SAME host the next
writer can tell the holder is gone (no such pid, or the pid now belongs to a process started
later) and takes the lock over with one warning. A lock written on another host is never taken
over: a pid means nothing across hosts, so the message says which file to remove once the user
knows that job is gone. "Host" is `socket.gethostname()`: two containers that share a hostname
but not a pid namespace would see each other's pids as dead, so give containers their own
hostnames (Docker and Kubernetes do by default).

Under `accelerate launch` only the main process (global rank 0) takes the lock, then tells the
other ranks whether it got it, so every rank goes on, or stops with the same line. Not one lock
per node: the nodes of one job share one run folder.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import secrets
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

__all__ = ["LOCK_NAME", "RunLockError", "RunLock", "hold_lock", "hold_lock_all_ranks", "locked", "export_lock_path"]

logger = logging.getLogger(__name__)

LOCK_NAME = "fusion-distill.lock"
# FOLDER/.fusion-distill.lock.takeover: flock'ed for the moment a stale lock is replaced (see
# _take_over); it stays once made (removing a flock file is itself a race) and holds nothing.
_GUARD_SUFFIX = ".takeover"


class RunLockError(OSError):
    """The folder is held by another writer, or the lock could not be written; one line."""


def _errno_text(err: OSError) -> str:
    return f"{errno.errorcode.get(err.errno or 0, type(err).__name__)}: {err.strerror or err}"


def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of `pid` (clock ticks since boot, /proc/PID/stat field 22), or None
    where /proc is not there. With the pid it names one process: pids are reused, start times not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]  # the command name may hold spaces: split after it


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: is there such a process (sends nothing)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


class RunLock:
    """The lock file of one folder. `acquire` takes it or raises RunLockError; `release` removes
    it only while it is still this holder's (the token decides, not the pid)."""

    def __init__(self, folder: Path, command: str, kind: str = "folder", path: Optional[Path] = None) -> None:
        self.folder = Path(folder)
        self.path = Path(path) if path is not None else self.folder / LOCK_NAME
        self.command, self.kind = command, kind
        self.record = {
            "pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "process_start": _process_start(os.getpid()),
            "token": secrets.token_hex(8),
        }
        self.held = False
        self._created: list[Path] = []

    # ----------------------------------------------------------------------------------- taking
    def acquire(self) -> "RunLock":
        # Folders this lock creates go again on release when still empty: a writer refused
        # before writing anything (a bad argument found after the lock) leaves no trace.
        self._created = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunLockError(f"{self.kind} {self.folder}: not writable ({_errno_text(err)})") from None
        for _ in range(5):  # each pass: create, or find a live holder (refuse), or clear a dead one
            if self._create():
                self.held = True
                return self
            holder = self._read()
            if holder is None:
                continue  # released between our try and our read: try again
            if holder.get("host") != self.record["host"]:
                raise RunLockError(
                    f"{self.kind} {self.folder}: in use by `fusion-distill {holder.get('command', '?')}` (pid {holder.get('pid')} "
                    f"on host {holder.get('host')}, since {holder.get('started')}); a lock from another host is never taken over: "
                    f"once that job is gone, remove {self.path}"
                )
            if _alive(int(holder.get("pid", -1)), holder.get("process_start")):
                raise RunLockError(
                    f"{self.kind} {self.folder}: in use by `fusion-distill {holder.get('command', '?')}` (pid {holder.get('pid')}, "
                    f"since {holder.get('started')}); one writer per folder: wait for it, stop it (kill {holder.get('pid')}), "
                    f"or use another folder"
                )
            self._take_over(holder)
        raise RunLockError(f"{self.kind} {self.folder}: could not take {self.path} (other processes keep racing for it)")

    def _create(self) -> bool:
        """Atomically create the lock file with its whole content; False if it exists.

        The record is written to a private file first and hard-linked to the lock name: link(2)
        fails with EEXIST when the name exists, atomically, on local filesystems and on NFS
        (O_CREAT|O_EXCL was not atomic on NFSv2), and a reader never finds an empty lock left by a
        writer killed between creating and writing it. Filesystems without hard links fall back
        to O_CREAT|O_EXCL.
        """
        text = json.dumps(self.record) + "\n"
        private = self.path.with_name(f".{self.path.name}.{os.getpid()}.{self.record['token']}")
        try:
            private.write_text(text)
            try:
                os.link(private, self.path)
                return True
            except FileExistsError:
                return False
            except OSError as err:
                if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                    raise
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        except OSError as err:
            raise RunLockError(f"{self.kind} {self.folder}: not writable ({_errno_text(err)})") from None
        finally:
            private.unlink(missing_ok=True)

    def _read(self) -> Optional[dict[str, Any]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
            if isinstance(holder, dict) and "pid" in holder:
                return holder
        except ValueError:
            pass
        # Not ours to judge (another tool's file, or hand-edited): treat it as held, say how to clear it.
        raise RunLockError(f"{self.kind} {self.folder}: {self.path} exists but is not a fusion-distill lock record; "
                           f"remove it if no process is writing this folder")

    def _take_over(self, stale: dict[str, Any]) -> None:
        """Remove a dead holder's lock, under a flock so two processes cannot both remove it and
        one of them then remove the other's fresh lock. flock (not the lock file itself) because
        the kernel drops it when its holder dies, however it dies; it only guards this moment, on
        this host, which is the only place a takeover happens."""
        guard_path = self.path.with_name(f".{self.path.name}{_GUARD_SUFFIX}")
        try:
            guard = os.open(guard_path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as err:
            raise RunLockError(f"{self.kind} {self.folder}: not writable ({_errno_text(err)})") from None
        try:
            try:
                import fcntl

                fcntl.flock(guard, fcntl.LOCK_EX)
            except (ImportError, OSError):  # no flock here (Windows, some network filesystems): a tiny race remains
                pass
            current = self._read()
            if current is not None and current.get("token") == stale.get("token"):
                self.path.unlink(missing_ok=True)
                logger.warning("%s %s: taking over the lock of `fusion-distill %s` (pid %s, since %s), which is no longer running",
                               self.kind, self.folder, stale.get("command", "?"), stale.get("pid"), stale.get("started"))
        finally:
            os.close(guard)  # also drops the flock

    # ----------------------------------------------------------------------------------- giving back
    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            current = self._read()
        except RunLockError:
            return
        if current is not None and current.get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)
        for folder in self._created:  # innermost first
            try:
                folder.rmdir()
            except OSError:  # not empty: the writer wrote something, keep it and what holds it
                break

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def export_lock_path(out_dir: Path) -> Path:
    """Beside the export folder, not in it: the export replaces the whole folder by a rename."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.lock")


@contextmanager
def hold_lock(folder: Path, command: str, kind: str = "folder", path: Optional[Path] = None) -> Iterator[RunLock]:
    """This process alone: take FOLDER/LOCK_NAME (or the lock file `path`, e.g. `export_lock_path`)."""
    with RunLock(folder, command, kind, path) as lock:
        yield lock


@contextmanager
def hold_lock_all_ranks(folder: Path, command: str, kind: str = "folder") -> Iterator[Optional[RunLock]]:
    """Every rank of an `accelerate launch` job (or the one process): the main process takes
    FOLDER/LOCK_NAME and sends the outcome to the others; all go on, or all raise its line."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    # Same arguments as Accelerator() would give (AcceleratorState reads ACCELERATE_USE_CPU), so
    # the Accelerator built after this reuses the process group set up here.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    lock, outcome = None, [None]
    if state.is_main_process:
        try:
            lock = RunLock(Path(folder), command, kind).acquire()
        except RunLockError as err:
            outcome[0] = str(err)
    if state.num_processes > 1:
        broadcast_object_list(outcome)
    if outcome[0] is not None:
        raise RunLockError(outcome[0])
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def locked(command: str, folder_of: Callable[..., Any], kind: str = "folder") -> Callable:
    """Decorator: hold the lock of the folder that `folder_of(*args, **kwargs)` names (on every
    rank, see hold_lock_all_ranks) for as long as the function runs."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with hold_lock_all_ranks(Path(folder_of(*args, **kwargs)), command, kind):
                return fn(*args, **kwargs)

        return wrapper

    return decorate
