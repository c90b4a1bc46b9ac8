"""Checkpoints: everything that defines a training step, saved and restored in one place.

A checkpoint is the folder ``OUTPUT_DIR/checkpoints/step_XXXXXXXX/`` holding the model and
optimiser (accelerate's files, or the DeepSpeed engine's ZeRO shards, one set per rank), the LR
scheduler, every rank's RNG states, and ``trainer_state.json`` (step, data loader position,
counters, saving topology, run lineage) with the resolved ``config.yaml``. It counts only once its
``COMPLETE`` marker (every file's sha256, written last) is there; the ``latest`` pointer then
names it. Modules: ``save`` (``Checkpointer``, ``CheckpointConfig``), ``state`` (capturing and
writing a rank's state), ``files`` (layout, marker, checksums), ``restore`` (which checkpoint,
loading it on this topology), ``remote`` (object storage), ``convert`` (ZeRO -> DDP /
universal). The full story: docs/checkpoints.md.
"""
from clicktower.launcher.engine.checkpoint.convert import convert_to_ddp, convert_to_universal
from clicktower.launcher.engine.checkpoint.files import (COMPLETE, LATEST, check_checkpoint, find_resume_checkpoint,
                                                         list_checkpoints)
from clicktower.launcher.engine.checkpoint.restore import topology
from clicktower.launcher.engine.checkpoint.save import CheckpointConfig, Checkpointer
from clicktower.launcher.engine.checkpoint.state import Snapshot

__all__ = ["COMPLETE", "LATEST", "CheckpointConfig", "Checkpointer", "Snapshot", "check_checkpoint",
           "convert_to_ddp", "convert_to_universal", "find_resume_checkpoint", "list_checkpoints", "topology"]
