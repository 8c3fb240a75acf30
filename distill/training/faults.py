"""What the training loop needs to survive faults: stop signals and non-finite steps.

Preemption: SLURM, Kubernetes and spot instances send SIGTERM (a terminal sends SIGINT) and
kill the job some seconds later. `StopSignals` turns the first signal into a request that the
loop honours after the current optimizer step (it then writes a checkpoint and exits 143 or
130); a second signal exits at once, for a user who does not want to wait. A launcher that
received the signal itself forwards it to its workers (torchrun does), so a worker often gets the
same signal twice within a moment: a repeat within `_REPEAT_WINDOW_S` counts as the same request.

Non-finite steps: `StepHealth` holds one step's flags (signals received, non-finite loss, loss
parts, gradient norm) as one tensor, so a single all-reduce makes every rank take the same
decision: skip the update everywhere, or stop everywhere. DDP replicas stay equal.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator

from ..config import RecipeConfig
from ..runs import CheckpointError, checkpoint_dir, list_checkpoints
from .checkpoint import mark_diverged, save_checkpoint

__all__ = [
    "StopSignals", "Preempted", "TrainingDiverged", "StepHealth", "EXIT_CODES", "errno_name", "check_writable",
    "count_nonfinite_step", "preempt",
]

logger = logging.getLogger(__name__)

# 128 + signal number: what a shell reports for a process killed by that signal.
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
_ORDER = (signal.SIGTERM, signal.SIGINT)  # flag positions in StepHealth
_REPEAT_WINDOW_S = 1.0


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; the exit code is 143 or 130."""


class TrainingDiverged(ValueError):
    """Too many non-finite steps in a row; the message is one line naming the good checkpoint."""


class StopSignals:
    """Context manager: the first SIGTERM/SIGINT sets `received`; a second one exits at once."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._received_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        # Handlers can only be installed from the main thread (train() called from a worker
        # thread, e.g. a notebook helper, keeps the default behaviour).
        if threading.current_thread() is threading.main_thread():
            for signum in _ORDER:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            if signum == self.received and time.monotonic() - self._received_at < _REPEAT_WINDOW_S:
                return  # the launcher forwarding what this process already got
            os.write(2, f"\nsecond {signal.Signals(signum).name}: exiting now without a checkpoint\n".encode())
            os._exit(EXIT_CODES[signum])
        self.received, self._received_at = signum, time.monotonic()
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this optimizer step and saving a checkpoint "
                    f"(send it again to exit at once)\n".encode())


@dataclass
class StepHealth:
    """One optimizer step's agreed flags: stop signals, non-finite loss, gradient norm and parts."""

    signal: Optional[int]  # the signal to stop for (SIGTERM wins over SIGINT), or None
    loss_ok: bool
    grad_ok: bool
    bad_parts: list[str]  # loss parts that were non-finite on some rank

    @property
    def finite(self) -> bool:
        return self.loss_ok and self.grad_ok

    @classmethod
    def agree(
        cls, accelerator: Accelerator, received: Optional[int], loss_bad: bool, grad_norm: Optional[torch.Tensor], parts_bad: dict[str, bool]
    ) -> "StepHealth":
        """Sum every rank's flags in one all-reduce; a flag set on any rank holds on all."""
        grad_bad = grad_norm is not None and not bool(torch.isfinite(grad_norm).all())
        names = list(parts_bad)  # every rank computes the same parts, in the same order
        flags = [float(received == s) for s in _ORDER] + [float(loss_bad), float(grad_bad)] + [float(parts_bad[n]) for n in names]
        summed = torch.tensor(flags, device=accelerator.device)
        if accelerator.num_processes > 1:
            summed = accelerator.reduce(summed, reduction="sum")
        values = summed.tolist()
        stop = next((s for s, v in zip(_ORDER, values) if v > 0), None)
        return cls(stop, values[2] == 0, values[3] == 0, [n for n, v in zip(names, values[4:]) if v > 0])


def errno_name(err: OSError) -> str:
    return f"{errno.errorcode.get(err.errno or 0, type(err).__name__)}: {err.strerror or err}"


def check_writable(out: Path, rank: int) -> None:
    """Fail now, in one line, rather than at the first checkpoint hours into the run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{rank}.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"training.output_dir {out}: not writable ({errno_name(err)})") from None


def count_nonfinite_step(accelerator: Accelerator, state, health: StepHealth, limit: int, out: Path) -> None:
    """Count a skipped step; after `limit` in a row, mark the weights' checkpoint and stop."""
    state.nonfinite_steps += 1
    state.nonfinite_in_a_row += 1
    what = " and ".join(w for w, ok in (("loss", health.loss_ok), ("gradient norm", health.grad_ok)) if not ok)
    parts = f" (parts: {', '.join(health.bad_parts)})" if health.bad_parts else ""
    if accelerator.is_main_process:
        logger.warning("step %d: non-finite %s%s; update skipped (%d in a row, %d in all)",
                       state.step + 1, what, parts, state.nonfinite_in_a_row, state.nonfinite_steps)
    accelerator.log({"train/nonfinite_steps": state.nonfinite_steps}, step=state.step)
    if state.nonfinite_in_a_row < limit:
        return
    # Every step of the streak ran from the weights of state.step: resuming there would repeat it.
    if accelerator.is_main_process:
        mark_diverged(out, state.step, f"{limit} non-finite steps in a row from these weights")
    accelerator.wait_for_everyone()
    good = list_checkpoints(out)
    where = (f"newest good checkpoint: {good[-1]}; resume from it with a lower learning rate: --resume-from latest "
             f"training.learning_rate=LR --allow-recipe-change training.learning_rate") if good else "no good checkpoint to resume from"
    accelerator.end_training()
    raise TrainingDiverged(f"stopped at step {state.step + 1}: {limit} steps in a row with a non-finite {what}{parts} "
                           f"(training.max_nonfinite_steps={limit}; no update applied since step {state.step}); {where}")


def preempt(accelerator: Accelerator, out: Path, state, skipped, cfg: RecipeConfig, student, signum: int, progress, saved: bool) -> None:
    """After a stop signal: checkpoint this step (unless just saved), say how to resume, exit 143/130.

    state: the TrainState; skipped: its SkipCounter; saved: checkpoint-STEP was written this step.
    """
    progress.close()
    state.skipped = skipped.counts
    written = checkpoint_dir(out, state.step) if saved else None
    if written is None:
        written = save_checkpoint(accelerator, out, state.step, cfg.training.save_total_limit, cfg, student)
    accelerator.end_training()
    if written is None:  # non-finite weights are never saved; the newest good checkpoint is still there
        good = list_checkpoints(out)
        where = f"no checkpoint written (non-finite weights); newest good: {good[-1] if good else 'none'}"
    else:
        where = f"checkpoint {written}"
    accelerator.print(f"{signal.Signals(signum).name}: stopped at step {state.step}; {where}; resume with: "
                      f"fusion-distill train RECIPE --output-dir {out} --resume-from latest")
    raise Preempted(EXIT_CODES[signum])
