"""Other engines as candidates, end to end: ``moesnap trace --engine transformers|llama.cpp`` on the
bundled tiny model, judged by ``moesnap compare`` against the committed goldens (goldens/tiny).

* transformers (float32, CPU) agrees stage by stage at float32 rounding and passes;
* llama.cpp passes under the ``ggml`` profile its ``engine`` attribute selects (it rounds every
  quantized matmul's input to 8 bits; the default profile calls that a divergence from layer 0);
* a 5 % error planted in one layer's MoE output of the llama.cpp dump is named at that layer and stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moesnap.model.synth import tiny_path
from moesnap.run.trace import write_output
from moesnap.store import open_store
from moesnap.store.case import load_case

from .foreign_run import cli

pytestmark = pytest.mark.crosscheck

GOLDENS = Path(__file__).resolve().parents[2] / "goldens"
SUITE = "tiny"


def _golden_cases() -> list[tuple[str, np.ndarray]]:
    v = open_store(str(GOLDENS)).open_version(SUITE, None)
    return [(name, v.read_case(name).tokens) for name in v.case_names()]


def _trace_all(engine: str, out: Path) -> Path:
    """Every golden case's tokens through ``engine``, as a group of case groups named like the golden's."""
    out.mkdir()
    for name, tokens in _golden_cases():
        rc, text = cli("-q", "trace", str(tiny_path()), "--tokens", ",".join(map(str, tokens)),
                       "--engine", engine, "--out", str(out / name))
        assert rc == 0, text
    return out


def _compare(cand: Path, tmp: Path, *extra: str) -> tuple[int, dict, str]:
    report = tmp / f"report-{len(list(tmp.iterdir()))}.json"
    rc, text = cli("-q", "compare", SUITE, str(cand), "--store", str(GOLDENS), "--allow-missing",
                   "--json", str(report), *extra)
    return rc, (json.loads(report.read_text()) if report.exists() else {}), text


@pytest.fixture(scope="module")
def llama_dump(tmp_path_factory) -> Path:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install 'moesnap[llama]')")
    return _trace_all("llama.cpp", tmp_path_factory.mktemp("llama") / "cand")


def test_transformers_engine_float32_matches_the_goldens(tmp_path, figures):
    pytest.importorskip("transformers", reason="transformers not installed (pip install 'moesnap[transformers]')")
    cand = _trace_all("transformers", tmp_path / "cand")
    for name, _ in _golden_cases():
        c = load_case(cand / name)
        g = open_store(str(GOLDENS)).open_version(SUITE, None).read_case(name)
        assert c.attrs["engine"] == "transformers" and c.attrs["model"]["sha256"]
        assert not {"q_rope", "k_rope", "expert_out"} & set(c.layers), "hooks cannot see these: absent, not faked"
        for stage, a in c.layers.items():
            if stage == "topk_ids":
                assert np.array_equal(np.sort(a, -1), np.sort(g.layers[stage], -1))
                continue
            rel = float(np.linalg.norm(a - g.layers[stage]) / np.linalg.norm(g.layers[stage]))
            figures(name, "trace-hf-vs-golden", f"rel_l2 {stage}", rel)
            assert rel < 1e-5, (name, stage, rel)
    rc, rep, text = _compare(cand, tmp_path)
    assert rc == 0 and rep["verdict"] == "pass", text[-3000:]


def test_llama_cpp_engine_passes_under_the_ggml_profile_it_selects(llama_dump, tmp_path):
    c = load_case(llama_dump / _golden_cases()[0][0])
    assert c.attrs["engine"] == "llama.cpp" and "attn_out" not in c.layers, "the unnamed o-projection: absent"
    rc, rep, text = _compare(llama_dump, tmp_path)
    assert rc == 0 and rep["verdict"] == "pass", text[-3000:]
    assert "tolerance profile ggml (the candidate's engine is llama.cpp)" in text
    assert rep["coverage"]["cells_judged"] == rep["coverage"]["cells_held"], rep["coverage"]


def test_llama_cpp_under_the_default_profile_is_called_a_divergence(llama_dump, tmp_path):
    """Why the profile exists: 8-bit activation rounding is ~0.5 % per matmul, far beyond float32 noise."""
    rc, rep, text = _compare(llama_dump, tmp_path, "--profile", "default")
    assert rc == 1 and rep["verdict"] == "fail", text[-2000:]
    assert rep["first_divergence"]["layer"] == 0 and rep["first_divergence"]["stage"] in ("q", "k", "v")


def test_a_5_percent_error_in_one_layers_moe_out_is_named_at_its_layer_and_stage(llama_dump, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    layer = 2
    for name, _ in _golden_cases():
        c = load_case(llama_dump / name)
        c.layers["moe_out"][layer] *= 1.05
        write_output(c, bad / name)
    rc, rep, text = _compare(bad, tmp_path)
    assert rc == 1 and rep["verdict"] == "fail", text[-3000:]
    first = rep["first_divergence"]
    assert (first["layer"], first["stage"]) == (layer, "moe_out"), text[-3000:]
    assert rep["local"]["first_introduced"]["layer"] == layer, rep["local"]
    assert rep["local"]["first_introduced"]["stage"] == "moe_out", rep["local"]
