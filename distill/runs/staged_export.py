"""Exports appear whole or not at all.

An export is written into a hidden sibling of the target (`.NAME.export-PID`, on the same
filesystem, so a rename can move it) and renamed into place only once every file is written and
the reload check passed. A full disk, a failed check or a kill therefore never leaves a folder
that `AutoModel.from_pretrained` would half-load; the target keeps what it held before.

The target is replaced as a whole: a previous export's files (say a model.onnx from an earlier
`--onnx`) never outlive it. A non-empty target that is not a previous export is refused unless
the caller passes overwrite=True (`--overwrite`), and a target that holds the source folder is
always refused: replacing it would delete the run. The target's lock (`.NAME.lock`, beside it
because the folder itself is replaced) keeps two exports from writing it at once.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from students.export import EXPORT_FILES
from students.onnx import INT8_FILE, ONNX_FILE, PARITY_FILE

from .lock import export_lock_path, hold_lock

__all__ = ["ExportError", "EXPORT_NAMES", "is_previous_export", "staged_export"]

# Every file an export writes: a folder holding only these (and config.json) is a previous export.
EXPORT_NAMES = frozenset(EXPORT_FILES) | {ONNX_FILE, INT8_FILE, PARITY_FILE}


class ExportError(OSError):
    """An export that could not be written, or a target it must not touch; one line."""


def is_previous_export(folder: Path) -> bool:
    names = {p.name for p in Path(folder).iterdir()}
    return "config.json" in names and names <= EXPORT_NAMES and all((Path(folder) / n).is_file() for n in names)


def _check_target(out: Path, overwrite: bool, protect: Sequence[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: is a file; export needs a folder path")
    target = out.resolve()
    for source in protect:
        source = Path(source).resolve()
        if target == source or target in source.parents:
            raise ExportError(f"{out}: holds {source}, which the export reads; replacing it would delete that: pick another folder")
    if not out.is_dir() or not any(out.iterdir()) or is_previous_export(out) or overwrite:
        return
    found = sorted(p.name for p in out.iterdir())
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    raise ExportError(f"{out}: not empty and not a previous export (holds {shown}); an export replaces the whole folder: "
                      f"pick a new or empty one, or add --overwrite to replace what is there")


@contextmanager
def staged_export(out_dir: str | Path, overwrite: bool = False, protect: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without an error it replaces `out_dir`.

    On an error the staging folder is removed and `out_dir` is left as it was; an OSError (full
    disk, permissions) becomes one ExportError line saying so. `protect`: folders the export
    reads, which `out_dir` must neither be nor contain.
    """
    out = Path(out_dir)
    if out.is_symlink():  # write where it points: renaming the link itself would leave the old export there
        out = out.resolve()
    with hold_lock(out, "export", "export folder", path=export_lock_path(out)):
        _check_target(out, overwrite, protect)
        for leftover in out.parent.glob(f".{out.name}.export-*"):  # of exports killed earlier: we hold the lock
            shutil.rmtree(leftover, ignore_errors=True)
        stage = out.with_name(f".{out.name}.export-{os.getpid()}")
        existed = out.is_dir()
        try:
            stage.mkdir()
            yield stage
            _replace(stage, out)
        except OSError as err:
            shutil.rmtree(stage, ignore_errors=True)
            name = errno.errorcode.get(err.errno or 0, type(err).__name__)
            left = "is as it was" if existed else "not created"
            raise ExportError(f"export to {out} failed ({name}: {err.strerror or err}); nothing written, {out} {left}; "
                              f"free space or fix permissions, then export again") from None
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise


def _replace(stage: Path, out: Path) -> None:
    if not out.exists():
        os.rename(stage, out)  # atomic: the folder appears whole
        return
    # Two renames: between them `out` is missing for a moment, never half-written.
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out, old)
    try:
        os.rename(stage, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
