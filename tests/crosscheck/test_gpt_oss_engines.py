"""gpt-oss through other engines, judged by ``moesnap compare`` against goldens of the tiny gpt-oss preset.

* ``moesnap trace --engine transformers`` builds transformers' ``GptOssForCausalLM`` from the GGUF
  (interleaved gate/up experts, router with bias, sinks, sliding layers, YaRN) and passes in float32
  and bfloat16 with every cell it holds judged, free-running and by local re-reference;
* ``moesnap.capture.transformers`` on a GptOssForCausalLM built independently of moesnap
  (:mod:`.hf_gpt_oss`) passes the same way, with ``decode=N`` through transformers' own cache
  (sliding layers keep a window-sized cache) in float32 and bfloat16;
* a 5 % error planted in one layer's ``moe_out`` of a bfloat16 dump is named at that layer and stage
  (local re-reference), a doubled ``attn_out`` free-running alone under gpt-oss's own wider
  free-running tolerances (:mod:`moesnap.judge.family_tolerances`);
* the router's outputs map onto ``router_logits``/``topk_ids``/``topk_weights`` whether the scores
  come in slot order ``[T, k]`` or scattered over the experts ``[T, E]``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import moesnap
import moesnap.capture
from moesnap.errors import UsageError

from .foreign_run import cli

pytestmark = pytest.mark.crosscheck

#: crosses the tiny preset's window of 4 positions several times
PROMPTS = {"case0": [1, 5, 9, 30, 7, 100, 3, 2, 44, 12, 19, 250], "case1": [7, 8, 9, 10, 11, 12]}
SUITE = "gptoss"
STEPS = 4
HIDDEN_FROM_HOOKS = {"q_rope", "k_rope", "expert_out"}


def _needs_transformers():
    pytest.importorskip("transformers", reason="transformers not installed (pip install -c constraints-cpu.txt "
                                               "-r requirements-crosscheck.txt)")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, str]:
    """(the tiny gpt-oss GGUF, a store holding its goldens: suite SUITE of PROMPTS, and ``dec`` of
    case0's prompt and STEPS greedy tokens)."""
    from moesnap.model.synth import make_model, preset

    root = tmp_path_factory.mktemp("gptoss-engines")
    path = make_model(root / "gpt-oss-tiny.gguf", preset("gpt-oss-tiny"))
    store = str(root / "goldens")
    assert moesnap.generate(path, SUITE, list(PROMPTS.values()), store=store) == f"{SUITE}@v0001"
    assert moesnap.generate(path, "dec", [PROMPTS["case0"]], store=store, decode=STEPS) == "dec@v0001"
    return Path(path), store


def _golden(store: str, suite: str = SUITE, case: str = "case0"):
    from moesnap.store import open_store

    return open_store(store).open_version(suite).read_case(case)


def _trace(model: Path, out: Path, *extra: str) -> Path:
    out.mkdir()
    for name, tokens in PROMPTS.items():
        rc, text = cli("-q", "trace", str(model), "--tokens", ",".join(map(str, tokens)), "--engine", "transformers",
                       "--out", str(out / name), *extra)
        assert rc == 0, text
    return out


def _compare(store: str, cand: Path, report: Path, *extra: str) -> tuple[int, dict, str]:
    rc, text = cli("-q", "compare", SUITE, str(cand), "--store", store, "--allow-missing", "--json", str(report),
                   *extra)
    return rc, (json.loads(report.read_text()) if report.exists() else {}), text


def _every_cell_judged(rep: dict) -> None:
    cov = rep["coverage"]
    assert cov["cells_judged"] == cov["cells_held"] > 0, cov


def test_trace_engine_transformers_float32_matches_the_gpt_oss_goldens(world, tmp_path, figures):
    _needs_transformers()
    model, store = world
    cand = _trace(model, tmp_path / "cand")
    for name in PROMPTS:
        from moesnap.store.case import load_case

        c, g = load_case(cand / name), _golden(store, case=name)
        assert c.attrs["engine"] == "transformers" and c.attrs["model"]["config"]["arch"] == "gpt-oss"
        assert set(c.layers) == set(g.layers) - HIDDEN_FROM_HOOKS, "gpt-oss has no q_norm/k_norm; hooks see no RoPE"
        assert sorted(c.attrs["not_captured"]) == sorted(HIDDEN_FROM_HOOKS)
        for stage, a in c.layers.items():
            if stage == "topk_ids":
                assert np.array_equal(a, g.layers[stage]), "same experts, in the same (descending) order"
                continue
            rel = float(np.linalg.norm(a - g.layers[stage]) / np.linalg.norm(g.layers[stage]))
            figures(f"gpt-oss-tiny {name}", "trace-hf-vs-golden", f"rel_l2 {stage}", rel)
            assert rel < 1e-5, (name, stage, rel)
    rc, rep, text = _compare(store, cand, tmp_path / "r.json")
    assert rc == 0 and rep["verdict"] == "pass", text[-3000:]
    _every_cell_judged(rep)
    assert rep["coverage"]["judged_by_mode"]["local"] > 0, "the local re-reference computed gpt-oss layers"


def test_trace_engine_transformers_bfloat16_passes_with_every_cell_judged(world, tmp_path):
    _needs_transformers()
    model, store = world
    cand = _trace(model, tmp_path / "cand", "--dtype", "bfloat16")
    rc, rep, text = _compare(store, cand, tmp_path / "r.json")
    assert rc == 0 and rep["verdict"] == "pass", text[-3000:]
    _every_cell_judged(rep)
    # free-running alone (no local re-reference) judges every cell too where no routing flipped
    rc, rep, text = _compare(store, cand, tmp_path / "free.json", "--no-local")
    assert rep["verdict"] in ("pass", "inconclusive") and rc in (0, 1), text[-3000:]
    assert rep["verdict"] == "pass" or "routing" in text, text[-3000:]


def test_a_5_percent_moe_out_error_in_a_bfloat16_dump_is_named(world, tmp_path):
    _needs_transformers()
    from moesnap.run.trace import write_output
    from moesnap.store.case import load_case

    model, store = world
    cand = _trace(model, tmp_path / "cand", "--dtype", "bfloat16")
    bad, layer = tmp_path / "bad", 2
    bad.mkdir()
    for name in PROMPTS:
        c = load_case(cand / name)
        c.layers["moe_out"][layer] *= 1.05
        write_output(c, bad / name)
    rc, rep, text = _compare(store, bad, tmp_path / "r.json")
    assert rc == 1 and rep["verdict"] == "fail", text[-3000:]
    assert rep["local"]["first_introduced"]["layer"] == layer, rep["local"]
    assert rep["local"]["first_introduced"]["stage"] == "moe_out", rep["local"]


def test_a_doubled_attn_out_is_named_free_running_under_gpt_osss_own_tolerances(world, tmp_path):
    """The family's wider free-running numbers still name a gross error, with no local re-reference."""
    _needs_transformers()
    from moesnap.run.trace import write_output
    from moesnap.store.case import load_case

    model, store = world
    cand = _trace(model, tmp_path / "cand", "--dtype", "bfloat16")
    bad, layer = tmp_path / "bad", 1
    bad.mkdir()
    for name in PROMPTS:
        c = load_case(cand / name)
        c.layers["attn_out"][layer] *= 2.0
        write_output(c, bad / name)
    rc, rep, text = _compare(store, bad, tmp_path / "r.json", "--no-local")
    assert rc == 1 and rep["verdict"] == "fail", text[-3000:]
    assert (rep["first_divergence"]["layer"], rep["first_divergence"]["stage"]) == (layer, "attn_out"), text[-3000:]
    assert "that family's own calibrated spread" in text


@pytest.fixture(scope="module")
def hf(world):
    """transformers' GptOssForCausalLM built from the GGUF by the cross-check's own loader (nothing of
    moesnap), float32, eager."""
    _needs_transformers()
    from .hf_gpt_oss import load_hf_from_gguf

    return load_hf_from_gguf(world[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capture_transformers_decodes_a_user_built_gpt_oss_model(world, hf, dtype):
    _, store = world
    cont = _golden(store, "dec").tokens.tolist()[len(PROMPTS["case0"]):]
    model = hf if dtype == torch.float32 else copy.deepcopy(hf).to(dtype)
    case = moesnap.capture.transformers(model, PROMPTS["case0"], decode=STEPS, continuation=cont)
    assert case.attrs["dtype"] == str(dtype).removeprefix("torch.") and len(case.steps) == STEPS
    assert [s.positions.tolist() for s in case.steps] == [[len(PROMPTS["case0"]) + n] for n in range(STEPS)]
    rep = moesnap.compare("dec", case, store=store, allow_missing=True, show_progress=False)
    assert rep.verdict == "pass", rep.summary()
    cov = rep.coverage()
    assert cov.complete and cov.judged == cov.held > 0 and not rep.unjudged_steps, cov
    if dtype == torch.float32:   # transformers' greedy choice is the reference's on this model
        assert moesnap.capture.transformers(hf, PROMPTS["case0"], decode=STEPS).attrs["continuation"] == cont


def _sink_ignored(model, layer: int = 1) -> None:
    model.model.layers[layer].self_attn.sinks.data.fill_(float("-inf"))     # exp(-inf) = 0: no sink in the softmax


def _window_off_by_one(model) -> None:
    model.config.sliding_window += 1          # the sliding layers' mask is built from it at each forward


@pytest.mark.parametrize("fault, where", [(_sink_ignored, (1, "attn")), (_window_off_by_one, (0, "attn"))],
                         ids=["sink-ignored", "window-off-by-one"])
def test_gpt_oss_faults_planted_in_bfloat16_transformers_are_named(world, hf, fault, where):
    """The issue's gpt-oss faults, planted in transformers itself, in bfloat16: the local re-reference
    names the layer and stage that makes each (the free-running judge alone may only see it later)."""
    _, store = world
    model = copy.deepcopy(hf).to(torch.bfloat16)
    fault(model)
    case = moesnap.capture.transformers(model, PROMPTS["case0"])
    rep = moesnap.compare(SUITE, {"case0": case}, store=store, allow_missing=True, show_progress=False)
    assert rep.verdict == "fail", rep.summary()
    intro = rep.to_dict()["local"]["first_introduced"]
    assert (intro["layer"], intro["stage"]) == where, intro


def test_router_outputs_in_either_layout_map_onto_our_stages():
    from moesnap.capture.hf import _routing

    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0], [3.0, 0.0, 2.5, -2.0]])            # [T, E]
    top, ids = torch.topk(logits, 2, dim=-1)
    weights = torch.softmax(top, dim=-1)                                               # [T, k] slot order
    scattered = torch.zeros_like(logits).scatter(1, ids, weights)                      # [T, E]
    for out in ((logits, weights, ids), (logits, scattered, ids), (scattered, ids)):
        got_logits, got_w, got_ids = _routing(out, 0, 2)
        assert torch.equal(got_w, weights) and torch.equal(got_ids, ids)
        assert got_logits is (None if len(out) == 2 else logits)
    with pytest.raises(UsageError, match="layer 3's router gave 2 expert ids per token, expected top-k = 3"):
        _routing((logits, weights, ids), 3, 3)
    with pytest.raises(UsageError, match="layer 1's router did not return"):
        _routing(logits, 1, 2)
    with pytest.raises(UsageError, match="router scores have 3 columns"):
        _routing((logits, torch.ones(2, 3), ids), 0, 2)


def test_a_transformers_that_fixes_the_swiglu_clamp_in_code_is_refused_for_another_clamp(world, monkeypatch):
    """transformers before 5.2x hard-codes limit 7.0 and alpha 1.702 in GptOssExperts: a model with
    another clamp is refused in one line rather than built with the wrong one."""
    _needs_transformers()
    import dataclasses

    from transformers.models.gpt_oss import modeling_gpt_oss as mg

    from moesnap.capture.hf import model_from_gguf
    from moesnap.model.load import open_model

    real_init = mg.GptOssExperts.__init__

    def fixed(self, config):
        real_init(self, config)
        self.limit, self.alpha = 7.0, 1.702

    monkeypatch.setattr(mg.GptOssExperts, "__init__", fixed)
    model = open_model(world[0])
    assert model_from_gguf(model) is not None                 # the model's own clamp: built
    model.config = dataclasses.replace(model.config, swiglu_limit=6.0)
    with pytest.raises(UsageError, match=r"GptOssExperts uses limit = 7.0, the model 6.0"):
        model_from_gguf(model)
