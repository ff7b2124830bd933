"""Qwen2-MoE, Mixtral, OLMoE and DeepSeek-V2/V3 through other engines, judged by ``moesnap compare``
against goldens of each family's tiny preset.

* ``moesnap trace --engine transformers`` builds each family's transformers model from the GGUF in
  memory; in float32 every stage it holds agrees with the golden within 1e-5 relative L2 and the
  comparison passes with every cell judged, in bfloat16 it passes too;
* ``moesnap trace --engine llama.cpp`` (llama-cpp-python 0.3.36's qwen2moe, llama, olmoe and
  deepseek2 graphs) holds the stages each graph names and passes under the ``ggml`` profile; a
  DeepSeek file without a q LoRA, which its loader reads only at V2-Lite's depth, is refused in one
  line;
* decode steps through each engine's own cache, teacher-forced on the golden's continuation, pass
  with every cell judged;
* bugs planted in transformers (a shared expert's gate ignored, the correction bias dropped, the
  router's renormalisation dropped, a q norm scaled, the shared experts' output scaled), in float32
  and bfloat16, and in llama.cpp's dumps (the shared experts' output, the shared gate's logit), are
  named at their layer and stage by the local re-reference.

Run: ``pytest -m crosscheck tests/crosscheck/test_family_engines.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

import moesnap
import moesnap.capture

from .foreign_run import cli

pytestmark = pytest.mark.crosscheck

PRESETS = ("qwen2-moe-tiny", "mixtral-tiny", "olmoe-tiny", "deepseek-v2-tiny", "deepseek-v3-tiny")
LLAMA_CPP = ("qwen2-moe-tiny", "mixtral-tiny", "olmoe-tiny", "deepseek-v3-tiny")
PROMPTS = {"case0": [1, 5, 9, 30, 7, 100, 3, 2, 44, 12], "case1": [7, 8, 9, 10, 11, 12]}
SUITE, STEPS = "fam", 3
#: what forward hooks on transformers cannot see (RoPE is a function, the experts one fused module;
#: router_select is moesnap's own measure of DeepSeek's selection)
HF_HIDDEN = {"q_rope", "k_rope", "expert_out", "router_select"}
#: what each llama.cpp graph leaves unnamed: the o-projection output (but in Mixtral's ``llama``
#: graph); under DeepSeek's latent attention k, v and k_rope, which llama.cpp never forms
LLAMA_HIDDEN = {"qwen2-moe-tiny": {"attn_out"}, "mixtral-tiny": set(), "olmoe-tiny": {"attn_out"},
                "deepseek-v3-tiny": {"attn_out", "k", "v", "k_rope", "router_select"}}


def _needs(module: str) -> None:
    pytest.importorskip(module, reason=f"{module} not installed (pip install -c constraints-cpu.txt "
                                       f"-r requirements-crosscheck.txt)")


def _make(preset: str, root: Path) -> tuple[Path, str, list[int]]:
    """(the preset's GGUF, a store with its goldens of PROMPTS and ``dec`` of case0 and STEPS greedy
    tokens, those tokens)."""
    from moesnap.model.synth import make_model
    from moesnap.model.synth import preset as spec

    path = Path(make_model(root / f"{preset}.gguf", spec(preset)))
    store = str(root / "goldens")
    assert moesnap.generate(path, SUITE, list(PROMPTS.values()), store=store) == f"{SUITE}@v0001"
    assert moesnap.generate(path, "dec", [PROMPTS["case0"]], store=store, decode=STEPS) == "dec@v0001"
    cont = _golden(store, "dec").tokens.tolist()[len(PROMPTS["case0"]):]
    return path, store, cont


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Callable[[str], tuple[Path, str, list[int]]]:
    """``world(preset)``: that preset's model and goldens (:func:`_make`), made once per module."""
    made: dict[str, tuple[Path, str, list[int]]] = {}

    def get(preset: str) -> tuple[Path, str, list[int]]:
        if preset not in made:
            made[preset] = _make(preset, tmp_path_factory.mktemp(preset))
        return made[preset]
    return get


@pytest.fixture(scope="module")
def llama_dump(world, tmp_path_factory) -> Callable[[str], Path]:
    """``llama_dump(preset)``: llama.cpp's trace of PROMPTS on that preset, a directory of case groups
    named like the golden's, made once per module."""
    made: dict[str, Path] = {}

    def get(preset: str) -> Path:
        _needs("llama_cpp")
        if preset not in made:
            made[preset] = _trace(world(preset)[0], tmp_path_factory.mktemp(f"llama-{preset}") / "cand", "llama.cpp")
        return made[preset]
    return get


def _golden(store: str, suite: str = SUITE, case: str = "case0"):
    from moesnap.store import open_store

    return open_store(store).open_version(suite).read_case(case)


def _trace(model: Path, out: Path, engine: str, *extra: str) -> Path:
    out.mkdir()
    for name, tokens in PROMPTS.items():
        rc, text = cli("-q", "trace", str(model), "--tokens", ",".join(map(str, tokens)), "--engine", engine,
                       "--out", str(out / name), *extra)
        assert rc == 0, text
    return out


def _compare(store: str, cand: Path, report: Path) -> tuple[int, dict, str]:
    rc, text = cli("-q", "compare", SUITE, str(cand), "--store", store, "--allow-missing", "--json", str(report))
    return rc, (json.loads(report.read_text()) if report.exists() else {}), text


def _passes_with_every_cell_judged(rc: int, rep: dict, text: str) -> None:
    assert rc == 0 and rep["verdict"] == "pass", text[-3000:]
    cov = rep["coverage"]
    assert cov["cells_judged"] == cov["cells_held"] > 0 and cov["judged_by_mode"]["local"] > 0, cov


def _held(model) -> set[str]:
    from moesnap.stages import stages_of_model

    c = model.config
    return set(stages_of_model(c.arch, c.to_dict(), c.n_layer))


@pytest.mark.parametrize("preset", PRESETS)
def test_trace_engine_transformers_float32_agrees_with_every_golden_stage_and_passes(world, preset, tmp_path, figures):
    _needs("transformers")
    from moesnap.model.load import open_model
    from moesnap.stages import stages_of_layer
    from moesnap.store.case import load_case

    model, store, _ = world(preset)
    cfg = open_model(model).config
    cand = _trace(model, tmp_path / "cand", "transformers")
    for name in PROMPTS:
        c, g = load_case(cand / name), _golden(store, case=name)
        assert set(c.layers) == _held(open_model(model)) - HF_HIDDEN, "every stage the hooks see, no other"
        for layer in range(cfg.n_layer):
            for stage in set(stages_of_layer(cfg.arch, cfg.to_dict(), layer)) - HF_HIDDEN:
                a, b = c.stage(stage, layer), g.stage(stage, layer)
                if stage == "topk_ids":
                    assert np.array_equal(np.sort(a, -1), np.sort(b, -1)), (name, layer)
                    continue
                rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
                assert rel < 1e-5, (name, stage, layer, rel)
        figures(f"{preset} {name}", "trace-hf-vs-golden", "max rel_l2 logits",
                float(np.linalg.norm(c.model["logits"] - g.model["logits"]) / np.linalg.norm(g.model["logits"])))
    _passes_with_every_cell_judged(*_compare(store, cand, tmp_path / "r.json"))


@pytest.mark.parametrize("preset", PRESETS)
def test_trace_engine_transformers_bfloat16_passes_with_every_cell_judged(world, preset, tmp_path):
    _needs("transformers")
    model, store, _ = world(preset)
    cand = _trace(model, tmp_path / "cand", "transformers", "--dtype", "bfloat16")
    _passes_with_every_cell_judged(*_compare(store, cand, tmp_path / "r.json"))


@pytest.mark.parametrize("preset", LLAMA_CPP)
def test_trace_engine_llama_cpp_holds_what_its_graph_names_and_passes_under_ggml(world, llama_dump, preset, tmp_path):
    from moesnap.model.load import open_model
    from moesnap.store.case import load_case

    model, store, _ = world(preset)
    cand = llama_dump(preset)
    c = load_case(cand / "case0")
    assert set(c.layers) == _held(open_model(model)) - LLAMA_HIDDEN[preset]
    assert sorted(c.attrs["not_captured"]) == sorted(LLAMA_HIDDEN[preset])
    rc, rep, text = _compare(store, cand, tmp_path / "r.json")
    _passes_with_every_cell_judged(rc, rep, text)
    assert "tolerance profile ggml" in text


def test_llama_cpp_refuses_a_deepseek_file_without_q_lora_in_one_line(world, tmp_path):
    model, _, _ = world("deepseek-v2-tiny")
    rc, text = cli("-q", "trace", str(model), "--tokens", "1,2,3", "--engine", "llama.cpp", "--out", str(tmp_path / "c"))
    assert rc == 2 and "26 or 27 layers" in text and "Traceback" not in text and len(text.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("engine, preset", [("transformers", p) for p in PRESETS] + [("llama.cpp", p) for p in LLAMA_CPP])
def test_decode_steps_through_the_engines_own_cache_pass_with_every_cell_judged(world, engine, preset):
    _needs("llama_cpp" if engine == "llama.cpp" else "transformers")
    model, store, cont = world(preset)
    case = moesnap.trace(model, PROMPTS["case0"], engine=engine, decode=STEPS, continuation=cont)
    assert [s.positions.tolist() for s in case.steps] == [[len(PROMPTS["case0"]) + n] for n in range(STEPS)]
    rep = moesnap.compare("dec", case, store=store, allow_missing=True, show_progress=False)
    assert rep.verdict == "pass", rep.summary()
    cov = rep.coverage()
    assert cov.complete and cov.judged == cov.held > 0 and not rep.unjudged_steps, cov


# ---------------------------------------------------------------- bugs planted in the engines


def _shared_gate_ignored(hf, layer: int) -> None:
    """Qwen2-MoE: the shared expert added without its sigmoid gate (the gate still computed)."""
    mlp = hf.model.layers[layer].mlp

    def forward(hidden_states):
        B, S, H = hidden_states.shape
        x = hidden_states.view(-1, H)
        shared, _ = mlp.shared_expert(x), mlp.shared_expert_gate(x)
        _, weights, ids = mlp.gate(x)
        return (mlp.experts(x, ids, weights) + shared).reshape(B, S, H)

    mlp.forward = forward


def _correction_bias_dropped(hf, layer: int) -> None:
    hf.model.layers[layer].mlp.gate.e_score_correction_bias.zero_()


def _renormalisation_dropped(hf, layer: int) -> None:
    """Mixtral: the router's top-k probabilities used as they are (Mixtral renormalises them)."""
    gate = hf.model.layers[layer].mlp.gate

    def forward(hidden_states):
        logits = torch.nn.functional.linear(hidden_states.reshape(-1, gate.hidden_dim), gate.weight)
        top, ids = torch.topk(torch.softmax(logits.float(), dim=-1), gate.top_k, dim=-1)
        return logits, top.to(logits.dtype), ids

    gate.forward = forward


def _q_norm_scaled(hf, layer: int) -> None:
    hf.model.layers[layer].self_attn.q_norm.weight.data.mul_(1.05)


def _shared_experts_scaled(hf, layer: int) -> None:
    hf.model.layers[layer].mlp.shared_experts.register_forward_hook(lambda m, a, out: out * 1.05)


#: preset -> (the fault, its layer, the stage that makes it)
HF_FAULTS = {"qwen2-moe-tiny": (_shared_gate_ignored, 1, "moe_out"),
             "deepseek-v3-tiny": (_correction_bias_dropped, 2, "topk_ids"),
             "mixtral-tiny": (_renormalisation_dropped, 1, "topk_weights"),
             "olmoe-tiny": (_q_norm_scaled, 2, "q_norm"),
             "deepseek-v2-tiny": (_shared_experts_scaled, 1, "shared_expert_out")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("preset", list(HF_FAULTS))
def test_a_bug_planted_in_transformers_is_named_at_its_layer_and_stage(world, preset, dtype):
    _needs("transformers")
    from moesnap.capture.hf import model_from_gguf
    from moesnap.model.load import open_model

    model, store, _ = world(preset)
    fault, layer, stage = HF_FAULTS[preset]
    hf = model_from_gguf(open_model(model), dtype=dtype)
    with torch.no_grad():
        fault(hf, layer)
    cases = {name: moesnap.capture.transformers(hf, tokens) for name, tokens in PROMPTS.items()}
    rep = moesnap.compare(SUITE, cases, store=store, allow_missing=True, show_progress=False)
    assert rep.verdict == "fail", rep.summary()
    intro = rep.to_dict()["local"]["first_introduced"]
    assert (intro["layer"], intro["stage"]) == (layer, stage), intro


@pytest.mark.parametrize("preset, stage, layer, change", [
    ("deepseek-v3-tiny", "shared_expert_out", 2, lambda a: a * 1.05),
    ("qwen2-moe-tiny", "shared_gate", 1, lambda a: a + 1.0)], ids=["deepseek-shared-scaled", "qwen2-gate-shifted"])
def test_an_error_planted_in_a_llama_cpp_dump_is_named_at_its_layer_and_stage(world, llama_dump, preset, stage, layer,
                                                                            change, tmp_path):
    from moesnap.run.trace import write_output
    from moesnap.store.case import load_case

    _, store, _ = world(preset)
    cand, bad = llama_dump(preset), tmp_path / "bad"
    bad.mkdir()
    for name in PROMPTS:
        c = load_case(cand / name)
        c.layers[stage][layer] = change(c.layers[stage][layer])
        write_output(c, bad / name)
    rc, rep, text = _compare(store, bad, tmp_path / "r.json")
    assert rc == 1 and rep["verdict"] == "fail", text[-3000:]
    intro = rep["local"]["first_introduced"]
    assert (intro["layer"], intro["stage"]) == (layer, stage), intro
