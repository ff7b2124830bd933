"""A conformance suite every :class:`~moesnap.store.GoldenStore` implementation passes (like zarr's
``testing/store.py``): subclass :class:`StoreConformance` as ``TestMyStore``, provide the ``store``
fixture and the few things a test cannot do through the interface (corrupt or delete an array, kill
a writer), and pytest runs every test against your store.
"""

from __future__ import annotations

import numpy as np
import pytest

from ..case import Case
from ..errors import GoldenError, UsageError
from ..store import GoldenStore, VersionWriter
from ..store.case import checksum


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


def named_arrays() -> dict[str, np.ndarray]:
    """Arrays of any names, dtypes and shapes (a scalar, an empty one, a NaN), nested names included."""
    rng = np.random.default_rng(7)
    nan = rng.standard_normal((2, 3)).astype(np.float64)
    nan[1, 2] = np.nan
    return {"hidden": rng.standard_normal((4, 8), dtype=np.float32), "layer0.attn-out": nan,
            "block/ids": np.arange(5, dtype=np.int64), "block/mask": np.array([True, False, True]),
            "scalar": np.array(2.5, dtype=np.float16), "empty": np.zeros((0, 3), dtype=np.float32)}


META = {"model": {"file": "m.gguf", "sha256": "ab" * 32, "size": 1}, "dtype": "float32", "note": "ünïcode"}


class StoreConformance:
    """Every GoldenStore implementation passes these."""

    @pytest.fixture
    def store(self) -> GoldenStore:
        raise TypeError(f"{type(self).__name__}: a conformance subclass defines the `store` fixture")

    # what a test cannot do through the interface
    def flip_bit(self, store: GoldenStore, suite: str, version: str, case: str, path: str) -> None:
        raise TypeError(f"{type(self).__name__}: a conformance subclass defines flip_bit for its store")

    def remove_array(self, store: GoldenStore, suite: str, version: str, case: str, path: str) -> None:
        raise TypeError(f"{type(self).__name__}: a conformance subclass defines remove_array for its store")

    def crash(self, store: GoldenStore, writer: VersionWriter) -> None:
        """The writer's process dies mid-write (its leftovers stay).  The test drops its last
        reference to ``writer`` right after: for a store that lives in the process (memory),
        that alone is the crash."""
        raise TypeError(f"{type(self).__name__}: a conformance subclass defines crash for its store")

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
        del w
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

    # -- named arrays (the generic layout: moesnap.store.arrays)
    def test_named_arrays_read_back_exactly(self, store):
        arrays = named_arrays()
        with store.begin("s") as w:
            w.add_case("case0", small_case(0))
            w.add_arrays("check0", arrays, {"dtype": "float32"})
            v = w.commit(META)
        arrays["hidden"][...] = 0       # the writer took copies
        got = store.open_version("s", v.version)
        assert got.case_names() == ["case0", "check0"]
        assert got.case_info("check0")["layout"] == "arrays"
        back = got.read_arrays("check0")
        want = named_arrays()
        assert set(back) == {f"arrays/{n}" for n in want}
        for n, a in want.items():
            assert back[f"arrays/{n}"].dtype == a.dtype and back[f"arrays/{n}"].shape == a.shape
            assert np.array_equal(back[f"arrays/{n}"], a, equal_nan=a.dtype.kind == "f")
        assert set(got.meta["checksums"]) >= {f"check0/arrays/{n}" for n in want}
        assert same_arrays(got.read_case("case0"), small_case(0))      # beside a forward's case
        assert "arrays/layers/moe_out" not in got.read_arrays("case0")
        with pytest.raises(GoldenError, match="named arrays"):
            got.read_case("check0")

    def test_named_arrays_are_verified(self, store):
        for suite in ("flipped", "removed"):
            with store.begin(suite) as w:
                w.add_arrays("check0", named_arrays())
                w.commit(META)
        self.flip_bit(store, "flipped", "v0001", "check0", "arrays/hidden")
        with pytest.raises(GoldenError, match=r"check0/arrays/hidden: checksum mismatch"):
            store.open_version("flipped").read_arrays("check0")
        bad = store.open_version("flipped").read_arrays("check0", verify=False)    # reads what is there
        assert not np.array_equal(bad["arrays/hidden"], named_arrays()["hidden"])
        self.remove_array(store, "removed", "v0001", "check0", "arrays/block/ids")
        with pytest.raises(GoldenError, match=r"check0/arrays/block/ids: array is missing"):
            store.open_version("removed").read_arrays("check0")

    def test_named_array_names_are_checked(self, store):
        with store.begin("s") as w:
            for bad in ({"": np.zeros(1)}, {"../x": np.zeros(1)}, {"a//b": np.zeros(1)}, {".h": np.zeros(1)},
                        {"a": np.zeros(1), "a/b": np.zeros(1)}, {"zarr.json": np.zeros(1)}, {}):
                with pytest.raises(UsageError):
                    w.add_arrays("check0", bad)
            with pytest.raises(UsageError, match="cannot be stored"):
                w.add_arrays("check0", {"z": np.zeros(2, dtype=np.complex64)})
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
