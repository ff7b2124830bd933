"""Golden generation made faster without changing one bit of the goldens (issue 22, point 3).

The three changes each have a twin that does the same work the old way, and the goldens of both are
compared file by file, byte for byte: the local store writing each layer's chunks while the next
layer runs (:class:`moesnap.store.stream.RawCaseStream`) against the whole case stacked and then
written (``add_case``); a dense matrix dequantized in row blocks on threads against one call; the
model's sha256 taken on a thread beside the forward against before it.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from moesnap.case import Case, stack_layers
from moesnap.errors import GoldenError, UsageError
from moesnap.model import weights
from moesnap.model.load import open_model
from moesnap.run.goldens import generate
from moesnap.run.trace import run_case
from moesnap.stages import LAYER_STAGES
from moesnap.store import LocalGoldenStore, MemoryGoldenStore
from moesnap import util

TOKENS = [1, 5, 9, 200, 17, 3, 3, 64, 100, 7, 2, 250]
#: attributes that say when and how fast a golden was made, not what it holds
CLOCKS = ("layer_timing", "created")


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path; JSON files without the clock attributes."""
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = str(p.relative_to(root))
        data = p.read_bytes()
        if p.name == "zarr.json":
            doc = json.loads(data)
            for key in CLOCKS:
                doc.get("attributes", {}).pop(key, None)
            data = json.dumps(doc).encode()     # key order kept: a reordered dict differs
        elif p.name == "published.json":
            continue        # its time and the sha256 of a zarr.json holding the clocks
        out[rel] = data
    return out


def _old_way(model_path: Path, store: Path, monkeypatch) -> Path:
    """The goldens as generation made them before: dense weights dequantized in one call, the
    model hashed first, the whole case stacked and then written."""
    with monkeypatch.context() as m:
        m.setattr(weights, "DENSE_THREADS", 1)
        model = open_model(model_path)
        util.file_sha256(model.path)
        case = run_case(model, TOKENS, dtype=torch.float32)
        st = LocalGoldenStore(store)
        with st.begin("s") as w:
            w.add_case("case0", case)
            v = w.commit({"model": None})
    return store / "s" / v.version / "case0"


@pytest.fixture(scope="module")
def deepseek_path(tmp_path_factory):
    from moesnap.model.synth import make_model, preset

    return make_model(tmp_path_factory.mktemp("ds") / "v3.gguf", preset("deepseek-v3-tiny"), progress=False)


@pytest.mark.parametrize("which", ["tiny", "deepseek-v3-tiny"])
def test_generated_goldens_are_byte_identical_to_the_old_way(which, tiny_path, deepseek_path, tmp_path, monkeypatch):
    """Every chunk file, every array's zarr.json and the case's attributes and checksums the same
    (DeepSeek: stages some layers lack, their rows filled); dense matrices split into blocks of 8 rows."""
    path = Path(str(tiny_path)) if which == "tiny" else deepseek_path
    monkeypatch.setenv("MOESNAP_CACHE", str(tmp_path / "cache"))
    old = _old_way(path, tmp_path / "old", monkeypatch)
    monkeypatch.setattr(weights, "DENSE_MIN_ROWS", 8)
    monkeypatch.setattr(weights, "DENSE_THREADS", 3)
    monkeypatch.setattr(util, "_SHA256_SEEN", {})
    v = generate(path, "s", store=LocalGoldenStore(tmp_path / "new"), inputs=[("tokens", TOKENS)])
    new = tmp_path / "new" / "s" / v.version / "case0"
    a, b = _tree(old), _tree(new)
    assert sorted(a) == sorted(b)
    assert [p for p in a if a[p] != b[p]] == []
    assert any(p.startswith("layers/") and "/c/" in p for p in a)
    recorded = {k.split("/", 1)[1]: s for k, s in v.meta["checksums"].items()}
    assert recorded == json.loads((old / "zarr.json").read_bytes())["attributes"]["checksums"]
    assert v.meta["model"]["sha256"] == util.file_sha256(path)
    assert v.read_case("case0").layers.keys()


def _layers(rng: np.random.Generator) -> dict[int, dict[str, np.ndarray]]:
    """Per-layer values with gaps: a stage from layer 2 on, one in layers 0 and 3 only, one in layer
    0 only, int32, float32 and float64 ones, a row of one value."""
    T = 3
    out: dict[int, dict[str, np.ndarray]] = {}
    for layer in range(5):
        v: dict[str, np.ndarray] = {"attn_norm": rng.standard_normal((T, 4), dtype=np.float32),
                                    "topk_weights": rng.standard_normal((T, 1)),
                                    "q": rng.standard_normal((T, 2, 2), dtype=np.float32)}
        if layer >= 2:
            v["topk_ids"] = rng.integers(0, 9, (T, 2), dtype=np.int32)
        if layer in (0, 3):
            v["router_logits"] = np.full((T, 6), np.float32(np.nan)) if layer == 3 else rng.standard_normal((T, 6), dtype=np.float32)
        if layer == 0:
            v["dense_ffn_out"] = rng.standard_normal((T, 4), dtype=np.float32)
        out[layer] = v
    return out


def _case(rng: np.random.Generator) -> Case:
    return Case(tokens=np.arange(3, dtype=np.int32), model={"embed": rng.standard_normal((3, 4), dtype=np.float32),
                                                             "logits": rng.standard_normal((3, 7), dtype=np.float32)},
                attrs={"prompt": "x", "n": 1})


@pytest.mark.parametrize("store_kind", ["local", "memory"])
def test_a_case_given_layer_by_layer_is_stored_as_the_stacked_case(store_kind, tmp_path):
    rng = np.random.default_rng(0)
    layers, case = _layers(rng), _case(rng)
    per: dict[str, dict[int, np.ndarray]] = {}
    for layer, values in layers.items():
        for stage, value in values.items():
            per.setdefault(stage, {})[layer] = value
    whole = Case(tokens=case.tokens, model=case.model, layers=stack_layers(per, LAYER_STAGES), attrs=case.attrs)

    def store(name):
        return LocalGoldenStore(tmp_path / name) if store_kind == "local" else MemoryGoldenStore()

    a, b = store("a"), store("b")
    with a.begin("s") as w:
        w.add_case("c", whole)
        va = w.commit({})
    with b.begin("s") as w:
        stream = w.begin_case("c")
        for layer, values in layers.items():
            stream.put_layer(layer, values)
        stream.finish(case)
        vb = w.commit({})
    assert va.meta["cases"] == vb.meta["cases"] and va.meta["checksums"] == vb.meta["checksums"]
    if store_kind == "local":
        ta, tb = _tree(tmp_path / "a" / "s" / "v0001"), _tree(tmp_path / "b" / "s" / "v0001")
        assert ta == tb
    got = vb.read_case("c")
    assert got.layers.keys() == whole.layers.keys()
    for stage, arr in whole.layers.items():
        assert got.layers[stage].tobytes() == arr.tobytes(), stage
    assert got.layers["topk_ids"][:2].tolist() == [[[-1, -1]] * 3] * 2 and got.layers["dense_ffn_out"].shape[0] == 1


def test_a_stream_refuses_what_the_stacked_case_could_not_hold(tmp_path):
    st = LocalGoldenStore(tmp_path)
    rng = np.random.default_rng(1)
    with st.begin("s") as w:
        stream = w.begin_case("c")
        with pytest.raises(UsageError, match="given twice"):
            w.begin_case("c")
        stream.put_layer(1, {"attn_norm": np.zeros((2, 3), np.float32)})
        with pytest.raises(ValueError, match="layer 1 after layer 1"):
            stream.put_layer(1, {"attn_norm": np.zeros((2, 3), np.float32)})
        with pytest.raises(ValueError, match="'logits' is not a per-layer stage"):
            stream.put_layer(2, {"logits": np.zeros((2, 3), np.float32)})
        with pytest.raises(ValueError, match=r"stage 'attn_norm' of layer 3 is float32 \[2, 4\], an earlier layer's float32 \[2, 3\]"):
            stream.put_layer(3, {"attn_norm": np.zeros((2, 4), np.float32)})
        with pytest.raises(UsageError, match="'c' was begun and never finished"):
            w.commit({})
        with pytest.raises(ValueError, match="come through put_layer"):
            stream.finish(Case(tokens=np.arange(2, dtype=np.int32), layers={"q": np.zeros((1, 2))}))
        stream.finish(_case(rng))
        for again in (lambda: stream.finish(_case(rng)), lambda: stream.put_layer(5, {})):
            with pytest.raises(GoldenError, match="s: case 'c' is finished or aborted already"):
                again()
        w.commit({})
    got = LocalGoldenStore(tmp_path).open_version("s").read_case("c").layers["attn_norm"]
    assert got.shape == (2, 2, 3) and np.isnan(got[0]).all() and (got[1] == 0).all()


def test_an_aborted_stream_leaves_nothing_and_a_failed_write_is_one_line(tmp_path, monkeypatch):
    st = LocalGoldenStore(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with st.begin("s") as w:
            stream = w.begin_case("c")
            stream.put_layer(0, {"attn_norm": np.ones((2, 3), np.float32)})
            raise KeyboardInterrupt
    assert list((tmp_path / "s").iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("moesnap-write-layers")]

    from moesnap.store import stream as stream_mod

    def broken(self, *args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stream_mod.RawCaseStream, "_write_row", broken)
    with pytest.raises(GoldenError, match=r"/c: storage error \(.*No space left on device") as e:
        with st.begin("s") as w:
            stream = w.begin_case("c")
            stream.put_layer(0, {"attn_norm": np.ones((2, 3), np.float32)})
            stream.finish(_case(np.random.default_rng(2)))
    assert "\n" not in str(e.value)
    assert list((tmp_path / "s").iterdir()) == []


@pytest.mark.parametrize("qtype", sorted(weights._TRAITS, key=lambda q: q.name), ids=lambda q: q.name)
def test_a_dense_matrix_dequantized_in_row_blocks_on_threads_is_the_same_bits(qtype, monkeypatch):
    """Every type gguf-py dequantizes by rows, on random bytes (NaN and Inf included: bits compared;
    the IQ types' grids built first, as quants.dequantize does)."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    rows = 37
    data = np.random.default_rng(int(qtype)).integers(0, 256, (rows, 2 * size), dtype=np.uint8)
    whole = weights._dequantize(None, "t", qtype, data)     # type: ignore[arg-type]
    monkeypatch.setattr(weights, "DENSE_MIN_ROWS", 4)
    monkeypatch.setattr(weights, "DENSE_THREADS", 3)
    split = weights._dequantize_rows_parallel(None, "t", qtype, data)   # type: ignore[arg-type]
    assert split.shape == whole.shape == (rows, 2 * block)
    assert split.tobytes() == whole.tobytes()


def test_hash_ahead_gives_file_sha256_its_digest_once(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("MOESNAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(util, "_SHA256_SEEN", {})
    files = [tmp_path / "a.bin", tmp_path / "b.bin"]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * (3 << 20))
    hashed: list[Path] = []
    real = util._sha256_compute

    def counted(p, key, on_bytes):
        hashed.append(p)
        return real(p, key, on_bytes)

    monkeypatch.setattr(util, "_sha256_compute", counted)
    util.hash_ahead([*files, tmp_path / "missing.bin"])
    assert [util.file_sha256(f) for f in files] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    util.hash_ahead(files)                   # known now: nothing started
    assert util.file_sha256(files[0]) and sorted(hashed) == sorted(files)
    cache = json.loads((tmp_path / "cache" / "moesnap" / "sha256.json").read_text())
    assert len(cache) == 2                   # both kept, though hashed one after the other on one thread
    with pytest.raises(FileNotFoundError):
        util.file_sha256(tmp_path / "missing.bin")


def test_a_file_that_fails_to_hash_ahead_fails_where_its_digest_is_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESNAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(util, "_SHA256_SEEN", {})
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x" * 10)

    def broken(p, key, on_bytes):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(util, "_sha256_compute", broken)
    util.hash_ahead([f])
    with pytest.raises(PermissionError):
        util.file_sha256(f)
    monkeypatch.undo()
    monkeypatch.setenv("MOESNAP_CACHE", str(tmp_path / "cache"))
    assert len(util.file_sha256(f)) == 64      # tried afresh once the failure was reported
