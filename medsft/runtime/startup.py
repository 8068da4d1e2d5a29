"""SIGTERM before the training loop takes over: exit 75 at once, with a message.

A scheduler may preempt a job at any moment, also while Python imports torch, the data is tokenized or the model
loads (tens of seconds on a large model). Without a handler the process dies of the signal (exit 143) and a
resubmit loop (`until python launch.py ...; [ $? -ne 75 ]; do :; done`) would stop. `exit_on_sigterm()` is the
first thing `launch.py` and `medsft train` do: until the training loop installs its own handler
(medsft.train.signals: checkpoint at the next step boundary, then exit 75) a SIGTERM ends the process with
PREEMPTED_EXIT_CODE. Nothing has been trained yet, so nothing is lost; `finally` blocks still run (SystemExit),
so temporary folders are removed and the experiment lock is released.

Imports only the standard library: it must be cheap enough to run before everything else.
"""

from __future__ import annotations

import signal
import sys
import threading

# 75 = EX_TEMPFAIL ("temporary failure, retry"): see medsft.train.signals.
PREEMPTED_EXIT_CODE = 75

_MESSAGE = ("medsft: received SIGTERM before training started: nothing to save yet; exiting with code "
            f"{PREEMPTED_EXIT_CODE} (rerun the same command to start, or to continue from the last checkpoint)\n")


def _stop(signum, _frame) -> None:
    try:
        sys.stderr.write(_MESSAGE)
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed: the exit code still says it
        pass
    raise SystemExit(PREEMPTED_EXIT_CODE)


def exit_on_sigterm() -> None:
    """Make SIGTERM end this process with exit code 75 (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
