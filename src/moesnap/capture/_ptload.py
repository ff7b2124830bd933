"""Reading one ``.pt`` file of SGLang's dumper (or vLLM's port of it) without running code from it:
``torch.load(weights_only=True)`` rebuilds tensors and plain containers only and refuses anything else."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import GoldenError

_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _reason(e: Exception) -> str:
    """The line of torch.load's error that says what it refused (it wraps it in advice to drop weights_only)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(_BOILERPLATE)]
    return (lines[0] if lines else f"{type(e).__name__}: {str(e).strip()}")[:200]


def load_file(path: Path) -> tuple[np.ndarray, str, dict]:
    """(the tensor a dumper file holds as numpy, its torch dtype name, the file's ``meta`` or {}), read
    without running any code the file may hold; bfloat16 and float16 become float32 (exactly)."""
    import torch

    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise GoldenError(f"{path}: refused: not plain tensor data (torch.load with weights_only=True: "
                          f"{_reason(e)}); moesnap never runs code from a dump") from None
    meta: dict = {}
    if isinstance(obj, dict) and "value" in obj:
        found = obj.get("meta")
        meta = found if isinstance(found, dict) else {}
        obj = obj["value"]
    if not isinstance(obj, torch.Tensor):
        raise GoldenError(f"{path}: holds {type(obj).__name__}, not a tensor")
    dtype = str(obj.dtype).removeprefix("torch.")
    try:
        t = obj.detach()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.numpy(), dtype, meta
    except Exception as e:
        raise GoldenError(f"{path}: a {dtype} tensor moesnap cannot read ({type(e).__name__})") from None


def load_tensor(path: Path) -> tuple[np.ndarray, str]:
    """(the tensor a dumper file holds as numpy, its torch dtype name): :func:`load_file` without the meta."""
    values, dtype, _ = load_file(path)
    return values, dtype
