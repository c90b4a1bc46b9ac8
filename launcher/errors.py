"""User errors and how every entry point reports them: one line on stderr and exit status 2.

``ConfigError`` lives here, below every launcher module, so that config composition and the
components it composes can all raise it without importing each other.
"""
from __future__ import annotations

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


def _quiet_libraries() -> None:
    """Keep library chatter (load reports of unused pooler weights...) out of the user's way."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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
