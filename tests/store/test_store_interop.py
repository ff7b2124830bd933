"""A golden is plain Zarr v3: tensorstore (an independent C++ implementation) reads the same values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moesnap.store import LocalGoldenStore

from moesnap.testing.store import small_case

ts = pytest.importorskip("tensorstore", reason="the test extra installs tensorstore")

COMMITTED = Path(__file__).resolve().parents[2] / "goldens"


def _read_with_tensorstore(path: Path) -> np.ndarray:
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, open=True, read=True).result()
    return np.asarray(arr.read().result())


def _check_version(store: LocalGoldenStore, suite: str, version: str) -> int:
    v = store.open_version(suite, version)
    n = 0
    for name in v.case_names():
        for path, ours in v.read_case(name).arrays().items():
            theirs = _read_with_tensorstore(store.root / suite / version / name / path)
            assert theirs.dtype == ours.dtype and theirs.shape == ours.shape, (name, path)
            assert theirs.tobytes() == ours.tobytes(), (name, path)
            n += 1
    return n


def test_tensorstore_reads_a_published_version(tmp_path):
    st = LocalGoldenStore(tmp_path)
    case = small_case(3, n_layer=3, n_tok=5)
    case.layers["moe_out"][1, 2, 3] = np.nan          # non-finite values survive too
    case.layers["moe_out"][2, 0, 0] = -np.inf
    v = st.publish("s", {"case0": case, "case1": small_case(4)}, {"dtype": "float32"})
    assert _check_version(st, "s", v.version) == 2 * len(case.arrays())
    got = _read_with_tensorstore(tmp_path / "s" / v.version / "case0" / "layers" / "moe_out")
    assert np.isnan(got[1, 2, 3]) and got[2, 0, 0] == -np.inf


def test_tensorstore_reads_the_committed_goldens():
    st = LocalGoldenStore(COMMITTED)
    v = st.open_version("tiny")
    assert _check_version(st, "tiny", v.version) == len(v.meta["checksums"])
