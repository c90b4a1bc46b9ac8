"""Retrieval on trained towers: metrics, catalog and query readers, embedding (one sharded
helper on ``clicktower.kernels.collectives``), evaluation, FAISS indexes and hard-negative mining.
"""
