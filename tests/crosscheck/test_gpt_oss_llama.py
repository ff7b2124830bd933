"""gpt-oss through llama.cpp (``moesnap trace --engine llama.cpp``, llama-cpp-python 0.3.36's openai-moe
graph) judged by ``moesnap compare`` against goldens of the tiny gpt-oss preset.

* Every gpt-oss stage is named in llama.cpp's graph (``attn_out`` too, unlike its qwen3moe graph; the
  router's biased logits are ``ffn_moe_probs``, the experts' biased outputs ``ffn_moe_down_biased``).
* With YaRN factor 1 (no frequency blend: the reference and llama.cpp compute the same RoPE) the dump
  passes with every cell judged, prefill and decode, under the ``ggml`` profile with gpt-oss's own
  free-running numbers; the local re-reference finds no stage that introduces an error.
* At the preset's YaRN factor 32 llama.cpp rounds the correction range to whole dimensions (its
  ``ggml_rope_yarn_corr_dims``) where gpt-oss's config.json says ``truncate: false``: the comparison
  names ``q_rope`` of layer 0 at the first position that rotates (token 1), as the stage that
  introduces the difference in every layer.
* A 5 % error planted in one layer's ``moe_out`` of the dump is named at that layer and stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import moesnap
import moesnap.capture

from .foreign_run import cli

pytestmark = pytest.mark.crosscheck

PROMPTS = {"case0": [1, 5, 9, 30, 7, 100, 3, 2, 44, 12], "case1": [7, 8, 9, 10, 11, 12]}
SUITE = "gptoss"
STEPS = 3


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[float, tuple[Path, str, Path]]:
    """Per YaRN factor (1: neutral, 32: the preset's): (the GGUF, its golden store, llama.cpp's dump of PROMPTS)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install 'moesnap[llama]')")
    from moesnap.model.synth import make_model, preset

    out = {}
    for factor in (1.0, 32.0):
        root = tmp_path_factory.mktemp(f"gptoss-llama-{int(factor)}")
        path = Path(make_model(root / "gpt-oss-tiny.gguf", preset("gpt-oss-tiny").with_(rope_factor=factor)))
        store = str(root / "goldens")
        assert moesnap.generate(path, SUITE, list(PROMPTS.values()), store=store) == f"{SUITE}@v0001"
        dump = root / "dump"
        dump.mkdir()
        for name, tokens in PROMPTS.items():
            rc, text = cli("-q", "trace", str(path), "--tokens", ",".join(map(str, tokens)), "--engine", "llama.cpp",
                           "--out", str(dump / name))
            assert rc == 0, text
        out[factor] = (path, store, dump)
    return out


def _compare(store: str, cand: Path, report: Path, *extra: str) -> tuple[int, dict, str]:
    rc, text = cli("-q", "compare", SUITE, str(cand), "--store", store, "--json", str(report), *extra)
    return rc, (json.loads(report.read_text()) if report.exists() else {}), text


def test_llama_cpp_names_every_gpt_oss_stage_and_passes_with_yarn_neutral(worlds, tmp_path):
    from moesnap.stages import FAMILY_STAGES
    from moesnap.store.case import load_case

    _, store, dump = worlds[1.0]
    c = load_case(dump / "case0")
    assert c.attrs["engine"] == "llama.cpp" and c.attrs["not_captured"] == []
    assert set(c.layers) == set(FAMILY_STAGES["gpt-oss"])
    rc, rep, text = _compare(store, dump, tmp_path / "r.json")          # no --allow-missing: nothing is
    assert rc == 0 and rep["verdict"] == "pass", text[-3000:]
    assert rep["coverage"]["cells_judged"] == rep["coverage"]["cells_held"] > 0, rep["coverage"]
    assert "tolerance profile ggml" in text and "that family's own calibrated spread" in text
    assert rep["local"]["first_introduced"] is None, rep["local"]


def test_llama_cpp_decode_steps_pass_with_every_cell_judged(worlds, tmp_path):
    path, _, _ = worlds[1.0]
    store = str(tmp_path / "dec")
    assert moesnap.generate(path, "dec", [PROMPTS["case0"]], store=store, decode=STEPS) == "dec@v0001"
    from moesnap.store import open_store

    cont = open_store(store).open_version("dec").read_case("case0").tokens.tolist()[len(PROMPTS["case0"]):]
    case = moesnap.capture.llama_cpp(path, PROMPTS["case0"], decode=STEPS, continuation=cont)
    assert [s.positions.tolist() for s in case.steps] == [[len(PROMPTS["case0"]) + n] for n in range(STEPS)]
    rep = moesnap.compare("dec", case, store=store, show_progress=False)
    assert rep.verdict == "pass", rep.summary()
    cov = rep.coverage()
    assert cov.complete and cov.judged == cov.held > 0 and not rep.unjudged_steps, cov


def test_yarn_truncation_is_named_at_q_rope_of_layer_0_from_the_first_rotated_position(worlds, tmp_path):
    _, store, dump = worlds[32.0]
    rc, rep, text = _compare(store, dump, tmp_path / "r.json")
    assert rc == 1 and rep["verdict"] == "fail", text[-3000:]
    first = rep["first_divergence"]
    assert (first["layer"], first["stage"]) == (0, "q_rope") and first["token"] >= 1, first
    intro = rep["local"]["first_introduced"]
    assert (intro["layer"], intro["stage"]) == (0, "q_rope"), intro


def test_a_5_percent_moe_out_error_in_the_llama_cpp_dump_is_named(worlds, tmp_path):
    from moesnap.run.trace import write_output
    from moesnap.store.case import load_case

    _, store, dump = worlds[1.0]
    bad, layer = tmp_path / "bad", 2
    bad.mkdir()
    for name in PROMPTS:
        c = load_case(dump / name)
        c.layers["moe_out"][layer] *= 1.05
        write_output(c, bad / name)
    rc, rep, text = _compare(store, bad, tmp_path / "r.json")
    assert rc == 1 and rep["verdict"] == "fail", text[-3000:]
    intro = rep["local"]["first_introduced"]
    assert (intro["layer"], intro["stage"]) == (layer, "moe_out"), intro
