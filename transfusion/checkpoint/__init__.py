"""Training checkpoints (DCP, sharded) and inference exports (safetensors)."""

from transfusion.checkpoint.dcp import (
    CheckpointError,
    CheckpointSaveError,
    ModelOptimizerState,
    ObjectState,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from transfusion.checkpoint.export import ExportError, export_model, load_export

__all__ = [
    "CheckpointError",
    "CheckpointSaveError",
    "ExportError",
    "ModelOptimizerState",
    "ObjectState",
    "checkpoint_step",
    "export_model",
    "latest_checkpoint",
    "load_checkpoint",
    "load_export",
    "resolve_checkpoint",
    "save_checkpoint",
]
