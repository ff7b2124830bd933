"""moesnap's gpt-oss reference against transformers' GptOssForCausalLM, on a small configuration drawn
at random per run (the seed is printed; ``MOESNAP_CROSSCHECK_SEED=N`` repeats a run) plus the bundled
``gpt-oss-tiny`` preset.

Both read the same GGUF (MXFP4 experts dequantized by gguf-py for transformers, by moesnap's loader for
the reference), in float32 with eager attention; every stage transformers exposes (:mod:`.hf_gpt_oss`)
must agree within a relative L2 error of 1e-5 per layer, the expert ids exactly.  The configurations
make each gpt-oss feature bind: prompts longer than the sliding window, sinks of the logits' size, gate
and up projections that reach the SwiGLU clamp, YaRN factors above 1; the test checks that each does.

Run: ``pytest -m crosscheck -s tests/crosscheck/test_gpt_oss.py``.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

pytestmark = pytest.mark.crosscheck

REL_L2 = 1e-5
SEED = int(os.environ.get("MOESNAP_CROSSCHECK_SEED") or np.random.SeedSequence().entropy % 2**31)


def _random_spec(seed: int):
    """A small gpt-oss spec drawn from ``seed``: 2-4 layers, GQA or MHA, head_dim 32 or 64, 4-12
    experts, top-1..4, MXFP4 or F32 experts, a window of 2-6 positions, YaRN factor 1-32."""
    from gguf import GGMLQuantizationType as QT
    from moesnap.model.synth import QTYPE_KINDS, preset

    rng = np.random.default_rng(seed)
    n_head_kv = int(rng.choice([1, 2, 4]))
    n_expert = int(rng.integers(4, 13))
    experts = QT.MXFP4 if rng.random() < 0.7 else QT.F32
    qtypes = {k: (experts if k.endswith("_exps") else QT(rng.choice([QT.F32, QT.Q8_0]))) for k in QTYPE_KINDS}
    return preset("gpt-oss-tiny").with_(
        n_layer=int(rng.integers(2, 5)), hidden=int(rng.choice([64, 96, 128])), n_head_kv=n_head_kv,
        n_head=n_head_kv * int(rng.choice([1, 2, 4])), head_dim=int(rng.choice([32, 64])), n_expert=n_expert,
        n_expert_used=int(rng.integers(1, min(4, n_expert) + 1)), expert_ff=int(rng.choice([32, 64, 96])),
        vocab_size=int(rng.integers(260, 330)), sliding_window=int(rng.integers(2, 7)),
        rope_factor=float(rng.choice([1.0, 4.0, 32.0])), rope_base=float(rng.choice([1e4, 150_000.0])),
        qtypes=qtypes, seed=seed, name=f"gpt-oss-random-{seed}")


CONFIGS = {"random": lambda: _random_spec(SEED), "gpt-oss-tiny": lambda: __import__(
    "moesnap.model.synth", fromlist=["preset"]).preset("gpt-oss-tiny")}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    pytest.importorskip("transformers", reason="transformers not installed (pip install -r requirements-crosscheck.txt)")
    from moesnap.model.recorder import ArrayRecorder
    from moesnap.model.reference import run_reference
    from moesnap.model.synth import make_model
    from moesnap.model.weights import GGUFModel

    from .hf_gpt_oss import hf_forward, load_hf_from_gguf

    spec = CONFIGS[request.param]()
    path = make_model(tmp_path_factory.mktemp("gptoss") / "m.gguf", spec)
    n_tokens = int(spec.sliding_window) + 8              # crosses the window by 8 positions
    tokens = [1] + np.random.default_rng(SEED).integers(3, spec.vocab_size, n_tokens - 1).tolist()
    rec = ArrayRecorder()
    model = GGUFModel.open(path)
    run_reference(model, tokens, recorder=rec)
    ours = {**rec.stacked(), **{k: v for k, v in rec.model.items() if k != "tokens"}}
    return request.param, spec, model, tokens, ours, hf_forward(load_hf_from_gguf(path), tokens)


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_every_stage_matches_transformers(pair, figures):
    name, spec, model, tokens, ours, hf = pair
    where = f"{name} (seed {SEED}: MOESNAP_CROSSCHECK_SEED={SEED}; {spec.config})"
    assert not {"q_norm", "k_norm"} & set(ours) and set(hf) == set(ours), where   # gpt-oss has no q/k norm
    assert np.array_equal(ours["topk_ids"], hf["topk_ids"]), f"expert ids differ: {where}"
    worst = {}
    for stage, theirs in hf.items():
        if stage == "topk_ids":
            continue
        mine = np.asarray(ours[stage]).reshape(theirs.shape)
        per_layer = [_rel_l2(mine, theirs)] if stage in ("embed", "final_norm", "logits") else \
            [_rel_l2(mine[i], theirs[i]) for i in range(spec.n_layer)]
        worst[stage] = max(per_layer)
        assert worst[stage] <= REL_L2, f"{stage}: relative L2 {per_layer} > {REL_L2}: {where}"
    figures(f"gpt-oss {name}", "ref-vs-hf", "max rel L2 (all stages)", max(worst.values()))


def test_each_gpt_oss_feature_binds(pair):
    """The agreement above is no accident of features that never act: each changes the result."""
    from moesnap.model.recorder import ArrayRecorder
    from moesnap.model.reference import run_reference

    name, spec, model, tokens, ours, hf = pair
    cfg = model.config
    for change, stage in [({"sliding_window": 0}, "attn"),            # every layer full
                          ({"attn_sinks": False}, "attn"),
                          ({"swiglu_limit": 1e9}, "expert_out"),
                          ({"rope_factor": 1.0}, "q_rope")]:
        if change.get("rope_factor") == cfg.rope_factor:
            continue
        model.config = dataclasses.replace(cfg, **change)
        if change == {"attn_sinks": False}:
            model.layer, real = _without_sinks(model), model.layer
        try:
            rec = ArrayRecorder()
            run_reference(model, tokens, recorder=rec)
        finally:
            model.config = cfg
            if change == {"attn_sinks": False}:
                model.layer = real
        err = _rel_l2(rec.stacked()[stage], ours[stage])
        assert err > 1e3 * REL_L2, f"{name}: {change} changes {stage} by {err:.2e} only (seed {SEED})"


def _without_sinks(model):
    real = model.layer

    def layer(i, dtype):
        w = real(i, dtype)
        w.sinks = None
        return w
    return layer


# ---------------------------------------------------------------- llama.cpp (logits)

LLAMA_ATOL = 1e-4   # all-F32 file, F32 KV cache: measured ~7e-6


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory):
    """llama.cpp's and the reference's logits on the all-F32 gpt-oss-tiny, YaRN factor 1 and 32."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install -r requirements-crosscheck.txt)")
    from gguf import GGMLQuantizationType as QT
    from moesnap.capture.llama import llama_forward
    from moesnap.model.reference import run_reference
    from moesnap.model.synth import QTYPE_KINDS, make_model, preset
    from moesnap.model.weights import GGUFModel

    root = tmp_path_factory.mktemp("gptoss-llama")
    tokens = [1] + np.random.default_rng(SEED).integers(3, 272, 13).tolist()
    out = {}
    for factor in (1.0, 32.0):
        spec = preset("gpt-oss-tiny").with_(qtypes={k: QT.F32 for k in QTYPE_KINDS}, rope_factor=factor)
        path = make_model(root / f"f{int(factor)}.gguf", spec)
        model = GGUFModel.open(path)
        ref = run_reference(model, tokens).numpy()
        model.config = dataclasses.replace(model.config, rope_yarn_truncate=True)   # llama.cpp's YaRN
        truncated = run_reference(model, tokens).numpy()
        out[factor] = (llama_forward(path, tokens, stages=False)["logits"], ref, truncated)
    return out


def test_llama_cpp_logits_match_without_yarn(llama_runs, figures):
    llama, ref, _ = llama_runs[1.0]
    err = float(np.abs(llama - ref).max())
    figures("gpt-oss tiny-f32 yarn 1", "ref-vs-llama", "max |dlogits|", err)
    assert err <= LLAMA_ATOL, f"seed {SEED}"


def test_llama_cpp_truncates_yarns_correction_range(llama_runs, figures):
    """llama.cpp rounds YaRN's correction range to whole dimensions (ggml_rope_yarn_corr_dims: floor and
    ceil); gpt-oss's config.json says ``truncate: false`` and transformers and the reference follow it.
    llama.cpp matches the reference computed its way, and differs from the golden at factor 32."""
    llama, ref, truncated = llama_runs[32.0]
    same, golden = float(np.abs(llama - truncated).max()), float(np.abs(llama - ref).max())
    figures("gpt-oss tiny-f32 yarn 32", "ref-vs-llama", "max |dlogits| truncated", same)
    figures("gpt-oss tiny-f32 yarn 32", "ref-vs-llama", "max |dlogits| golden", golden)
    assert same <= LLAMA_ATOL and golden > 10 * LLAMA_ATOL, f"seed {SEED}"
    assert float(np.abs(llama[0] - ref[0]).max()) <= LLAMA_ATOL   # position 0: no rotation, no difference
