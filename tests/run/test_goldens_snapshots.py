"""`moesnap goldens list/show/diff` on a pytest snapshot suite (named arrays, not a forward's cases)."""

from __future__ import annotations

import json
import os
from importlib.metadata import entry_points

import numpy as np
import pytest

from moesnap.cli.main import main
from moesnap.store import open_store

pytest_plugins = ["pytester"]


def test_list_and_show_describe_a_snapshot_suite_and_verify_it(tmp_path, capsys):
    st = open_store(str(tmp_path))
    with st.begin("tests.test_a.test_b") as w:
        w.add_arrays("check0", {"hidden": np.arange(12, dtype=np.float32).reshape(3, 4)}, {"dtype": "float32"})
        w.commit({"suite": "tests.test_a.test_b", "kind": "moesnap_snapshot", "test": "tests/test_a.py::test_b",
                  "created": "2026-11-30T12:00:00+00:00",
                  "command": "pytest --moesnap-regen tests/test_a.py::test_b"})
    assert main(["goldens", "list", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pytest snapshot of tests/test_a.py::test_b, 1 check" in out and "?" not in out
    assert main(["goldens", "show", "tests.test_a.test_b", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "check0: hidden float32 [3, 4]" in out and "all verified" in out
    assert "pytest --moesnap-regen tests/test_a.py::test_b" in out


# ---------------------------------------------------------------- goldens diff

SUITE = "tests.test_a.test_b"
RNG = np.random.default_rng(0)
HIDDEN = RNG.standard_normal((3, 4)).astype(np.float32)
LOGITS = RNG.standard_normal((5, 16)).astype(np.float32)


def _publish(st, checks, moesnap_version="0.1"):
    """One version of the snapshot suite, as the fixture writes it under --moesnap-regen."""
    with st.begin(SUITE) as w:
        for name, arrays in checks.items():
            w.add_arrays(name, arrays, {"dtype": "float32", "test": "tests/test_a.py::test_b"})
        return w.commit({"suite": SUITE, "kind": "moesnap_snapshot", "test": "tests/test_a.py::test_b",
                         "created": "2026-11-30T12:00:00+00:00", "versions": {"moesnap": moesnap_version},
                         "command": "pytest --moesnap-regen tests/test_a.py::test_b"})


@pytest.fixture
def two_versions(tmp_path):
    """v0001, and v0002 with every kind of change; v0003 equal to v0001."""
    root = tmp_path / "goldens"
    st = open_store(str(root))
    base = {"hidden": HIDDEN, "logits": LOGITS, "ids": np.arange(5, dtype=np.int32), "old": np.ones(2, np.float32),
            "noise": HIDDEN}
    _publish(st, {"check0": base})
    nan = HIDDEN.copy()
    nan[1, 2] = np.nan
    _publish(st, {"check0": {"hidden": nan,                                   # NaN: beyond tolerance
                             "logits": LOGITS * np.float32(1.05),             # 5 %: beyond tolerance
                             "ids": np.arange(5, dtype=np.int64),             # same values, another dtype
                             "new": np.zeros(3, np.float16),                  # added ('old' removed)
                             "noise": HIDDEN + np.float32(1e-7)},             # float noise: within tolerance
                  "check1": {"x": np.zeros(2, np.float32)}},                  # a new check
             moesnap_version="0.2")
    _publish(st, {"check0": base})
    return root


def test_diff_of_a_snapshot_suite_summarises_each_check(two_versions, capsys):
    assert main(["-q", "goldens", "diff", f"{SUITE}@v0001", f"{SUITE}@v0002", "--store", str(two_versions)]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"{SUITE}@v0001 -> {SUITE}@v0002"
    assert "  provenance versions.moesnap: 0.1 -> 0.2" in lines
    assert f"  check check1: only in {SUITE}@v0002" in lines
    head = next(line for line in lines if line.startswith("  check check0:"))
    assert "3 of 6 arrays changed, 2 beyond tolerance" in head
    assert "added: new float16 [3]" in head and "removed: old float32 [2]" in head and "1 in another dtype only" in head
    hidden = next(line for line in lines if line.startswith("    hidden float32 [3, 4]:"))
    assert "beyond tolerance" in hidden and "1 NaN" in hidden
    logits = next(line for line in lines if line.startswith("    logits float32 [5, 16]:"))
    assert "max_abs 0.1" in logits and "max_rel 0.05" in logits and "beyond tolerance" in logits
    noise = next(line for line in lines if line.startswith("    noise float32 [3, 4]:"))
    assert "within tolerance" in noise
    assert not any(line.startswith("    ids") for line in lines)          # equal values in another dtype: not changed
    assert lines[-1].startswith("changed: 3 arrays, 2 beyond tolerance, 1 added, 1 removed, 1 check difference")
    assert "(each array: --details)" in lines[-1]
    assert "Traceback" not in out and max(map(len, lines)) < 200


def test_diff_of_a_snapshot_suite_details_and_json(two_versions, tmp_path, capsys):
    report = tmp_path / "diff.json"
    assert main(["-q", "goldens", "diff", f"{SUITE}@v0001", SUITE + "@v0002", "--store", str(two_versions),
                 "--details", "--json", str(report)]) == 1
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines if line.startswith("    ")}
    assert set(rows) == {"hidden", "ids", "logits", "new", "noise", "old"}   # every array of the check
    assert "dtype only  int32 -> int64 [5]" in rows["ids"]
    assert "DIVERGE" in rows["logits"] and "max_abs" in rows["logits"] and "outside" in rows["logits"]
    assert "NAN_CANDIDATE" in rows["hidden"] and "worst at (1, 2)" in rows["hidden"]
    assert "MATCH" in rows["noise"] and "of tolerance" in rows["noise"]
    assert "added" in rows["new"] and "removed" in rows["old"]
    d = json.loads(report.read_text())
    # the keys of the forward-case diff's JSON, and the same meanings
    assert {"a", "b", "verdict", "n_stages", "n_changed", "n_dtype_only", "n_beyond_tolerance", "provenance",
            "case_notes", "results"} <= set(d)
    assert d["kind"] == "moesnap_snapshot" and d["verdict"] == "changed"
    assert (d["n_stages"], d["n_changed"], d["n_dtype_only"], d["n_beyond_tolerance"], d["n_added"],
            d["n_removed"]) == (6, 5, 1, 2, 1, 1)
    assert d["provenance"] == [{"key": "versions.moesnap", "a": "0.1", "b": "0.2"}]
    assert d["case_notes"] == [f"check check1: only in {SUITE}@v0002"]
    by = {r["stage"]: r for r in d["results"]}
    assert all(r["case"] == "check0" and r["layer"] is None for r in d["results"])
    assert by["logits"]["verdict"] == "DIVERGE" and by["logits"]["changed"] and by["logits"]["worst"]["rule"]
    assert by["logits"]["metrics"]["max_rel"] == pytest.approx(0.05, rel=1e-3)
    assert by["ids"]["changed"] is False and by["ids"]["dtypes"] == ["int32", "int64"]
    assert by["new"]["added"] and by["new"]["shapes"] == [None, [3]] and by["old"]["removed"]
    assert by["noise"]["verdict"] == "MATCH" and by["noise"]["changed"]


def test_diff_of_equal_snapshot_versions_exits_0(two_versions, capsys):
    assert main(["-q", "goldens", "diff", f"{SUITE}@v0001", f"{SUITE}@v0003", "--store", str(two_versions)]) == 0
    out = capsys.readouterr().out
    assert "check check0: all 5 arrays unchanged" in out and "identical: all 5 arrays bit for bit" in out


def test_diff_of_named_arrays_written_without_the_fixture(tmp_path, capsys):
    """Case groups of named arrays (``add_arrays``) with no snapshot provenance are diffed the same way."""
    st = open_store(str(tmp_path / "goldens"))
    for scale in (1.0, 2.0):
        with st.begin("mine") as w:
            w.add_arrays("a", {"x": HIDDEN * np.float32(scale)})
            w.commit({})
    assert main(["-q", "goldens", "diff", "mine@v0001", "mine@v0002", "--store", str(tmp_path / "goldens")]) == 1
    assert "    x float32 [3, 4]: max_abs" in capsys.readouterr().out


def test_diff_of_a_snapshot_suite_against_a_forward_golden_is_one_line(two_versions, capsys):
    from moesnap.case import Case

    open_store(str(two_versions)).publish(
        "moe", {"case0": Case(tokens=np.array([1, 2, 3], np.int32), model={"logits": np.zeros((3, 8), np.float32)})},
        {"dtype": "float32"})
    for a, b in ((f"{SUITE}@v0001", "moe"), ("moe@v0001", SUITE)):
        assert main(["-q", "goldens", "diff", a, b, "--store", str(two_versions)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err
        assert err.startswith("moesnap: error: ") and "is a pytest snapshot suite" in err


def test_diff_of_two_regenerations_by_the_fixture(pytester, monkeypatch, capsys):
    """The whole workflow: the fixture writes v0001, a 5 % change is regenerated as v0002, diff names it."""
    autoloaded = (not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD")
                  and any(ep.name == "moesnap" for ep in entry_points(group="pytest11")))
    plugin = [] if autoloaded else ["-p", "moesnap.pytest_plugin"]
    pytester.makepyfile(test_k="""
import os
import numpy as np

def test_k(moesnap_snapshot):
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6) * np.float32(os.environ.get("K_SCALE", "1"))
    moesnap_snapshot.check({"out": x, "ids": np.arange(4, dtype=np.int32)})
""")
    store = pytester.path / "goldens" / "snapshots"
    pytester.runpytest(*plugin, "-p", "no:cacheprovider", "--moesnap-regen").assert_outcomes(failed=1)
    monkeypatch.setenv("K_SCALE", "1.05")
    pytester.runpytest(*plugin, "-p", "no:cacheprovider", "--moesnap-regen").assert_outcomes(failed=1)
    capsys.readouterr()
    assert main(["-q", "goldens", "diff", "test_k.test_k@v0001", "test_k.test_k", "--store", str(store)]) == 1
    out = capsys.readouterr().out
    assert "check check0: 1 of 2 arrays changed, 1 beyond tolerance" in out
    assert "    out float32 [4, 6]: max_abs 0.05, max_rel 0.05, beyond tolerance" in out
