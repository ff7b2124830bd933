"""The golden store: the shipped conformance class (:mod:`moesnap.testing.store`) run against every
implementation, plus what is particular to each.  ``tests/store/test_store_s3.py`` runs the same class on S3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesnap.errors import GoldenError, UsageError
from moesnap.testing.store import META, StoreConformance, same_arrays, small_case  # noqa: F401
from moesnap.store import (
    CLAIM,
    MARKER,
    LocalGoldenStore,
    MemoryGoldenStore,
    open_store,
    parse_ref,
    validate_suite,
)


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
        pass   # the test drops the writer right after: the store holds it weakly, so it is dead


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


def test_delays_are_constructor_arguments_checked_at_the_edge(tmp_path):
    """The pauses the crash tests use (tests/run/slow_cli.py) are 0 unless given, never negative."""
    assert (LocalGoldenStore(tmp_path).write_delay, LocalGoldenStore(tmp_path).read_delay) == (0.0, 0.0)
    for bad in ({"write_delay": -1.0}, {"read_delay": float("nan")}):
        with pytest.raises(UsageError, match=f"{next(iter(bad))}=.* must be ≥ 0"):
            LocalGoldenStore(tmp_path, **bad)
    v = LocalGoldenStore(tmp_path, read_delay=0.3).publish("s", {"case0": small_case(0)}, META)
    t0 = time.monotonic()
    assert same_arrays(v.read_case("case0"), small_case(0))
    assert time.monotonic() - t0 >= 0.3


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


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int32", "int64", "uint8", "int8", "bool"])
def test_direct_metadata_and_reads_match_zarr_for_every_dtype(tmp_path, dtype, monkeypatch):
    """The local store writes each array's zarr.json itself and reads a case group's metadata
    without zarr's store: both must be what zarr writes and reads, for every dtype a snapshot holds."""
    import zarr

    from moesnap.store import zarr as zs
    from moesnap.store.arrays import NamedArrays

    rng = np.random.default_rng(3)
    values = {"a": (rng.standard_normal((3, 5, 2)) * 50).astype(dtype), "layers/b": (rng.standard_normal((4, 6)) * 9).astype(dtype),
              "c/d": (rng.standard_normal((7,)) * 3).astype(dtype)}
    with LocalGoldenStore(tmp_path / "store").begin("s") as w:
        w.add_arrays("case0", values)
        w.commit(META)
    ours = tmp_path / "store" / "s" / "v0001" / "case0"
    theirs = zarr.open_group(str(tmp_path / "zarr"), mode="w-", zarr_format=3)
    for path in NamedArrays.of(values).arrays():
        mine = json.loads((ours / path / "zarr.json").read_bytes())
        a = NamedArrays.of(values).arrays()[path]
        chunks = tuple(mine["chunk_grid"]["configuration"]["chunk_shape"])
        theirs.create_array(path, shape=a.shape, dtype=a.dtype, chunks=chunks, compressors=None)
        assert (ours / path / "zarr.json").read_bytes() == (tmp_path / "zarr" / path / "zarr.json").read_bytes()
    fast = LocalGoldenStore(tmp_path / "store").open_version("s").read_arrays("case0")
    assert zs._LocalGroup.open(ours) is not None        # the direct reader took it
    monkeypatch.setattr(zs._LocalGroup, "open", classmethod(lambda cls, d: None))   # now zarr reads it
    slow = LocalGoldenStore(tmp_path / "store").open_version("s").read_arrays("case0")
    assert fast.keys() == slow.keys() and len(fast) == 3
    for k in fast:
        assert fast[k].dtype == slow[k].dtype and np.array_equal(fast[k], slow[k])


def test_chunks_in_pieces_checksummed_as_they_pass(tmp_path, monkeypatch):
    """Chunk files are written and read in ``PIECE``-byte pieces, each checksummed as it passes:
    the checksums recorded equal ``checksum`` of each array, the bytes read back are the same, a
    flipped byte is a checksum mismatch and a truncated file is still caught."""
    from moesnap.store import zarr as zs

    monkeypatch.setattr(zs, "PIECE", 1024)
    case = small_case(5, n_layer=2, n_tok=64)
    st = LocalGoldenStore(tmp_path)
    v = st.publish("s", {"case0": case}, META)
    got = st.open_version("s").read_case("case0")
    assert same_arrays(got, case)
    from moesnap.store.case import checksum

    sums = json.loads((tmp_path / "s" / v.version / "case0" / "zarr.json").read_text())["attributes"]["checksums"]
    assert sums == {path: checksum(a) for path, a in case.arrays().items()}
    logits = tmp_path / "s" / v.version / "case0" / "logits" / "c" / "0" / "0"
    assert logits.stat().st_size > 2 * 1024   # 64 tokens x 16 x float32
    raw = bytearray(logits.read_bytes())
    raw[1500] ^= 0x10                      # in the second piece
    logits.write_bytes(bytes(raw))
    with pytest.raises(GoldenError, match=r"case0/logits: checksum mismatch"):
        st.open_version("s").read_case("case0")
    logits.write_bytes(logits.read_bytes()[:-8])
    with pytest.raises(GoldenError, match=r"case0/logits: chunk c/0/0 has the wrong size"):
        st.open_version("s").read_case("case0")


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


# ---------------------------------------------------------------- only what is expected is caught (issue 19)


class _Bug(Exception):
    """An error no storage fault makes: a bug, which must surface as it is."""


class _Failed(Exception):
    """What the code inside a writer's block raised."""


def _fail() -> None:
    raise _Failed("the block's own error")


def test_a_bug_while_reading_a_case_directly_surfaces(tmp_path, monkeypatch):
    """Reading a local case's zarr.json files directly falls back to zarr on what a damaged file
    raises; anything else is not swallowed."""
    import moesnap.store.zarr as zarr_store

    LocalGoldenStore(tmp_path).publish("s", {"case0": small_case(0)}, META)
    zarr_store._array_metadata.cache_clear()
    monkeypatch.setattr(zarr_store, "_array_metadata", lambda raw: (_ for _ in ()).throw(_Bug("in our code")))
    with pytest.raises(_Bug, match="in our code"):
        LocalGoldenStore(tmp_path).open_version("s").read_case("case0")


def test_leaving_a_writer_removes_what_it_wrote_and_says_what_it_could_not(tmp_path, monkeypatch):
    from moesnap.store.local import _LocalWriter

    st = LocalGoldenStore(tmp_path)
    with pytest.raises(_Failed):                       # the block's own error, and nothing left behind
        with st.begin("s") as w:
            w.add_case("case0", small_case(0))
            _fail()
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == []

    def stuck(self):
        raise GoldenError(f"{self.dir}: cannot remove the unpublished version (PermissionError)")

    monkeypatch.setattr(_LocalWriter, "_discard", stuck)
    with pytest.raises(_Failed):                       # a storage fault while unwinding: the block's error wins
        with st.begin("s"):
            _fail()
    with pytest.raises(GoldenError, match="cannot remove the unpublished version"):
        with st.begin("s"):                            # no error of its own: the fault is the error
            pass
    monkeypatch.setattr(_LocalWriter, "_discard", lambda self: (_ for _ in ()).throw(_Bug("in discard")))
    with pytest.raises(_Bug, match="in discard"):      # a bug surfaces, whatever the block raised
        with st.begin("s"):
            _fail()


def test_a_keyboard_interrupt_while_writing_leaves_nothing(tmp_path):
    st = LocalGoldenStore(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with st.begin("s") as w:
            w.add_case("case0", small_case(0))
            raise KeyboardInterrupt
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == []
    assert st.versions("s") == []
