"""User-facing data errors.

``DataError`` is what the ``clicktower`` CLI turns into one line on stderr and exit status 2,
so every message is a single line that names the file, the row (or JSONL line) and the field
at fault: ``clicks.csv: row 3: field 'label': not a number: 'abc'``.
"""
from __future__ import annotations

from typing import Any


def _one_line(text: str) -> str:
    # A message is printed as one stderr line by the CLI; a path or value containing a
    # newline must not split it, so line breaks are shown escaped instead.
    return text.replace("\r", "\\r").replace("\n", "\\n")


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for quoting bad values in messages."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


class DataError(ValueError):
    """A bad input file or data directory: one line naming the file, row and field.

    Args:
        message: what is wrong, e.g. ``"not a number: 'abc'"``.
        source: the file (or directory) at fault.
        row: 1-based data row number (CSV/Parquet/datasets) or line number (JSONL).
        field: the field/column at fault.
        unit: how ``row`` is named in the message: ``"row"`` or ``"line"``.

    The structured parts stay available as attributes (``source``, ``row``, ``field``) for
    callers and tests; ``str(err)`` is the formatted single line.
    """

    def __init__(
        self,
        message: str,
        *,
        source: Any = None,
        row: int | None = None,
        field: str | None = None,
        unit: str = "row",
    ):
        self.message = message
        self.source = None if source is None else str(source)
        self.row = row
        self.field = field
        self.unit = unit
        parts = []
        if self.source is not None:
            parts.append(self.source)
        if row is not None:
            parts.append(f"{unit} {row}")
        if field is not None:
            parts.append(f"field {field!r}")
        parts.append(message)
        super().__init__(_one_line(": ".join(parts)))
