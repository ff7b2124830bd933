"""Open a model: a GGUF file, or an HF checkpoint directory (``config.json`` + ``*.safetensors``)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import CheckpointModel, is_checkpoint
from .weights import GGUFModel, ModelWeights


def open_model(path: str | Path) -> ModelWeights:
    """The model at ``path``: :class:`CheckpointModel` for a directory holding ``config.json``,
    :class:`GGUFModel` otherwise.  Bad files raise :class:`~moesnap.errors.ModelFileError` naming them."""
    if is_checkpoint(path):
        return CheckpointModel(path)
    return GGUFModel.open(path)
