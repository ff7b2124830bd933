"""The golden store: versioned, immutable, checksummed goldens, and the case layout every engine writes.

Owns ``case`` (the :class:`~moesnap.store.case.Case` value and its Zarr v3 group I/O), ``base``
(the :class:`GoldenStore` interface, names), ``memory`` (a store in a dict),
``zarr`` (what the Zarr stores share: reading a version, writing a case), ``local`` (a
directory), ``s3`` (``s3://`` through s3fs) and ``open`` (:func:`open_store`).
May import: :mod:`moesnap.errors`, :mod:`moesnap.stages`, :mod:`moesnap.util`; never the model,
the judge, the use cases or the command line.
"""

from .base import (
    CLAIM,
    DEFAULT_ROOT,
    DEFAULT_STALE_AFTER,
    MARKER,
    GoldenStore,
    GoldenVersion,
    Leftover,
    PruneResult,
    VersionWriter,
    parse_ref,
    validate_case_name,
    validate_suite,
    validate_version,
    version_name,
    version_number,
)
from .memory import MemoryGoldenStore
from .local import LocalGoldenStore
from .open import open_store
from .s3 import RemoteGoldenStore
from .zarr import ZarrGoldenStore

__all__ = [
    "CLAIM", "DEFAULT_ROOT", "DEFAULT_STALE_AFTER", "MARKER", "GoldenStore", "GoldenVersion", "Leftover", "PruneResult", "VersionWriter",
    "parse_ref", "validate_case_name", "validate_suite", "validate_version", "version_name",
    "version_number", "MemoryGoldenStore", "open_store", "LocalGoldenStore", "RemoteGoldenStore", "ZarrGoldenStore",
]
