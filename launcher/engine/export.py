"""Export a trained model: consolidated fp32 towers as Hugging Face and sentence-transformers
folders (``clicktower export``).

Input: a checkpoint folder (accelerate ``model.safetensors``, or DeepSpeed ZeRO shards of any
stage, consolidated to fp32 with DeepSpeed's ``zero_to_fp32``) or a ``final/`` folder.
Output::

    DIR/query_tower/, DIR/item_tower/                Hugging Face folders (AutoModel) + tokenizer
    DIR/sentence_transformers/query/, .../item/      SentenceTransformer folders: transformer,
                                                     pooling, projection (Dense), normalisation
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from clicktower.launcher.engine.config import load_config
from clicktower.modeling.towers import Tower, TwoTower


def load_checkpoint_model(folder: Path) -> tuple[TwoTower, Any, Any]:
    """Rebuild ``TwoTower`` from a checkpoint's ``config.yaml`` and load its fp32 weights.

    Args:
        folder: a complete checkpoint folder.

    Returns:
        ``(model, tokenizer, experiment config)``.
    """
    from transformers import AutoTokenizer

    cfg = load_config(folder / "config.yaml")
    model = TwoTower.from_config(cfg.model)
    state = read_model_state(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Shared towers are saved once: the item tower's names are aliases of the query tower's.
    missing = [k for k in missing if not (model.shared and k.startswith("item_tower."))]
    if missing or unexpected:
        raise ValueError(f"{folder}: checkpoint does not match the model config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.float(), AutoTokenizer.from_pretrained(cfg.model.tokenizer_path), cfg


def read_model_state(folder: Path) -> dict[str, torch.Tensor]:
    """The model's fp32 state dict from an accelerate or DeepSpeed checkpoint folder."""
    weights = folder / "model.safetensors"
    if weights.is_file():
        from safetensors.torch import load_file

        return load_file(str(weights))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    ds_dir = folder / "pytorch_model"  # accelerate saves the DeepSpeed engine under this tag
    if ds_dir.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # Gathers the ZeRO-1/2/3 partitions of every rank into one fp32 state dict.
        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="pytorch_model")
    raise FileNotFoundError(f"{folder}: no model weights (model.safetensors or a DeepSpeed folder)")


def to_sentence_transformer(tower: Tower, hf_folder: Path, max_seq_length: int | None) -> Any:
    """A ``SentenceTransformer`` equal to ``tower``: transformer, pooling, Dense, Normalize.

    Args:
        tower: the trained tower.
        hf_folder: its saved Hugging Face folder (weights + tokenizer).
        max_seq_length: token limit the tower was trained with.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense, Normalize, Pooling, Transformer

    transformer = Transformer(str(hf_folder), max_seq_length=max_seq_length)
    modules = [transformer, Pooling(tower.encoder.config.hidden_size, pooling_mode=tower.pooling)]
    if tower.projection is not None:
        proj = tower.projection
        modules.append(Dense(proj.in_features, proj.out_features, bias=False,
                             activation_function=torch.nn.Identity(),
                             init_weight=proj.weight.detach().clone()))
    if tower.normalize:
        modules.append(Normalize())
    return SentenceTransformer(modules=modules, device="cpu")


def export(source: str, out: str) -> dict[str, Any]:
    """Write the Hugging Face and sentence-transformers folders of both towers.

    Args:
        source: checkpoint folder or ``final/`` folder.
        out: output folder.
    """
    src, dst = Path(source), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such checkpoint folder")
    if (src / "query_tower").is_dir():  # a final/ folder: towers already consolidated
        from transformers import AutoTokenizer

        towers = {"query": Tower.from_pretrained(src / "query_tower"), "item": Tower.from_pretrained(src / "item_tower")}
        tokenizer = AutoTokenizer.from_pretrained(src / "query_tower")
        lengths = {k: t.max_length for k, t in towers.items()}
    else:
        model, tokenizer, cfg = load_checkpoint_model(src)
        towers = {"query": model.query_tower, "item": model.item_tower}
        lengths = {"query": cfg.model.max_query_length, "item": cfg.model.max_item_length}
    for side, tower in towers.items():
        hf = dst / f"{side}_tower"
        tower.save_pretrained(hf, tokenizer, lengths[side])
        to_sentence_transformer(tower, hf, lengths[side]).save(str(dst / "sentence_transformers" / side))
    summary = {"out": str(dst), "source": str(src), "towers": sorted(towers)}
    (dst / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
