"""clicktower.data: click-log readers, indexed WebDataset shards, ``ClickPairLoader``.

Exports resolve lazily (PEP 562) so that importing ``clicktower.data.shards`` (e.g. in a
spawned shard-writer process) does not import torch.
"""
from __future__ import annotations

_EXPORTS = {
    "ClickPairLoader": "clicktower.data.loader",
    "DataConfig": "clicktower.data.loader",
    "DataError": "clicktower.data.errors",
    "PairBatch": "clicktower.data.batch",
    "PairLabels": "clicktower.data.batch",
    "PairTokenizer": "clicktower.data.loader",
    "Rank": "clicktower.data.loader",
    "FieldMap": "clicktower.data.sources",
    "load_manifest": "clicktower.data.shards",
    "write_shards": "clicktower.data.shards",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clicktower.data' has no attribute {name!r}")
