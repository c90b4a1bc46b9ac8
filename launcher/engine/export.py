"""Export a trained model: consolidated fp32 towers as Hugging Face and sentence-transformers
folders, and one sentence-transformers model with a model card (``clicktower export``).

Input: a checkpoint folder (accelerate ``model.safetensors``, or DeepSpeed ZeRO shards of any
stage, consolidated to fp32 with DeepSpeed's ``zero_to_fp32``) or a ``final/`` folder. Output:
``DIR/query_tower/`` and ``DIR/item_tower/`` (Hugging Face folders with the tokenizer),
``DIR/sentence_transformers/query/`` and ``.../item/``, ``DIR/sentence_transformers/router/``
(ONE SentenceTransformer whose ``Router`` sends "query" to the query tower and "document" to
the item tower, with README.md, the model card) and ``DIR/export.json``. The model card is
filled from the run folder the input sits in (its ``config.yaml`` and ``metrics.jsonl``) and
says so when they are absent. Layout and loading examples: docs/checkpoints.md ("Export").
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from clicktower.data.errors import DataError
from clicktower.launcher.engine.config import load_config
from clicktower.launcher.engine.metrics import read_metrics
from clicktower.modeling.towers import FUSION_FILE, TOWER_META, Tower, TwoTower, is_hub_id

ROUTER_DIR = "router"
MODEL_CARD = "README.md"
# What the sentence-transformers folders of a model with item feature vectors leave out.
TEXT_ONLY_NOTE = ("item_tower/ holds the feature projection, the learned 'missing' embedding and the "
                  "fusion (fusion.pt; clicktower embed / eval use them with the catalog's vectors). The "
                  "sentence_transformers/ folders are text only: their item route skips the fusion, so "
                  "its embeddings are not the trained item tower's, with or without a vector.")


@dataclass
class ExportTowers:
    """The towers to export and what they were trained with.

    Args:
        towers: ``{"query": Tower, "item": Tower}``; the same object twice for shared towers.
        tokenizer: the towers' tokenizer.
        lengths: token limit of each side (None when unknown).
        logit_scale: the trained inverse temperature, when known.
    """

    towers: dict[str, Tower]
    tokenizer: Any
    lengths: dict[str, int | None]
    logit_scale: float | None = None

    @property
    def shared(self) -> bool:
        # One text encoder (the item side may add its own feature fusion, which the
        # sentence-transformers folders leave out).
        return self.towers["query"].encoder is self.towers["item"].encoder


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
    """The model's fp32 state dict from an accelerate or DeepSpeed checkpoint folder.

    Args:
        folder: a checkpoint folder.
    """
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


def load_export_towers(src: Path) -> ExportTowers:
    """The towers of a checkpoint folder or of a ``final/`` folder.

    Args:
        src: a checkpoint folder (any ZeRO stage) or a folder with ``query_tower/`` and
            ``item_tower/`` (``final/``, ``best/``).
    """
    if not (src / "query_tower").is_dir():
        model, tokenizer, cfg = load_checkpoint_model(src)
        return ExportTowers({"query": model.query_tower, "item": model.item_tower}, tokenizer,
                            {"query": cfg.model.max_query_length, "item": cfg.model.max_item_length},
                            float(model.logit_scale().detach()))
    from transformers import AutoTokenizer

    info_file = src / "clicktower.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    query = Tower.from_pretrained(src / "query_tower")
    # Shared towers were saved twice with equal weights: load one, so the router holds one.
    item = query if info.get("shared_towers") else Tower.from_pretrained(src / "item_tower")
    if item is query and (src / "item_tower" / FUSION_FILE).is_file():
        # Shared text encoder, plus the item side's own feature fusion.
        item = query.with_fusion(Tower.from_pretrained(src / "item_tower").fusion)
    item_meta = src / "item_tower" / TOWER_META
    item_length = json.loads(item_meta.read_text()).get("max_length") if item_meta.is_file() else None
    return ExportTowers({"query": query, "item": item}, AutoTokenizer.from_pretrained(src / "query_tower"),
                        {"query": query.max_length, "item": item_length}, info.get("logit_scale"))


def _st_module_classes() -> Any:
    """sentence-transformers' module namespace (``Transformer``, ``Pooling``, ``Router`` ...)."""
    try:  # sentence-transformers >= 6
        from sentence_transformers.sentence_transformer import modules
    except ImportError:  # 5.x: the same classes under their older, now deprecated, path
        from sentence_transformers import models as modules
    return modules


def tower_modules(tower: Tower, hf_folder: Path, max_seq_length: int | None,
                  **transformer_kwargs: Any) -> list[Any]:
    """The sentence-transformers modules equal to ``tower``: transformer, pooling, Dense, Normalize.

    Args:
        tower: the trained tower.
        hf_folder: its saved Hugging Face folder (weights + tokenizer).
        max_seq_length: token limit the tower was trained with.
        transformer_kwargs: more arguments of the ``Transformer`` module (per-task lengths).
    """
    st = _st_module_classes()
    transformer = st.Transformer(str(hf_folder), max_seq_length=max_seq_length, **transformer_kwargs)
    modules = [transformer, st.Pooling(tower.encoder.config.hidden_size, pooling_mode=tower.pooling)]
    if tower.projection is not None:
        proj = tower.projection
        modules.append(st.Dense(proj.in_features, proj.out_features, bias=False,
                                activation_function=torch.nn.Identity(),
                                init_weight=proj.weight.detach().clone()))
    if tower.normalize:
        modules.append(st.Normalize())
    return modules


def to_sentence_transformer(tower: Tower, hf_folder: Path, max_seq_length: int | None) -> Any:
    """A ``SentenceTransformer`` equal to ``tower``: transformer, pooling, Dense, Normalize.

    Args:
        tower: the trained tower.
        hf_folder: its saved Hugging Face folder (weights + tokenizer).
        max_seq_length: token limit the tower was trained with.
    """
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(modules=tower_modules(tower, hf_folder, max_seq_length), device="cpu",
                               similarity_fn_name="cosine" if tower.normalize else "dot")


def to_router(export: ExportTowers, hf_folders: dict[str, Path]) -> tuple[Any, bool]:
    """ONE ``SentenceTransformer`` for both towers: ``encode_query`` runs the query tower,
    ``encode_document`` (and plain ``encode``) the item tower.

    Args:
        export: the towers and their token limits.
        hf_folders: each side's saved Hugging Face folder.

    Returns:
        ``(model, one_module)``: one_module is True when both routes share one set of
        modules (shared towers), stored once.
    """
    from sentence_transformers import SentenceTransformer

    st = _st_module_classes()
    lengths = export.lengths
    # Shared towers still truncate queries and items at different limits; one module does
    # both where the Transformer module takes per-task lengths (``query_length``, recent
    # sentence-transformers: 6.2 has it), else each route gets its own copy of the encoder.
    per_task = "query_length" in getattr(st.Transformer, "config_keys", [])
    one_module = export.shared and (lengths["query"] == lengths["item"] or per_task)
    if one_module:
        kwargs = ({} if lengths["query"] == lengths["item"] else
                  {"query_length": lengths["query"], "document_length": lengths["item"]})
        shared = tower_modules(export.towers["query"], hf_folders["query"], lengths["item"], **kwargs)
        router = st.Router.for_query_document(query_modules=shared, document_modules=shared)
    else:
        router = st.Router.for_query_document(
            query_modules=tower_modules(export.towers["query"], hf_folders["query"], lengths["query"]),
            document_modules=tower_modules(export.towers["item"], hf_folders["item"], lengths["item"]))
    similarity = "cosine" if export.towers["query"].normalize else "dot"
    return SentenceTransformer(modules=[router], device="cpu", similarity_fn_name=similarity), one_module


def export(source: str, out: str, onnx: bool = False, onnx_fused: bool = False) -> dict[str, Any]:
    """Write the Hugging Face and sentence-transformers folders of both towers, and the
    sentence-transformers router model with its model card.

    Args:
        source: checkpoint folder or ``final/`` folder.
        out: output folder.
        onnx: also write each tower as ONNX (``DIR/onnx/``, see ``onnx_export``), checked
            against PyTorch with onnxruntime.
        onnx_fused: those graphs with onnxruntime's transformer fusions (onnxruntime-only).
    """
    src, dst = Path(source), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such checkpoint folder")
    run = RunInfo.gather(src)  # reads the run folder first: a broken metrics file fails nothing
    towers = load_export_towers(src)
    st_root = dst / "sentence_transformers"
    hf_folders = {}
    for side, tower in towers.towers.items():
        hf_folders[side] = dst / f"{side}_tower"
        tower.save_pretrained(hf_folders[side], towers.tokenizer, towers.lengths[side])
        to_sentence_transformer(tower, hf_folders[side], towers.lengths[side]).save(str(st_root / side))
    router, one_module = to_router(towers, hf_folders)
    router_dir = st_root / ROUTER_DIR
    router.save(str(router_dir), create_model_card=False)
    (router_dir / MODEL_CARD).write_text(render_model_card(run, towers, one_module), encoding="utf-8")
    summary = {"out": str(dst), "source": str(src), "towers": sorted(towers.towers),
               "router": str(router_dir), "shared_towers": towers.shared,
               "run_dir": None if run.run_dir is None else str(run.run_dir)}
    fusion = towers.towers["item"].fusion
    if fusion is not None:
        summary["item_features"] = {
            "dim": fusion.features_dim, "fusion": fusion.mode,
            "weights": str(hf_folders["item"] / FUSION_FILE),
            "note": TEXT_ONLY_NOTE}
    if onnx or onnx_fused:
        from clicktower.launcher.engine.onnx_export import export_onnx

        summary["onnx"] = export_onnx(towers.towers, towers.tokenizer, towers.lengths, dst, onnx_fused)
    (dst / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------
# The model card: what the run folder says about how the model was made.


@dataclass
class RunInfo:
    """What the run folder (and the checkpoint) record about the exported model.

    Args:
        source: the exported checkpoint or ``final/`` folder.
        run_dir: the run folder it sits in, when found.
        config: the training config (parsed YAML), when found.
        config_file: where the config came from.
        metrics: the records of ``metrics.jsonl`` up to the exported step, when found.
        notes: what is missing or unreadable, one sentence each.
        step: the exported optimiser step, when known.
        trainer_state: the checkpoint's ``trainer_state.json``, when it is a checkpoint.
    """

    source: Path
    run_dir: Path | None = None
    config: dict[str, Any] | None = None
    config_file: Path | None = None
    metrics: list[dict[str, Any]] | None = None
    notes: list[str] = field(default_factory=list)
    step: int | None = None
    trainer_state: dict[str, Any] | None = None

    @classmethod
    def gather(cls, source: Path) -> "RunInfo":
        """Find the run folder of ``source`` and read its config and metrics.

        Args:
            source: a checkpoint folder (``RUN/checkpoints/step_X``) or a towers folder
                (``RUN/final``).
        """
        info = cls(source, find_run_dir(source))
        state_file = source / "trainer_state.json"
        if state_file.is_file():
            info.trainer_state = json.loads(state_file.read_text())
            info.step = info.trainer_state.get("step")
        if info.run_dir is None:
            info.notes.append(f"No run folder found around {source} (expected RUN/checkpoints/step_X "
                              "or RUN/final): no metrics.jsonl.")
        info._read_config()
        info._read_metrics()
        return info

    def _read_config(self) -> None:
        candidates = ([self.run_dir / "config.yaml"] if self.run_dir else []) + [self.source / "config.yaml"]
        for path in candidates:
            if path.is_file():
                try:
                    config = yaml.safe_load(path.read_text())
                except yaml.YAMLError:
                    self.notes.append(f"{path} is not valid YAML.")
                    continue
                if isinstance(config, dict):
                    self.config, self.config_file = config, path
                    return
        self.notes.append("No training config.yaml found (neither in the run folder nor in the export source).")

    def _read_metrics(self) -> None:
        if self.run_dir is None:
            return
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            self.notes.append(f"No {path}: no training or evaluation metrics.")
            return
        try:
            records = read_metrics(path)
        except DataError as exc:
            self.notes.append(f"metrics.jsonl unreadable: {exc}.")
            return
        if self.step is None:  # a final/ folder: the run's last step
            self.step = max((r["step"] for r in records if isinstance(r.get("step"), int)), default=None)
        # A checkpoint of a run that went on: only what was logged up to the exported step.
        self.metrics = [r for r in records if self.step is None or r.get("step", 0) <= self.step]

    def last_eval(self) -> dict[str, Any] | None:
        """The last evaluation record (``eval/*`` keys) up to the exported step."""
        evals = [r for r in self.metrics or [] if any(k.startswith("eval/") for k in r)]
        return evals[-1] if evals else None

    def last_train(self) -> dict[str, Any] | None:
        """The last training record (``loss`` key) up to the exported step."""
        trains = [r for r in self.metrics or [] if "loss" in r]
        return trains[-1] if trains else None


def find_run_dir(source: Path) -> Path | None:
    """The run folder of a checkpoint (``RUN/checkpoints/step_X``) or towers folder (``RUN/final``).

    Args:
        source: the exported folder.
    """
    source = source.resolve()
    if source.parent.name == "checkpoints":
        return source.parent.parent
    if source.name in ("final", "best") or any((source.parent / name).is_file()
                                                for name in ("config.yaml", "metrics.jsonl")):
        return source.parent
    return None


def render_model_card(run: RunInfo, towers: ExportTowers, one_module: bool) -> str:
    """The router model's README.md: base model, how to load it, training config, data
    counts, last evaluation metrics, versions.

    Args:
        run: what the run folder recorded.
        towers: the exported towers.
        one_module: both routes share one set of modules.
    """
    model_cfg = (run.config or {}).get("model") or {}
    base = _base_model(model_cfg)
    front = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
             "tags: [sentence-transformers, sentence-similarity, feature-extraction, clicktower, two-tower]"]
    if model_cfg.get("name_or_path") and is_hub_id(model_cfg["name_or_path"]):
        front.append(f"base_model: {model_cfg['name_or_path']}")
    front.append("---")
    step = "" if run.step is None else f" at step {run.step}"
    layout = ("Shared towers: both routes run one set of modules (one encoder)" if one_module else
              "Shared towers, stored once per route" if towers.shared else
              "Separate towers: each route has its own encoder")
    lines = [*front, "", "# clicktower two-tower retrieval model", "",
             f"A query tower and an item (product) tower trained by clicktower {_version('clicktower')} "
             f"with in-batch contrastive loss on search clicks, exported from `{run.source}`{step}.",
             "", f"- Base model: {base}",
             f"- {layout}; queries are cut at {_limit(towers.lengths['query'])}, "
             f"documents at {_limit(towers.lengths['item'])}.",
             *_architecture_lines(towers), "", *_usage_lines(), "", *_training_lines(run), "",
             *_eval_lines(run), "", "## Versions", "",
             *(f"- {name}: {_version(name)}" for name in
               ("clicktower", "sentence-transformers", "transformers", "torch"))]
    if run.notes:
        lines += ["", "## Missing from this card", "", *(f"- {note}" for note in run.notes)]
    return "\n".join(lines) + "\n"


def _base_model(model_cfg: dict[str, Any]) -> str:
    if model_cfg.get("name_or_path"):
        return f"`{model_cfg['name_or_path']}`"
    if model_cfg.get("bert_config"):
        return (f"a randomly initialised BERT ({json.dumps(model_cfg['bert_config'], sort_keys=True)}), "
                f"tokenizer `{model_cfg.get('tokenizer')}`")
    return "unknown (no training config found)"


def _architecture_lines(towers: ExportTowers) -> list[str]:
    query = towers.towers["query"]
    proj = query.projection
    head = (f"{query.pooling} pooling, "
            + (f"projection {proj.in_features} -> {proj.out_features}, " if proj is not None else "no projection, ")
            + ("L2-normalised (cosine similarity)" if query.normalize else "not normalised (dot product)"))
    lines = [f"- Head: {head}; {query.embedding_dim}-dimensional embeddings."]
    if towers.logit_scale is not None:
        lines.append(f"- Trained temperature: {1.0 / towers.logit_scale:.4f} (logit scale {towers.logit_scale:.2f}).")
    fusion = towers.towers["item"].fusion
    if fusion is not None:
        lines.append(f"- Item feature vectors: {fusion.features_dim}-dimensional, {fusion.mode} fusion. "
                     + TEXT_ONLY_NOTE)
    return lines


def _usage_lines() -> list[str]:
    return ["## Usage", "",
            "Encode search queries with `encode_query` and product texts with `encode_document` "
            "(plain `encode` takes the document route):", "",
            "```python", "from sentence_transformers import SentenceTransformer", "",
            'model = SentenceTransformer("path/to/sentence_transformers/router")',
            'queries = model.encode_query(["cordless drill 20v"])',
            'products = model.encode_document(["DEWALT 20V MAX Cordless Drill/Driver Kit"])',
            "print(model.similarity(queries, products))", "```", "",
            "The folders beside this one (`../query`, `../item`) hold each tower as its own "
            "SentenceTransformer; `../../query_tower` and `../../item_tower` hold them as Hugging Face "
            "folders (`AutoModel`, plus clicktower's pooling and projection files)."]


def _training_lines(run: RunInfo) -> list[str]:
    lines = ["## Training", ""]
    if run.run_dir is not None:
        lines.append(f"- Run folder: `{run.run_dir}`")
    lines += _data_count_lines(run)
    if run.config is not None:
        lines += ["", f"Training config (`{run.config_file}`):", "", "```yaml",
                  yaml.safe_dump(run.config, sort_keys=False).rstrip(), "```"]
    return lines


def _data_count_lines(run: RunInfo) -> list[str]:
    data = (run.config or {}).get("data") or {}
    manifests = [m.get("manifest") for m in data.get("mix") or [] if isinstance(m, dict)]
    manifests = manifests or ([data["train_manifest"]] if data.get("train_manifest") else [])
    lines = [f"- Training data `{m}`: {_manifest_pairs(m)}" for m in manifests]
    if run.step is not None:
        lines.append(f"- Optimiser steps: {run.step}")
    batch = ((run.config or {}).get("train") or {}).get("batch_size")
    world = ((run.trainer_state or {}).get("topology") or {}).get("world_size")
    if batch is not None:
        lines.append(f"- Batch: {batch} pairs per process" + (f" x {world} processes" if world else ""))
    loader = (run.trainer_state or {}).get("loader") or {}
    if "samples_consumed" in loader:
        lines.append(f"- Data position: epoch {loader.get('epoch', 0)}, "
                     f"{loader['samples_consumed']} pairs into it")
    last = run.last_train()
    skipped = {k[len('data_'):]: v for k, v in (last or {}).items() if k.startswith("data_")}
    if last is not None:
        lines.append(f"- Bad samples skipped by step {last.get('step')}: "
                     + (", ".join(f"{k} {v}" for k, v in skipped.items()) if skipped else "none recorded"))
    return lines


def _manifest_pairs(manifest: str) -> str:
    path = Path(manifest)
    path = path / "manifest.json" if path.is_dir() else path
    try:
        count = json.loads(path.read_text()).get("num_samples")
    except (OSError, ValueError, AttributeError):
        return "pair count not readable from here"
    return f"{count:,} pairs" if isinstance(count, int) else "pair count not recorded"


def _eval_lines(run: RunInfo) -> list[str]:
    lines = ["## Evaluation", ""]
    record = run.last_eval()
    if record is None and run.metrics is None:
        return lines + ["No evaluation metrics: no metrics.jsonl was found (see below)."]
    if record is None:
        return lines + ["The run's metrics.jsonl has no evaluation up to the exported step "
                        "(held-out evaluation during training: `eval.every_steps`)."]
    lines += [f"Last held-out evaluation logged during training (step {record.get('step')}):", "",
              "| metric | value |", "|---|---|"]
    for key, value in record.items():
        if key.startswith("eval/"):
            lines.append(f"| {key[len('eval/'):]} | {value:.4f} |" if isinstance(value, float)
                         else f"| {key[len('eval/'):]} | {value} |")
    return lines


def _limit(length: int | None) -> str:
    return "the tokenizer's limit" if length is None else f"{length} tokens"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
