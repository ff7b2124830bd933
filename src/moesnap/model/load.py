"""Open a model: a GGUF file, or an HF checkpoint directory (``config.json`` + ``*.safetensors``).

:func:`check_model_path` tells a path that cannot be a model from one that may be without torch
(reading at most four bytes), so that a command can refuse a bad MODEL before it loads torch or says
``opening MODEL``; :func:`open_model` opens it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelFileError

if TYPE_CHECKING:
    import torch

    from .weights import ModelWeights

#: what MODEL may be, as the error messages say it
MODEL_FORMS = "a GGUF file or an HF checkpoint directory (config.json + *.safetensors)"

#: the file that makes a directory a checkpoint (:data:`moesnap.model.checkpoint.CONFIG`; repeated
#: here so that checking a path imports neither torch nor the checkpoint reader)
CONFIG = "config.json"


def parse_device(name: str) -> torch.device:
    """Where a forward runs: ``cpu``, ``cuda`` or ``cuda:N`` (a CUDA device only where torch sees one)."""
    import torch

    from ..errors import UsageError

    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"unknown device {name!r}; choose cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but no CUDA device is available")
    return torch.device(name)


def check_model_path(path: str | Path) -> Path:
    """``path`` if it may be a model: a directory holding ``config.json`` (a checkpoint, read later),
    or a non-empty readable file starting with the GGUF magic.  Otherwise a
    :class:`~moesnap.errors.ModelFileError` naming the path and what is wrong with it.  Imports no
    torch and reads at most the file's first four bytes."""
    from ..gguf.reader import GGUF_MAGIC

    if not str(path):
        raise ModelFileError(f"MODEL: empty path; MODEL is {MODEL_FORMS}")
    p = Path(path)
    if p.is_dir():
        if not (p / CONFIG).exists():
            raise ModelFileError(f"{p}: is a directory without {CONFIG}; MODEL is {MODEL_FORMS}")
        return p
    if not p.exists():
        raise ModelFileError(f"{p}: no such file")
    try:
        with open(p, "rb") as f:
            head = f.read(len(GGUF_MAGIC))
    except OSError as e:
        raise ModelFileError(f"{p}: cannot read ({e.strerror or e})") from None
    if not head:
        raise ModelFileError(f"{p}: empty file, not a GGUF model")
    if head != GGUF_MAGIC:
        raise ModelFileError(f"{p}: not a GGUF file (bad magic)")
    return p


def open_model(path: str | Path) -> ModelWeights:
    """The model at ``path``: :class:`~moesnap.model.checkpoint.CheckpointModel` for a directory
    holding ``config.json``, :class:`~moesnap.model.weights.GGUFModel` for a GGUF file.  A path that
    is neither (:func:`check_model_path`) and bad files raise :class:`~moesnap.errors.ModelFileError`
    naming them."""
    p = check_model_path(path)
    if p.is_dir():
        from .checkpoint import CheckpointModel

        return CheckpointModel(p)
    from .weights import GGUFModel

    return GGUFModel.open(p)
