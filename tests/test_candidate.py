"""The candidate forward against the reference on the bundled tiny model.

Measured on the CPU (torch 2.13, 32 tokens), max |candidate - reference| per
stage: float32 everything <= 8.2e-6 (router_logits; logits 3.0e-6),
bfloat16 <= 0.16 on router_logits and <= 0.10 on every other stage (relative
to the stage's largest magnitude: <= 2.5 %), same expert sets everywhere.
The bounds below leave an order of magnitude of room over those figures.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from moesnap import quants_torch
from moesnap.candidate import EXPERT_PATHS, CandidateModel, grouped_mm_works
from moesnap.errors import UsageError
from moesnap.recorder import ArrayRecorder, NullRecorder
from moesnap.reference import run_reference
from moesnap.stages import INTEGER_STAGES, LAYER_STAGES
from moesnap.synth import tiny_path
from moesnap.weights import GGUFModel

N_TOKENS = 32
FP32_ATOL = 1e-4          # max abs error, every float stage and the logits
BF16_REL = 0.06           # max abs error / max |reference|, every float stage
FLOAT_LAYER_STAGES = [s for s in LAYER_STAGES if s not in INTEGER_STAGES]


@pytest.fixture(scope="module")
def model() -> GGUFModel:
    return GGUFModel.open(tiny_path())


@pytest.fixture(scope="module")
def tokens(model) -> list[int]:
    return np.random.default_rng(0).integers(0, model.config.vocab_size, N_TOKENS).tolist()


@pytest.fixture(scope="module")
def ref(model, tokens) -> ArrayRecorder:
    rec = ArrayRecorder()
    run_reference(model, tokens, recorder=rec)
    return rec


def run_candidate(model, tokens, device="cpu", dtype=torch.float32, **kw) -> tuple[ArrayRecorder, torch.Tensor]:
    rec = ArrayRecorder()
    logits = CandidateModel(model, device=device, dtype=dtype, **kw).forward(tokens, rec)
    return rec, logits


@pytest.fixture(scope="module")
def cand32(model, tokens) -> ArrayRecorder:
    return run_candidate(model, tokens)[0]


def stage_errors(ref: ArrayRecorder, cand: ArrayRecorder) -> dict[str, float]:
    """Max abs error of every float stage (layer stages over all layers)."""
    out = {s: float(np.abs(ref.model[s] - cand.model[s]).max()) for s in ("embed", "final_norm", "logits")}
    r, c = ref.stacked(), cand.stacked()
    for s in FLOAT_LAYER_STAGES:
        out[s] = float(np.abs(r[s] - c[s]).max())
    return out


def assert_same_shapes(ref: ArrayRecorder, cand: ArrayRecorder) -> None:
    assert set(cand.model) == set(ref.model)
    for s in ref.model:
        assert cand.model[s].shape == ref.model[s].shape, s
    assert set(cand.layers) == set(ref.layers) == set(LAYER_STAGES)
    for s, per in ref.layers.items():
        assert sorted(cand.layers[s]) == sorted(per), s
        for i, arr in per.items():
            assert cand.layers[s][i].shape == arr.shape, (s, i)
            assert cand.layers[s][i].dtype == arr.dtype, (s, i)


def assert_agrees(ref: ArrayRecorder, cand: ArrayRecorder, *, atol: float | None = None,
                  rel: float | None = None) -> dict[str, float]:
    assert_same_shapes(ref, cand)
    np.testing.assert_array_equal(cand.model["tokens"], ref.model["tokens"])
    errs = stage_errors(ref, cand)
    golden = {**ref.model, **ref.stacked()}
    for s, e in errs.items():
        scale = float(np.abs(golden[s]).max())
        if atol is not None:
            assert e <= atol, f"{s}: max abs error {e:.3g} > {atol}"
        if rel is not None:
            assert e <= rel * scale, f"{s}: max abs error {e:.3g} > {rel} x {scale:.3g}"
    # same experts, in the same (descending weight) order
    np.testing.assert_array_equal(cand.stacked()["topk_ids"], ref.stacked()["topk_ids"])
    return errs


# --------------------------------------------------------------------------- agreement


def test_float32_agrees_with_reference(ref, cand32):
    errs = assert_agrees(ref, cand32, atol=FP32_ATOL)
    assert errs["embed"] == 0.0  # F32 embedding rows: both decoders are exact


def test_bfloat16_agrees_loosely(model, tokens, ref):
    cand, logits = run_candidate(model, tokens, dtype=torch.bfloat16)
    assert logits.dtype == torch.bfloat16
    assert_agrees(ref, cand, rel=BF16_REL)


def test_float16_agrees_loosely(model, tokens, ref):
    cand, _ = run_candidate(model, tokens, dtype=torch.float16)
    assert_agrees(ref, cand, rel=BF16_REL / 8)


def test_returned_logits_are_the_recorded_ones(model, tokens, cand32):
    logits = CandidateModel(model).forward(tokens)  # no recorder at all
    np.testing.assert_array_equal(logits.numpy(), cand32.model["logits"])


def test_recording_changes_nothing(model, tokens):
    cm = CandidateModel(model)
    a = cm.forward(tokens, NullRecorder())
    b = cm.forward(tokens, ArrayRecorder())
    assert torch.equal(a, b)


def test_tokens_as_tensor_or_array(model, tokens, cand32):
    for form in (torch.tensor(tokens), np.asarray(tokens, dtype=np.int32)):
        np.testing.assert_array_equal(CandidateModel(model).forward(form).numpy(), cand32.model["logits"])


def test_progress_reports_every_layer(model, tokens):
    calls = []
    CandidateModel(model).forward(tokens[:4], progress=lambda done, total: calls.append((done, total)))
    L = model.config.n_layer
    assert calls == [(i + 1, L) for i in range(L)]


def test_single_token(model, tokens, ref):
    rec = ArrayRecorder()
    CandidateModel(model).forward(tokens[:1], rec)
    np.testing.assert_allclose(rec.model["logits"], ref.model["logits"][:1], atol=FP32_ATOL)


# --------------------------------------------------------------------------- experts


@pytest.mark.parametrize("path", EXPERT_PATHS)
def test_grouped_experts_equal_naive_per_token(model, tokens, path):
    """Every (token, slot) expert output of the grouped run equals a plain per-token computation."""
    rec, _ = run_candidate(model, tokens, expert_path=path)
    cfg = model.config
    for layer in range(cfg.n_layer):
        x = torch.from_numpy(rec.layers["ffn_norm"][layer])              # [T, H]
        ids = rec.layers["topk_ids"][layer]                              # [T, k]
        mats = {}
        for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            qtype, data = model.raw(f"blk.{layer}.{name}")
            mats[name] = quants_torch.dequantize(torch.from_numpy(np.array(data)), qtype)  # [E, out, in]
        want = np.empty_like(rec.layers["expert_out"][layer])           # [T, k, H]
        for t in range(len(tokens)):
            for slot, e in enumerate(ids[t]):
                g, u, d = (mats[n][e] for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))
                h = F.silu(g @ x[t]) * (u @ x[t])                        # [F]
                want[t, slot] = (d @ h).numpy()                          # [H]
        np.testing.assert_allclose(rec.layers["expert_out"][layer], want, rtol=0, atol=1e-5,
                                   err_msg=f"layer {layer}, expert path {path}")
        moe = (want * rec.layers["topk_weights"][layer][..., None]).sum(1)
        np.testing.assert_allclose(rec.layers["moe_out"][layer], moe, rtol=0, atol=1e-5)


def test_expert_paths_agree(model, tokens, cand32):
    loop, _ = run_candidate(model, tokens, expert_path="loop")
    for s in FLOAT_LAYER_STAGES:
        np.testing.assert_allclose(loop.stacked()[s], cand32.stacked()[s], rtol=0, atol=1e-5, err_msg=s)


def test_expert_batches_do_not_change_results(model, tokens, cand32):
    """Dequantizing one expert at a time (bounded memory) gives the same outputs, up to
    float32 summation order (the CPU's grouped GEMM blocks differently per call)."""
    small, _ = run_candidate(model, tokens, expert_values=1)
    np.testing.assert_allclose(small.stacked()["expert_out"], cand32.stacked()["expert_out"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(small.model["logits"], cand32.model["logits"], rtol=0, atol=1e-5)


def test_grouped_mm_probe_on_cpu():
    # torch 2.13's CPU build has a working _grouped_mm; a build without it must say no
    assert grouped_mm_works("cpu", torch.float32, 64, 512) == hasattr(torch, "_grouped_mm")


def test_unknown_expert_path_and_dtype(model):
    with pytest.raises(UsageError, match="expert_path='fast'"):
        CandidateModel(model, expert_path="fast")
    with pytest.raises(UsageError, match="int32"):
        CandidateModel(model, dtype=torch.int32)


# --------------------------------------------------------------------------- replay


def test_replay_with_golden_inputs(model, tokens, ref):
    """Each layer fed the reference's input of that layer introduces only float noise."""
    L = model.config.n_layer
    golden_in = {0: torch.from_numpy(ref.model["embed"])}
    golden_in.update({i: torch.from_numpy(ref.layers["layer_out"][i - 1]) for i in range(1, L)})
    cm = CandidateModel(model)
    rec = ArrayRecorder()
    cm.forward(tokens, rec, layer_inputs=golden_in)
    for i in range(L):
        err = np.abs(rec.layers["layer_out"][i] - ref.layers["layer_out"][i]).max()
        assert err <= 2e-5, (i, err)
        # the single-layer entry point gives exactly the same layer
        one = ArrayRecorder()
        out = cm.forward_layer(i, golden_in[i], one)
        np.testing.assert_array_equal(out.numpy(), rec.layers["layer_out"][i])
        assert set(one.layers) == set(LAYER_STAGES) and not one.model


def test_replay_input_replaces_the_predecessor(model, tokens, cand32):
    """Feeding layer 2 a zero state changes layers >= 2 only."""
    T, H = len(tokens), model.config.hidden
    rec = ArrayRecorder()
    CandidateModel(model).forward(tokens, rec, layer_inputs={2: torch.zeros(T, H)})
    for s in LAYER_STAGES:
        for i in range(2):
            np.testing.assert_array_equal(rec.layers[s][i], cand32.layers[s][i])
    np.testing.assert_array_equal(rec.layers["attn_norm"][2], 0)   # RMSNorm of the zero state
    for i in range(2, model.config.n_layer):
        assert not np.array_equal(rec.layers["layer_out"][i], cand32.layers["layer_out"][i])


def test_forward_layer_rejects_bad_layer(model):
    with pytest.raises(UsageError, match="layer=4 is out of range: the model has 4 layers"):
        CandidateModel(model).forward_layer(4, torch.zeros(2, model.config.hidden))


# --------------------------------------------------------------------------- GPU


def _cuda_flips_only_at_ties(ref: ArrayRecorder, cand: ArrayRecorder, margin: float) -> None:
    """Expert sets agree except where the reference's k-th and (k+1)-th router logits nearly tie."""
    r, c = ref.stacked(), cand.stacked()
    k = r["topk_ids"].shape[-1]
    srt = -np.sort(-r["router_logits"], axis=-1)
    gap = srt[..., k - 1] - srt[..., k]                                 # [L, T]
    differ = (np.sort(r["topk_ids"], -1) != np.sort(c["topk_ids"], -1)).any(-1)
    assert (gap[differ] < margin).all(), gap[differ]


@pytest.mark.gpu
def test_cuda_float32_agrees_with_reference(model, tokens, ref):
    cand, logits = run_candidate(model, tokens, device="cuda")
    assert logits.device.type == "cuda"
    assert_agrees(ref, cand, atol=FP32_ATOL)


@pytest.mark.gpu
def test_cuda_bfloat16_agrees_loosely(model, tokens, ref):
    cand, _ = run_candidate(model, tokens, device="cuda", dtype=torch.bfloat16)
    _cuda_flips_only_at_ties(ref, cand, margin=0.05)
    assert_same_shapes(ref, cand)
    errs = stage_errors(ref, cand)
    assert errs["logits"] <= BF16_REL * np.abs(ref.model["logits"]).max(), errs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_expert_paths_agree(model, tokens, dtype):
    if not grouped_mm_works("cuda", dtype, model.config.hidden, 2 * model.config.expert_ff):
        pytest.skip(f"torch._grouped_mm does not work on this GPU in {dtype}")
    grouped, _ = run_candidate(model, tokens, device="cuda", dtype=dtype, expert_path="grouped_mm")
    loop, _ = run_candidate(model, tokens, device="cuda", dtype=dtype, expert_path="loop")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    np.testing.assert_allclose(grouped.stacked()["expert_out"], loop.stacked()["expert_out"], rtol=0, atol=tol)


@pytest.mark.gpu
def test_cuda_uses_grouped_mm_for_bfloat16(model):
    assert CandidateModel(model, device="cuda", dtype=torch.bfloat16).expert_path == "grouped_mm"
