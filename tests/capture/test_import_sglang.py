"""`moesnap import --format sglang`: SGLang dumper files written from a committed golden case, imported and judged.

Both file-name styles of SGLang's dumper (``step=`` with ``{"value", "meta"}`` files and module names of
the non-intrusive hooks; ``forward_pass_id=`` with bare tensors and explicit names), round trips that
pass counting only the dumped stages, a planted 5 % scale error named at its layer and stage, a hostile
pickle that is refused without running, and every ambiguity (passes, ranks, names) refused naming files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import moesnap.capture
from flat_dumps import CASE0, REPO_GOLDENS, assert_refused, invoke, sglang_name, tree_digest, write_sglang
from moesnap.store.case import load_case


@pytest.fixture(scope="module")
def golden():
    return load_case(CASE0)


def _argv(dump: Path, out: Path, *extra: str) -> list[str]:
    return ["import", "--format", "sglang", str(dump), "--like", str(CASE0), "--out", str(out), *extra]


def _compare(out: Path, report: Path, *extra: str) -> tuple[int, str, dict]:
    code, text, err = invoke(["compare", str(CASE0), str(out), "--allow-missing", "--json", str(report), *extra])
    assert code in (0, 1), err
    return code, text, json.loads(report.read_text())


def test_round_trip_of_the_hooks_module_names(tmp_path, golden):
    dump = write_sglang(tmp_path / "dump", golden)
    code, out, err = invoke(_argv(dump, tmp_path / "cand.zarr"))
    assert code == 0, err
    stored = load_case(tmp_path / "cand.zarr")
    for stage in ("q", "k", "v", "layer_out", "attn_resid", "topk_ids", "moe_out"):      # split, shifted, renamed
        assert np.array_equal(stored.layers[stage], golden.layers[stage]), stage
    assert stored.layers["topk_ids"].dtype == np.int32
    assert np.array_equal(stored.model["logits"][-1], golden.model["logits"][-1])
    assert np.isnan(stored.model["logits"][:-1]).all()                        # next_token_logits: the last token's
    code, text, rep = _compare(tmp_path / "cand.zarr", tmp_path / "r.json")
    assert code == 0 and rep["verdict"] == "pass", text
    T, L = golden.tokens.size, golden.n_layer
    dumped = ("attn_norm", "q", "k", "v", "attn", "attn_out", "attn_resid", "ffn_norm", "router_logits",
              "topk_ids", "topk_weights", "moe_out", "layer_out")
    cov = rep["coverage"]
    assert cov["cells_held"] == cov["cells_judged"] == len(dumped) * L * T + 2 * T + 1   # + embed, final_norm, logits[-1]
    assert [(p["stage"], p["last_token_only"]) for p in cov["partial"]] == [("logits", True)]
    assert "case0/logits: last token only" in text
    # what judges the stages the dump lacks (as a GPU dump of SGLang's fused q/k norm + RoPE lacks them)
    assert f"note: case0: q_norm, k_norm, q_rope, k_rope not in the candidate at layers 0-{L - 1}" in text
    assert any(n.startswith("case0: q_norm, k_norm, q_rope, k_rope not") and "judged through attn" in n
               for n in rep["notes"]), rep["notes"]


def test_round_trip_of_explicit_dump_calls_in_bfloat16(tmp_path, golden):
    dump = write_sglang(tmp_path / "dump", golden, style="old", dtype=torch.bfloat16)
    code, out, err = invoke(_argv(dump, tmp_path / "cand.zarr"))
    assert code == 0, err
    stored = load_case(tmp_path / "cand.zarr")
    assert stored.attrs["dtype"] == "bfloat16" and stored.attrs["forward_pass"] == 1
    assert "held_tokens" not in stored.attrs                                   # every stage holds every token
    code, text, rep = _compare(tmp_path / "cand.zarr", tmp_path / "r.json")
    assert code == 0 and rep["dtype"] == "bfloat16", text                      # judged at bfloat16 tolerances
    T, L = golden.tokens.size, golden.n_layer
    assert rep["coverage"]["cells_held"] == rep["coverage"]["cells_judged"] == 7 * L * T + 3 * T


def test_a_five_percent_scale_error_in_one_layer_is_named(tmp_path, golden):
    dump = write_sglang(tmp_path / "dump", golden,
                        edit=lambda stage, layer, v: v * np.float32(1.05) if (stage, layer) == ("moe_out", 2) else v)
    assert invoke(_argv(dump, tmp_path / "cand.zarr"))[0] == 0
    code, text, rep = _compare(tmp_path / "cand.zarr", tmp_path / "r.json")
    assert code == 1 and rep["verdict"] == "fail"
    fd = rep["first_divergence"]
    assert (fd["layer"], fd["stage"]) == (2, "moe_out"), text
    assert (rep["local"]["first_introduced"]["layer"], rep["local"]["first_introduced"]["stage"]) == (2, "moe_out")


def test_a_hostile_pickle_is_refused_and_never_runs(tmp_path, golden):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    dump = write_sglang(tmp_path / "dump", golden)
    bad = dump / sglang_name(step=0, rank=0, dump_index=999, name="non_intrusive__model.layers.1.mlp.output", layer_id=1)
    torch.save({"value": Payload(), "meta": {}}, bad)
    assert not marker.exists()
    out = tmp_path / "cand.zarr"
    assert_refused(_argv(dump, out), str(bad), "weights_only", "moesnap never runs code")
    assert not marker.exists() and not out.exists()
    with pytest.raises(Exception, match="never runs code"):
        moesnap.capture.import_sglang(dump, golden)
    assert not marker.exists()


def test_one_forward_pass_is_chosen_or_the_choice_asked_for(tmp_path, golden):
    dump = write_sglang(tmp_path / "dump", golden)
    write_sglang(dump, golden, step=1,
                 edit=lambda stage, layer, v: v * np.float32(1.05) if (stage, layer) == ("moe_out", 1) else v)
    out = tmp_path / "cand.zarr"
    assert_refused(_argv(dump, out), str(dump), "2 forward passes", "0: step=0___", "1: step=1___", "--pass N")
    assert_refused(_argv(dump, out, "--pass", "7"), "no forward pass 7")
    assert invoke(_argv(dump, out, "--pass", "0"))[0] == 0
    assert _compare(out, tmp_path / "r.json")[0] == 0
    assert invoke(_argv(dump, out, "--pass", "1", "--force"))[0] == 0
    code, _, rep = _compare(out, tmp_path / "r.json", "--force")
    assert code == 1 and rep["first_divergence"]["layer"] == 1


def test_ranks_above_zero_must_be_replicas(tmp_path, golden):
    dump = write_sglang(tmp_path / "dump", golden)
    write_sglang(dump, golden, rank=1)                                  # a replicated tensor on every rank
    out = tmp_path / "cand.zarr"
    code, _, err = invoke(_argv(dump, out))
    assert code == 0, err
    assert load_case(out).attrs["ranks"] == [0, 1]
    other = tmp_path / "tp"
    write_sglang(other, golden)
    write_sglang(other, golden, rank=1, edit=lambda stage, layer, v: v * 0.5 if stage == "attn_out" else v)
    err = assert_refused(_argv(other, tmp_path / "tp.zarr"), "rank 1", "tensor-parallel", "not supported yet")
    assert "rank=1" in err and "self_attn.o_proj.output" in err


def test_the_pass_must_have_run_the_goldens_prompt(tmp_path, golden):
    dump = write_sglang(tmp_path / "dump", golden)
    ids = next(p for p in dump.iterdir() if "name=input_ids" in p.name)
    torch.save({"value": torch.tensor([5, 6, 7]), "meta": {}}, ids)
    assert_refused(_argv(dump, tmp_path / "o.zarr"), str(ids), "ran tokens [5, 6, 7]", "--disable-radix-cache")
    store = ["--store", str(REPO_GOLDENS)]
    assert_refused(["import", "--format", "sglang", str(dump), "--like", "tiny", *store, "--out", str(tmp_path / "o")],
                   "input_ids match none of tiny's cases")


def test_the_goldens_case_is_found_by_the_dumps_input_ids(tmp_path, golden):
    dump = write_sglang(tmp_path / "dump", load_case(CASE0.parent / "case2"))
    store = ["--store", str(REPO_GOLDENS)]
    code, out, err = invoke(["import", "--format", "sglang", str(dump), "--like", "tiny", *store,
                             "--out", str(tmp_path / "o.zarr")])
    assert code == 0 and "golden case case2" in out, err
    assert invoke(["compare", "tiny", str(tmp_path / "o.zarr"), *store, "--allow-missing"])[0] == 0


def _put(name: str, value, **tags):
    def make(d: Path) -> Path:
        t = dict(forward_pass_id=1, rank=0, name=name, dump_index=900, **tags)
        p = d / sglang_name(**t)
        torch.save(value, p)
        return p
    return make


def _raw(filename: str, data: bytes):
    def make(d: Path) -> Path:
        (d / filename).write_bytes(data)
        return d / filename
    return make


BAD = {
    "not key=value pairs": (_raw("moe_out_layer3.pt", b""), "not an SGLang dumper file name"),
    "layer_id disagrees with the name": (_put("non_intrusive__model.layers.2.mlp.output", torch.zeros(19, 64),
                                              layer_id=3), "layer_id=3, but the name says layer 2"),
    "layer beyond the golden": (_put("moe_out", torch.zeros(19, 64), layer_id=9), "layer 9 is beyond the golden's 4"),
    "per-layer stage without a layer": (_put("moe_out", torch.zeros(19, 64)), "gives no layer"),
    "element count of neither": (_put("attn_out", torch.zeros(18, 64), layer_id=0), "neither every token's"),
    "a dict without a value": (_put("moe_out", {"x": torch.zeros(3)}, layer_id=0), "holds dict, not a tensor"),
    "not a pickle": (_raw(sglang_name(forward_pass_id=1, rank=0, name="moe_out", dump_index=901, layer_id=0),
                          b"\x80\x02junk"),
                     "not plain tensor data"),
    "a residual at layer 0": (_put("non_intrusive__model.layers.0.input_layernorm.output.1", torch.zeros(19, 64),
                                   layer_id=0), "no layer before it"),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_dump_files_are_refused_naming_the_file(tmp_path, golden, bad):
    make, needle = BAD[bad]
    dump = write_sglang(tmp_path / "dump", golden, style="old")
    path = make(dump)
    out = tmp_path / "cand.zarr"
    assert_refused(_argv(dump, out), str(path), needle)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["dump"]


def test_a_refused_dump_leaves_an_existing_output_untouched(tmp_path, golden):
    out = tmp_path / "cand.zarr"
    assert invoke(_argv(write_sglang(tmp_path / "good", golden), out))[0] == 0
    before = tree_digest(out)
    dump = write_sglang(tmp_path / "dump", golden, style="old")
    BAD["layer beyond the golden"][0](dump)
    assert_refused(_argv(dump, out, "--force"), "beyond the golden's")
    assert tree_digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["cand.zarr", "dump", "good"]


def test_dumps_holding_nothing_to_judge_are_refused(tmp_path, golden):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(_argv(empty, tmp_path / "o"), str(empty), "no .pt file")
    only = tmp_path / "core"
    only.mkdir()
    _put("input_ids", torch.from_numpy(golden.tokens.astype(np.int64)))(only)
    _put("rids", ["req-1"])(only)                                   # bookkeeping, never loaded
    assert_refused(_argv(only, tmp_path / "o"), str(only), "holds no stage")
    decode = tmp_path / "decode"
    decode.mkdir()
    _put("logits", torch.zeros(1, 272))(decode)
    assert_refused(_argv(decode, tmp_path / "o"), str(decode), "a decode pass?")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["core", "decode", "empty"]


def test_a_malformed_parted_attribute_is_refused_naming_the_case(tmp_path, golden):
    from dataclasses import replace

    import moesnap
    from moesnap.errors import GoldenError

    case = moesnap.capture.import_sglang(write_sglang(tmp_path / "dump", golden), golden)
    lacking = replace(case, attrs={**case.attrs, "parted": [{"stage": "moe_out", "layer": 2, "array": "parted/0"}]})
    with pytest.raises(GoldenError, match=r"case0 \(candidate\): attribute 'parted' names array 'parted/0', which"):
        moesnap.compare(str(CASE0), lacking, allow_missing=True, show_progress=False, local=False)
    bad = replace(case, attrs={**case.attrs, "parted": [{"stage": "moe_out", "layer": None, "array": "parted/0"}]},
                  extra={"parted/0": golden.layers["moe_out"][2]})
    with pytest.raises(GoldenError, match="entry 0 is not"):
        moesnap.compare(str(CASE0), bad, allow_missing=True, show_progress=False, local=False)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """A ``deepseek-v2-tiny`` golden case group (layer 0 dense: no router, experts or moe_out there, its
    rows of those stages filler) and the case."""
    import moesnap
    from moesnap.model.synth import make_model, preset

    root = tmp_path_factory.mktemp("ds")
    path = make_model(root / "ds.gguf", preset("deepseek-v2-tiny"))
    moesnap.generate(path, "ds", [[1, 5, 9, 200, 17, 3, 3]], store=root / "store")
    like = root / "store" / "ds" / "v0001" / "case0"
    return like, load_case(like)


@pytest.mark.parametrize("style", ["old", "new"])
def test_a_stage_a_layer_lacks_is_skipped(tmp_path, deepseek, style):
    """A dump holding the router and MoE stages at DeepSeek's dense layer 0 (here the golden's own filler:
    NaN, and -1 for topk_ids, which no expert id is) is imported with those skipped and listed; the
    layers that have the stages keep the dump's values, and everything held is judged.  The module names
    (``new``): a dense layer's ``mlp.output`` is its ``dense_ffn_out``, and DeepSeek's ``mlp.topk.output.0``
    no stage (SGLang's weights carry routed_scaling_factor only where the MoE runner fuses it in)."""
    like, golden = deepseek
    dump, cand = write_sglang(tmp_path / "dump", golden, style=style), tmp_path / "cand.zarr"
    code, out, err = invoke(["import", "--format", "sglang", str(dump), "--like", str(like), "--out", str(cand)])
    assert code == 0, err
    stored = load_case(cand)
    lacking = ["moe_out", "router_logits", "topk_ids", "topk_weights"] if style == "old" else ["router_logits", "topk_ids"]
    assert stored.attrs["skipped"] == [[s, 0] for s in lacking]
    assert "skipped (the golden's model has no such stage at the layer): " + "; ".join(
        f"{s} at layer 0" for s in lacking) in out
    if style == "new":
        assert np.array_equal(stored.layers["dense_ffn_out"], golden.layers["dense_ffn_out"][:1])
        assert "topk_weights" not in stored.layers and "non_intrusive__model.layers.N.mlp.topk.output.0" in \
            stored.attrs["ignored_names"]
        lacking.append("moe_out")
    assert "  router_logits: layers 1-2\n" in out and "  attn_norm: layers 0-2\n" in out
    assert np.isnan(stored.layers["router_logits"][0]).all() and (stored.layers["topk_ids"][0] == -1).all()
    for stage in lacking:
        assert np.array_equal(stored.layers[stage][1:], golden.layers[stage][1:]), stage
    # --no-local: the local re-reference (run/rereference.py) computes Qwen3-MoE-shaped layers only
    code, text, err = invoke(["compare", str(like), str(cand), "--allow-missing", "--no-local",
                              "--json", str(tmp_path / "r.json")])
    rep = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and rep["verdict"] == "pass", text + err
    assert rep["coverage"]["cells_held"] == rep["coverage"]["cells_judged"] > 0
    assert not any(r["layer"] == 0 and r["stage"] in lacking for r in rep["results"])


def test_a_count_of_several_times_every_tokens_row_says_what_it_likely_is():
    """A rank's stage holding every token's whole row twice over (a tensor-parallel rank that all-gathered its
    heads first) is refused naming that; a count of no such multiple keeps the plain line."""
    from moesnap.capture._flat import Like
    from moesnap.errors import GoldenError

    like = Like(tokens=np.arange(4, dtype=np.int32), n_layer=1, shapes={"q_norm": (2, 8)})
    assert like.rows("q_norm", 4 * 16, "f.pt") == 4 and like.rows("q_norm", 16, "f.pt") == 1
    with pytest.raises(GoldenError, match=r"f\.pt: 128 values of q_norm.*2 x every token's values: a tensor-parallel "
                                          r"rank holding the whole row where its 1/2 was expected"):
        like.rows("q_norm", 2 * 4 * 16, "f.pt")
    with pytest.raises(GoldenError, match=r"f\.pt: 72 values of q_norm.*another model or prompt"):
        like.rows("q_norm", 72, "f.pt")
