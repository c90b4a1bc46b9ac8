"""Stop cleanly on a preemption signal or Ctrl-C: checkpoint at the next step boundary, all ranks agreeing.

SLURM (``--signal=B:USR1@grace`` forwarded by ``train.sbatch``, or ``scancel --signal=USR1``),
torchrun and Kubernetes (SIGTERM before the kill) all give a process a signal and some grace
time; a user at a terminal presses Ctrl-C (SIGINT). The handler only records it; at the end of
each step the ranks agree (a max over one flag) so that every rank saves the same step and
exits, and no rank is left waiting in a collective for one that already left. A second Ctrl-C
aborts at once, without a checkpoint (``KeyboardInterrupt``).
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
from typing import Any, Sequence

logger = logging.getLogger("clicktower")

# EX_TEMPFAIL: "temporary failure, the user is invited to retry". A preempted run exits with
# it after its checkpoint, so that job schedulers requeue (and a Kubernetes Job restarts it)
# instead of counting it as done; train.sbatch requeues on it.
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped at a step boundary after a preemption signal (checkpoint written)."""

    def __init__(self, step: int, checkpoint: str | None) -> None:
        super().__init__(f"preempted at step {step}; checkpoint {checkpoint or '(none configured)'}")
        self.step, self.checkpoint = step, checkpoint


class PreemptionHandler:
    """Records SIGUSR1/SIGTERM/SIGINT; ``requested()`` tells every rank the same answer; a
    SIGINT or SIGTERM after a SIGINT (a second Ctrl-C, as a launcher's agent passes it on)
    raises ``KeyboardInterrupt`` at once.

    Args:
        accelerator: the training accelerator (for the cross-rank agreement).
    """

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.signal_name: str | None = None
        self._previous = {}
        self._pid = os.getpid()

    def install(self) -> "PreemptionHandler":
        self._pid = os.getpid()
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, _frame: Any) -> None:
        # Only a flag: the step in flight finishes, collectives included.
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker (Ctrl-C reaches the terminal's whole process group)
        name = signal.Signals(signum).name
        if self.signal_name == "SIGINT" and signum in (signal.SIGINT, signal.SIGTERM):
            # The second Ctrl-C: the user does not want to wait. Under `accelerate launch` or
            # torchrun the terminal's Ctrl-C reaches only the agent, which passes the first on
            # as SIGINT and the second as SIGTERM to its workers.
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            # os.write, not print: a handler that prints while the main thread is printing
            # would raise "reentrant call" inside the step. One line per run, not per rank:
            # torchrun's agent passes the terminal's Ctrl-C on to every worker.
            if self.accelerator is None or self.accelerator.is_main_process:
                os.write(2, b"Ctrl-C: saving a checkpoint at the end of this step, then stopping "
                         b"(Ctrl-C again aborts without one)\n")
        self.signal_name = name

    def requested(self) -> bool:
        """Whether any rank got a signal (collective: every rank calls it every step)."""
        import torch

        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        stop = bool(flag.item() > 0)
        if stop and self.accelerator.is_main_process:
            logger.warning("preemption signal %s: saving a checkpoint and stopping",
                           self.signal_name or "(on another rank)")
        return stop


def resume_command(args: Sequence[str], resume_setting: str, launched: bool) -> str:
    """The command that continues a stopped run: the same one, with ``train.resume=auto``.

    Args:
        args: the ``clicktower train`` arguments of the run (config and overrides).
        resume_setting: the run's ``train.resume`` (anything but ``auto`` is replaced).
        launched: started by a launcher (``accelerate launch``, torchrun), whose own
            command line this process cannot see.
    """
    kept = list(args)
    if resume_setting != "auto":
        kept = [arg for arg in kept if not arg.startswith("train.resume=")] + ["train.resume=auto"]
    if launched:
        return "the same launch command with: -m clicktower.launcher.train " + shlex.join(kept)
    return "clicktower train " + shlex.join(kept)
