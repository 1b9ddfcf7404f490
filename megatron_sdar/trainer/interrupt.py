"""Stopping a job cleanly: Slurm's preemption signals and Ctrl-C.

    preemption = Preemption()      # installs the handlers (main thread)
    ...
    if preemption.any_rank():      # collective: every rank stops after the same step
        save(); exit

SIGTERM / SIGUSR1 (Slurm's preemption, ``scancel``) and the first SIGINT (Ctrl-C) only set a flag: the
trainer finishes the step in progress, writes its checkpoint (SFT keeps none) and exits (0 for
SIGTERM, which Slurm requeues; 130 for SIGINT). A second SIGINT raises :class:`Interrupted` at once,
which ``python -m megatron_sdar.train`` reports in one line. Kept apart from the trainer so the entry
point can catch :class:`Interrupted` without importing torch.
"""
from __future__ import annotations

import signal
import sys


class Interrupted(KeyboardInterrupt):
    """A second Ctrl-C: the run stops at once, without finishing the step (``train`` prints one line
    and exits with 130)."""


class Preemption:
    """SIGTERM / SIGUSR1 (Slurm's preemption, ``scancel``) and the first SIGINT (Ctrl-C) set a flag;
    the trainer finishes the step, checkpoints (SFT keeps none) and exits. A second SIGINT raises
    :class:`Interrupted` at once, as a user who presses Ctrl-C twice expects."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""  # the first signal's
        self.interrupts = 0  # SIGINTs received
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test harness): no handler
                pass

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise Interrupted("a second SIGINT")
        self.requested = True
        self.signal_name = self.signal_name or signal.Signals(signum).name
        import torch.distributed as dist

        if signum == signal.SIGINT and (not dist.is_initialized() or dist.get_rank() == 0):
            print("\nmegatron-sdar: SIGINT: finishing the step in progress, then exiting (after an RL step with a "
                  "checkpoint; Ctrl-C again exits at once)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        """The default handlers again (the run is over: a Ctrl-C during teardown is an ordinary one)."""
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            try:
                signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
            except ValueError:
                pass

    def any_rank(self) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        if dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
