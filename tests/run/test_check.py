"""`moesnap check` and `moesnap compare` end to end on the tiny model: verdicts, reports, planted faults."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from moesnap.cli.main import main
from moesnap.model.weights import GGUFModel

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_path):
    root = tmp_path_factory.mktemp("store")
    assert main(["-q", "goldens", "generate", str(tiny_path), "--suite", "t", "--store", str(root),
                 "--prompt", PROMPT, "--tokens", "5,9,200,17,3,3,64"]) == 0
    return root


def check(capsys, tiny_path, store, tmp_path, *extra):
    js = tmp_path / "r.json"
    code = main(["-q", "check", str(tiny_path), "--suite", "t", "--store", str(store), "--json", str(js), "--force",
                 *extra])
    out = capsys.readouterr()
    return code, out.out, out.err, (json.loads(js.read_text()) if js.exists() else None)


def test_clean_check_passes_and_writes_reports(capsys, tiny_path, store, tmp_path):
    html = tmp_path / "r.html"
    code, out, err, rep = check(capsys, tiny_path, store, tmp_path, "--html", str(html))
    assert code == 0, out + err
    assert "first divergence: none" in out and "verdict: pass" in out
    assert rep["verdict"] == "pass" and rep["first_divergence"] is None
    r0 = rep["results"][0]
    assert {"case", "layer", "stage", "verdict", "metrics", "flipped_tokens"} <= set(r0)
    assert {"cosine", "rel_l2", "max_abs", "nan_golden", "nan_candidate", "inf_golden", "inf_candidate"} <= set(r0["metrics"])
    cfg = GGUFModel.open(tiny_path).config
    assert len(rep["results"]) == 2 * (3 + 18 * cfg.n_layer)  # two cases, every stage of every layer
    page = html.read_text()
    assert page.startswith("<!doctype html>") and "L03" in page and "title=" in page


def _q6k_layer(tiny_path) -> int:
    q = GGUFModel.open(tiny_path).qtypes()
    return next(i for i in range(8) if q.get(f"blk.{i}.ffn_down_exps.weight", q.get(f"blk.{i}.ffn_down_exps")) == "Q6_K")


@pytest.mark.parametrize("replay", [False, True])
@pytest.mark.parametrize("spec, layer, stages, verdicts", [
    ("nan:layer=2,expert=3", 2, {"expert_out"}, {"NAN_CANDIDATE"}),
    ("scale:layer=1,stage=attn_out,factor=1.05", 1, {"attn_out"}, {"DIVERGE"}),
    ("scale:layer=3,stage=moe_out,factor=0.95", 3, {"moe_out"}, {"DIVERGE"}),
    ("route:layer=2,token=4", 2, {"topk_ids"}, {"DIVERGE"}),
    ("qtype:Q6K,tensor=ffn_down_exps,as=q4_k", None, {"expert_out"}, {"DIVERGE", "NAN_CANDIDATE"}),
])
def test_planted_fault_is_named(capsys, tiny_path, store, tmp_path, spec, layer, stages, verdicts, replay):
    if spec.startswith("qtype"):
        layer = _q6k_layer(tiny_path)
        spec = f"qtype:layer={layer},tensor=ffn_down_exps,as=q4_k"
    extra = ["--inject", spec] + (["--replay"] if replay else [])
    code, out, err, rep = check(capsys, tiny_path, store, tmp_path, *extra)
    assert code == 1, out + err
    fd = rep["first_divergence"]
    assert fd["layer"] == layer and fd["stage"] in stages and fd["verdict"] in verdicts, fd
    assert f"first divergence: {fd['case']} / layer {layer} / {fd['stage']}" in out
    if replay:
        intro = rep["replay"]["first_introduced"]
        assert intro["layer"] == layer and intro["stage"] in stages, intro
        # later layers fed golden inputs introduce nothing
        later = [r for r in rep["replay"]["results"] if r["layer"] is not None and r["layer"] > layer]
        assert all(r["verdict"] in ("MATCH", "ROUTING_TIE") for r in later)
        assert later or layer == GGUFModel.open(tiny_path).config.n_layer - 1


def test_a_planted_flip_within_the_tie_width_is_refused(capsys, tiny_path, store, tmp_path):
    # with a wide tie tolerance every flip is a near tie: router replay takes the golden's experts back,
    # so the planted fault changes nothing and proves nothing
    code, out, err, rep = check(capsys, tiny_path, store, tmp_path, "--inject", "route:layer=1,token=4",
                                "--tol", "float32:tie_tol=100")
    assert code == 2 and "cannot fire" in err and "route:layer=1,token=4" in err, out + err
    assert len(err.strip().splitlines()) == 1


def test_without_router_replay_a_flip_leaves_the_check_inconclusive(capsys, tiny_path, store, tmp_path):
    # the candidate keeps its own experts: the flipped token and every later one go unjudged in later
    # layers, so nothing fails, and yet it is no pass
    code, out, err, rep = check(capsys, tiny_path, store, tmp_path, "--inject", "route:layer=1,token=4",
                                "--tol", "float32:tie_tol=100", "--no-router-replay")
    assert code == 1, out + err
    assert rep["verdict"] == "inconclusive" and rep["first_divergence"] is None
    ids = [r for r in rep["results"] if r["stage"] == "topk_ids" and r["layer"] == 1]
    assert any(r["verdict"] == "ROUTING_TIE" and r["flipped_tokens"] == [4] for r in ids)
    later = [r for r in rep["results"] if r["layer"] == 2 and r["stage"] == "layer_out"]
    assert all(set(r["excluded_tokens"]) >= {4, 5, 6} for r in later if len(r["excluded_tokens"]))
    cov = rep["coverage"]
    assert 0 < cov["cells_judged"] < cov["cells_held"] and cov["unjudged"]
    assert "router replay" in rep["inconclusive"] and "verdict: inconclusive" in out
    assert "~" in out and "inconclusive:" in out


def test_bfloat16_router_replay_judges_every_token(capsys, tiny_path, tmp_path):
    # these 32 tokens of the tiny model flip near ties in bfloat16 (layers 1 and 3); router replay keeps them judged
    store = tmp_path / "s"
    toks = ",".join(str(t) for t in np.random.default_rng(4).integers(0, 272, 32))
    assert main(["-q", "goldens", "generate", str(tiny_path), "--suite", "b", "--store", str(store),
                 "--tokens", toks]) == 0
    js = tmp_path / "b.json"
    code = main(["-q", "check", str(tiny_path), "--suite", "b", "--store", str(store), "--dtype", "bfloat16",
                 "--json", str(js)])
    out = capsys.readouterr().out
    rep = json.loads(js.read_text())
    assert code == 0 and rep["verdict"] == "pass", out
    cov = rep["coverage"]
    assert cov["cells_judged"] == cov["cells_held"] > 0
    assert set(cov["judged_by_mode"]) == {"free-running, router replay", "replay"}
    assert any("followed" in n for n in rep["routing_notes"] + rep["replay"]["routing_notes"]), rep["routing_notes"]
    ties = [r for r in rep["results"] + rep["replay"]["results"] if r["verdict"] == "ROUTING_TIE"]
    assert ties and all(r["stage"] == "topk_ids" for r in ties)
    assert not any(r["excluded_tokens"] for r in rep["results"])   # nothing was excused


def test_golden_from_another_model_is_refused(capsys, tmp_path, store):
    from ggufgen import write_gguf

    other = write_gguf(tmp_path / "other.gguf", n_layer=4)
    code = main(["-q", "check", str(other), "--suite", "t", "--store", str(store)])
    err = capsys.readouterr().err
    assert code == 2 and "another model file" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, needle", [
    (["--suite", "nosuch"], "nosuch"),
    (["--suite", "t@v0099"], "v0099"),
    (["--suite", "t", "--inject", "nan:layer=99,expert=0"], "layer=99"),
    (["--suite", "t", "--inject", "boom"], "boom"),
    (["--suite", "t", "--dtype", "int8"], "int8"),
    (["--suite", "t", "--tol", "moe_out.atol=-1"], "atol"),
])
def test_check_bad_arguments(capsys, tiny_path, store, argv, needle):
    code = main(["-q", "check", str(tiny_path), "--store", str(store), *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_compare_another_engines_dump_with_aliases(capsys, tiny_path, tmp_path):
    gold, cand = tmp_path / "g.zarr", tmp_path / "c.zarr"
    assert main(["-q", "trace", str(tiny_path), "--tokens", "5,6,7,8", "--out", str(gold)]) == 0
    src = zarr.open_group(str(gold), mode="r")
    # an engine that dumps only three stages, under its own names, without attributes
    g = zarr.open_group(str(cand), mode="w")
    g.create_array("tokens", data=src["tokens"][:])
    g.create_array("layers/moe_router", data=src["layers/topk_weights"][:])
    moe = src["layers/moe_ffn_out" if "layers/moe_ffn_out" in src else "layers/moe_out"][:].copy()
    moe[2, 1, 5] = np.nan  # layer 2, token 1
    g.create_array("layers/moe_ffn_out", data=moe)
    g.create_array("lm_head", data=src["logits"][:])
    capsys.readouterr()
    js = tmp_path / "r.json"
    code = main(["compare", str(gold), str(cand), "--allow-missing", "--json", str(js)])
    out = capsys.readouterr().out
    assert code == 1
    assert "first divergence: g.zarr / layer 2 / moe_out / token 1: NAN_CANDIDATE (1 NaN in the candidate)" in out
    rep = json.loads(js.read_text())
    assert {r["stage"] for r in rep["results"]} == {"topk_weights", "moe_out", "logits"}
    # without --allow-missing the stages the dump lacks are MISSING
    assert main(["compare", str(gold), str(cand)]) == 1
    assert "MISSING" in capsys.readouterr().out


def test_compare_refuses_other_tokens_and_non_groups(capsys, tiny_path, tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert main(["-q", "trace", str(tiny_path), "--tokens", "5,6", "--out", str(a)]) == 0
    assert main(["-q", "trace", str(tiny_path), "--tokens", "5,7", "--out", str(b)]) == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(b)]) == 2
    assert "other tokens" in capsys.readouterr().err
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "file.txt").write_text("x")
    assert main(["compare", str(a), str(junk)]) == 2
    err = capsys.readouterr().err
    assert str(junk) in err and len(err.strip().splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_check_passes_and_names_a_planted_nan(capsys, tiny_path, store, tmp_path, dtype):
    code, out, err, rep = check(capsys, tiny_path, store, tmp_path, "--device", "cuda", "--dtype", dtype, "--replay")
    assert code == 0, out + err
    code, out, err, rep = check(capsys, tiny_path, store, tmp_path, "--device", "cuda", "--dtype", dtype,
                                "--inject", "nan:layer=1,expert=0")
    assert code == 1 and rep["first_divergence"]["layer"] == 1
    assert rep["first_divergence"]["verdict"] == "NAN_CANDIDATE"
