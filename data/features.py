"""Item feature vectors: checking one, tables of them, and vectors kept in a separate file.

A feature vector (an image embedding, an attribute vector ...) travels with its item: a
``features`` field of a training record, catalog row or hard negative, or a row of a
``.npy`` matrix keyed by item id (``clicktower shard --features-file --features-ids``). An
item without one is legal (the model's learned "missing" embedding stands in); a vector of
the wrong length, with NaN or inf, or not numbers at all is a bad one (``bad_features``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from clicktower.data.errors import DataError, short_repr


class BadFeatures(ValueError):
    """A feature vector that cannot be used; the message says why (no location)."""


def check_vector(value: Any, dim: int | None = None) -> np.ndarray:
    """One feature vector as float32, checked.

    Args:
        value: a list/tuple of numbers, a numpy array, or a JSON string of a list.
        dim: the expected length (None: any non-zero length).

    Returns:
        A 1-D float32 array.

    Raises:
        BadFeatures: not a non-empty list of finite numbers, or not ``dim`` long.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadFeatures(f"not a JSON list of numbers ({exc.msg} at column {exc.colno}): "
                              f"{short_repr(value)}") from None
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "fiu" or value.ndim != 1:
            raise BadFeatures(f"expected a 1-D numeric vector, got a {value.ndim}-D {value.dtype} array")
        vector = value.astype(np.float32)
    else:
        if hasattr(value, "tolist"):  # pyarrow arrays
            value = value.tolist()
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise BadFeatures(f"expected a list of numbers, got {short_repr(value)}")
        vector = np.asarray(value, dtype=np.float32)
    if vector.size == 0:
        raise BadFeatures("empty vector")
    if dim is not None and vector.size != dim:
        raise BadFeatures(f"vector of length {vector.size}, expected {dim} (model.item_features_dim)")
    if not np.isfinite(vector).all():
        raise BadFeatures(f"vector has NaN or inf at position {int(np.flatnonzero(~np.isfinite(vector))[0])}")
    return vector


@dataclass
class FeatureTable:
    """Feature vectors of a list of items, rows without one marked.

    Args:
        values: [n, dim] float32 (zeros where ``present`` is False).
        present: [n] bool.
        bad_features: bad vectors dropped while reading (those rows are not present).
    """

    values: np.ndarray
    present: np.ndarray
    bad_features: int = 0

    @classmethod
    def from_rows(cls, rows: list[np.ndarray | None], dim: int) -> "FeatureTable":
        """Stack checked vectors (None: missing) into a table.

        Args:
            rows: one vector (``dim`` long) or None per item.
            dim: the vector length.
        """
        values = np.zeros((len(rows), dim), dtype=np.float32)
        present = np.zeros(len(rows), dtype=bool)
        for i, row in enumerate(rows):
            if row is not None:
                values[i], present[i] = row, True
        return cls(values, present)

    def take(self, index: list[int] | np.ndarray) -> "FeatureTable":
        """The rows at ``index`` (in that order)."""
        index = np.asarray(index, dtype=np.int64)
        return FeatureTable(self.values[index], self.present[index])

    @property
    def num_missing(self) -> int:
        return int((~self.present).sum())


def is_missing(value: Any) -> bool:
    """Whether a field value means "no vector" (absent, null, empty string or NaN cell)."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, float) and math.isnan(value)


def load_features_file(npy_path: str, ids_path: str) -> dict[str, np.ndarray]:
    """Vectors kept apart from the click log: a [n, dim] ``.npy`` matrix and a text file of
    n item ids, one a line (row i of the matrix is the vector of the id on line i).

    Args:
        npy_path: the matrix (float, 2-D).
        ids_path: the ids.

    Returns:
        item id -> float32 vector (rows with NaN or inf are an error: fix the file).

    Raises:
        DataError: unreadable or non-numeric matrix, row count differing from the id count,
            a duplicate or empty id, a non-finite row.
    """
    try:
        matrix = np.load(npy_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"--features-file: cannot read a .npy matrix ({exc})", source=npy_path) from None
    if matrix.ndim != 2 or matrix.dtype.kind not in "fiu" or matrix.shape[1] < 1:
        raise DataError(f"--features-file: expected a 2-D numeric matrix, got shape {matrix.shape} "
                        f"{matrix.dtype}", source=npy_path)
    try:
        with open(ids_path, encoding="utf-8") as fh:
            ids = [line.rstrip("\r\n") for line in fh]
    except OSError as exc:
        raise DataError(f"--features-ids: cannot read ({exc.strerror})", source=ids_path) from None
    if len(ids) != matrix.shape[0]:
        raise DataError(f"--features-ids: {len(ids)} ids for the {matrix.shape[0]} rows of {npy_path}",
                        source=ids_path)
    table: dict[str, np.ndarray] = {}
    for line, item_id in enumerate(ids, 1):
        item_id = item_id.strip()
        if not item_id:
            raise DataError(f"line {line}: empty item id", source=ids_path)
        if item_id in table:
            raise DataError(f"line {line}: item id {item_id!r} listed twice", source=ids_path)
        row = np.asarray(matrix[line - 1], dtype=np.float32)
        if not np.isfinite(row).all():
            raise DataError(f"row {line - 1} (item {item_id!r}) has NaN or inf", source=npy_path)
        table[item_id] = row
    return table
