"""The golden store: one conformance class, run against every implementation.

Like zarr's ``testing/store.py``: :class:`StoreConformance` holds the tests; a
subclass per implementation provides the ``store`` fixture and the few
things a test cannot do through the interface (corrupt or delete an array,
kill a writer).  ``tests/test_store_s3.py`` runs the same class on S3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesnap.store.case import Case, checksum
from moesnap.errors import GoldenError, UsageError
from moesnap.store import (
    CLAIM,
    MARKER,
    GoldenStore,
    LocalGoldenStore,
    MemoryGoldenStore,
    open_store,
    parse_ref,
    validate_suite,
)


def small_case(seed: int = 0, *, n_layer: int = 2, n_tok: int = 3, prompt: str | None = "hi") -> Case:
    """A case with the real layout and small random arrays (no model run)."""
    rng = np.random.default_rng(seed)
    H, E, k = 8, 4, 2
    layers = {s: rng.standard_normal((n_layer, n_tok, H), dtype=np.float32)
              for s in ("attn_norm", "attn_out", "moe_out", "layer_out")}
    layers["router_logits"] = rng.standard_normal((n_layer, n_tok, E), dtype=np.float32)
    layers["topk_ids"] = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(n_tok)])
                                   for _ in range(n_layer)]).astype(np.int32)
    layers["topk_weights"] = rng.random((n_layer, n_tok, k), dtype=np.float32)
    model = {"embed": rng.standard_normal((n_tok, H), dtype=np.float32),
             "final_norm": rng.standard_normal((n_tok, H), dtype=np.float32),
             "logits": rng.standard_normal((n_tok, 16), dtype=np.float32)}
    tokens = rng.integers(0, 16, n_tok).astype(np.int32)
    return Case(tokens=tokens, model=model, layers=layers,
                attrs={"prompt": prompt, "token_ids": tokens.tolist(), "dtype": "float32"})


def same_arrays(a: Case, b: Case) -> bool:
    x, y = a.arrays(), b.arrays()
    return x.keys() == y.keys() and all(x[p].dtype == y[p].dtype and np.array_equal(x[p], y[p]) for p in x)


META = {"model": {"file": "m.gguf", "sha256": "ab" * 32, "size": 1}, "dtype": "float32", "note": "ünïcode"}


class StoreConformance:
    """Every GoldenStore implementation passes these."""

    @pytest.fixture
    def store(self) -> GoldenStore:
        raise NotImplementedError

    # what a test cannot do through the interface
    def flip_bit(self, store: GoldenStore, suite: str, version: str, case: str, path: str) -> None:
        raise NotImplementedError

    def remove_array(self, store: GoldenStore, suite: str, version: str, case: str, path: str) -> None:
        raise NotImplementedError

    def crash(self, store: GoldenStore, writer) -> None:
        """The writer's process dies mid-write (its leftovers stay)."""
        raise NotImplementedError

    stale_after = 24 * 3600.0   # what prune needs to judge a crashed writer dead

    # -- basics
    def test_empty(self, store):
        assert store.suites() == []
        assert store.versions("nothing") == []
        with pytest.raises(GoldenError, match="unknown suite 'nothing'"):
            store.open_version("nothing")

    def test_publish_numbers_versions_and_reads_back(self, store):
        c0, c1 = small_case(0), small_case(1, prompt=None)
        v1 = store.publish("s", {"case0": c0, "case1": c1}, META)
        assert (v1.suite, v1.version, v1.ref) == ("s", "v0001", "s@v0001")
        v2 = store.publish("s", {"case0": small_case(2)}, META)
        assert v2.version == "v0002"
        assert store.suites() == ["s"]
        assert store.versions("s") == ["v0001", "v0002"]
        assert store.open_version("s").version == "v0002"          # no version: the newest
        assert store.resolve("s@v0001").version == "v0001"
        got = store.open_version("s", "v0001")
        assert got.case_names() == ["case0", "case1"]
        assert same_arrays(got.read_case("case0"), c0)
        assert same_arrays(got.read_case("case1"), c1)
        assert same_arrays(store.resolve("s").read_case("case0"), small_case(2))

    def test_provenance_attributes(self, store):
        c = small_case(0)
        v = store.publish("s", {"case0": c}, META)
        meta = store.open_version("s", v.version).meta
        assert meta["note"] == "ünïcode" and meta["model"]["sha256"] == "ab" * 32
        assert meta["schema"] == 1
        assert meta["cases"][0]["name"] == "case0"
        assert meta["cases"][0]["prompt"] == "hi"
        assert meta["cases"][0]["token_ids"] == c.tokens.tolist()
        arrays = c.arrays()
        assert set(meta["checksums"]) == {f"case0/{p}" for p in arrays}
        for p, a in arrays.items():
            assert meta["checksums"][f"case0/{p}"] == checksum(a)
            assert meta["cases"][0]["arrays"][p] == {"shape": list(a.shape), "dtype": str(a.dtype)}

    def test_read_returns_copies(self, store):
        v = store.publish("s", {"case0": small_case(0)}, META)
        a = v.read_case("case0")
        a.layers["moe_out"][...] = 0
        assert same_arrays(v.read_case("case0"), small_case(0))

    def test_unknown_version_and_case(self, store):
        store.publish("s", {"case0": small_case(0)}, META)
        with pytest.raises(GoldenError, match=r"unknown version 'v0007' \(published: v0001\)"):
            store.open_version("s", "v0007")
        with pytest.raises(GoldenError, match="no case 'nope'"):
            store.open_version("s").read_case("nope")
        with pytest.raises(UsageError):
            store.open_version("s", "7")

    # -- atomicity
    def test_uncommitted_writer_is_invisible(self, store):
        v1 = store.publish("s", {"case0": small_case(0)}, META)
        w = store.begin("s")
        w.add_case("case0", small_case(5))
        assert store.versions("s") == [v1.version]
        assert store.open_version("s").version == v1.version
        assert len(store.leftovers("s")) == 1
        assert store.prune("s", keep=5).cleaned == ()   # a live (or, remotely, a recent) writer stays
        w.abort()
        assert store.versions("s") == [v1.version]
        assert store.leftovers("s") == []

    def test_exception_inside_writer_discards(self, store):
        with pytest.raises(RuntimeError):
            with store.begin("s") as w:
                w.add_case("case0", small_case(0))
                raise RuntimeError("boom")
        assert store.versions("s") == []
        assert store.suites() == []
        assert store.leftovers("s") == []

    def test_crashed_writer_is_invisible_and_pruned(self, store):
        v1 = store.publish("s", {"case0": small_case(0)}, META)
        w = store.begin("s")
        w.add_case("case0", small_case(1))
        self.crash(store, w)
        assert store.versions("s") == [v1.version]
        assert [lo.stale(self.stale_after) for lo in store.leftovers("s")] == [True]
        res = store.prune("s", keep=1, stale_after=self.stale_after)
        assert len(res.cleaned) == 1 and res.deleted == ()
        assert store.leftovers("s") == []
        assert same_arrays(store.open_version("s").read_case("case0"), small_case(0))
        assert store.publish("s", {"case0": small_case(2)}, META).version not in ("", v1.version)

    def test_interleaved_writers_get_distinct_versions(self, store):
        w1, w2 = store.begin("s"), store.begin("s")
        w1.add_case("case0", small_case(1))
        w2.add_case("case0", small_case(2))
        v2 = w2.commit(META)
        v1 = w1.commit(META)
        assert v1.version != v2.version
        assert sorted(store.versions("s")) == sorted([v1.version, v2.version])
        assert same_arrays(store.resolve(v1.ref).read_case("case0"), small_case(1))
        assert same_arrays(store.resolve(v2.ref).read_case("case0"), small_case(2))

    def test_commit_is_final(self, store):
        w = store.begin("s")
        w.add_case("case0", small_case(0))
        w.commit(META)
        with pytest.raises(GoldenError, match="already committed"):
            w.commit(META)
        with pytest.raises(GoldenError, match="already committed"):
            w.add_case("case1", small_case(1))

    def test_writer_validates(self, store):
        with store.begin("s") as w:
            with pytest.raises(UsageError, match="at least one case"):
                w.commit(META)
            w.add_case("case0", small_case(0))
            with pytest.raises(UsageError, match="given twice"):
                w.add_case("case0", small_case(1))
            for bad in ("", "../x", "a/b", ".hidden", "x\n"):
                with pytest.raises(UsageError, match="case name"):
                    w.add_case(bad, small_case(1))
        assert store.versions("s") == []

    # -- deleting
    def test_delete_and_prune_never_touch_the_newest(self, store):
        for i in range(3):
            store.publish("s", {"case0": small_case(i)}, META)
        with pytest.raises(GoldenError, match="newest"):
            store.delete_version("s", "v0003")
        store.delete_version("s", "v0001")
        assert store.versions("s") == ["v0002", "v0003"]
        with pytest.raises(UsageError):
            store.prune("s", keep=0)
        res = store.prune("s", keep=1)
        assert (res.deleted, res.kept) == (("v0002",), ("v0003",))
        assert store.versions("s") == ["v0003"]
        assert same_arrays(store.open_version("s").read_case("case0"), small_case(2))
        # numbers are never reused
        assert store.publish("s", {"case0": small_case(9)}, META).version == "v0004"

    # -- integrity
    def test_bit_flip_is_caught_naming_the_array(self, store):
        v = store.publish("s", {"case0": small_case(0)}, META)
        self.flip_bit(store, "s", v.version, "case0", "layers/moe_out")
        with pytest.raises(GoldenError, match=r"case0/layers/moe_out: checksum mismatch"):
            store.open_version("s").read_case("case0")
        # verify=False reads what is there
        bad = store.open_version("s").read_case("case0", verify=False)
        assert not np.array_equal(bad.layers["moe_out"], small_case(0).layers["moe_out"])

    def test_missing_array_is_caught(self, store):
        v = store.publish("s", {"case0": small_case(0)}, META)
        self.remove_array(store, "s", v.version, "case0", "logits")
        with pytest.raises(GoldenError, match=r"case0/logits: array is missing"):
            store.open_version("s").read_case("case0")

    def test_bad_suite_names_are_refused(self, store):
        for bad in ("..", "../x", "a/b", "/abs", "a\x00b", "tab\there", "", ".hidden", "a..b", "x\\y"):
            with pytest.raises(UsageError):
                store.begin(bad)
            with pytest.raises(UsageError):
                store.open_version(bad)
        assert store.suites() == []


# ---------------------------------------------------------------- implementations


class TestMemoryStore(StoreConformance):
    @pytest.fixture
    def store(self):
        return MemoryGoldenStore()

    def flip_bit(self, store, suite, version, case, path):
        v = store._published[suite][version]
        a = v.cases[case][path].copy()
        a.view(np.uint8).reshape(-1)[3] ^= 0x10
        v.cases[case][path] = a

    def remove_array(self, store, suite, version, case, path):
        del store._published[suite][version].cases[case][path]

    def crash(self, store, writer):
        store.simulate_crash(writer)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class TestLocalZarrStore(StoreConformance):
    @pytest.fixture
    def store(self, tmp_path):
        (tmp_path / "root").mkdir()
        return LocalGoldenStore(tmp_path / "root")

    def _chunks(self, store, suite, version, case, path) -> list[Path]:
        d = store.root / suite / version / case / path
        return sorted(p for p in (d / "c").rglob("*") if p.is_file())

    def flip_bit(self, store, suite, version, case, path):
        chunk = self._chunks(store, suite, version, case, path)[-1]
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x01
        chunk.write_bytes(bytes(data))

    def remove_array(self, store, suite, version, case, path):
        import shutil

        shutil.rmtree(store.root / suite / version / case / path)

    def crash(self, store, writer):
        writer._close()   # what the kernel does to a killed process's flock; the staging dir stays

    def test_layout_is_plain_zarr_v3_with_one_chunk_per_layer(self, store):
        import zarr

        v = store.publish("s", {"case0": small_case(0, n_layer=3)}, META)
        d = store.root / "s" / v.version
        assert (d / MARKER).is_file() and not (d / CLAIM).exists()
        assert json.loads((d / "zarr.json").read_text())["attributes"]["schema"] == 1
        g = zarr.open_group(str(d), mode="r")
        arr = g["case0/layers/moe_out"]
        assert arr.shape == (3, 3, 8) and arr.chunks == (1, 3, 8)
        assert arr.compressors == ()                   # uncompressed
        assert len(self._chunks(store, "s", v.version, "case0", "layers/moe_out")) == 3
        assert [p.name for p in (store.root / "s").iterdir()] == [v.version]   # nothing else left behind

    def test_rename_never_lands_on_an_existing_name(self, store):
        # an empty directory squatting on the next name is skipped, not replaced
        (store.root / "s").mkdir()
        (store.root / "s" / "v0001").mkdir()
        v = store.publish("s", {"case0": small_case(0)}, META)
        assert v.version == "v0002"
        assert list((store.root / "s" / "v0001").iterdir()) == []
        assert store.versions("s") == ["v0002"]     # the unmarked squatter is not a version

    def test_unmarked_or_staging_dirs_are_ignored(self, store):
        v = store.publish("s", {"case0": small_case(0)}, META)
        import shutil

        shutil.copytree(store.root / "s" / v.version, store.root / "s" / "v0002")
        (store.root / "s" / "v0002" / MARKER).unlink()
        shutil.copytree(store.root / "s" / v.version, store.root / "s" / ".staging-deadbeef")
        assert store.versions("s") == ["v0001"]
        with pytest.raises(GoldenError, match="unknown version 'v0002'"):
            store.open_version("s", "v0002")
        # a dead staging dir (no one holds its lock) is pruned; the unmarked v0002 is left for a human
        assert store.prune("s", keep=1).cleaned == (".staging-deadbeef",)
        assert sorted(p.name for p in (store.root / "s").iterdir()) == ["v0001", "v0002"]

    def test_modified_provenance_is_caught(self, store):
        v = store.publish("s", {"case0": small_case(0)}, META)
        zj = store.root / "s" / v.version / "zarr.json"
        doc = json.loads(zj.read_text())
        doc["attributes"]["model"]["sha256"] = "cd" * 32
        zj.write_text(json.dumps(doc))
        with pytest.raises(GoldenError, match="changed after publishing"):
            store.open_version("s")

    def test_store_path_that_is_a_file(self, tmp_path):
        f = tmp_path / "file"
        f.write_text("x")
        with pytest.raises(GoldenError, match="store path is a file"):
            open_store(f)
        with pytest.raises(GoldenError, match="no such golden store"):
            LocalGoldenStore(tmp_path / "missing").suites()
        assert f.read_text() == "x"

    def test_writes_stay_under_the_root(self, store, tmp_path):
        before = {p for p in tmp_path.rglob("*") if not str(p).startswith(str(store.root))}
        store.publish("s", {"case0": small_case(0)}, META)
        store.prune("s", keep=1)
        after = {p for p in tmp_path.rglob("*") if not str(p).startswith(str(store.root))}
        assert before == after


# ---------------------------------------------------------------- names and helpers


@given(st.text(max_size=30))
def test_accepted_suite_names_are_single_safe_path_components(name):
    try:
        validate_suite(name)
    except UsageError:
        return
    assert name not in (".", "..") and ".." not in name and not name.startswith(".")
    assert "/" not in name and "\\" not in name and not os.path.isabs(name)
    assert all(32 <= ord(ch) < 127 for ch in name)
    assert Path(name).name == name


def test_parse_ref():
    assert parse_ref("tiny") == ("tiny", None)
    assert parse_ref("tiny@v0003") == ("tiny", "v0003")
    assert parse_ref("tiny@v12345") == ("tiny", "v12345")
    for bad in ("tiny@", "tiny@3", "tiny@v1", "@v0001", "../x@v0001", "a/b", "tiny@v0001@v0002"):
        with pytest.raises(UsageError):
            parse_ref(bad)


def test_s3fs_is_imported_only_for_s3_roots(tmp_path):
    code = (
        "import sys\n"
        "from moesnap.store import open_store\n"
        "from moesnap.run import goldens\n"
        "from moesnap.cli import goldens as cli_goldens\n"
        f"open_store({str(tmp_path)!r}).versions('x')\n"
        "from moesnap.cli.main import main\n"
        f"assert main(['goldens', 'list', '--store', {str(tmp_path)!r}]) == 0\n"
        "assert 's3fs' not in sys.modules and 'botocore' not in sys.modules, 'eager import'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_local_chunks_are_byte_identical_to_zarrs_own(tmp_path):
    """The local store writes and reads chunk files itself; they must be exactly what zarr writes."""
    import zarr

    case = small_case(7, n_layer=3, n_tok=4)
    case.layers["moe_out"][1] = 0.0                    # an all-zero chunk is written too
    v = LocalGoldenStore(tmp_path / "store").publish("s", {"case0": case}, META)
    ours = tmp_path / "store" / "s" / v.version / "case0"
    theirs = tmp_path / "zarr"
    g = zarr.open_group(str(theirs), mode="w-", zarr_format=3)
    with zarr.config.set({"array.write_empty_chunks": True}):
        for path, a in case.arrays().items():
            chunks = (1, *a.shape[1:]) if path.startswith("layers/") else a.shape
            g.create_array(path, data=a, chunks=chunks, compressors=None)
    a_files = {str(p.relative_to(ours)): p.read_bytes() for p in ours.rglob("*") if p.is_file()}
    b_files = {str(p.relative_to(theirs)): p.read_bytes() for p in theirs.rglob("*") if p.is_file()}
    a_files.pop("zarr.json"), b_files.pop("zarr.json")     # the case group's attributes differ
    assert a_files.keys() == b_files.keys() and len(a_files) > 30
    assert all(a_files[k] == b_files[k] for k in a_files), [k for k in a_files if a_files[k] != b_files[k]]


def test_truncated_chunk_is_caught(tmp_path):
    st = LocalGoldenStore(tmp_path)
    v = st.publish("s", {"case0": small_case(0)}, META)
    chunk = tmp_path / "s" / v.version / "case0" / "layers" / "attn_out" / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-4])
    with pytest.raises(GoldenError, match=r"case0/layers/attn_out: chunk c/1/0/0 has the wrong size"):
        st.open_version("s").read_case("case0")
    chunk.unlink()                                       # a missing chunk reads as zeros: the checksum catches it
    with pytest.raises(GoldenError, match=r"case0/layers/attn_out: checksum mismatch"):
        st.open_version("s").read_case("case0")


@pytest.fixture(scope="module")
def fuzz_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz") / "store"
    LocalGoldenStore(root).publish("s", {"case0": small_case(0)}, META)
    meta_files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name in ("zarr.json", MARKER))
    return root, meta_files


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_metadata_bytes_only_ever_give_golden_errors(fuzz_source, tmp_path_factory, data):
    """Any mutation of a published version's zarr.json / published.json files: reading it either
    raises a GoldenError or returns exactly the arrays that were written."""
    import shutil

    src, files = fuzz_source
    root = tmp_path_factory.mktemp("fuzzcase") / "store"
    shutil.copytree(src, root)
    target = root / data.draw(st.sampled_from(files), label="file")
    raw = bytearray(target.read_bytes())
    for _ in range(data.draw(st.integers(1, 4), label="n")):
        i = data.draw(st.integers(0, len(raw) - 1), label="at")
        raw[i] = data.draw(st.integers(0, 255), label="byte")
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw)), label="len")]
    target.write_bytes(bytes(raw))
    try:
        case = LocalGoldenStore(root).open_version("s").read_case("case0")
    except GoldenError:
        return
    assert same_arrays(case, small_case(0))
