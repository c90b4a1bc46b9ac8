"""User errors and how every entry point reports them: one line on stderr and exit status 2.

``ConfigError`` lives here, below every launcher module, so that config composition and the
components it composes can all raise it without importing each other.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from clicktower.data.errors import DataError

USAGE_ERROR = 2


class ConfigError(ValueError):
    """A bad experiment config or launch setting: one line naming the key at fault."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input (files, data, config), not by a bug."""
    return (DataError, ConfigError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
            PermissionError)


# Library log records dropped by ``_quiet_libraries``: (logger, message start), each with why.
_NOISE = (
    # Every checkpoint save of shared towers (one encoder under two names): accelerate lists
    # each of the ~100 aliased tensor names (~5.5 KB); the aliases are restored on load.
    ("accelerate.utils.other", "Removed shared tensor"),
    # DeepSpeed's accelerator probe, on every CPU process that imports it (no GPU is no news here).
    ("DeepSpeed", "Setting accelerator to CPU"),
)


class _DropRecords(logging.Filter):
    """Drops the log records whose message starts with ``prefix`` (one logger's, nothing else;
    accelerate's multi-process logger may put ``[RANK n] `` before it)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("[RANK "):
            msg = msg.partition("] ")[2]
        return not msg.startswith(self.prefix)


def _quiet_libraries() -> None:
    """Keep library chatter (load reports of unused pooler weights, progress bars, the floods
    in ``_NOISE``) out of the user's way, without importing the libraries: ``--help`` and
    argument errors must not wait for transformers (the variables are read at its import, and
    only set where the user has not)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already (Python callers): set it directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    for name, prefix in _NOISE:
        logger = logging.getLogger(name)  # the same object the library gets when it imports
        if not any(isinstance(f, _DropRecords) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropRecords(prefix))


def run_cli(main: Callable[[], int]) -> int:
    """Run ``main`` and turn a user error into one line and exit status 2 (no traceback wall).

    Args:
        main: the entry point; returns its exit status.
    """
    _quiet_libraries()
    try:
        return main()
    except user_error_types() as exc:
        message = str(exc)
        if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in message:
            message = f"{exc.filename}: {message}"
        elif isinstance(exc, OSError) and exc.strerror and exc.filename:
            message = f"{exc.filename}: {exc.strerror}"
        print(f"clicktower: error: {message}", file=sys.stderr, flush=True)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("clicktower: interrupted", file=sys.stderr, flush=True)
        return 130
