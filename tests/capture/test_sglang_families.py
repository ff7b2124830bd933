"""SGLang 0.5.23's own dumper (unmodified) on module trees named and called as SGLang's Qwen2-MoE and
DeepSeek-V2/V3 (tests/capture/sglang_families.py), built from the tiny presets, imported against each
preset's golden and judged: the family's module paths (moesnap.stages.DUMPER_ALIASES) land in its stages.
Skipped with the reason where sglang is not installed (``pip install --no-deps sglang==0.5.23`` and pyzmq).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flat_dumps import compare_run, golden_of_run, import_sglang_run

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sglang_tree import require_dumper  # noqa: E402

TOKENS = [1, 5, 9, 200, 17, 3, 3, 42, 100, 7, 250, 64]
PRESETS = {"qwen2": "qwen2-moe-tiny", "ds": "deepseek-v2-tiny", "v3": "deepseek-v3-tiny"}
#: run name -> (preset, the tree's arguments)
RUNS = {
    "qwen2": ("qwen2", ["--unfused-gate"]),
    "qwen2_fused_bf16": ("qwen2", ["--dtype", "bfloat16"]),
    "qwen2_gate_fault": ("qwen2", ["--unfused-gate", "--fault-gate", "1"]),
    "ds": ("ds", []),
    "ds_fault": ("ds", ["--fault-shared", "2"]),
    "v3": ("v3", []),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each run's (dump directory, golden store, golden name)."""
    require_dumper()
    import moesnap
    from moesnap.model.synth import make_model, preset

    root = tmp_path_factory.mktemp("sgfam")
    store = root / "store"
    models = {k: make_model(root / f"{name}.gguf", preset(name)) for k, name in PRESETS.items()}
    tokens = ",".join(map(str, TOKENS))
    procs = {run: subprocess.Popen([sys.executable, str(HERE / "sglang_families.py"), str(root / run), "--model",
                                    str(models[k]), "--tokens", tokens, *args],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for run, (k, args) in RUNS.items()}
    for k, path in models.items():                       # the goldens while the trees run
        moesnap.generate(path, k, [TOKENS], store=store)
    for p in procs.values():
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-2000:]
    return {run: (root / run / "exp", store, f"{k}@v0001") for run, (k, _) in RUNS.items()}


_imported, _compare, _golden = import_sglang_run, compare_run, golden_of_run


def _held(rep: dict, stage: str) -> list[int]:
    return sorted(r["layer"] for r in rep["results"] if r["stage"] == stage and r["verdict"] != "MISSING")


@pytest.mark.parametrize("run", ["qwen2", "qwen2_fused_bf16"])
def test_a_qwen2_moe_dump_passes_with_its_shared_expert_judged(tmp_path, runs, run):
    """The shared expert's output before its gate and (where the gate is not fused) the gate's logit land
    in shared_expert_out / shared_gate; the routed mixture alone (experts.output) is no stage."""
    case, cand = _imported(runs, run, tmp_path)
    assert "non_intrusive__model.layers.N.mlp.experts.output" in case.attrs["ignored_names"]
    assert "parted" not in case.attrs
    golden = _golden(runs, run)
    tol = dict(rtol=1e-4, atol=1e-5) if run == "qwen2" else dict(rtol=0.1, atol=0.05)
    assert np.allclose(case.layers["shared_expert_out"], golden.layers["shared_expert_out"], **tol)
    code, text, rep = _compare(runs, run, cand, tmp_path)
    assert code == 0 and rep["verdict"] == "pass", text
    cov = rep["coverage"]
    assert cov["cells_held"] == cov["cells_judged"] > 0
    assert _held(rep, "shared_expert_out") == _held(rep, "moe_out") == _held(rep, "q_rope") == [0, 1, 2]
    if run == "qwen2":
        assert _held(rep, "shared_gate") == [0, 1, 2] and rep["dtype"] == "float32"
    else:                         # the fused gate calls no module: no shared_gate, judged through moe_out
        assert "shared_gate" not in case.layers and rep["dtype"] == "bfloat16"


def test_a_fault_in_the_qwen2_moe_shared_expert_gate_is_named_at_its_layer(tmp_path, runs):
    case, cand = _imported(runs, "qwen2_gate_fault", tmp_path)
    golden = _golden(runs, "qwen2_gate_fault")
    assert np.allclose(case.layers["shared_gate"][1], golden.layers["shared_gate"][1] * 1.05, rtol=1e-4, atol=1e-6)
    code, text, rep = _compare(runs, "qwen2_gate_fault", cand, tmp_path)
    assert code == 1 and rep["verdict"] == "fail"
    fd, intro = rep["first_divergence"], rep["local"]["first_introduced"]
    assert (fd["layer"], fd["stage"]) == (intro["layer"], intro["stage"]) == (1, "shared_gate"), text
    assert [r["verdict"] for r in rep["results"] if r["stage"] == "shared_expert_out"][:2] == ["MATCH", "MATCH"]


@pytest.mark.parametrize("run", ["ds", "v3"])
def test_a_deepseek_dump_passes_with_its_latents_and_dense_layer_judged(tmp_path, runs, run):
    """MLA's latents (V3: q and kv latents cut from fused_qkv_a_proj_with_mqa), q and k after RoPE from the
    attention's inputs, the shared experts; the dense layer 0's mlp.output is its dense_ffn_out, never
    moe_out; the rope part alone (rotary_emb) and the unscaled top-k weights are no stage."""
    case, cand = _imported(runs, run, tmp_path)
    golden = _golden(runs, run)
    assert np.allclose(case.layers["dense_ffn_out"][0], golden.layers["dense_ffn_out"][0], rtol=1e-4, atol=1e-5)
    assert "skipped" not in case.attrs and np.isnan(case.layers["moe_out"][0]).all()
    ignored = case.attrs["ignored_names"]
    for name in ("self_attn.rotary_emb.output.0", "self_attn.rotary_emb.output.1", "mlp.topk.output.0",
                 "mlp.experts.output", "self_attn.kv_b_proj.output"):
        assert f"non_intrusive__model.layers.N.{name}" in ignored, name
    code, text, rep = _compare(runs, run, cand, tmp_path)
    assert code == 0 and rep["verdict"] == "pass", text
    cov = rep["coverage"]
    assert cov["cells_held"] == cov["cells_judged"] > 0
    assert _held(rep, "dense_ffn_out") == [0] and _held(rep, "moe_out") == _held(rep, "shared_expert_out") == [1, 2]
    for stage in ("kv_latent", "kv_latent_norm", "q", "q_rope", "k_rope", "v", "attn"):
        assert _held(rep, stage) == [0, 1, 2], stage
    assert _held(rep, "q_latent") == ([0, 1, 2] if run == "v3" else [])


def test_a_fault_in_deepseeks_shared_experts_is_named_at_its_layer(tmp_path, runs):
    case, cand = _imported(runs, "ds_fault", tmp_path)
    code, text, rep = _compare(runs, "ds_fault", cand, tmp_path)
    assert code == 1 and rep["verdict"] == "fail"
    fd, intro = rep["first_divergence"], rep["local"]["first_introduced"]
    assert (fd["layer"], fd["stage"]) == (intro["layer"], intro["stage"]) == (2, "shared_expert_out"), text
    assert [r["verdict"] for r in rep["results"] if r["stage"] == "shared_expert_out"] == ["MATCH", "DIVERGE"]
