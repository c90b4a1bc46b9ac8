"""ONNX export of the towers (``clicktower export --onnx``) and an onnxruntime encoder.

Each tower's whole forward -- encoder, pooling, projection, L2 normalisation -- becomes one
ONNX graph ``DIR/onnx/<side>.onnx`` with inputs ``input_ids`` and ``attention_mask`` (int64
[batch, tokens], both axes dynamic) and output ``embedding`` (float32 [batch, D]). The
tokenizer is saved beside it (``DIR/onnx/tokenizer/``) and ``DIR/onnx/onnx.json`` describes
the files, the token limits and the check made at export: onnxruntime against PyTorch on
sample texts, max abs difference (it must stay within ``ONNX_TOLERANCE``). ``fused``: the
graphs carry onnxruntime's transformer fusions (faster there, onnxruntime-only operators).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from clicktower.modeling.towers import DEFAULT_MAX_ITEM_LENGTH, DEFAULT_MAX_QUERY_LENGTH, Tower

ONNX_TOLERANCE = 1e-4
OPSET = 17
CHECK_TEXTS = ("cordless drill 18v", "a", "stainless steel kitchen sink with a very long description " * 4,
               "led light bulb 60w equivalent soft white")


class _TowerGraph(torch.nn.Module):
    """The tower's text forward with two tensor inputs (what the exporter traces)."""

    def __init__(self, tower: Tower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.tower(input_ids, attention_mask).float()


def export_tower_onnx(tower: Tower, tokenizer: Any, path: Path, max_length: int, fused: bool = False) -> dict[str, int]:
    """Write one tower as an ONNX graph (fp32, dynamic batch and length); returns the fused
    operators (empty unless ``fused``).

    Args:
        tower: the tower (text only: a tower fusing item feature vectors is refused).
        tokenizer: its tokenizer (makes the example input).
        path: the ``.onnx`` file.
        max_length: token limit of the example input.
        fused: rewrite the graph with onnxruntime's transformer fusions (see ``fuse_graph``).
    """
    if getattr(tower, "fusion", None) is not None:
        raise ValueError("ONNX export covers text towers; this item tower fuses feature vectors")
    graph_tower = copy.deepcopy(tower).float().eval()
    # Length buckets only split a batch (same embeddings) and their Python control flow
    # depends on the data: the graph takes the one-bucket path.
    graph_tower.length_buckets = 1
    if fused and hasattr(graph_tower.encoder, "set_attn_implementation"):
        # The attention fusion matches the eager softmax(QK^T)V subgraph, not the SDPA export.
        graph_tower.encoder.set_attn_implementation("eager")
    enc = tokenizer(list(CHECK_TEXTS[:2]), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(_TowerGraph(graph_tower), (enc["input_ids"], enc["attention_mask"]), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                        "attention_mask": {0: "batch", 1: "tokens"}, "embedding": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    return fuse_graph(path, graph_tower.encoder.config) if fused else {}


def fuse_graph(path: Path, config: Any) -> dict[str, int]:
    """Rewrite ``path`` with onnxruntime's BERT fusions (Attention, EmbedLayerNormalization,
    SkipLayerNormalization, BiasGelu: ``com.microsoft`` operators, so the graph then runs in
    onnxruntime only); returns how many of each it made.

    Args:
        path: the ``.onnx`` file, replaced.
        config: the encoder's Hugging Face config (heads and hidden size of the attention).
    """
    from onnxruntime.transformers.optimizer import optimize_model

    # opt_level 0: the Python fusions only, no onnxruntime session rewriting the graph for one
    # machine's execution provider; the session's own optimisations still run at load.
    model = optimize_model(str(path), model_type="bert", opt_level=0,
                           num_heads=getattr(config, "num_attention_heads", 0),
                           hidden_size=getattr(config, "hidden_size", 0))
    model.save_model_to_file(str(path))
    return {op: n for op, n in model.get_fused_operator_statistics().items() if n}


class OnnxEncoder:
    """Encode texts with an exported tower through onnxruntime (CPU).

    Args:
        path: the ``.onnx`` file.
        tokenizer: the tokenizer (or its folder).
        max_length: token limit.
        threads: intra-op threads (None: onnxruntime's default).
    """

    def __init__(self, path: str | Path, tokenizer: Any, max_length: int, threads: int | None = None) -> None:
        import onnxruntime as ort

        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.tokenizer, self.max_length = tokenizer, max_length

    def encode(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        """float32 [len(texts), D], batched like ``embed_texts`` (length-sorted, order kept)."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = None
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="np")
            emb = self.session.run(["embedding"], {"input_ids": enc["input_ids"].astype(np.int64),
                                                   "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
            out[idx] = emb
        return out if out is not None else np.empty((0, 0), dtype=np.float32)


def export_onnx(towers: dict[str, Tower], tokenizer: Any, lengths: dict[str, int | None], out: Path,
                fused: bool = False) -> dict[str, Any]:
    """Export each tower to ``out/onnx/``, check it against PyTorch and describe it.

    Args:
        towers: ``{"query": Tower, "item": Tower}``.
        tokenizer: their tokenizer (saved to ``out/onnx/tokenizer``).
        lengths: each side's token limit (None: the default).
        out: the export folder.
        fused: write graphs with onnxruntime's transformer fusions (``fuse_graph``).

    Raises:
        RuntimeError: an exported graph differs from PyTorch by more than ``ONNX_TOLERANCE``.
    """
    from clicktower.launcher.retrieval.embedding import embed_texts

    folder = out / "onnx"
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    defaults = {"query": DEFAULT_MAX_QUERY_LENGTH, "item": DEFAULT_MAX_ITEM_LENGTH}
    described = {}
    for side, tower in towers.items():
        limit = lengths.get(side) or defaults[side]
        path = folder / f"{side}.onnx"
        fusions = export_tower_onnx(tower, tokenizer, path, limit, fused)
        got = OnnxEncoder(path, tokenizer, limit).encode(list(CHECK_TEXTS))
        want = embed_texts(tower.float(), tokenizer, list(CHECK_TEXTS), limit).numpy()
        diff = float(np.abs(got - want).max())
        if not diff <= ONNX_TOLERANCE:
            raise RuntimeError(f"ONNX {side} tower differs from PyTorch by {diff:.2e} (> {ONNX_TOLERANCE})")
        described[side] = {"file": path.name, "max_length": limit, "dim": int(want.shape[1]),
                           "max_abs_diff_vs_torch": diff, **({"fused_operators": fusions} if fused else {})}
    meta = {"inputs": ["input_ids", "attention_mask"], "output": "embedding", "opset": OPSET, "fused": fused,
            "tokenizer": "tokenizer", "towers": described,
            "usage": "OnnxEncoder(path, tokenizer_folder, max_length).encode(texts) "
                     "(clicktower.launcher.engine.onnx_export), or onnxruntime directly"}
    (folder / "onnx.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
