"""Stop cleanly on a preemption signal: checkpoint at the next step boundary, all ranks agreeing.

SLURM (``--signal=B:USR1@grace`` forwarded by ``train.sbatch``, or ``scancel --signal=USR1``),
torchrun and Kubernetes (SIGTERM before the kill) all give a process a signal and some grace
time. The handler only records it; at the end of each step the ranks agree (a max over one
flag) so that every rank saves the same step and exits, and no rank is left waiting in a
collective for one that already left.
"""
from __future__ import annotations

import logging
import signal
from typing import Any

logger = logging.getLogger("clicktower")

# EX_TEMPFAIL: "temporary failure, the user is invited to retry". A preempted run exits with
# it after its checkpoint, so that job schedulers requeue (and a Kubernetes Job restarts it)
# instead of counting it as done; train.sbatch requeues on it.
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Training stopped at a step boundary after a preemption signal (checkpoint written)."""

    def __init__(self, step: int, checkpoint: str | None) -> None:
        super().__init__(f"preempted at step {step}; checkpoint {checkpoint or '(none configured)'}")
        self.step, self.checkpoint = step, checkpoint


class PreemptionHandler:
    """Records SIGUSR1/SIGTERM; ``requested()`` tells every rank the same answer.

    Args:
        accelerator: the training accelerator (for the cross-rank agreement).
    """

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> "PreemptionHandler":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, _frame: Any) -> None:
        # Only a flag: the step in flight finishes, collectives included.
        self.signal_name = signal.Signals(signum).name

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
