"""TEST-ONLY fault injection for the crash-safety tests (tests/test_resume.py, tests/test_checkpoint_safety.py).
Off unless the environment variable MEDSFT_TEST_FAULTS is set; it has no config key on purpose, so a production
config can never enable it.

    MEDSFT_TEST_FAULTS="nan_at_steps=3,5,6"      loss of optimizer steps 3, 5 and 6 (1-based) becomes NaN
    MEDSFT_TEST_FAULTS="nan_grad_at_steps=4"     loss of step 4 stays finite but its gradients become NaN
    MEDSFT_TEST_FAULTS="kill_mid_step=5"         SIGKILL inside step 5, at its last micro-batch (earlier
                                                 micro-batches of the step have already run backward)
    MEDSFT_TEST_FAULTS="kill_in_save=8"          SIGKILL while the checkpoint of step 8 is being written: every
                                                 file is in the .tmp- folder, the COMPLETE marker is not
    MEDSFT_TEST_FAULTS="kill_after_step=4"       SIGKILL right after step 4 (before its checkpoint, if any)
    MEDSFT_TEST_FAULTS="sigterm_after_step=7"    send SIGTERM to this process right after step 7

Several items are separated by ";" (e.g. "nan_at_steps=3;kill_in_save=8"). Every process of a distributed
run applies them. When the variable is unset each hook is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

import torch

ENV = "MEDSFT_TEST_FAULTS"
_KNOWN = ("nan_at_steps", "nan_grad_at_steps", "kill_mid_step", "kill_in_save", "kill_after_step", "sigterm_after_step")
_parsed: tuple[str, dict[str, set[int]]] = ("", {})


def _faults() -> dict[str, set[int]]:
    global _parsed
    raw = os.environ.get(ENV, "")
    if raw != _parsed[0]:
        table: dict[str, set[int]] = {}
        for item in filter(None, (part.strip() for part in raw.split(";"))):
            name, _, steps = item.partition("=")
            if name.strip() not in _KNOWN:
                raise ValueError(f"{ENV}: unknown fault {name!r} (known: {', '.join(_KNOWN)})")
            table[name.strip()] = {int(s) for s in steps.split(",") if s.strip()}
        _parsed = (raw, table)
    return _parsed[1]


def _hit(name: str, step: int) -> bool:
    return step in _faults().get(name, ())


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def on_micro_batch(loss_sum, step: int, is_last: bool):
    """In optimizer step `step` (1-based), after a micro-batch's forward, before its backward."""
    if not os.environ.get(ENV):
        return loss_sum
    if is_last and _hit("kill_mid_step", step):
        _kill_self()
    if _hit("nan_at_steps", step):
        return loss_sum * float("nan")
    if _hit("nan_grad_at_steps", step):
        return _NaNGradient.apply(loss_sum)
    return loss_sum


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def after_step(step: int) -> None:
    """Right after optimizer step `step` (1-based) is done, before logging and checkpointing."""
    if not os.environ.get(ENV):
        return
    if _hit("kill_after_step", step):
        _kill_self()
    if _hit("sigterm_after_step", step):
        os.kill(os.getpid(), signal.SIGTERM)


def in_save(step: int) -> None:
    """In save_checkpoint of step `step`, when the temporary folder is fully written but not yet marked."""
    if os.environ.get(ENV) and _hit("kill_in_save", step):
        _kill_self()
