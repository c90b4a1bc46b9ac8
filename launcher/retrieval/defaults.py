"""Defaults shared by the retrieval code and the commands' options, in a module without torch
so that ``clicktower eval --help`` (and the others) can show them without importing it."""
from __future__ import annotations

# Texts per forward pass when embedding a catalog or queries: the one default of
# ``eval.batch_size`` and of the ``--batch-size`` of ``clicktower eval/embed/mine``.
EMBED_BATCH_SIZE = 128
# The grade from which a judged item counts as relevant, unless a command or config says otherwise.
MIN_RELEVANCE = 2.0
