"""A resumed run redoes the steps after its checkpoint, so it first drops what the killed run
logged for them: `train_log.jsonl` and `eval_log.jsonl` then hold each step once, in order.

Both files are rewritten aside and renamed over the old one, so a kill during the rewrite keeps
either the old lines or the new ones. A line cut short by the kill (no closing newline, not JSON)
is dropped too: its step is unknown and it would break every reader.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

__all__ = ["RESUMED_LOGS", "drop_records_after"]

logger = logging.getLogger(__name__)

RESUMED_LOGS = ("train_log.jsonl", "eval_log.jsonl")


def drop_records_after(run_dir: str | Path, step: int, names: tuple[str, ...] = RESUMED_LOGS) -> dict[str, int]:
    """Keep the records with "step" <= `step` in each log; return {file name: lines dropped}."""
    dropped = {}
    for name in names:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        kept, gone = [], 0
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                record_step = None
            if isinstance(record_step, int) and record_step <= step:
                kept.append(line)
            else:
                gone += 1
        if gone:
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
            logger.info("%s: dropped %d line(s) past step %d (the resumed run writes them again)", path, gone, step)
        dropped[name] = gone
    return dropped
