"""Writing samples with new hard negatives or teacher scores as a shard set, shared by
``clicktower mine`` and ``clicktower teacher score``; reading a manifest's samples back.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from clicktower.data.errors import DataError
from clicktower.data.shards import iter_shard, write_shards
from clicktower.data.sources import FieldMap
from clicktower.data.storage import is_url

# Sample fields carried over unchanged (besides query, item_id, item_text, hard_negatives).
# teacher_scores are not: they score the sample's old negatives, and each writer sets its own.
_PASSTHROUGH = ("label", "weight", "features", "exclude_ids")


def check_output_free(out: str, overwrite: bool) -> None:
    """Refuse a local output folder that holds something, unless ``overwrite``: called before
    any model loads, so the command fails in a second (``write_shards`` checks again when it
    writes, URLs included).

    Args:
        out: output shard folder (path or URL).
        overwrite: replace an existing output.
    """
    if not is_url(out) and Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
        raise DataError(f"{out}: output exists and is not empty; pass --overwrite to replace it")


def iter_manifest_samples(manifest: dict) -> Iterator[dict]:
    """Every sample of a loaded manifest, shard by shard, in file order.

    Args:
        manifest: a manifest from ``load_manifest``.
    """
    for shard in manifest["shards"]:
        yield from iter_shard(shard["path"])


def write_samples(samples: Sequence[dict], negatives: Sequence[list[dict]], teacher: Sequence[Any],
                  manifest: dict, out: str, shard_size: int | None, overwrite: bool,
                  label: str) -> dict[str, Any]:
    """Write samples with new hard negatives and teacher scores as a shard set (``mine``,
    ``teacher score``): through a JSONL file, then ``write_shards``.

    Args:
        samples: the input samples (query, item, and the ``_PASSTHROUGH`` fields are kept).
        negatives: per sample, its hard negatives (``item_id``, ``item_text``, ``features``).
        teacher: per sample, its teacher scores (the positive's, then one per negative) or None.
        manifest: the input's manifest (which optional fields it declares).
        out: output shard folder (path or URL).
        shard_size: samples per output shard (None: the input's).
        overwrite: replace an existing output.
        label: the command, for the temporary folder's name.
    """
    fields = set(manifest.get("fields") or ())
    # The samples go through a JSONL file next to a local output (same disk), or in a
    # temporary folder for a URL output (s3://...).
    tmp = Path(tempfile.mkdtemp(prefix=f"clicktower-{label}-") if is_url(out)
               else f"{out.rstrip(os.sep)}.{label}-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        jsonl = tmp / "samples.jsonl"
        with_negatives = teachers = 0
        with open(jsonl, "w", encoding="utf-8") as fh:
            for s, negs, scores in zip(samples, negatives, teacher):
                teachers += scores is not None
                # Vectors as JSON lists (the shards' decoder gave numpy arrays).
                negs = [{k: v.tolist() if hasattr(v, "tolist") else v for k, v in n.items()} for n in negs]
                with_negatives += bool(negs)
                record = {"query": s["query"], "item_id": s["item_id"], "item_text": s["item_text"],
                          "hard_negatives": negs, "teacher_scores": scores}
                for name in _PASSTHROUGH:
                    if name in s:
                        value = s[name]
                        record[name] = value.tolist() if hasattr(value, "tolist") else value
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        field_map = FieldMap(hard_negatives="hard_negatives",
                             label="label" if "label" in fields else None,
                             weight="weight" if "weight" in fields else None,
                             exclude_ids="exclude_ids" if "exclude_ids" in fields else None,
                             features="features" if "features" in fields else None,
                             teacher_scores="teacher_scores" if teachers else None)
        written = write_shards([str(jsonl)], out, field_map,
                               shard_size=shard_size or int(manifest.get("shard_size") or 100_000),
                               overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "num_samples": written["num_samples"], "num_shards": len(written["shards"]),
            "samples_with_negatives": with_negatives}
