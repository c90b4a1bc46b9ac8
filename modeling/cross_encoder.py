"""The teacher: a cross-encoder that reads a query and an item together and scores the pair.

``[CLS] query [SEP] item [SEP]`` goes through a Hugging Face BERT-family encoder; a linear
head on the CLS token's last hidden state gives one logit per pair. Trained pointwise (binary
cross-entropy towards the relevance grade scaled to [0, 1], ``grade_targets``), its logit is
the teacher score that ``clicktower teacher score`` writes and ``mine --teacher`` compares.
Why pointwise and not listwise: docs/teacher.md. No config reading, no collectives here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clicktower.modeling.towers import load_encoder, resolve_model_path

TEACHER_META = "clicktower_teacher.json"
HEAD_FILE = "head.pt"


class CrossEncoder(nn.Module):
    """An encoder and a linear head on its CLS token: one relevance logit per (query, item).

    Args:
        encoder: a Hugging Face encoder (``AutoModel``) returning ``last_hidden_state``.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B] logits of the pairs (the tokenizer's pair encoding).

        Args:
            input_ids: [B, L] token ids of ``[CLS] query [SEP] item [SEP]``.
            attention_mask: [B, L] 1 for tokens, 0 for padding.
            token_type_ids: [B, L] 0 for the query segment, 1 for the item's (None: all 0).
        """
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return self.head(hidden[:, 0]).squeeze(-1).float()

    @classmethod
    def from_encoder(cls, path: str | Path, seed: int = 0) -> "CrossEncoder":
        """A new teacher on a pretrained encoder folder; the head drawn with ``seed``.

        Args:
            path: the encoder's folder (``pkg://`` references are resolved).
            seed: seed of the head's initial weights.
        """
        encoder = load_encoder(resolve_model_path(str(path)))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(encoder)

    def save_pretrained(self, path: str | Path, tokenizer: Any, meta: dict) -> None:
        """Write the encoder (``AutoModel`` folder), the tokenizer, the head and ``meta``.

        Args:
            path: output folder.
            tokenizer: saved beside the weights.
            meta: what the head and scores mean (grade range, objective, token limit), as JSON.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(path)
        tokenizer.save_pretrained(path)
        torch.save(self.head.state_dict(), path / HEAD_FILE)
        (path / TEACHER_META).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> tuple["CrossEncoder", dict]:
        """Load a teacher saved by ``save_pretrained``: ``(model, meta)``.

        Args:
            path: the teacher folder.
        """
        path = Path(path)
        if not (path / TEACHER_META).is_file():
            raise FileNotFoundError(f"{path}: not a teacher folder (no {TEACHER_META}; "
                                    f"write one with clicktower teacher train)")
        model = cls(load_encoder(path))
        model.head.load_state_dict(torch.load(path / HEAD_FILE, weights_only=True))
        return model, json.loads((path / TEACHER_META).read_text())


def grade_targets(labels: torch.Tensor, grade_min: float, grade_max: float) -> torch.Tensor:
    """Grades scaled to [0, 1] targets: ``grade_min`` -> 0, ``grade_max`` -> 1.

    Args:
        labels: [B] relevance grades (binary labels are grades 0 and 1).
        grade_min: the lowest grade (irrelevant).
        grade_max: the highest grade (fully relevant); must exceed ``grade_min``.
    """
    return ((labels - grade_min) / (grade_max - grade_min)).clamp(0.0, 1.0)


def pointwise_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of the logits towards soft targets in [0, 1].

    Args:
        logits: [B] the teacher's logits.
        targets: [B] ``grade_targets`` of the pairs' grades.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())
