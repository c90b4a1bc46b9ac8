"""Serving an embedded catalog: a chosen size (Matryoshka prefix), precision and FAISS index.

``ServingSettings`` says how: ``dim`` (a leading prefix, re-normalised), ``precision``
(``float32``, ``float16``, ``int8`` with per-dimension ranges calibrated on a sample, or
``ubinary``: one bit per dimension, Hamming search of ``k x rescore_multiplier`` candidates
rescored with the float query, sentence-transformers' recipe; ``rescore`` says against what:
the candidates' bits, or int8 copies of the vectors kept beside the index, memory-mapped from
disk) and ``index`` (``flat`` exact,
``ivf-pq:NLIST,M``, ``hnsw:M``; ``ivf`` and ``hnsw`` as before). ``build_index`` trains on a
seeded sample and adds every vector; ``search_index`` applies the same settings to queries.
The settings travel in the index folder's ``index.json`` (``clicktower embed``).
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

PRECISIONS = ("float32", "float16", "int8", "ubinary")
# What ubinary candidates are rescored against: their own bits, or int8 vectors kept apart.
RESCORE_SOURCES = ("bits", "int8")
# Vectors a trained index (IVF cells, PQ codebooks, int8 ranges) learns from, at most.
TRAIN_SAMPLE = 100_000
# Candidates of the binary search rescored with the float query, per result (ubinary).
RESCORE_MULTIPLIER = 4
# Unpacked float32 candidate values rescored at once (ubinary), at most.
RESCORE_CHUNK = 1 << 24
# Search-time defaults, recorded with the index (override: --nprobe / --ef-search).
DEFAULT_NPROBE, DEFAULT_EF_SEARCH = 16, 64
# The scalar quantiser of each non-binary precision in a FAISS factory string.
_SQ = {"float32": "Flat", "float16": "SQfp16", "int8": "SQ8"}


@dataclass(frozen=True)
class ServingSettings:
    """How a catalog is served; recorded as ``index.json["serving"]``.

    Args:
        dim: embedding prefix served (None: the whole embedding).
        precision: one of ``PRECISIONS``.
        index: ``flat``, ``ivf`` / ``ivf:NLIST`` (IVF-flat), ``ivf-pq:NLIST,M`` (M bytes per
            vector, float32 only: PQ is its own quantisation) or ``hnsw`` / ``hnsw:M``.
        rescore_multiplier: ubinary: candidates rescored per result.
        rescore: ubinary: rescore against the candidates' ``bits`` (the documents stay 1 bit
            per dimension) or against ``int8`` vectors (calibrated like ``int8``) held apart
            from the index: in memory only the bits, the int8 rows of the candidates read
            from a memory-mapped file once saved.
        nprobe: IVF cells visited per query (None: ``DEFAULT_NPROBE``).
        ef_search: HNSW search breadth (None: ``DEFAULT_EF_SEARCH``, at least k).
        train_sample: vectors the index trains (or calibrates int8) on, at most.
    """

    dim: int | None = None
    precision: str = "float32"
    index: str = "flat"
    rescore_multiplier: int = RESCORE_MULTIPLIER
    rescore: str = "bits"
    nprobe: int | None = None
    ef_search: int | None = None
    train_sample: int = TRAIN_SAMPLE

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        kind, params = parse_index(self.index)
        if kind == "ivf-pq" and self.precision != "float32":
            raise ValueError("ivf-pq quantises with PQ itself: use --precision float32 with it")
        if kind == "ivf" and self.precision == "ubinary":
            raise ValueError("ubinary serves from a flat or hnsw binary index")
        if self.rescore not in RESCORE_SOURCES:
            raise ValueError(f"rescore must be one of {', '.join(RESCORE_SOURCES)}, got {self.rescore!r}")
        if self.rescore != "bits" and self.precision != "ubinary":
            raise ValueError("rescore applies to ubinary candidates: use it with --precision ubinary")
        if self.rescore_multiplier < 1 or self.train_sample < 1:
            raise ValueError("rescore_multiplier and train_sample must be >= 1")

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "ServingSettings":
        """The settings an ``index.json`` records (an index from before them: flat float32)."""
        serving = meta.get("serving") or {"index": meta.get("kind", "flat")}
        return cls(**serving)

    def to_meta(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_index(spec: str) -> tuple[str, tuple[int, ...]]:
    """``"ivf-pq:1024,48"`` -> ``("ivf-pq", (1024, 48))``; checks the kind and its numbers."""
    kind, _, rest = spec.partition(":")
    try:
        params = tuple(int(p) for p in rest.split(",")) if rest else ()
    except ValueError:
        raise ValueError(f"index {spec!r}: parameters must be integers") from None
    wanted = {"flat": (0,), "ivf": (0, 1), "ivf-pq": (2,), "hnsw": (0, 1)}
    if kind not in wanted:
        raise ValueError(f"unknown index {spec!r}: flat, ivf[:NLIST], ivf-pq:NLIST,M or hnsw[:M]")
    if len(params) not in wanted[kind] or any(p < 1 for p in params):
        raise ValueError(f"index {spec!r}: expected {kind}{':NLIST,M' if kind == 'ivf-pq' else '[:N]'}")
    return kind, params


def prepare(vectors: np.ndarray, dim: int | None) -> np.ndarray:
    """float32 [N, dim]: the leading ``dim`` columns re-normalised (all columns: unchanged)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if dim is None or dim == vectors.shape[1]:
        return vectors
    if dim > vectors.shape[1]:
        raise ValueError(f"dim {dim} is larger than the embedding ({vectors.shape[1]})")
    cut = vectors[:, :dim]
    return np.ascontiguousarray(cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12))


def binarize(vectors: np.ndarray) -> np.ndarray:
    """One bit per dimension (> 0), packed 8 per byte (uint8 [N, dim / 8])."""
    return np.packbits(vectors > 0, axis=1)


@dataclass
class RescoredBinaryIndex:
    """A binary FAISS index plus int8 copies of its vectors that rescore its candidates
    (``rescore="int8"``). Only ``binary`` is the index held in memory; ``codes`` is a
    memory-mapped file once read back (``read_index``), of which a search touches the rows of
    its candidates: the binary-index-in-memory, int8-on-disk layout of sentence-transformers'
    quantized retrieval demo.

    Args:
        binary: the Hamming index (flat or HNSW).
        codes: uint8 [N, D], row r = item r: ``low + codes * step`` decodes it.
        low: float32 [D], each dimension's calibrated minimum.
        step: float32 [D], each dimension's (max - min) / 255.
    """

    binary: Any
    codes: np.ndarray
    low: np.ndarray
    step: np.ndarray

    @property
    def ntotal(self) -> int:
        return self.binary.ntotal

    def decode(self, rows: np.ndarray) -> np.ndarray:
        """float32 [..., D]: the decoded int8 vectors of ``rows`` (any shape of row numbers)."""
        return self.low + self.codes[rows].astype(np.float32) * self.step


def int8_ranges(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension ``(low, step)`` mapping the sample's [min, max] to 256 levels."""
    low, high = sample.min(axis=0), sample.max(axis=0)
    # A constant dimension decodes to its value from any code: a step of 1 avoids 0 / 0.
    step = np.where(high > low, (high - low) / 255, 1.0).astype(np.float32)
    return low.astype(np.float32), step


def int8_codes(vectors: np.ndarray, low: np.ndarray, step: np.ndarray) -> np.ndarray:
    """uint8 [N, D] codes of ``vectors`` (values outside the calibrated range: clipped)."""
    return np.clip(np.rint((vectors - low) / step), 0, 255).astype(np.uint8)


def build_index(vectors: np.ndarray, settings: ServingSettings, seed: int = 0) -> Any:
    """A FAISS inner-product index (Hamming for ubinary) over ``vectors`` served as ``settings``.

    Args:
        vectors: float32 [N, D] catalog embeddings (L2-normalised).
        settings: size, precision and index.
        seed: picks the training sample.
    """
    import faiss

    x = prepare(vectors, settings.dim)
    n, dim = x.shape
    kind, params = parse_index(settings.index)
    if settings.precision == "ubinary":
        if dim % 8:
            raise ValueError(f"ubinary needs a dim divisible by 8, got {dim}")
        index = faiss.index_binary_factory(dim, "BFlat" if kind == "flat" else f"BHNSW{params[0] if params else 32}")
        index.add(binarize(x))
        set_search_params(index, settings)
        if settings.rescore == "bits":
            return index
        low, step = int8_ranges(x[_sample_rows(n, settings.train_sample, seed)])
        return RescoredBinaryIndex(index, int8_codes(x, low, step), low, step)
    sq = _SQ[settings.precision]
    if kind == "flat":
        factory = sq
    elif kind == "hnsw":
        factory = f"HNSW{params[0] if params else 32}" + ("" if sq == "Flat" else f",{sq}")
    elif kind == "ivf":
        factory = f"IVF{params[0] if params else _default_nlist(n)},{sq}"
    else:
        # "np": no polysemous training (a Hamming pre-filter this search never uses, and
        # minutes of annealing on a loaded CPU).
        factory = f"IVF{params[0]},PQ{params[1]}np"
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(x[_sample_rows(n, settings.train_sample, seed)])
    index.add(x)
    set_search_params(index, settings)  # saved with it: a plain index.search uses them too
    return index


def _sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """The seeded, sorted sample of rows an index trains (or calibrates) on."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, size), replace=False))


def _default_nlist(n: int) -> int:
    return max(1, min(n // 39, int(4 * np.sqrt(n))))


def search_index(index: Any, settings: ServingSettings, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ``(scores, rows)`` for float query embeddings, best first (row -1: none).

    ubinary: the Hamming top ``k x rescore_multiplier`` of the binary query, rescored by the
    float query's inner product with each candidate's bits (0/1: for one query the same order
    as +-1) or, with ``rescore="int8"``, with its decoded int8 vector, and cut to k.

    Args:
        index: from ``build_index`` or ``read_index``.
        settings: the index's settings.
        queries: float32 [Q, D] query embeddings (the whole embedding).
        k: results per query.
    """
    q = prepare(queries, settings.dim)
    if settings.precision != "ubinary":
        set_search_params(index, settings, k)
        return index.search(q, min(k, index.ntotal))
    rescored = isinstance(index, RescoredBinaryIndex)
    binary = index.binary if rescored else index
    wide = min(index.ntotal, k * settings.rescore_multiplier)
    set_search_params(binary, settings, wide)
    _, rows = binary.search(binarize(q), wide)
    codes = None if rescored else _binary_codes(binary)
    scores = np.empty(rows.shape, dtype=np.float32)
    # Decoded candidates are 32x their bits (4x their int8 codes): a few MB of them at a time,
    # not Q x wide x dim.
    step = max(1, RESCORE_CHUNK // (wide * q.shape[1]))
    for start in range(0, len(q), step):
        part = np.maximum(rows[start:start + step], 0)
        if rescored:
            candidates = index.decode(part)
        else:
            candidates = np.unpackbits(codes[part], axis=2)[:, :, :q.shape[1]].astype(np.float32)
        scores[start:start + step] = np.einsum("qd,qkd->qk", q[start:start + step], candidates)
    scores[rows < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def set_search_params(index: Any, settings: ServingSettings, k: int = 10) -> None:
    """Set the IVF cells visited (``nprobe``) or the HNSW breadth (``efSearch``, >= k)."""
    kind, _ = parse_index(settings.index)
    if kind in ("ivf", "ivf-pq"):
        import faiss

        faiss.ParameterSpace().set_index_parameter(index, "nprobe", settings.nprobe or DEFAULT_NPROBE)
    elif kind == "hnsw":
        index.hnsw.efSearch = max(k, settings.ef_search or DEFAULT_EF_SEARCH)


def _binary_codes(index: Any) -> np.ndarray:
    """The packed codes a binary FAISS index stores, uint8 [N, dim / 8]: a view of FAISS's own
    storage, valid while the index lives (``faiss.vector_to_array`` would copy the whole
    catalog's codes on every search: 48 MB per query at 1M items x 384 dims)."""
    import faiss

    flat = faiss.downcast_IndexBinary(index.storage) if hasattr(index, "storage") else index
    return faiss.rev_swig_ptr(flat.xb.data(), index.ntotal * index.code_size).reshape(index.ntotal, index.code_size)


def rescore_paths(path: str) -> tuple[str, str]:
    """The files beside index ``path`` holding a ``RescoredBinaryIndex``'s int8 codes and
    its ranges (low and step, float32 [2, D])."""
    return f"{path}.rescore-int8.npy", f"{path}.rescore-ranges.npy"


def write_index(index: Any, path: str) -> None:
    """Save a float or binary FAISS index at ``path`` (and the int8 rescoring vectors of a
    ``RescoredBinaryIndex`` beside it: ``rescore_paths``). Each file is written under a
    temporary name and renamed, so a crash leaves no half-written index under the real name.
    """
    import faiss

    if isinstance(index, RescoredBinaryIndex):
        codes_path, ranges_path = rescore_paths(path)
        atomic_save(codes_path, lambda p: np.save(p, np.ascontiguousarray(index.codes)))
        atomic_save(ranges_path, lambda p: np.save(p, np.stack([index.low, index.step])))
        index = index.binary
    atomic_save(path, lambda p: (faiss.write_index_binary if isinstance(index, faiss.IndexBinary)
                                 else faiss.write_index)(index, p))


def atomic_save(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(tmp)`` for a temporary name beside ``path``, then rename it to ``path``.

    Args:
        path: the file's final name.
        write: writes the file at the name it is given.
    """
    path = os.fspath(path)
    # np.save appends ".npy" to names without it, so the temporary name keeps the suffix.
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    write(tmp)
    os.replace(tmp, path)


def read_index(path: str, settings: ServingSettings) -> Any:
    """Load what ``write_index`` saved for these settings (int8 rescoring codes memory-mapped:
    a search reads its candidates' rows, not the whole file)."""
    import faiss

    if settings.precision != "ubinary":
        return faiss.read_index(path)
    binary = faiss.read_index_binary(path)
    if settings.rescore == "bits":
        return binary
    codes_path, ranges_path = rescore_paths(path)
    low, step = np.load(ranges_path)
    return RescoredBinaryIndex(binary, np.load(codes_path, mmap_mode="r"), low, step)


def index_bytes(index: Any) -> int:
    """The serialised size of an index: what holding it in memory costs, overheads included
    (of a ``RescoredBinaryIndex``: the binary index; its int8 file is ``rescore_bytes``)."""
    import faiss

    if isinstance(index, RescoredBinaryIndex):
        index = index.binary
    if isinstance(index, faiss.IndexBinary):
        return int(faiss.serialize_index_binary(index).size)
    return int(faiss.serialize_index(index).size)


def rescore_bytes(index: Any) -> int:
    """Bytes of the int8 rescoring vectors kept beside the index (on disk once saved; 0: none)."""
    if not isinstance(index, RescoredBinaryIndex):
        return 0
    return int(index.codes.nbytes + index.low.nbytes + index.step.nbytes)


def latency_ms(index: Any, settings: ServingSettings, queries: np.ndarray, k: int = 10) -> dict[str, float]:
    """p50 / p99 milliseconds of one-query searches over ``queries`` (one at a time, as served),
    on one FAISS thread: a server answers concurrent queries on its other cores, and on a
    shared CPU a multi-threaded single query mostly measures the threads' waiting.

    Args:
        index: the index.
        settings: its settings.
        queries: float32 [Q, D].
        k: results per query.
    """
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    times = []
    try:
        for row in queries:
            start = time.perf_counter()
            search_index(index, settings, row[None, :], k)
            times.append((time.perf_counter() - start) * 1000)
    finally:
        faiss.omp_set_num_threads(threads)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def overlap_at_k(rows: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Mean share of each query's exact top-k that ``rows`` also returns in its top k."""
    return float(np.mean([len(set(a[:k].tolist()) & set(b[:k].tolist())) / k for a, b in zip(rows, exact)]))


def add_serving_arguments(parser: Any, index_flag: str = "--index") -> None:
    """The ``--dim/--precision/<index_flag>/...`` options of embed, eval and search.

    Args:
        parser: an ``argparse.ArgumentParser``.
        index_flag: the option naming the index spec (``--index`` for embed).
    """
    parser.add_argument("--dim", type=int, default=None, help="serve this leading prefix of the embedding")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="float32 (default), float16, int8 (calibrated ranges), ubinary (rescored)")
    parser.add_argument(index_flag, dest="index_spec", default=None,
                        help="flat (default), ivf[:NLIST], ivf-pq:NLIST,M or hnsw[:M]")
    parser.add_argument("--nprobe", type=int, default=None, help=f"IVF cells per query (default {DEFAULT_NPROBE})")
    parser.add_argument("--ef-search", type=int, default=None, help=f"HNSW breadth (default {DEFAULT_EF_SEARCH})")
    parser.add_argument("--rescore-multiplier", type=int, default=None,
                        help=f"ubinary: candidates rescored per result (default {RESCORE_MULTIPLIER})")
    parser.add_argument("--rescore", choices=RESCORE_SOURCES, default=None,
                        help="ubinary: rescore candidates against their bits (default) or int8 vectors "
                             "kept on disk beside the index")
    parser.add_argument("--train-sample", type=int, default=None,
                        help=f"vectors the index trains / int8 calibrates on (default {TRAIN_SAMPLE})")


def settings_from_args(args: Any) -> ServingSettings | None:
    """The settings parsed by ``add_serving_arguments`` (None: no option given)."""
    given = {"dim": args.dim, "precision": args.precision, "index": args.index_spec, "nprobe": args.nprobe,
             "ef_search": args.ef_search, "rescore_multiplier": args.rescore_multiplier,
             "rescore": args.rescore, "train_sample": args.train_sample}
    given = {key: value for key, value in given.items() if value is not None}
    return ServingSettings(**given) if given else None
