"""Named arrays as a case group: the generic layout, for arrays of any names (not only stages).

::

    <case>/arrays/<name>    any shape; a real floating, integer or bool dtype; one chunk
    attributes              layout = "arrays", schema, checksums (CRC-32C of every array), and the caller's

A name is one or more ``/``-separated parts, each up to 100 letters, digits, ``.``, ``_`` or ``-``
starting with a letter or digit (``hidden``, ``layer0.attn``, ``layers/moe_out``).  A version of a
golden store holds such groups beside, or instead of, forward cases
(:meth:`moesnap.store.VersionWriter.add_arrays`, :meth:`moesnap.store.GoldenVersion.read_arrays`),
with the same guarantees: atomic publish, nothing overwritten, every array checksummed and verified
on read.  The ``moesnap_snapshot`` pytest fixture keeps its goldens this way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..errors import UsageError

LAYOUT = "arrays"        # the case group's ``layout`` attribute
PREFIX = "arrays/"       # where the arrays sit inside the case group
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_RESERVED = frozenset({"zarr.json"})    # Zarr v3's metadata document


def validate_array_name(name: object) -> str:
    """Return ``name`` if it can name an array of the generic layout, else raise :class:`UsageError`."""
    if not isinstance(name, str) or not name:
        raise UsageError(f"array name {name!r} is empty or not a string")
    for part in name.split("/"):
        if not _PART.fullmatch(part) or ".." in part or part in _RESERVED:
            raise UsageError(f"array name {name!r}: use '/'-separated parts of up to 100 letters, digits, '.', "
                             f"'_' or '-', each starting with a letter or digit (not 'zarr.json')")
    return name


@dataclass(frozen=True)
class NamedArrays:
    """Arrays by name, ready to be written as one case group (what ``add_arrays`` writes)."""

    values: Mapping[str, np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = sorted(self.values)
        for name in names:
            validate_array_name(name)
            a = self.values[name]
            if not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf":
                what = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
                raise UsageError(f"array {name!r}: {what} cannot be stored (a numpy array of a real floating, "
                                 f"integer or bool dtype)")
        known = set(names)
        for name in names:
            parts = name.split("/")
            folder = next((f for f in ("/".join(parts[:i]) for i in range(1, len(parts))) if f in known), None)
            if folder is not None:
                raise UsageError(f"array names {folder!r} and {name!r}: one cannot be an array and a folder of arrays")
        if not names:
            raise UsageError("no arrays to store")

    @classmethod
    def of(cls, values: Mapping[str, np.ndarray], attrs: Mapping[str, Any] | None = None) -> NamedArrays:
        """Frozen C-ordered copies of ``values`` (the caller may change its arrays afterwards)."""
        copies = {}
        for name, a in values.items():
            c = np.array(a, copy=True, order="C")
            c.setflags(write=False)
            copies[name] = c
        return cls(copies, {**dict(attrs or {}), "layout": LAYOUT})

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array keyed by its path inside the case group (what the store writes)."""
        return {PREFIX + name: a for name, a in self.values.items()}


def strip_prefix(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A case group's arrays (as :meth:`~moesnap.store.GoldenVersion.read_arrays` returns them) by name."""
    return {path[len(PREFIX):]: a for path, a in arrays.items() if path.startswith(PREFIX)}
