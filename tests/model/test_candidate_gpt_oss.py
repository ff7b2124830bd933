"""The candidate forward of gpt-oss against the reference, and ``moesnap check`` of a gpt-oss golden.

The tiny gpt-oss model (``--preset gpt-oss-tiny``: 4 layers, layers 0 and 2 slide over 4 positions,
attention sinks, biases everywhere, YaRN, MXFP4 experts decoded on the device).  Measured on the CPU
(torch 2.13, 20 tokens), the candidate in float32 against the reference: every stage within 2.2e-6 of
its largest magnitude (attn_resid, expert_out, layer_out: ~8e-5 of ~45), the same experts everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moesnap
from moesnap.errors import UsageError
from moesnap.judge.routing import tie_gap
from moesnap.model.candidate import CandidateModel, RouterReplay
from moesnap.model.inject import MxfpScale, SinkOff, WindowOff, parse_inject
from moesnap.model.recorder import ArrayRecorder
from moesnap.model.reference import run_reference
from moesnap.model.synth import make_model, preset
from moesnap.model.weights import GGUFModel
from moesnap.stages import FAMILY_STAGES, INTEGER_STAGES

N_TOKENS = 20
FP32_REL = 2e-5           # max abs error / max |reference|, every float stage and the logits
STAGES = FAMILY_STAGES["gpt-oss"]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("gptoss") / "gpt-oss-tiny.gguf", preset("gpt-oss-tiny"))


@pytest.fixture(scope="module")
def model(path) -> GGUFModel:
    return GGUFModel.open(path)


@pytest.fixture(scope="module")
def tokens(model) -> list[int]:
    return np.random.default_rng(0).integers(0, model.config.vocab_size, N_TOKENS).tolist()


@pytest.fixture(scope="module")
def ref(model, tokens) -> ArrayRecorder:
    rec = ArrayRecorder()
    run_reference(model, tokens, recorder=rec)
    return rec


def run(model, tokens, **kw) -> ArrayRecorder:
    rec = ArrayRecorder()
    CandidateModel(model, **{k: v for k, v in kw.items() if k in ("dtype", "expert_path")}).forward(
        tokens, rec, **{k: v for k, v in kw.items() if k not in ("dtype", "expert_path")})
    return rec


@pytest.fixture(scope="module")
def cand32(model, tokens) -> ArrayRecorder:
    return run(model, tokens)


def test_the_tiny_model_is_gpt_oss(model):
    cfg = model.config
    assert cfg.arch == "gpt-oss" and cfg.attn_sinks and cfg.attn_bias and cfg.expert_bias and cfg.router_bias
    assert [cfg.slides(i) for i in range(cfg.n_layer)] == [True, False, True, False] and cfg.sliding_window < N_TOKENS
    assert cfg.gating == "topk_softmax" and cfg.rope_scaling == "yarn"
    assert model.tensor_type("blk.0.ffn_down_exps").name == "MXFP4"


@pytest.mark.parametrize("expert_path", ["grouped_mm", "loop"])
def test_float32_agrees_with_reference_in_every_stage(model, tokens, ref, cand32, expert_path):
    cand = cand32 if expert_path == "grouped_mm" else run(model, tokens, expert_path="loop")
    r, c = ref.stacked(), cand.stacked()
    assert set(c) == set(r) == set(STAGES)                  # no q_norm / k_norm: absent, never faked
    for s in STAGES:
        assert c[s].shape == r[s].shape and c[s].dtype == r[s].dtype, s
        if s in INTEGER_STAGES:
            np.testing.assert_array_equal(c[s], r[s])        # the same experts, in the same order
            continue
        err, scale = np.abs(c[s] - r[s]).max(), np.abs(r[s]).max()
        assert err <= FP32_REL * scale, f"{s}: max abs error {err:.3g} > {FP32_REL} x {scale:.3g}"
    for s in ("final_norm", "logits"):
        assert np.abs(cand.model[s] - ref.model[s]).max() <= FP32_REL * np.abs(ref.model[s]).max(), s
    np.testing.assert_array_equal(cand.model["embed"], ref.model["embed"])


def test_weights_are_a_softmax_over_the_chosen_logits(cand32):
    c = cand32.stacked()
    chosen = np.take_along_axis(c["router_logits"], c["topk_ids"].astype(np.int64), axis=-1)   # [L, T, k]
    want = torch.softmax(torch.from_numpy(chosen), dim=-1).numpy()
    np.testing.assert_allclose(c["topk_weights"], want, rtol=0, atol=1e-6)
    assert (np.diff(chosen, axis=-1) <= 0).all()                # the k largest logits, descending
    rest = np.sort(c["router_logits"], axis=-1)[..., -chosen.shape[-1] - 1]
    assert (chosen[..., -1] >= rest).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_replay_stays_close(model, tokens, ref, dtype):
    """Each layer fed the reference's input: every float stage within 6 % of its magnitude (bfloat16)."""
    inputs = {0: torch.from_numpy(ref.model["embed"])}
    inputs.update({i: torch.from_numpy(ref.layers["layer_out"][i - 1]) for i in range(1, model.config.n_layer)})
    rec = ArrayRecorder()
    logits, _ = CandidateModel(model, dtype=dtype).forward(tokens, rec, layer_inputs=inputs)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    r, c = ref.stacked(), rec.stacked()
    same = (r["topk_ids"] == c["topk_ids"]).all(-1)     # [L, T] tokens that kept their experts, in the same slots
    assert same.mean() >= 0.75, same.mean()
    for s in STAGES:
        if s in INTEGER_STAGES:
            continue
        for i in range(model.config.n_layer):
            g, x = r[s][i], c[s][i]
            if s in ("topk_weights", "expert_out", "moe_out", "layer_out"):
                g, x = g[same[i]], x[same[i]]
            assert np.abs(g - x).max(initial=0) <= 0.06 * np.abs(g).max(initial=0), (s, i)


# --------------------------------------------------------------------------- what each family part does


def test_sinks_and_window_act_only_where_they_are(model, tokens, cand32):
    """Ignoring layer 1's sinks changes nothing before its ``attn``; moving layer 2's window changes nothing
    before layer 2's ``attn``: the forward applies them where the config says, and only there."""
    cand = CandidateModel(model)
    for fault, layer in ((SinkOff(layer=1), 1), (WindowOff(layer=2, by=1), 2)):
        faults = cand.faults([fault])
        rec = ArrayRecorder()
        cand.forward(tokens, rec, faults=faults)
        assert faults.fired == {fault}
        for s in STAGES:
            before = np.array_equal(rec.layers[s][layer - 1], cand32.layers[s][layer - 1])
            assert before, (fault, s)
        assert np.array_equal(rec.layers["q_rope"][layer], cand32.layers["q_rope"][layer])
        assert not np.allclose(rec.layers["attn"][layer], cand32.layers["attn"][layer], atol=1e-3)


def test_mxfp4_scale_fault_doubles_the_expert_weights(model, tokens, cand32):
    cand = CandidateModel(model)
    faults = cand.faults([MxfpScale(layer=1, tensor="ffn_gate_exps", shift=1)])
    rec = ArrayRecorder()
    cand.forward(tokens, rec, faults=faults)
    assert np.array_equal(rec.layers["moe_out"][0], cand32.layers["moe_out"][0])
    assert np.array_equal(rec.layers["topk_ids"][1], cand32.layers["topk_ids"][1])
    assert not np.allclose(rec.layers["expert_out"][1], cand32.layers["expert_out"][1], atol=1e-2)


@pytest.mark.parametrize("tie_tol, follows", [(1e9, True), (0.0, False)])
def test_router_replay_on_logits(model, tokens, ref, tie_tol, follows):
    """gpt-oss picks by its logits; the near-tie gap (on the logits, as for Qwen3-MoE) decides whether a
    flipped token continues with the golden's experts, re-weighted by a softmax over their logits."""
    from moesnap.model.inject import RouteFlip

    golden = ref.stacked()
    guide = RouterReplay(golden["topk_ids"], golden["router_logits"], tie_tol, tie_gap)
    cand = CandidateModel(model)
    faults = cand.faults([RouteFlip(layer=1, token=3)])
    rec = ArrayRecorder()
    _, followed = cand.forward(tokens, rec, router_replay=guide, faults=faults)
    got, g_ids = rec.stacked()["topk_ids"][1][3], golden["topk_ids"][1][3]
    if follows:
        assert set(got.tolist()) == set(g_ids.tolist()) and [(f.layer, f.token) for f in followed] == [(1, 3)]
        w = rec.stacked()["topk_weights"][1][3]
        want = torch.softmax(torch.from_numpy(rec.stacked()["router_logits"][1][3][got.astype(np.int64)]), -1)
        np.testing.assert_allclose(w, want.numpy(), atol=1e-6)
    else:
        assert set(got.tolist()) != set(g_ids.tolist()) and followed == ()


def test_family_faults_are_refused_where_they_cannot_fire(model, path):
    cfg = model.config
    with pytest.raises(UsageError, match="layer 1 attends every position.*sliding layers are 0, 2"):
        parse_inject("window:layer=1", cfg)
    with pytest.raises(UsageError, match="window of 0 positions"):
        parse_inject(f"window:layer=0,by=-{cfg.sliding_window}", cfg)
    with pytest.raises(UsageError, match="not MXFP4"):
        CandidateModel(model).faults([parse_inject("mxfp4_scale:layer=0,tensor=attn_q", cfg)])
    from moesnap.model.inject import check_injections
    with pytest.raises(UsageError, match="cannot fire.*longest prompt has 3 tokens"):
        check_injections([WindowOff(layer=0)], model, [3, 2])
    check_injections([WindowOff(layer=0)], model, [cfg.sliding_window + 1])     # long enough: accepted
    tiny = GGUFModel.open(moesnap.model.synth.tiny_path())
    with pytest.raises(UsageError, match=r"\(qwen3moe\) has no attention sinks"):
        parse_inject("sink_off:layer=1", tiny.config)
    with pytest.raises(UsageError, match="no sliding-window layers"):
        parse_inject("window:layer=1", tiny.config)
    with pytest.raises(UsageError, match="Q4_K, not MXFP4"):
        CandidateModel(tiny).faults([parse_inject("mxfp4_scale:layer=1,tensor=ffn_down_exps", tiny.config)])


def test_fault_specs_round_trip(model):
    for spec in ("sink_off:layer=1", "window:layer=2,by=-1", "mxfp4_scale:layer=3,tensor=ffn_up_exps,shift=-1"):
        inj = parse_inject(spec, model.config)
        assert inj.spec == spec and parse_inject(inj.spec, model.config) == inj
    assert parse_inject("window:layer=0", model.config) == WindowOff(layer=0, by=1)
    assert parse_inject("mxfp4_scale:layer=0,tensor=ffn_down_exps", model.config).shift == 1


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("expert_path", ["grouped_mm", "loop"])
def test_cuda_float32_agrees_with_reference(model, tokens, ref, expert_path):
    rec = ArrayRecorder()
    logits, _ = CandidateModel(model, device="cuda", expert_path=expert_path).forward(tokens, rec)
    assert logits.device.type == "cuda"
    r, c = ref.stacked(), rec.stacked()
    assert set(c) == set(r) == set(STAGES)
    np.testing.assert_array_equal(c["topk_ids"], r["topk_ids"])
    for s in STAGES:
        if s not in INTEGER_STAGES:
            assert np.abs(c[s] - r[s]).max() <= FP32_REL * np.abs(r[s]).max(), s


@pytest.mark.gpu
def test_cuda_graph_decode_is_the_static_decode(model, tokens):
    """The decode steps captured in a CUDA graph (sinks, window, biases, float32 epilogue inside) give the
    same bits as the same static step run eagerly, bfloat16, past the sliding window."""
    from moesnap.model.serve import GraphDecoder, Session

    out = {}
    for graph in (False, True):
        s = Session(CandidateModel(model, device="cuda", dtype=torch.bfloat16), capacity=len(tokens) + 8)
        s.prefill(tokens)
        dec = GraphDecoder(s, graph=graph)
        out[graph] = [dec.decode(t)[0] for t in (3, 9, 27, 81, 5, 6)]
    for a, b in zip(out[False], out[True]):
        assert torch.equal(a.logits, b.logits)
        for stage, arr in a.case.layers.items():
            np.testing.assert_array_equal(arr, b.case.layers[stage], err_msg=stage)


def test_static_decode_on_the_cpu_agrees_with_the_session(model, tokens):
    """The static-buffer decode (what a CUDA graph captures; eager here) against the session's own decode
    steps, float32: the same experts and the same stages up to summation order over the padded keys."""
    from moesnap.model.serve import GraphDecoder, Session

    runs = []
    for static in (False, True):
        s = Session(CandidateModel(model), capacity=len(tokens) + 8)
        s.prefill(tokens)
        dec = GraphDecoder(s, graph=False) if static else s
        runs.append([dec.decode(t)[0] for t in (3, 9, 27, 81, 5, 6)])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a.case.layers["topk_ids"], b.case.layers["topk_ids"])
        for stage in ("attn", "expert_out", "layer_out"):
            x, y = a.case.layers[stage], b.case.layers[stage]
            assert np.abs(x - y).max() <= FP32_REL * np.abs(x).max(), stage
