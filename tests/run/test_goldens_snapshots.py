"""`moesnap goldens list/show` on a pytest snapshot suite (named arrays, not a forward's cases)."""

from __future__ import annotations

import numpy as np

from moesnap.cli.main import main
from moesnap.store import open_store


def test_list_and_show_describe_a_snapshot_suite_and_verify_it(tmp_path, capsys):
    st = open_store(str(tmp_path))
    with st.begin("tests.test_a.test_b") as w:
        w.add_arrays("check0", {"hidden": np.arange(12, dtype=np.float32).reshape(3, 4)}, {"dtype": "float32"})
        w.commit({"suite": "tests.test_a.test_b", "kind": "moesnap_snapshot", "test": "tests/test_a.py::test_b",
                  "created": "2026-11-30T12:00:00+00:00",
                  "command": "pytest --moesnap-regen tests/test_a.py::test_b"})
    assert main(["goldens", "list", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pytest snapshot of tests/test_a.py::test_b, 1 check(s)" in out and "?" not in out
    assert main(["goldens", "show", "tests.test_a.test_b", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "check0: hidden float32 [3, 4]" in out and "all verified" in out
    assert "pytest --moesnap-regen tests/test_a.py::test_b" in out
