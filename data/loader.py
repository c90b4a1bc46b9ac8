"""Streaming click-pair batches from WebDataset shards to every rank and loader worker.

The epoch is one deterministic global order of samples: a seeded permutation of the shards,
each shard read in order through a seeded shuffle buffer. Global position ``p`` of that
stream belongs to rank ``p % world_size``; every rank yields the same number of batches,
``num_samples // (world_size * batch_size)``, and the remainder (fewer than one global batch)
is dropped for that epoch (the next epoch's order is a new permutation, so no sample is
dropped every time). Batch ``j`` of a rank is built by loader worker ``j % num_workers``;
PyTorch's ``DataLoader`` takes workers round-robin, so the order is the same for any worker
count.

The state is ``{"epoch", "samples_consumed"}`` (global samples): it holds no rank or worker,
so a resume can happen on any world size or worker count whose global batch divides the
consumed count.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clicktower.data.errors import DataError
from clicktower.data.shards import iter_shard, load_manifest


@dataclass
class DataConfig:
    """Data section of the experiment config.

    Args:
        train_manifest: ``manifest.json`` (or its folder) written by ``clicktower shard``.
        num_workers: loader worker processes per rank (0 reads in the training process).
        shuffle_buffer: samples held in the shuffle buffer while reading a shard stream.
    """

    train_manifest: str | None = None
    num_workers: int = 0
    shuffle_buffer: int = 1000

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")


def stable_id(text: str) -> int:
    """A process-independent non-negative int64 id for a string (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def epoch_order(manifest: dict[str, Any], seed: int, epoch: int, shuffle_buffer: int) -> Iterator[dict]:
    """Yield every sample of the manifest once, in the deterministic order of ``epoch``.

    Args:
        manifest: as returned by ``load_manifest``.
        seed: base seed of the run.
        epoch: epoch number; each epoch has its own order.
        shuffle_buffer: size of the reservoir that shuffles samples across shard boundaries.
    """
    rng = random.Random(f"{seed}:{epoch}")
    shards = list(manifest["shards"])
    rng.shuffle(shards)
    buffer: list[dict] = []
    for shard in shards:
        for sample in iter_shard(shard["path"]):
            if len(buffer) < shuffle_buffer:
                buffer.append(sample)
                continue
            slot = rng.randrange(len(buffer))
            buffer[slot], sample = sample, buffer[slot]
            yield sample
    rng.shuffle(buffer)
    yield from buffer


class _EpochStream(IterableDataset):
    """One epoch of one rank's batches, from a starting global sample, split over workers."""

    def __init__(self, manifest: dict, batch_size: int, rank: int, world_size: int, seed: int,
                 epoch: int, start_batch: int, num_batches: int, shuffle_buffer: int,
                 collate: Callable[[list[dict]], dict]) -> None:
        self.manifest, self.batch_size, self.rank, self.world_size = manifest, batch_size, rank, world_size
        self.seed, self.epoch, self.shuffle_buffer, self.collate = seed, epoch, shuffle_buffer, collate
        self.start_batch, self.num_batches = start_batch, num_batches

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        global_batch = self.batch_size * self.world_size
        samples = epoch_order(self.manifest, self.seed, self.epoch, self.shuffle_buffer)
        batch: list[dict] = []
        for position, sample in enumerate(samples):
            step = position // global_batch
            if step >= self.num_batches:
                return  # the remainder that cannot fill a step on every rank
            if step < self.start_batch or position % self.world_size != self.rank:
                continue
            if (step - self.start_batch) % num_workers != worker:
                continue
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []


class ClickPairLoader:
    """Batches of (query, item) pairs for one rank, resumable to the exact sample.

    Args:
        manifest: path of ``manifest.json`` (or its folder), or a loaded manifest.
        batch_size: pairs per batch on this rank.
        rank: this rank.
        world_size: number of ranks.
        num_workers: worker processes for reading and tokenising.
        seed: seed of the epoch orders.
        tokenizer: a Hugging Face tokenizer; when given, batches carry padded tensors.
        max_length: token limit for queries (and items unless ``max_item_length``).
        max_item_length: token limit for items.
        shuffle_buffer: shuffle buffer size.
    """

    def __init__(self, manifest: str | dict, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, tokenizer: Any = None, max_length: int = 32,
                 max_item_length: int | None = None, shuffle_buffer: int = 1000) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.manifest = manifest if isinstance(manifest, dict) else load_manifest(manifest)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.shuffle_buffer = num_workers, seed, shuffle_buffer
        self.tokenizer = tokenizer
        self.max_length, self.max_item_length = max_length, max_item_length or max_length
        self.batches_per_epoch = self.manifest["num_samples"] // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"{self.manifest.get('path', 'manifest')}: {self.manifest['num_samples']} samples "
                            f"cannot fill one global batch of {batch_size} x {world_size} ranks")
        self.epoch = 0
        self.samples_consumed = 0  # global samples of the current epoch already yielded

    def __len__(self) -> int:
        return self.batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        """The position of the stream: epoch and global samples consumed in it."""
        return {"epoch": self.epoch, "samples_consumed": self.samples_consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a position saved by ``state_dict`` (any world size or worker count).

        Args:
            state: ``{"epoch", "samples_consumed"}``.
        """
        global_batch = self.batch_size * self.world_size
        if state["samples_consumed"] % global_batch:
            raise DataError(f"cannot resume at sample {state['samples_consumed']}: not a multiple of "
                            f"the global batch {global_batch}")
        self.epoch, self.samples_consumed = int(state["epoch"]), int(state["samples_consumed"])

    def __iter__(self) -> Iterator[dict]:
        """Yield the rest of the current epoch, then move the state to the next epoch."""
        global_batch = self.batch_size * self.world_size
        start = self.samples_consumed // global_batch
        stream = _EpochStream(self.manifest, self.batch_size, self.rank, self.world_size, self.seed,
                              self.epoch, start, self.batches_per_epoch, self.shuffle_buffer, self.collate)
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                            persistent_workers=False)
        for batch in loader:
            self.samples_consumed += global_batch
            yield batch
        self.epoch += 1
        self.samples_consumed = 0

    def collate(self, samples: list[dict]) -> dict[str, Any]:
        """Turn samples into a batch: keys, texts, int64 item ids, and token tensors.

        Args:
            samples: decoded samples from the shards.
        """
        batch: dict[str, Any] = {
            "keys": [s["__key__"] for s in samples],
            "queries": [s["query"] for s in samples],
            "items": [s["item_text"] for s in samples],
            "item_ids": torch.tensor([stable_id(str(s["item_id"])) for s in samples], dtype=torch.long),
            "query_ids": torch.tensor([stable_id(s["query"]) for s in samples], dtype=torch.long),
        }
        if self.tokenizer is not None:
            batch.update(tokenize_pairs(self.tokenizer, batch["queries"], batch["items"],
                                        self.max_length, self.max_item_length))
        return batch


def tokenize_pairs(tokenizer: Any, queries: list[str], items: list[str], max_query_length: int,
                   max_item_length: int) -> dict[str, torch.Tensor]:
    """Tokenise both sides, padded to the longest in the batch (a multiple of 8).

    Args:
        tokenizer: a Hugging Face tokenizer.
        queries: query texts.
        items: item texts.
        max_query_length: token limit for queries.
        max_item_length: token limit for items.
    """
    out = {}
    for side, texts, limit in (("query", queries, max_query_length), ("item", items, max_item_length)):
        enc = tokenizer(texts, padding=True, truncation=True, max_length=limit,
                        pad_to_multiple_of=8, return_tensors="pt")
        out[f"{side}_input_ids"] = enc["input_ids"]
        out[f"{side}_attention_mask"] = enc["attention_mask"]
    return out
