"""`moesnap import --format aprt`: aprender traces written from a committed golden case, imported and judged.

Round trips pass with coverage counting only the dumped stages; a 5 % scale error planted in one layer's
``moe_out`` is named at that layer and stage; a trace of the last token alone is judged on it alone and
the report says so; every malformed trace is refused (exit 2, one line naming the file, ``--out``
untouched).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import moesnap.capture
from flat_dumps import CASE0, REPO_GOLDENS, aprt_bytes, assert_refused, invoke, tree_digest, write_aprt
from moesnap.store.case import load_case


@pytest.fixture(scope="module")
def golden():
    return load_case(CASE0)


def _import(dump: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return invoke(["import", "--format", "aprt", str(dump), "--like", str(CASE0), "--out", str(out), *extra])


def _compare(out: Path, report: Path) -> tuple[int, str, dict]:
    code, text, err = invoke(["compare", str(CASE0), str(out), "--allow-missing", "--json", str(report)])
    assert code in (0, 1), err
    return code, text, json.loads(report.read_text())


def test_round_trip_passes_judging_only_the_dumped_stages(tmp_path, golden):
    dump = write_aprt(tmp_path / "trace", golden)
    code, out, err = _import(dump, tmp_path / "cand.zarr")
    assert code == 0, err
    assert "moe_out: layers 0-3" in out and "logits: 19 tokens" in out and "wrote" in out
    code, text, rep = _compare(tmp_path / "cand.zarr", tmp_path / "r.json")
    assert code == 0 and rep["verdict"] == "pass", text
    T, L = golden.tokens.size, golden.n_layer
    cov = rep["coverage"]
    assert cov["cells_held"] == cov["cells_judged"] == 3 * L * T + T     # topk_weights, moe_out, layer_out, logits
    assert cov["partial"] == [] and cov["stages_skipped"] > 0
    judged = {(r["layer"], r["stage"]) for r in rep["results"]}
    assert judged == {(lay, s) for lay in range(L) for s in ("topk_weights", "moe_out", "layer_out")} | {(None, "logits")}


def test_a_five_percent_scale_error_in_one_layer_is_named(tmp_path, golden):
    dump = write_aprt(tmp_path / "trace", golden,
                      edit=lambda stage, layer, rows: rows * np.float32(1.05) if (stage, layer) == ("moe_out", 2) else rows)
    assert _import(dump, tmp_path / "cand.zarr")[0] == 0
    code, text, rep = _compare(tmp_path / "cand.zarr", tmp_path / "r.json")
    assert code == 1 and rep["verdict"] == "fail"
    assert rep["first_divergence"]["layer"] == 2 and rep["first_divergence"]["stage"] == "moe_out", text
    assert f"first divergence: {rep['first_divergence']['case']} / layer 2 / moe_out" in text
    failed = {(r["layer"], r["stage"]) for r in rep["results"] if r["verdict"] != "MATCH"}
    assert failed == {(2, "moe_out")}


def test_last_token_only_is_judged_on_the_last_token_alone_and_says_so(tmp_path, golden):
    dump = write_aprt(tmp_path / "trace", golden, last=True)
    code, out, err = _import(dump, tmp_path / "cand.zarr")
    assert code == 0, err
    assert "moe_out: layers 0-3 (last token only)" in out and "logits: last token only" in out
    stored = load_case(tmp_path / "cand.zarr")
    T = golden.tokens.size
    assert np.isnan(stored.layers["moe_out"][:, : T - 1]).all()           # nothing stands in for what was not dumped
    assert np.array_equal(stored.layers["moe_out"][:, T - 1], golden.layers["moe_out"][:, T - 1])
    code, text, rep = _compare(tmp_path / "cand.zarr", tmp_path / "r.json")
    assert code == 0 and rep["verdict"] == "pass", text
    cov = rep["coverage"]
    assert cov["cells_held"] == cov["cells_judged"] == 3 * golden.n_layer + 1     # one token per (layer, stage)
    assert {(p["stage"], p["last_token_only"]) for p in cov["partial"]} == \
        {("topk_weights", True), ("moe_out", True), ("layer_out", True), ("logits", True)}
    assert all(p["tokens_held"] == [T - 1] for p in cov["partial"])
    assert "case0/moe_out at layers 0, 1, 2, 3: last token only" in text            # the coverage line
    assert any("moe_out at layers [0, 1, 2, 3]: last token only" in n for n in rep["notes"])
    moe = next(r for r in rep["results"] if r["stage"] == "moe_out")
    assert moe["metrics"]["n"] == golden.layers["moe_out"].shape[-1] and "not in the dump" in moe["detail"]


def test_last_token_only_still_fails_on_an_error_in_that_token(tmp_path, golden):
    dump = write_aprt(tmp_path / "trace", golden, last=True,
                      edit=lambda stage, layer, rows: rows * np.float32(1.05) if (stage, layer) == ("moe_out", 1) else rows)
    assert _import(dump, tmp_path / "cand.zarr")[0] == 0
    code, text, rep = _compare(tmp_path / "cand.zarr", tmp_path / "r.json")
    assert code == 1
    fd = rep["first_divergence"]
    assert (fd["layer"], fd["stage"], fd["token"]) == (1, "moe_out", golden.tokens.size - 1), text


def test_a_layer_left_out_is_not_judged_nor_held(tmp_path, golden):
    dump = write_aprt(tmp_path / "trace", golden)
    for f in (dump / "layer-1").iterdir():
        f.unlink()
    (dump / "layer-1").rmdir()
    assert _import(dump, tmp_path / "cand.zarr")[0] == 0
    code, text, rep = _compare(tmp_path / "cand.zarr", tmp_path / "r.json")
    assert code == 0, text
    T, L = golden.tokens.size, golden.n_layer
    assert rep["coverage"]["cells_held"] == rep["coverage"]["cells_judged"] == 3 * (L - 1) * T + T
    assert not any(r["layer"] == 1 for r in rep["results"])
    code, text, _ = invoke(["compare", str(CASE0), str(tmp_path / "cand.zarr"), "--no-local"])
    assert code == 1 and "MISSING" in text                    # without --allow-missing the gap is a failure


def test_library_call_and_store_golden(tmp_path, golden):
    dump = write_aprt(tmp_path / "trace", golden, last=True)
    case = moesnap.capture.import_aprt(dump, golden)
    assert case.attrs["producer"] == "aprender" and ["logits", None, [golden.tokens.size - 1]] in case.attrs["held_tokens"]
    assert set(case.layers) == {"topk_weights", "moe_out", "layer_out"} and set(case.model) == {"logits"}
    store = ["--store", str(REPO_GOLDENS)]
    assert_refused(["import", "--format", "aprt", str(dump), "--like", "tiny", *store, "--out", str(tmp_path / "o.zarr")],
                   "tiny holds 3 cases", "--case")
    code, _, err = invoke(["import", "--format", "aprt", str(dump), "--like", "tiny@v0001", *store, "--case", "case0",
                           "--out", str(tmp_path / "o.zarr")])
    assert code == 0, err
    assert invoke(["compare", "tiny", str(tmp_path / "o.zarr"), *store, "--allow-missing"])[0] == 0


def test_the_held_rows_are_what_keeps_the_missing_ones_unjudged(tmp_path, golden):
    """Without its held_tokens attribute the case's NaN rows fail (nothing stands in for them); a malformed
    attribute is refused."""
    import zarr

    assert _import(write_aprt(tmp_path / "trace", golden, last=True), tmp_path / "cand.zarr")[0] == 0
    group = zarr.open_group(str(tmp_path / "cand.zarr"), mode="r+")
    attrs = group.attrs.asdict()
    group.attrs.put({k: v for k, v in attrs.items() if k != "held_tokens"})
    code, text, rep = _compare(tmp_path / "cand.zarr", tmp_path / "r.json")
    assert code == 1 and rep["first_divergence"]["verdict"] == "NAN_CANDIDATE", text
    for bad in ("all", [["moe_out", 0, [99]]], [["moe_out", None, [1]]], [["logits", 0, [1]]], [["nope", 0, []]]):
        group.attrs.put({**attrs, "held_tokens": bad})
        assert_refused(["compare", str(CASE0), str(tmp_path / "cand.zarr"), "--allow-missing"], "'held_tokens'")


# ---------------------------------------------------------------- malformed traces: exit 2, naming the file


def _bad(name: str, make):
    return pytest.param(make, id=name)


def _replace(rel: str, data: bytes):
    def make(d: Path, g) -> Path:
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
        return d / rel
    return make


def _edit(rel: str, change):
    def make(d: Path, g) -> Path:
        p = d / rel
        p.write_bytes(change(p.read_bytes()))
        return p
    return make


MOE1 = "layer-1/moe_ffn_out.bin"
BAD = [
    _bad("bad magic", _edit(MOE1, lambda b: b"APRX" + b[4:])),
    _bad("short header", _replace(MOE1, b"APRT\x01\x00")),
    _bad("truncated data", _edit(MOE1, lambda b: b[:-8])),
    _bad("trailing bytes", _edit(MOE1, lambda b: b + b"\0\0\0\0")),
    _bad("count neither all tokens nor one", _edit(MOE1, lambda b: b[:8] + struct.pack("<I", 65) + b[12:12 + 4 * 65])),
    _bad("header layer disagrees", _edit(MOE1, lambda b: b[:4] + struct.pack("<I", 2) + b[8:])),
    _bad("whole-model file with a layer", _edit("lm_head.bin", lambda b: b[:4] + struct.pack("<I", 0) + b[8:])),
    _bad("unknown stage name", _replace("layer-1/moe_gate_up.bin", aprt_bytes(1, np.zeros(64)))),
    _bad("layer beyond the golden", _replace("layer-4/moe_ffn_out.bin", aprt_bytes(4, np.zeros(64)))),
    _bad("per-layer stage at the top", _replace("moe_ffn_out.bin", aprt_bytes(0xFFFFFFFF, np.zeros(64)))),
    _bad("whole-model stage in a layer", _replace("layer-0/lm_head.bin", aprt_bytes(0, np.zeros(272)))),
    _bad("topk weights that are ids", _replace("layer-0/topk_ids.bin", aprt_bytes(0, np.full(2, 0.5)))),
    _bad("two names of one stage disagree", _replace("layer-1/moe_out.bin", aprt_bytes(1, np.zeros(64)))),
]


@pytest.mark.parametrize("make", BAD)
def test_malformed_trace_is_refused_naming_the_file(tmp_path, golden, make):
    dump = write_aprt(tmp_path / "trace", golden)
    bad = make(dump, golden)
    out = tmp_path / "cand.zarr"
    assert_refused(["import", "--format", "aprt", str(dump), "--like", str(CASE0), "--out", str(out)], str(bad))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["trace"]


@pytest.mark.parametrize("make", BAD[:3])
def test_a_refused_trace_leaves_an_existing_output_untouched(tmp_path, golden, make):
    out = tmp_path / "cand.zarr"
    assert _import(write_aprt(tmp_path / "good", golden), out)[0] == 0
    before = tree_digest(out)
    dump = write_aprt(tmp_path / "trace", golden)
    make(dump, golden)
    assert_refused(["import", "--format", "aprt", str(dump), "--like", str(CASE0), "--out", str(out), "--force"])
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cand.zarr", "good", "trace"]      # no temporary left


def test_directories_and_outputs_refused(tmp_path, golden):
    dump = write_aprt(tmp_path / "trace", golden)
    (dump / "layers-9").mkdir()
    assert_refused(["import", "--format", "aprt", str(dump), "--like", str(CASE0), "--out", str(tmp_path / "o")],
                   str(dump / "layers-9"), "layer-<N>")
    (dump / "layers-9").rmdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(["import", "--format", "aprt", str(empty), "--like", str(CASE0), "--out", str(tmp_path / "o")],
                   str(empty), "no stage file")
    assert_refused(["import", "--format", "aprt", str(tmp_path / "none"), "--like", str(CASE0), "--out",
                    str(tmp_path / "o")], str(tmp_path / "none"), "no such directory")
    (tmp_path / "o").mkdir()
    assert_refused(["import", "--format", "aprt", str(dump), "--like", str(CASE0), "--out", str(tmp_path / "o")],
                   str(tmp_path / "o"), "exists (use --force")
    assert_refused(["import", "--format", "aprt", str(dump), "--like", str(CASE0), "--out",
                    str(CASE0.parent / "case9")], "inside the published golden version")
    assert_refused(["import", "--format", "aprt", str(dump), "--like", str(CASE0), "--out", str(tmp_path / "p"),
                    "--pass", "1"], "--pass")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "o", "trace"]
