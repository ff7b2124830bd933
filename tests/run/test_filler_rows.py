"""Stages some layers lack, on the ``deepseek-v2-tiny`` preset (layer 0 dense, layers 1-2 MoE): a golden
stores them over the layers with filler rows (NaN, -1 for ``topk_ids``) where a layer lacks them, and
``goldens diff``, ``goldens show`` and ``calibrate`` read only the layers that have each stage
(:func:`moesnap.stages.stages_of_layer`).  The importers' side: tests/capture/test_import_sglang.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import moesnap
from moesnap.cli.main import main
from moesnap.model.synth import make_model, preset
from moesnap.model.weights import GGUFModel
from moesnap.run.calibrate import measure
from moesnap.run.goldens_diff import diff
from moesnap.run.goldens_show import show_lines
from moesnap.stages import MODEL_STAGES, stages_of_layer
from moesnap.store import LocalGoldenStore

PROMPTS = [[1, 5, 9, 200, 17, 3, 3, 64], [7, 8, 9, 10, 11]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("filler") / "ds.gguf", preset("deepseek-v2-tiny"))


@pytest.fixture(scope="module")
def store(model):
    root = model.parent / "store"
    moesnap.generate(model, "ds", PROMPTS, store=root)
    moesnap.generate(model, "ds", PROMPTS, store=root)
    return LocalGoldenStore(root)


def layer_stages(version) -> list[tuple[str, ...]]:
    cfg = version.meta["model"]["config"]
    return [stages_of_layer("deepseek2", cfg, layer) for layer in range(cfg["n_layer"])]


def test_the_preset_has_filler_rows(store):
    """What the other tests rest on: layer 0 is dense, and the router stages hold filler there."""
    v = store.open_version("ds", "v0001")
    per = layer_stages(v)
    assert "router_logits" not in per[0] and "dense_ffn_out" in per[0]
    assert all("router_logits" in s and "dense_ffn_out" not in s for s in per[1:])
    case = v.read_case("case0")
    assert np.isnan(case.layers["router_logits"][0]).all() and (case.layers["topk_ids"][0] == -1).all()
    assert case.layers["dense_ffn_out"].shape[0] == 1


def test_diff_of_two_goldens_of_one_model_is_empty(store, capsys):
    va, vb = store.open_version("ds", "v0001"), store.open_version("ds", "v0002")
    rep = diff(va, vb)
    assert not rep.any_changed and not rep.changed
    per = layer_stages(va)
    judged = {(s.case, s.layer, s.stage) for s in rep.stages}
    want = {(c, layer, stage) for c in va.case_names() for layer, stages in enumerate(per) for stage in stages}
    want |= {(c, None, stage) for c in va.case_names() for stage in MODEL_STAGES if stage != "tokens"}
    assert judged == want       # every layer's own stages, no filler row
    n = len(want) // len(va.case_names())
    assert main(["-q", "goldens", "diff", "ds@v0001", "ds@v0002", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert f"case case0: all {n} stages unchanged" in out and f"identical: all {len(want)} stages bit for bit" in out


def test_diff_never_reads_a_filler_row(store):
    """A version whose filler rows hold other values (an engine's zeros where a layer has no router) is
    the same golden: nothing the judge reads changed."""
    v1 = store.open_version("ds", "v0001")
    cases = {n: v1.read_case(n) for n in v1.case_names()}
    for c in cases.values():
        c.layers["router_logits"][0] = 0.0
        c.layers["topk_ids"][0] = 0
        c.layers["moe_out"][0] = 7.0
    rep = diff(v1, store.publish("ds", cases, {k: v1.meta[k] for k in ("model", "dtype", "versions")}))
    assert not rep.any_changed, [(s.layer, s.stage) for s in rep.changed]
    assert not any(s.layer == 0 and s.stage in ("router_logits", "topk_ids", "moe_out") for s in rep.stages)
    # and a change in a row a layer has is still named
    cases["case0"].layers["router_logits"][1] += 0.5
    rep = diff(v1, store.publish("ds", cases, {k: v1.meta[k] for k in ("model", "dtype", "versions")}))
    assert {(s.layer, s.stage) for s in rep.changed if not s.passed} >= {(1, "router_logits")}


def test_show_lists_no_filler(store):
    lines = show_lines(store.open_version("ds", "v0001"))
    row = next(line for line in lines if line.strip().startswith("layers ("))
    assert row.strip().startswith("layers (3): attn_norm [8,64]  kv_latent [8,96]")
    for needle in ("dense_ffn_out [8,64] (layer 0)", "router_logits [8,8] (layers 1-2)",
                   "topk_ids [8,2] int32 (layers 1-2)", "moe_out [8,64] (layers 1-2)", "layer_out [8,64]  ",
                   "shared_expert_out [8,64] (layers 1-2)"):
        assert needle in row + "  ", (needle, row)
    assert "attn_norm [8,64] (" not in row and "layer_out [8,64] (" not in row   # every layer has them


def test_calibrate_measures_each_layer_on_its_own_stages(model):
    """The spread is over the layers that have each stage: element counts are those layers' alone, and
    every figure is a number (no filler NaN, no filler -1 ids matched as routes)."""
    m = GGUFModel.open(model)
    tokens = PROMPTS[0]
    spread, flips = measure(m, [tokens], torch.float32)
    cfg, T = m.config, len(tokens)
    n_moe = cfg.n_layer - cfg.n_dense_layers
    assert cfg.n_dense_layers == 1 and n_moe == 2
    assert spread["router_logits"].n == T * cfg.n_expert * n_moe
    assert spread["expert_out"].n == T * cfg.n_expert_used * cfg.hidden * n_moe
    assert spread["dense_ffn_out"].n == T * cfg.hidden * cfg.n_dense_layers
    assert spread["attn_norm"].n == T * cfg.hidden * cfg.n_layer
    assert spread["q_latent"].n == 0                      # V2-Lite's shape: no q LoRA, no such stage
    for stage, sp in spread.items():
        assert all(math.isfinite(x) for x in (sp.max_abs, sp.rel_p99, sp.max_rel_l2)), stage
        if sp.n:
            assert sp.max_abs < 1e-3 and (sp.max_abs > 0 or stage == "embed"), (stage, sp)   # float32 noise
    assert flips == 0


def test_calibrate_cli_on_a_model_with_dense_layers(model, tmp_path, capsys):
    js = tmp_path / "cal.json"
    assert main(["-q", "calibrate", str(model), "--tokens", "1,5,9,200", "--dtypes", "float32",
                 "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "dense_ffn_out = {atol = " in out and "q_latent" not in out
