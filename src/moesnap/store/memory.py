"""The in-memory golden store: versions kept in a dict, for tests and for callers that want no disk."""

from __future__ import annotations

import copy
import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import GoldenError
from .base import (
    GoldenStore,
    Leftover,
    VersionWriter,
    _json_clean,
    sort_versions,
    validate_suite,
    version_name,
    version_number,
)
from .case import Case, GroupValue, checksum, checksum_matches


@dataclass
class _MemVersion:
    meta: dict[str, Any]
    cases: dict[str, dict[str, np.ndarray]]   # case -> array path -> array
    case_attrs: dict[str, dict[str, Any]]


class MemoryGoldenStore(GoldenStore):
    """Versions in a dict: same rules as the Zarr store, no disk.

    A writer is alive while something holds it (the store keeps only a weak reference); one
    dropped without a commit or an abort is what a crashed process leaves: a dead leftover
    that :meth:`~GoldenStore.prune` removes.
    """

    def __init__(self, name: str = "memory") -> None:
        self.url = f"memory://{name}"
        self._lock = threading.Lock()
        self._published: dict[str, dict[str, _MemVersion]] = {}
        self._writers: dict[str, dict[str, weakref.ref[_MemoryWriter]]] = {}   # suite -> token -> writer
        self._claimed: dict[str, int] = {}

    def suites(self) -> list[str]:
        with self._lock:
            return sorted(s for s, vs in self._published.items() if vs)

    def versions(self, suite: str) -> list[str]:
        validate_suite(suite)
        with self._lock:
            return sort_versions(self._published.get(suite, {}))

    def begin(self, suite: str) -> VersionWriter:
        validate_suite(suite)
        w = _MemoryWriter(self, suite)
        with self._lock:
            self._writers.setdefault(suite, {})[w.token] = weakref.ref(w)
        return w

    def _get(self, suite: str, version: str) -> _MemVersion:
        with self._lock:
            v = self._published.get(suite, {}).get(version)
        if v is None:
            raise GoldenError(f"{self.where(suite, version)}: unknown version")
        return v

    def _read_meta(self, suite: str, version: str) -> dict[str, Any]:
        return copy.deepcopy(self._get(suite, version).meta)

    def _group(self, suite: str, version: str, case: str, *, verify: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Copies of one case group's arrays, checked against its checksums when ``verify``, and its attributes."""
        v = self._get(suite, version)
        where = f"{self.where(suite, version)}/{case}"
        if case not in v.cases:
            raise GoldenError(f"{where}: no such case group")
        arrays, attrs = v.cases[case], copy.deepcopy(v.case_attrs[case])
        sums = attrs.get("checksums") or {}
        if verify:
            for path, digest in sums.items():
                if path not in arrays:
                    raise GoldenError(f"{where}/{path}: array is missing")
                if not checksum_matches(arrays[path], digest):
                    raise GoldenError(f"{where}/{path}: checksum mismatch (corrupt or modified array)")
        return {p: a.copy() for p, a in arrays.items()}, attrs

    def _read_arrays(self, suite: str, version: str, case: str, *, verify: bool) -> dict[str, np.ndarray]:
        return self._group(suite, version, case, verify=verify)[0]

    def _read_case(self, suite: str, version: str, case: str, *, verify: bool) -> Case:
        out, attrs = self._group(suite, version, case, verify=verify)
        if "tokens" not in out:
            raise GoldenError(f"{self.where(suite, version)}/{case}: no 'tokens' array")
        return Case(tokens=out.pop("tokens").astype(np.int32),
                    model={p: a for p, a in out.items() if not p.startswith("layers/")},
                    layers={p[len("layers/"):]: a for p, a in out.items() if p.startswith("layers/")},
                    attrs=attrs)

    def _delete(self, suite: str, version: str) -> None:
        with self._lock:
            self._published.get(suite, {}).pop(version, None)

    def leftovers(self, suite: str) -> list[Leftover]:
        with self._lock:
            return [Leftover(t, None, ref() is not None) for t, ref in self._writers.get(suite, {}).items()]

    def _remove_leftover(self, suite: str, leftover: Leftover) -> bool:
        with self._lock:
            ref = self._writers.get(suite, {}).get(leftover.name)
            if ref is None or ref() is not None:
                return False
            del self._writers[suite][leftover.name]
            return True


class _MemoryWriter(VersionWriter):
    def __init__(self, store: MemoryGoldenStore, suite: str) -> None:
        super().__init__(store, suite)
        self.token = f".staging-{uuid.uuid4().hex[:12]}"
        self._arrays: dict[str, dict[str, np.ndarray]] = {}
        self._attrs: dict[str, dict[str, Any]] = {}

    def _write_case(self, name: str, case: GroupValue) -> dict[str, str]:
        arrays = {p: np.array(a, copy=True, order="C") for p, a in case.arrays().items()}
        for a in arrays.values():
            a.setflags(write=False)
        sums = {p: checksum(a) for p, a in arrays.items()}
        self._arrays[name] = arrays
        self._attrs[name] = _json_clean({**case.attrs, "checksums": sums})
        return sums

    def _publish(self, meta: dict[str, Any]) -> str:
        st: MemoryGoldenStore = self.store  # type: ignore[assignment]
        with st._lock:
            vs = st._published.setdefault(self.suite, {})
            n = max([version_number(v) or 0 for v in vs] + [st._claimed.get(self.suite, 0)]) + 1
            name = version_name(n)
            st._claimed[self.suite] = n
            vs[name] = _MemVersion(meta, self._arrays, self._attrs)
            st._writers.get(self.suite, {}).pop(self.token, None)
        return name

    def _discard(self) -> None:
        st: MemoryGoldenStore = self.store  # type: ignore[assignment]
        with st._lock:
            st._writers.get(self.suite, {}).pop(self.token, None)
