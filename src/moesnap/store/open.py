"""Open a golden store by its root: a local directory or an ``s3://`` URL."""

from __future__ import annotations

import os

from ..errors import UsageError
from .base import DEFAULT_ROOT, GoldenStore
from .local import LocalGoldenStore
from .s3 import RemoteGoldenStore


def open_store(root: str | os.PathLike[str] | None = None) -> GoldenStore:
    """A store at ``root``: a directory (default ``goldens/``) or ``s3://bucket/prefix``."""
    if root is None:
        root = DEFAULT_ROOT
    text = os.fspath(root)
    if not text:
        raise UsageError("store root is empty")
    if any(ord(ch) < 32 for ch in text):
        raise UsageError(f"store root {text!r} contains control characters")
    if "://" in text:
        return RemoteGoldenStore(text)
    return LocalGoldenStore(text)
