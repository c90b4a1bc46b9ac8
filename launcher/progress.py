"""Progress where a user waits: bars and status lines on stderr (stdout keeps each command's
results, e.g. its last-line JSON summary).

On a terminal a bar redraws a few times a second; into a file or a pipe (CI logs, SLURM job
output) it writes one line every ``LOG_INTERVAL_S`` seconds at most, so that logs stay short.
"""
from __future__ import annotations

import sys
from typing import Any

# Seconds between a bar's lines when stderr is not a terminal.
LOG_INTERVAL_S = 5.0


def bar(total: int | None, desc: str, enabled: bool = True, unit: str = "it") -> Any:
    """A tqdm progress bar on stderr (a no-op one when not ``enabled``).

    Args:
        total: the count to reach (None: unknown).
        desc: what is being done ("embed catalog").
        enabled: False on ranks other than the main one.
        unit: what is counted.
    """
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
                mininterval=0.2 if tty else LOG_INTERVAL_S, dynamic_ncols=True)


def status(message: str, enabled: bool = True) -> None:
    """One status line on stderr, ``[clicktower] message``.

    Args:
        message: what is happening.
        enabled: False on ranks other than the main one.
    """
    if enabled:
        print(f"[clicktower] {message}", file=sys.stderr, flush=True)
