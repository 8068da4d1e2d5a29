"""Preemption: SIGTERM (what SLURM sends before killing a job) -> checkpoint at the next step boundary -> exit.

The handler only sets a flag; the training loop asks `stop_requested()` after every optimizer step (after that
step's own logging and checkpoint). In a distributed run the flag is OR-reduced over all processes at that
point, so every process stops after the same step even when the signal reached them at different moments.
The loop then saves a checkpoint (unless that step was just saved) and raises `TrainingPreempted`, whose exit
code is PREEMPTED_EXIT_CODE:

    75 (EX_TEMPFAIL, "temporary failure, retry"): the run stopped cleanly with a complete checkpoint of its
    last step; rerunning the same command continues it exactly (resume.from_checkpoint=auto).

It is deliberately not 0, so schedulers and `afterok` dependencies never mistake a preempted run for a
finished one, and not 143 (killed by SIGTERM), which would suggest the checkpoint may be missing. A
wrapper can loop on it:  `until python launch.py ...; [ $? -ne 75 ]; do :; done`.

Tell SLURM to send the signal early enough for one step plus one checkpoint write, e.g.
`#SBATCH --signal=TERM@300` (or B:TERM@300 when the batch script forwards it).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

import torch

from medsft.errors import MedsftError
from medsft.runtime.startup import PREEMPTED_EXIT_CODE  # what a SIGTERM before the loop's handler exits with

log = logging.getLogger("medsft.signals")


class TrainingPreempted(MedsftError):
    """Stopped on SIGTERM after saving a checkpoint; rerun the same command to continue."""

    exit_code = PREEMPTED_EXIT_CODE


class PreemptionHandler:
    """Installs a SIGTERM handler for the duration of a run and answers 'stop now?' at step boundaries."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, _frame) -> None:
        if self.received is None:
            log.warning("received %s: saving a checkpoint at the next step boundary, then exiting with code %d",
                        signal.Signals(signum).name, PREEMPTED_EXIT_CODE)
        self.received = signum

    def install(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: SIGTERM will not trigger a checkpoint")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def stop_requested(self, accelerator) -> bool:
        """Collective when there are several processes: every process must call it at the same step."""
        local = self.received is not None
        if accelerator.num_processes == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def preempted(self, step: int, checkpoint) -> TrainingPreempted:
        name = signal.Signals(self.received).name if self.received else "a signal on another process"
        return TrainingPreempted(
            f"preempted by {name} after step {step}: checkpoint {checkpoint} is complete; rerun the same command "
            f"to continue exactly from it (resume.from_checkpoint=auto); exit code {PREEMPTED_EXIT_CODE}"
        )
