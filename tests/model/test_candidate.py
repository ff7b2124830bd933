"""The candidate forward against the reference on the bundled tiny model.

Measured on the CPU (torch 2.13, these 32 tokens), max |candidate - reference|
over all layers, the reference in float32:

* float32: every stage <= 7.8e-6 (router_logits; logits 3.1e-6), the same
  experts in the same order everywhere.
* bfloat16, replay (each layer fed the reference's input): router_logits
  <= 0.053, every other stage <= 0.042 (layer_out), i.e. <= 1.4 % of the
  stage's largest magnitude (topk_weights; 0.4-0.9 % for most stages), post-
  routing stages judged on unflipped tokens.  One flip: layer 2 / token 7,
  where the reference's k-th and (k+1)-th router logits are 0.026 apart and
  the candidate's router error is 0.039.  Free-running: no flip, logits 0.068.
* float16, replay: router_logits <= 0.008, all stages <= 0.19 % relative;
  no flips.  On the H200 (torch 2.11) the same tests pass in float32,
  bfloat16 and float16.

The bounds below leave 3-10x room over those figures.  A routing flip is
accepted only where the reference's own top-k margin is within twice the
candidate's router-logit error at that layer (a near tie).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from moesnap.gguf import quants_torch
from moesnap.model.candidate import EXPERT_PATHS, CandidateModel, default_expert_path, grouped_mm_works
from moesnap.errors import UsageError
from moesnap.model.recorder import ArrayRecorder, NullRecorder
from moesnap.model.reference import run_reference
from moesnap.stages import FAMILY_STAGES, INTEGER_STAGES, POST_ROUTING_STAGES
from moesnap.model.synth import tiny_path
from moesnap.model.weights import GGUFModel

#: the stages of the family these tests run (Qwen3-MoE); the schema has other families' too
LAYER_STAGES = FAMILY_STAGES["qwen3moe"]

N_TOKENS = 32
FP32_ATOL = 1e-4          # max abs error, every float stage and the logits
# max abs error / max |reference| per stage, (replay, free-running up to the first flip)
LOOSE_REL = {torch.bfloat16: (0.06, 0.12), torch.float16: (0.01, 0.02)}
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
    logits, followed = CandidateModel(model, device=device, dtype=dtype, **kw).forward(tokens, rec)
    assert followed == ()     # no router replay: nothing followed
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


def golden_inputs(ref: ArrayRecorder, n_layer: int) -> dict[int, torch.Tensor]:
    """The reference's input of every layer (replay)."""
    inputs = {0: torch.from_numpy(ref.model["embed"])}
    inputs.update({i: torch.from_numpy(ref.layers["layer_out"][i - 1]) for i in range(1, n_layer)})
    return inputs


def routing_flips(ref: ArrayRecorder, cand: ArrayRecorder) -> np.ndarray:
    """``[L, T]``: where the candidate selected another expert set than the reference."""
    r, c = ref.stacked()["topk_ids"], cand.stacked()["topk_ids"]
    return (np.sort(r, -1) != np.sort(c, -1)).any(-1)


def assert_flips_at_ties(ref: ArrayRecorder, cand: ArrayRecorder) -> np.ndarray:
    """Every routing flip sits where the reference's top-k margin is within twice the
    candidate's router-logit error of that layer; returns the flips."""
    r, c = ref.stacked()["router_logits"], cand.stacked()["router_logits"]
    k = ref.stacked()["topk_ids"].shape[-1]
    srt = -np.sort(-r, axis=-1)
    margin = srt[..., k - 1] - srt[..., k]                                # [L, T]
    err = np.abs(r - c).max(axis=(1, 2))                                 # [L]
    flips = routing_flips(ref, cand)
    for layer, tok in np.argwhere(flips):
        assert margin[layer, tok] <= 2 * err[layer], \
            f"layer {layer} token {tok}: routing differs at margin {margin[layer, tok]:.3g} (router error {err[layer]:.3g})"
    return flips


def assert_loose(ref: ArrayRecorder, cand: ArrayRecorder, rel: float, *, replay: bool) -> None:
    """Float stages within ``rel`` x max |reference|, judged per layer: in replay mode every
    layer, post-routing stages only on unflipped tokens; free-running only up to the first flip."""
    assert_same_shapes(ref, cand)
    flips = assert_flips_at_ties(ref, cand)
    n_layer = flips.shape[0]
    first = int(np.argmax(flips.any(-1))) if flips.any() else n_layer
    for layer in range(n_layer if replay else min(first + 1, n_layer)):
        for s in FLOAT_LAYER_STAGES:
            g, c = ref.layers[s][layer], cand.layers[s][layer]
            if s in POST_ROUTING_STAGES:
                if not replay and layer == first:
                    continue
                g, c = g[~flips[layer]], c[~flips[layer]]
            err, scale = float(np.abs(g - c).max(initial=0)), float(np.abs(g).max(initial=0))
            assert err <= rel * scale, f"layer {layer} {s}: max abs error {err:.3g} > {rel} x {scale:.3g}"
    if not replay and not flips.any():
        for s in ("final_norm", "logits"):
            err, scale = np.abs(ref.model[s] - cand.model[s]).max(), np.abs(ref.model[s]).max()
            assert err <= rel * scale, f"{s}: max abs error {err:.3g} > {rel} x {scale:.3g}"
    assert np.isfinite(cand.model["logits"]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_agrees_loosely(model, tokens, ref, dtype):
    rel_replay, rel_free = LOOSE_REL[dtype]
    free, logits = run_candidate(model, tokens, dtype=dtype)
    assert logits.dtype == dtype
    assert_loose(ref, free, rel_free, replay=False)
    replay = ArrayRecorder()
    CandidateModel(model, dtype=dtype).forward(tokens, replay, layer_inputs=golden_inputs(ref, model.config.n_layer))
    assert_loose(ref, replay, rel_replay, replay=True)


def test_returned_logits_are_the_recorded_ones(model, tokens, cand32):
    logits = CandidateModel(model).forward(tokens).logits  # no recorder at all
    np.testing.assert_array_equal(logits.numpy(), cand32.model["logits"])


def test_recording_changes_nothing(model, tokens):
    cm = CandidateModel(model)
    a = cm.forward(tokens, NullRecorder())
    b = cm.forward(tokens, ArrayRecorder())
    assert torch.equal(a.logits, b.logits)


def test_tokens_as_tensor_or_array(model, tokens, cand32):
    for form in (torch.tensor(tokens), np.asarray(tokens, dtype=np.int32)):
        np.testing.assert_array_equal(CandidateModel(model).forward(form).logits.numpy(), cand32.model["logits"])


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


def test_grouped_mm_probe_on_cpu(model):
    # torch 2.13's CPU build has a working _grouped_mm; a build without it must say no
    has = hasattr(torch, "_grouped_mm")
    assert grouped_mm_works("cpu", torch.float32, 64, 256) == has
    assert default_expert_path("cpu", torch.float32, model.config) == ("grouped_mm" if has else "loop")
    assert CandidateModel(model).expert_path == ("grouped_mm" if has else "loop")


def test_without_grouped_mm_the_loop_is_chosen(model, monkeypatch):
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    assert not grouped_mm_works("cpu", torch.float32, 64, 256)
    assert CandidateModel(model).expert_path == "loop"
    monkeypatch.undo()                     # the probe is keyed by the function: the real one is found again
    assert grouped_mm_works("cpu", torch.float32, 64, 256) == hasattr(torch, "_grouped_mm")


def test_probes_are_decided_once_and_kept_by_the_model(model, monkeypatch):
    """No process-wide flag is flipped by a call: each model holds what its probes found."""
    from moesnap.model import candidate, kernels

    cm = CandidateModel(model)
    assert cm.gqa == candidate.sdpa_takes_enable_gqa()
    assert not any(name.startswith(("_GQA", "_GROUPED_MM_PROBES")) for m in (candidate, kernels) for name in vars(m))
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    assert CandidateModel(model).expert_path == "loop" and cm.expert_path in EXPERT_PATHS


def test_unknown_expert_path_and_dtype(model):
    with pytest.raises(UsageError, match="expert_path='fast'"):
        CandidateModel(model, expert_path="fast")
    with pytest.raises(UsageError, match="int32"):
        CandidateModel(model, dtype=torch.int32)


# --------------------------------------------------------------------------- replay


def test_replay_with_golden_inputs(model, tokens, ref):
    """Each layer fed the reference's input of that layer introduces only float noise."""
    L = model.config.n_layer
    golden_in = golden_inputs(ref, L)
    cm = CandidateModel(model)
    rec = ArrayRecorder()
    cm.forward(tokens, rec, layer_inputs=golden_in)
    for i in range(L):
        err = np.abs(rec.layers["layer_out"][i] - ref.layers["layer_out"][i]).max()
        assert err <= 2e-5, (i, err)
        # the single-layer entry point gives exactly the same layer
        one = ArrayRecorder()
        out, followed = cm.forward_layer(i, golden_in[i], one)
        np.testing.assert_array_equal(out.numpy(), rec.layers["layer_out"][i])
        assert followed == ()
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
    with pytest.raises(UsageError, match=r"layer 1 input has shape \[2, 3\], expected \[T, 64\]"):
        CandidateModel(model).forward_layer(1, torch.zeros(2, 3))


def test_forward_rejects_bad_layer_inputs(model, tokens):
    H = model.config.hidden
    with pytest.raises(UsageError, match="layer=7 is out of range"):
        CandidateModel(model).forward(tokens, layer_inputs={7: torch.zeros(len(tokens), H)})
    with pytest.raises(UsageError, match=r"layer_inputs\[1\] has shape \[3, 64\]"):
        CandidateModel(model).forward(tokens, layer_inputs={1: torch.zeros(3, H)})


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_float32_agrees_with_reference(model, tokens, ref):
    cand, logits = run_candidate(model, tokens, device="cuda")
    assert logits.device.type == "cuda"
    assert_agrees(ref, cand, atol=FP32_ATOL)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_agrees_loosely(model, tokens, ref, dtype):
    rel_replay, rel_free = LOOSE_REL[dtype]
    free, _ = run_candidate(model, tokens, device="cuda", dtype=dtype)
    assert_loose(ref, free, rel_free, replay=False)
    replay = ArrayRecorder()
    CandidateModel(model, device="cuda", dtype=dtype).forward(
        tokens, replay, layer_inputs=golden_inputs(ref, model.config.n_layer))
    assert_loose(ref, replay, rel_replay, replay=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_expert_paths_agree(model, tokens, dtype):
    if not grouped_mm_works("cuda", dtype, model.config.hidden, model.config.expert_ff):
        pytest.skip(f"torch._grouped_mm does not work on this GPU in {dtype}")
    grouped, _ = run_candidate(model, tokens, device="cuda", dtype=dtype, expert_path="grouped_mm")
    loop, _ = run_candidate(model, tokens, device="cuda", dtype=dtype, expert_path="loop")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    np.testing.assert_allclose(grouped.stacked()["expert_out"], loop.stacked()["expert_out"], rtol=0, atol=tol)


@pytest.mark.gpu
def test_cuda_uses_grouped_mm_for_bfloat16(model):
    assert CandidateModel(model, device="cuda", dtype=torch.bfloat16).expert_path == "grouped_mm"


@pytest.mark.gpu
def test_cuda_upload_keeps_bytes_on_the_device(model, tokens):
    cm = CandidateModel(model, device="cuda")
    cm.upload()
    n_tensors = 3 + 12 * model.config.n_layer
    assert len(cm._bytes) == n_tensors
    assert all(t.device.type == "cuda" and t.dtype == torch.uint8 for t in cm._bytes.values())
    cm.forward(tokens[:4])
    assert len(cm._bytes) == n_tensors  # nothing uploaded twice


@pytest.mark.parametrize("tie_tol, follows", [(1e9, True), (0.0, False)])
def test_router_replay_follows_the_golden_only_within_the_tie_width(model, tokens, ref, tie_tol, follows):
    from moesnap.model.candidate import RouterReplay
    from moesnap.judge.routing import tie_gap
    from moesnap.model.inject import RouteFlip

    golden = ref.stacked()
    guide = RouterReplay(golden["topk_ids"], golden["router_logits"], tie_tol, tie_gap)
    cand = CandidateModel(model)
    faults = cand.faults([RouteFlip(layer=1, token=3)])   # token 3 picks its (k+1)-th expert
    rec = ArrayRecorder()
    _, followed = cand.forward(tokens, rec, router_replay=guide, faults=faults)
    got = rec.stacked()["topk_ids"][1][3]
    if follows:   # continued with the golden's experts; its own choice is listed
        assert set(got.tolist()) == set(golden["topk_ids"][1][3].tolist())
        assert [(f.layer, f.token) for f in followed] == [(1, 3)]
        assert set(followed[0].own) != set(got.tolist())
        assert faults.unfired() == [RouteFlip(layer=1, token=3)]
    else:         # a flip beyond the tie width is kept: it is a divergence to report
        assert set(got.tolist()) != set(golden["topk_ids"][1][3].tolist())
        assert followed == () and faults.unfired() == []
    # the same model, asked again without replay or faults, is the plain forward: nothing was left set
    again = ArrayRecorder()
    assert cand.forward(tokens, again).followed == ()
    np.testing.assert_array_equal(again.stacked()["topk_ids"], golden["topk_ids"])
