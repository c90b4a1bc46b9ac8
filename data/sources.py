"""Read click logs (CSV/TSV, JSON Lines, Parquet, Hugging Face ``datasets`` folders) as records.

Two layers: ``iter_records(path)`` streams ``(row_number, record_dict)`` from one input,
whatever its format (1-based data rows; for JSON Lines the physical line number, so an editor
jumps straight to a bad line), and ``to_sample(record, field_map, ...)`` turns one record
into a training sample as a ``FieldMap`` describes, or ``None`` when the label is below
``min_label``. ``split_input`` cuts an input into the ranges the shard writers share.

Every problem with an input is a ``DataError`` whose one-line message names the file, the row
(or line) and the field. Supported inputs (by extension, case-insensitive: ``.csv``/``.tsv``
with a header row, UTF-8 with or without BOM; ``.jsonl``/``.json``; those gzipped;
``.parquet``, streamed by record batches; a ``datasets.save_to_disk`` folder, ``DIR:split``):
docs/data.md ("Sharding", "Bad input").
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import gzip
import json
import math
import os
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from clicktower.data.errors import DataError, short_repr
from clicktower.data.features import BadFeatures, check_vector, is_missing

__all__ = [
    "FieldMap",
    "SUPPORTED_EXTENSIONS",
    "check_fields",
    "compose_item_text",
    "iter_records",
    "record_fields",
    "split_input",
    "to_sample",
]

# Text formats by (lower-cased) extension; each may also carry a trailing ".gz".
_TEXT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
                 ".ndjson": "jsonl"}
SUPPORTED_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json", ".ndjson", ".parquet",
                        ".csv.gz", ".tsv.gz", ".jsonl.gz", ".json.gz", ".ndjson.gz")

# Rows read per Parquet record batch / datasets batch: big enough to amortise the
# Arrow -> Python conversion, small enough to keep memory flat on huge files.
_BATCH_ROWS = 8192
# csv's default 128 KiB field limit is too small for long item descriptions.
_CSV_FIELD_LIMIT = 64 * 1024 * 1024


# --------------------------------------------------------------------------------------
# Field mapping
# --------------------------------------------------------------------------------------

@dataclass
class FieldMap:
    """Which input fields (columns) feed which sample fields.

    Args:
        query: field holding the query text.
        item_text: field holding the clicked item's text.
        item_id: field holding the item's id (strings or integers; stored as a string).
        label: optional numeric field (click, purchase, relevance grade...). When set, samples
            carry ``"label"`` as a float.
        min_label: keep only rows whose label is ``>= min_label``; requires ``label``.
        hard_negatives: optional field holding a list of ``{"item_id", "item_text"}`` objects
            (or a JSON string of such a list, as CSV cells do).
        weight: optional numeric, non-negative per-sample weight field.
        item_fields: optional structured item fields (e.g. ``["title", "brand", "category",
            "attributes"]``), kept as the sample's ``"item"`` object. When the record has no
            ``item_text`` field, the item text is composed from them (``compose_item_text``).
        features: optional field holding a precomputed item feature vector (a list of
            numbers, or a JSON string of one), stored as a float32 ``.npy`` shard member;
            a row where it is null or absent has no vector (the model's "missing"
            embedding stands in). Hard negatives may carry a ``features`` key likewise.
        exclude_ids: optional field holding a list of item ids (or a JSON string of one)
            that the sample's query must never be scored against (judged but not clicked
            items, variants of its positive); stored as ``"exclude_ids"`` (id strings). A null
            or absent value is an empty list.
        teacher_scores: optional field holding a list of numbers: a teacher's scores of the
            sample's positive, then of each of its hard negatives (so ``1 + len(hard
            negatives)`` of them); stored as ``"teacher_scores"`` for distillation.
    """

    query: str = "query"
    item_text: str = "item_text"
    item_id: str = "item_id"
    label: str | None = None
    min_label: float | None = None
    hard_negatives: str | None = None
    weight: str | None = None
    item_fields: list[str] | None = None
    features: str | None = None
    exclude_ids: str | None = None
    teacher_scores: str | None = None

    def __post_init__(self):
        for name in ("query", "item_text", "item_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"field map: {name} must be a non-empty field name, "
                                f"got {short_repr(value)}")
        if self.item_fields is not None:
            if isinstance(self.item_fields, str) or not self.item_fields or not all(
                    isinstance(f, str) and f.strip() for f in self.item_fields):
                raise DataError(f"field map: item_fields must be a non-empty list of field "
                                f"names, got {short_repr(self.item_fields)}")
            self.item_fields = list(self.item_fields)
        for name in ("label", "hard_negatives", "weight", "features", "exclude_ids", "teacher_scores"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise DataError(f"field map: {name} must be a non-empty field name or None, "
                                f"got {short_repr(value)}")
        if self.min_label is not None:
            if self.label is None:
                raise DataError("field map: min_label needs a label field (--label-field)")
            if isinstance(self.min_label, bool) or not isinstance(self.min_label, (int, float)) \
                    or not math.isfinite(self.min_label):
                raise DataError(f"field map: min_label must be a finite number, "
                                f"got {short_repr(self.min_label)}")
            self.min_label = float(self.min_label)

    def source_fields(self) -> list[str]:
        """Input fields every record must have, in mapping order, without duplicates."""
        # With structured item fields the item text may be composed, so it is optional.
        names = [self.query, self.item_id, None if self.item_fields else self.item_text,
                 self.label, self.weight, self.hard_negatives, *(self.item_fields or ()),
                 self.features, self.teacher_scores]
        return list(dict.fromkeys(n for n in names if n is not None))

    def sample_fields(self) -> list[str]:
        """Fields of the samples ``to_sample`` produces (the manifest's ``"fields"``)."""
        fields = ["query", "item_id", "item_text"]
        if self.label is not None:
            fields.append("label")
        if self.weight is not None:
            fields.append("weight")
        if self.hard_negatives is not None:
            fields.append("hard_negatives")
        if self.item_fields is not None:
            fields.append("item")
        if self.features is not None:
            fields.append("features")
        for name in ("exclude_ids", "teacher_scores"):
            if getattr(self, name) is not None:
                fields.append(name)
        return fields

    def to_dict(self) -> dict:
        """Plain dict (for the manifest); ``FieldMap(**d)`` rebuilds it."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def _unit_for(source: str) -> str:
    """How rows of ``source`` are numbered in messages: JSONL by line, the rest by row."""
    name = str(source).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return "line" if _TEXT_FORMATS.get(os.path.splitext(name)[1]) == "jsonl" else "row"


class _DecodeError(Exception):
    def __init__(self, lineno: int, exc: UnicodeDecodeError):
        self.lineno, self.exc = lineno, exc


class _Reader:
    """One input. ``fields()`` reads only the header/schema/first record;
    iterating yields ``(row, record)``. Subclasses per format."""

    unit = "row"
    # Optional part of the input to read (see ``split_input``): ``{"start", "end",
    # "first_line"}`` (uncompressed JSONL) or ``{"row_groups", "first_row"}`` (Parquet).
    part: dict | None = None
    fields_origin = "the input"   # where fields() found the names, for error messages
    fields_row: int | None = None  # and at which row/line, where that means anything

    def __init__(self, path: str, display: str):
        self.path = path          # what to open
        self.display = display    # what to name in messages (as the user wrote it)

    def error(self, message: str, row: int | None = None, field: str | None = None):
        return DataError(message, source=self.display, row=row, field=field, unit=self.unit)

    def fields(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[int, dict]]:  # pragma: no cover - abstract
        raise NotImplementedError


class _TextReader(_Reader):
    """Line-oriented UTF-8 text, optionally gzip-compressed."""

    def __init__(self, path: str, display: str, gz: bool):
        super().__init__(path, display)
        self.gz = gz

    def _lines(self) -> Iterator[tuple[int, str]]:
        """(line number, decoded line with its newline); decodes line by line so that invalid
        UTF-8 is reported with the line it is on."""
        opener = gzip.open if self.gz else open
        part = self.part
        # bytes and lines yielded so far: split_input's cut points
        self.consumed = self.lines_consumed = 0
        try:
            with opener(self.path, "rb") as fh:
                lines: Iterator[bytes] = fh
                first = 1
                if part is not None:   # a byte range cut at line boundaries (split_input)
                    fh.seek(part["start"])
                    lines = _lines_until(fh, part["end"] - part["start"])
                    first = part["first_line"]
                for lineno, raw in enumerate(lines, first):
                    self.consumed += len(raw)
                    self.lines_consumed += 1
                    try:
                        # utf-8-sig on line 1: spreadsheet exports start with a BOM, which
                        # would otherwise glue itself to the first column name.
                        yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                    except UnicodeDecodeError as exc:
                        raise _DecodeError(lineno, exc) from None
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise self.error(f"corrupt or truncated gzip data ({exc})") from None


def _lines_until(fh, size: int) -> Iterator[bytes]:
    """The lines of ``fh`` from where it stands that start within the next ``size`` bytes."""
    pos = 0
    for raw in fh:
        if pos >= size:
            return
        pos += len(raw)
        yield raw


class _CsvReader(_TextReader):
    fields_origin = "the header"

    def __init__(self, path: str, display: str, gz: bool, delimiter: str):
        super().__init__(path, display, gz)
        self.delimiter = delimiter

    def _rows(self) -> Iterator[tuple[int, list[str] | None, list[str]]]:
        """Yields (row, header, cells); row 0 is the header itself."""
        csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
        lines = self._lines()
        current = {"line": 0}

        def text():
            for lineno, line in lines:
                current["line"] = lineno
                yield line

        reader = csv.reader(text(), delimiter=self.delimiter)
        row = 0
        header = None
        if self.part is not None and self.part["start"] > 0:
            # a byte range from split_input, past the header: read it at the top of the file
            header = self._file_header()
            row = self.part["first_row"] - 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except _DecodeError as exc:
                raise self.error(f"invalid UTF-8 on line {exc.lineno} "
                                 f"(byte {exc.exc.start}): {exc.exc.reason}",
                                 row=None if header is None else row + 1) from None
            except csv.Error as exc:
                raise self.error(f"malformed CSV near line {current['line']}: {exc}",
                                 row=None if header is None else row + 1) from None
            if not cells:  # blank line: not a row
                continue
            if header is None:
                header = [c.strip() for c in cells]
                dupes = sorted({c for c in header if header.count(c) > 1})
                if dupes:
                    raise self.error(f"header repeats column name(s) "
                                     f"{', '.join(map(repr, dupes))}")
                yield 0, header, header
                continue
            row += 1
            if len(cells) != len(header):
                raise self.error(f"expected {len(header)} columns (as in the header), "
                                 f"got {len(cells)}", row=row)
            yield row, header, cells
        if self.part is not None:   # a range may hold no rows; the whole file was checked
            return
        if header is None:
            raise self.error("empty file, no rows")
        if row == 0:
            raise self.error("empty file, no rows (only a header)")

    def _file_header(self) -> list[str]:
        part, self.part = self.part, None
        try:
            return self.fields()
        finally:
            self.part = part

    def fields(self) -> list[str]:
        rows = self._rows()
        try:
            return next(rows)[1]
        finally:
            rows.close()

    def __iter__(self):
        for row, header, cells in self._rows():
            if row:
                yield row, dict(zip(header, cells))


class _JsonlReader(_TextReader):
    unit = "line"
    fields_origin = "the first record"

    def fields(self) -> list[str]:
        records = iter(self)
        try:
            self.fields_row, record = next(records)
            return list(record)
        finally:
            records.close()

    def __iter__(self):
        count = 0
        lines = self._lines()
        while True:
            try:
                lineno, line = next(lines)
            except StopIteration:
                break
            except _DecodeError as exc:
                raise self.error(f"invalid UTF-8 (byte {exc.exc.start}): {exc.exc.reason}",
                                 row=exc.lineno) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                hint = ""
                if count == 0 and line.lstrip().startswith("["):
                    hint = " (expected JSON Lines: one object per line, not a JSON array)"
                raise self.error(f"invalid JSON: {exc.msg} at column {exc.colno}{hint}",
                                 row=lineno) from None
            if not isinstance(record, dict):
                raise self.error(f"expected a JSON object, got {type(record).__name__}",
                                 row=lineno)
            count += 1
            yield lineno, record
        # A part of a file may hold only blank lines; the whole file may not.
        if count == 0 and self.part is None:
            raise self.error("empty file, no rows")


class _ParquetReader(_Reader):
    fields_origin = "the Parquet schema"

    def _open(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as exc:
            raise self.error(f"not a readable Parquet file ({exc})") from None

    def fields(self) -> list[str]:
        return list(self._open().schema_arrow.names)

    def __iter__(self):
        import pyarrow as pa

        pf = self._open()
        if pf.metadata.num_rows == 0:
            raise self.error("empty file, no rows")
        row, groups = 0, None
        if self.part is not None:   # some row groups only (split_input)
            row, groups = self.part["first_row"] - 1, self.part["row_groups"]
        try:
            for batch in pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups):
                for record in batch.to_pylist():
                    row += 1
                    yield row, record
        except (pa.ArrowException, OSError) as exc:
            raise self.error(f"unreadable Parquet data ({exc})", row=row + 1) from None


class _HFDatasetReader(_Reader):
    fields_origin = "the dataset's columns"

    def __init__(self, path: str, display: str, split: str | None):
        super().__init__(path, display)
        self.split = split
        self._dataset = None

    def _load(self):
        if self._dataset is not None:
            return self._dataset
        import datasets  # slow import: only when a datasets folder is actually read

        try:
            obj = datasets.load_from_disk(self.path)
        except FileNotFoundError:
            raise self.error("not a Hugging Face dataset folder "
                             "(expected one written by save_to_disk)") from None
        if isinstance(obj, datasets.DatasetDict):
            splits = list(obj)
            if self.split is not None:
                if self.split not in obj:
                    raise self.error(f"no split {self.split!r}; available splits: "
                                     f"{', '.join(map(repr, splits))}")
                obj = obj[self.split]
            elif len(splits) == 1:
                obj = obj[splits[0]]
            else:
                raise self.error(f"dataset has {len(splits)} splits "
                                 f"({', '.join(map(repr, splits))}); name one as PATH:split")
        elif self.split is not None:
            raise self.error(f"a single Dataset has no splits; drop ':{self.split}'")
        self._dataset = obj
        return obj

    def fields(self) -> list[str]:
        return list(self._load().column_names)

    def __iter__(self):
        ds = self._load()
        if ds.num_rows == 0:
            raise self.error("empty dataset, no rows")
        row = 0
        for batch in ds.iter(batch_size=_BATCH_ROWS):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns)):
                row += 1
                yield row, dict(zip(columns, values))


_DOWNLOADS: dict[str, str] = {}   # URL -> local copy, for this process


def _localize(url: str) -> str:
    """A local copy of the file at ``url`` (downloaded once per process into a temporary
    folder removed at exit): the readers seek, split and reopen their input."""
    local = _DOWNLOADS.get(url)
    if local is None:
        import atexit
        import shutil
        import tempfile

        from clicktower.data.storage import Storage

        if not _DOWNLOADS:
            folder = tempfile.mkdtemp(prefix="clicktower-inputs-")
            _DOWNLOADS[""] = folder
            atexit.register(shutil.rmtree, folder, True)
        name = str(len(_DOWNLOADS)) + "-" + url.rstrip("/").rsplit("/", 1)[-1]
        local = os.path.join(_DOWNLOADS[""], name)
        try:
            data = Storage().read_bytes(url)
        except (FileNotFoundError, IsADirectoryError):
            raise DataError("no such file", source=url) from None
        with open(local, "wb") as fh:
            fh.write(data)
        _DOWNLOADS[url] = local
    return local


def _open_reader(path) -> _Reader:
    """Pick the reader for ``path`` and check, eagerly, that it exists and is supported.
    A URL (``s3://...``, ``https://...``) is downloaded first and named as the URL."""
    display = os.fspath(path)
    if not isinstance(display, str):
        display = os.fsdecode(display)
    from clicktower.data.storage import is_url

    if is_url(display):
        local = _localize(display)
    elif os.path.isdir(display):
        return _HFDatasetReader(display, display, None)
    else:
        local = display
        if not os.path.exists(display) and ":" in display:
            base, split = display.rsplit(":", 1)
            if split and os.path.isdir(base):
                return _HFDatasetReader(base, display, split)
        if not os.path.exists(display):
            raise DataError("no such file", source=display)
        if not os.path.isfile(display):
            raise DataError("not a regular file", source=display)

    name = display.lower()
    gz = name.endswith(".gz")
    stem = name[:-3] if gz else name
    ext = os.path.splitext(stem)[1]
    kind = _TEXT_FORMATS.get(ext)
    if ext == ".parquet" and not gz:
        reader: _Reader = _ParquetReader(local, display)
    elif kind == "jsonl":
        reader = _JsonlReader(local, display, gz)
    elif kind in ("csv", "tsv"):
        reader = _CsvReader(local, display, gz, "," if kind == "csv" else "\t")
    else:
        raise DataError(f"unsupported input type {ext + ('.gz' if gz else '') or '(none)'!r}; "
                        f"expected one of {', '.join(SUPPORTED_EXTENSIONS)} "
                        f"or a datasets folder", source=display)
    if os.path.getsize(local) == 0:
        raise DataError("empty file, no rows", source=display)
    return reader


def iter_records(path, part: dict | None = None) -> Iterator[tuple[int, dict]]:
    """Stream the records of one input file or datasets folder.

    Args:
        path: a ``.csv``/``.tsv``/``.jsonl``/``.json`` file (optionally ``.gz``), a
            ``.parquet`` file, or a ``save_to_disk`` folder (``DIR:split`` for a split).
        part: optional part of the input from ``split_input`` (``None``: all of it); row
            numbers stay those of the whole file.

    Returns:
        An iterator of ``(row, record)``: ``row`` is the 1-based data row (JSONL: line
        number), ``record`` maps field names to values (CSV values are strings).

    Raises:
        DataError: raised by this call for a missing file, unsupported extension or empty
            file; raised while iterating for unreadable content (invalid UTF-8, invalid
            JSON line, wrong CSV column count, no rows...).
    """
    reader = _open_reader(path)  # eager: a bad path fails here, not at the first next()
    reader.part = part
    return iter(reader)


def _split_csv(reader: "_CsvReader", split_bytes: int) -> list[dict]:
    size = os.path.getsize(reader.path)
    if size <= split_bytes:
        return [{"part": None, "bytes": size}]
    cuts = []   # (byte offset just past a record, the next record's row number)
    target = split_bytes
    rows = reader._rows()
    try:
        for row, _, _ in rows:
            # csv.reader pulls lines one at a time and returns a record as soon as its last
            # line is in, so the bytes consumed end exactly at this record.
            pos = reader.consumed
            if row and pos >= target and pos < size:
                cuts.append((pos, row + 1, reader.lines_consumed + 1))
                target = (pos // split_bytes + 1) * split_bytes
    finally:
        rows.close()
    if not cuts:
        return [{"part": None, "bytes": size}]
    bounds = [(0, 1, 1)] + cuts + [(size, None, None)]
    return [{"part": {"start": a, "end": b, "first_row": row, "first_line": line}, "bytes": b - a}
            for (a, row, line), (b, _, _) in zip(bounds, bounds[1:])]


# Newline counting reads this much at a time (bytes.count runs at memory speed).
_COUNT_BLOCK = 16 * 1024 * 1024


def split_input(path, split_bytes: int) -> list[dict]:
    """Cut one input into parts of about ``split_bytes`` that can be read independently.

    Uncompressed JSON Lines are cut into byte ranges at line boundaries (the line number
    where each range starts comes from one newline count over the file, so keys and error
    messages name the same lines as a whole-file read); uncompressed CSV/TSV into byte ranges
    at record boundaries found by parsing the file once with the csv module in this process
    (a quoted field may span lines, and an unquoted field may hold a lone quote, so neither
    line ends nor quote counts tell where a record ends; the parse costs a fraction of what
    writing the samples does, but it is serial); Parquet into runs of whole row groups (from
    the footer). Other inputs are one part: a gzip stream cannot be entered in the middle,
    and a ``datasets`` folder is read whole.

    Args:
        path: an input accepted by ``iter_records``.
        split_bytes: target part size in (uncompressed file) bytes.

    Returns:
        A list of ``{"part": dict | None, "bytes": int}`` in input order: ``part`` goes to
        ``iter_records``; ``bytes`` is the part's size (Parquet: uncompressed row groups).
    """
    reader = _open_reader(path)
    if isinstance(reader, _CsvReader) and not reader.gz:
        return _split_csv(reader, split_bytes)
    if isinstance(reader, _JsonlReader) and not reader.gz:
        size = os.path.getsize(reader.path)
        cuts = []
        with open(reader.path, "rb") as fh:
            for nominal in range(split_bytes, size, split_bytes):
                fh.seek(nominal - 1)
                fh.readline()   # to just past the newline ending the line at ``nominal``
                cut = fh.tell()
                if cut < size and (not cuts or cut > cuts[-1]):
                    cuts.append(cut)
            bounds = [0] + cuts + [size]
            first_lines, lines, pos = [1], 0, 0
            for cut in cuts:
                fh.seek(pos)
                while pos < cut:
                    block = fh.read(min(_COUNT_BLOCK, cut - pos))
                    lines += block.count(b"\n")
                    pos += len(block)
                first_lines.append(lines + 1)
        if not cuts:
            return [{"part": None, "bytes": size}]
        return [{"part": {"start": a, "end": b, "first_line": line}, "bytes": b - a}
                for a, b, line in zip(bounds, bounds[1:], first_lines)]
    if isinstance(reader, _ParquetReader):
        meta = reader._open().metadata
        parts, groups, nbytes, first_row, row = [], [], 0, 1, 1
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            if groups and nbytes + group.total_byte_size > split_bytes:
                parts.append({"part": {"row_groups": groups, "first_row": first_row},
                              "bytes": nbytes})
                groups, nbytes, first_row = [], 0, row
            groups.append(g)
            nbytes += group.total_byte_size
            row += group.num_rows
        if not parts:
            return [{"part": None, "bytes": nbytes}]
        parts.append({"part": {"row_groups": groups, "first_row": first_row}, "bytes": nbytes})
        return parts
    if os.path.isdir(reader.path):
        size = sum(os.path.getsize(os.path.join(d, f))
                   for d, _, files in os.walk(reader.path) for f in files)
    else:
        size = os.path.getsize(reader.path)
    return [{"part": None, "bytes": size}]


def record_fields(path) -> list[str]:
    """The field names of an input, from its CSV header, Parquet/datasets schema, or the
    first JSONL record, without reading further.

    Raises:
        DataError: as ``iter_records``.
    """
    return _open_reader(path).fields()


def check_fields(path, field_map: FieldMap) -> list[str]:
    """Fail fast if ``path`` lacks any field ``field_map`` needs.

    Args:
        path: an input accepted by ``iter_records``.
        field_map: the mapping to check.

    Returns:
        The available field names.

    Raises:
        DataError: naming the first missing field and listing the available ones.
    """
    reader = _open_reader(path)
    available = reader.fields()
    for name in field_map.source_fields():
        if name not in available:
            raise reader.error(f"missing from {reader.fields_origin}; available fields: "
                               f"{_list_names(available)}", row=reader.fields_row, field=name)
    return available


# --------------------------------------------------------------------------------------
# Records -> samples
# --------------------------------------------------------------------------------------

def _list_names(names, limit: int = 30) -> str:
    names = list(names)
    text = ", ".join(repr(str(n)) for n in names[:limit])
    if len(names) > limit:
        text += f", ... ({len(names) - limit} more)"
    return text or "(none)"


class _Row:
    """Error context for one record."""

    __slots__ = ("source", "row", "unit")

    def __init__(self, source, row, unit):
        self.source, self.row, self.unit = source, row, unit

    def error(self, field: str, message: str) -> DataError:
        return DataError(message, source=self.source, row=self.row, field=field,
                         unit=self.unit)


def _get(record: Mapping, name: str, at: _Row) -> Any:
    try:
        return record[name]
    except KeyError:
        raise at.error(name, f"missing; available fields: {_list_names(record)}") from None


def _text(value: Any, name: str, at: _Row) -> str:
    if isinstance(value, str):
        text = value.strip()
    elif isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, float) and math.isfinite(value):
        text = str(value)
    elif value is None:
        raise at.error(name, "empty text (null)")
    else:
        raise at.error(name, f"expected text, got {type(value).__name__}: "
                             f"{short_repr(value)}")
    if not text:
        raise at.error(name, "empty text")
    return text


def _item_id(value: Any, name: str, at: _Row) -> str:
    # Ids are compared as strings everywhere downstream: 123 (Parquet int64), "123" (CSV)
    # and 123.0 (a pandas int column that picked up a null) must all become "123".
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise at.error(name, "empty item id")
        return text
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    if value is None:
        raise at.error(name, "empty item id (null)")
    raise at.error(name, f"item id must be text or an integer, got "
                         f"{type(value).__name__}: {short_repr(value)}")


def _number(value: Any, name: str, at: _Row) -> float:
    if isinstance(value, bool):  # JSON true/false as a click flag
        return float(value)
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise at.error(name, f"not a number: {short_repr(value)}") from None
    if not math.isfinite(number):
        raise at.error(name, f"not a finite number: {short_repr(value)}")
    return number


def _hard_negatives(value: Any, name: str, at: _Row) -> list[dict]:
    if value is None:
        return []
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise at.error(name, f"not a JSON list of {{item_id, item_text}} objects "
                                 f"({exc.msg} at column {exc.colno} of the value): {short_repr(value)}") from None
    if not isinstance(value, (list, tuple)):
        raise at.error(name, f"expected a list of {{item_id, item_text}} objects, got "
                             f"{type(value).__name__}")
    negatives = []
    for i, neg in enumerate(value):
        if not isinstance(neg, Mapping) or "item_id" not in neg or "item_text" not in neg:
            raise at.error(name, f"entry {i}: expected an object with item_id and item_text, "
                                 f"got {short_repr(neg)}")
        negative = {"item_id": _item_id(neg["item_id"], f"{name}[{i}].item_id", at),
                    "item_text": _text(neg["item_text"], f"{name}[{i}].item_text", at)}
        # Hard negatives carry their own vectors (as ``clicktower mine`` writes them).
        features = _features(neg.get("features"), f"{name}[{i}].features", at)
        if features is not None:
            negative["features"] = features
        negatives.append(negative)
    return negatives


def _item_field(value: Any, name: str, at: _Row) -> Any:
    """A structured item field: text, number, list of texts or a flat mapping (attributes)."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)  # CSV cells carry attribute maps as JSON
        except json.JSONDecodeError:
            pass
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, Mapping):
        return {str(k): str(v).strip() for k, v in value.items() if str(v).strip()}
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    raise at.error(name, f"expected text, a list or an object, got {type(value).__name__}")


def compose_item_text(item: Mapping[str, Any]) -> str:
    """One text from structured item fields, in field order: values joined by ``" | "``,
    mappings as ``"key: value"`` pairs, lists comma-joined.

    >>> compose_item_text({"title": "Drill", "brand": "Varlo", "attributes": {"colour": "Red"}})
    'Drill | Varlo | colour: Red'
    """
    parts = []
    for value in item.values():
        if isinstance(value, Mapping):
            parts.append(", ".join(f"{k}: {v}" for k, v in value.items()))
        elif isinstance(value, (list, tuple)):
            parts.append(", ".join(map(str, value)))
        elif value is not None:
            parts.append(str(value))
    return " | ".join(p for p in parts if p)


def _features(value: Any, name: str, at: _Row) -> list[float] | None:
    """A record's feature vector as floats, or None when it has none (null, empty)."""
    if is_missing(value):
        return None
    try:
        return check_vector(value).tolist()
    except BadFeatures as exc:
        raise at.error(name, str(exc)) from None


def to_sample(record: Mapping[str, Any], field_map: FieldMap, *, source, row: int) -> dict | None:
    """Map one record to a training sample.

    Args:
        record: one record from ``iter_records``.
        field_map: which fields to read.
        source: the input it came from (named in errors; its extension decides whether
            ``row`` is called a row or a line).
        row: its row (JSONL: line) number, named in errors.

    Returns:
        ``{"query": str, "item_id": str, "item_text": str}`` plus ``"label"`` (float),
        ``"weight"`` (float) and ``"hard_negatives"`` (list of ``{"item_id", "item_text"}``)
        when mapped; texts are stripped and ids are strings. ``None`` when the label is
        below ``field_map.min_label`` (the row is filtered out, not an error).

    Raises:
        DataError: missing field (listing the available ones), non-numeric label or
            weight, empty query/item text or id, malformed hard negatives.
    """
    at = _Row(source, row, _unit_for(str(source)))
    fm = field_map
    label = None
    if fm.label is not None:
        # The label goes first so that filtered rows (often most of a click log) cost no
        # further parsing and cannot fail on fields nobody will train on.
        label = _number(_get(record, fm.label, at), fm.label, at)
        if fm.min_label is not None and label < fm.min_label:
            return None
    item = None
    if fm.item_fields is not None:
        item = {name: _item_field(_get(record, name, at), name, at) for name in fm.item_fields}
        item = {k: v for k, v in item.items() if v not in (None, "", {}, [])}
    if item is not None and fm.item_text not in record:
        item_text = compose_item_text(item)
        if not item_text:
            raise at.error(fm.item_text, "missing, and the item fields are all empty")
    else:
        item_text = _text(_get(record, fm.item_text, at), fm.item_text, at)
    sample: dict[str, Any] = {
        "query": _text(_get(record, fm.query, at), fm.query, at),
        "item_id": _item_id(_get(record, fm.item_id, at), fm.item_id, at),
        "item_text": item_text,
    }
    if item is not None:
        sample["item"] = item
    if fm.features is not None:
        # A row may lack a vector (null or absent): the model's "missing" embedding stands in.
        features = _features(record.get(fm.features), fm.features, at)
        if features is not None:
            sample["features"] = features
    if label is not None:
        sample["label"] = label
    if fm.weight is not None:
        weight = _number(_get(record, fm.weight, at), fm.weight, at)
        if weight < 0:
            raise at.error(fm.weight, f"negative weight: {short_repr(weight)}")
        sample["weight"] = weight
    if fm.hard_negatives is not None:
        sample["hard_negatives"] = _hard_negatives(_get(record, fm.hard_negatives, at),
                                                   fm.hard_negatives, at)
    _add_exclusions_and_teacher(sample, record, fm, at)
    return sample


def _add_exclusions_and_teacher(sample: dict, record: Mapping[str, Any], fm: FieldMap, at: _Row) -> None:
    """``exclude_ids`` (id strings) and ``teacher_scores`` (floats, one per candidate:
    the positive, then each hard negative) of a sample, when mapped."""
    if fm.exclude_ids is not None:
        value = record.get(fm.exclude_ids)  # null or absent: nothing excluded
        if isinstance(value, str) and value.strip().startswith("["):
            value = _json_list(value, fm.exclude_ids, "item ids", at)
        if hasattr(value, "tolist"):  # numpy / pyarrow arrays
            value = value.tolist()
        if value is None or value == "":
            value = []
        if not isinstance(value, (list, tuple)):
            raise at.error(fm.exclude_ids, f"expected a list of item ids, got {short_repr(value)}")
        sample["exclude_ids"] = [_item_id(v, f"{fm.exclude_ids}[{i}]", at) for i, v in enumerate(value)]
    if fm.teacher_scores is not None:
        value = _get(record, fm.teacher_scores, at)
        if value is None:  # present but null: this sample has no teacher scores (the loss skips it)
            return
        if isinstance(value, str):
            value = _json_list(value, fm.teacher_scores, "numbers", at)
        if hasattr(value, "tolist"):
            value = value.tolist()
        if not isinstance(value, (list, tuple)):
            raise at.error(fm.teacher_scores, f"expected a list of numbers, got {short_repr(value)}")
        scores = [_number(v, f"{fm.teacher_scores}[{i}]", at) for i, v in enumerate(value)]
        want = 1 + len(sample.get("hard_negatives", ()))
        if len(scores) != want:
            raise at.error(fm.teacher_scores, f"{len(scores)} scores for {want} candidates (the positive and "
                                              f"{want - 1} hard negatives)")
        sample["teacher_scores"] = scores


def _json_list(value: str, name: str, what: str, at: _Row) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise at.error(name, f"not a JSON list of {what} ({exc.msg} at column {exc.colno} of the value): "
                             f"{short_repr(value)}") from None
