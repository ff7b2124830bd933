"""The candidate forward of Qwen2-MoE, Mixtral and OLMoE against the reference, their routing (k weights
renormalised or not) and router replay, their KV cache, and the family faults (``shared_gate_off``,
``renorm_flip``, ``rope_flip``, ``qk_norm_flip``, ``shared_off``) and their refusals.  All on the CPU, in
seconds.

The presets: ``qwen2-moe-tiny`` (q/k/v biases, 8 experts top-4 not renormalised, a gated shared expert of
twice the experts' width), ``mixtral-tiny`` (GQA 4/2, RoPE on the adjacent pairs of the file's permuted
rows, 8 experts top-2 renormalised) and ``olmoe-tiny`` (q/k norm over the whole projection, 16 experts
top-4 not renormalised).  Measured (torch 2.13 CPU, 20 tokens), the candidate in float32 against the
reference: every float stage within 1e-6 of its largest magnitude (Qwen2-MoE's ``topk_weights`` 9.5e-7 the
largest), the same experts everywhere.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from family_files import assert_router_replay, assert_static_decode_is_the_sessions, close

from moesnap.errors import UsageError
from moesnap.model.candidate import CandidateModel
from moesnap.model.inject import PartOff, check_injections, parse_inject
from moesnap.model.recorder import ArrayRecorder
from moesnap.model.reference import run_reference
from moesnap.model.synth import make_model, preset, tiny_path
from moesnap.model.weights import GGUFModel
from moesnap.stages import FAMILY_STAGES, INTEGER_STAGES

N_TOKENS = 20
FP32_REL = 1e-5          # max abs error / max |reference|, every float stage and the logits
PRESETS = ("qwen2-moe-tiny", "mixtral-tiny", "olmoe-tiny")


@pytest.fixture(scope="module", params=PRESETS)
def model(request, tmp_path_factory) -> GGUFModel:
    return GGUFModel.open(make_model(tmp_path_factory.mktemp("ll") / f"{request.param}.gguf", preset(request.param)))


@pytest.fixture(scope="module")
def tokens(model) -> list[int]:
    return np.random.default_rng(0).integers(0, model.config.vocab_size, N_TOKENS).tolist()


@pytest.fixture(scope="module")
def ref(model, tokens) -> ArrayRecorder:
    rec = ArrayRecorder()
    run_reference(model, tokens, recorder=rec)
    return rec


@pytest.fixture(scope="module")
def clean(model, tokens) -> ArrayRecorder:
    return run(model, tokens)


def run(model, tokens, *, dtype=torch.float32, expert_path=None, **kw) -> ArrayRecorder:
    rec = ArrayRecorder()
    CandidateModel(model, dtype=dtype, expert_path=expert_path).forward(tokens, rec, **kw)
    return rec


@pytest.mark.parametrize("expert_path", ["grouped_mm", "loop"])
def test_float32_agrees_with_reference_in_every_stage(model, tokens, ref, expert_path):
    cand = run(model, tokens, expert_path=expert_path)
    r, c = ref.stacked(), cand.stacked()
    arch = model.config.arch
    assert set(c) == set(r) == set(FAMILY_STAGES[arch])
    assert ("shared_gate" in c) == (arch == "qwen2moe") and ("q_norm" in c) == (arch == "olmoe")
    for s in r:
        assert c[s].shape == r[s].shape and c[s].dtype == r[s].dtype, s
        if s in INTEGER_STAGES:
            np.testing.assert_array_equal(c[s], r[s])       # the same experts, in the same order
        else:
            assert close(c[s], r[s], FP32_REL), s
    for s in ("final_norm", "logits"):
        assert close(cand.model[s], ref.model[s], FP32_REL), s


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_finite_near_the_reference(model, tokens, ref, dtype):
    """Without router replay a near tie may pick other experts; the stages before any routing stay within
    the dtype's rounding (attention: 2e-2 of the largest magnitude, measured ~1.5e-2 in bfloat16)."""
    c, r = run(model, tokens, dtype=dtype).stacked(), ref.stacked()
    for s in c:
        assert np.isfinite(c[s]).all(), s
    for s in ("q", "k", "v", "q_rope", "k_rope", "attn", "attn_out", "router_logits"):
        assert close(c[s][0], r[s][0], 3e-2), s


def test_weights_follow_the_familys_renormalisation(model, tokens, clean):
    """The k weights are the softmax probabilities of the k experts, renormalised for Mixtral only."""
    c = clean.stacked()
    probs = torch.softmax(torch.from_numpy(c["router_logits"]).double(), -1)                 # [L, T, E]
    w = probs.gather(-1, torch.from_numpy(c["topk_ids"].astype(np.int64))).numpy()           # [L, T, k]
    if model.config.gating == "softmax_topk_renorm":
        w = w / w.sum(-1, keepdims=True)
    else:
        assert w.sum(-1).min() < 0.95            # kept as they are: the k do not sum to 1
    np.testing.assert_allclose(c["topk_weights"], w, rtol=1e-5, atol=1e-7)


def test_shared_expert_is_gated_by_the_sigmoid_of_its_logit(model, clean):
    if not model.config.shared_expert_gate:
        pytest.skip("only Qwen2-MoE has a gated shared expert")
    c = clean.stacked()
    routed = (c["expert_out"].astype(np.float64) * c["topk_weights"][..., None]).sum(2)       # [L, T, H]
    gate = 1 / (1 + np.exp(-c["shared_gate"].astype(np.float64)))                            # [L, T, 1]
    np.testing.assert_allclose(c["moe_out"], routed + gate * c["shared_expert_out"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tie_tol, follows", [(1e9, True), (0.0, False)])
def test_router_replay_weighs_the_goldens_experts_as_the_family_does(model, tokens, ref, tie_tol, follows):
    """A flipped token follows the golden's experts where the gap on the golden's logits is within the tie
    width, weighted by its own probabilities (renormalised only where the family renormalises)."""
    assert_router_replay(model, tokens, ref.stacked(), 1, tie_tol, follows, FP32_REL)


def test_stage_local_replay_runs_the_goldens_experts(model, tokens, ref):
    """forward_layer with forced stages: the golden's experts run, every recorded stage within float32 noise."""
    golden = ref.stacked()
    cand = CandidateModel(model)
    force = {s: golden[s][1] for s in golden}
    rec = ArrayRecorder()
    cand.forward_layer(1, golden["layer_out"][0], rec, force=force)
    got = rec.stacked()
    for s in got:
        if s not in INTEGER_STAGES:
            assert close(got[s][1], golden[s][1], FP32_REL), s
    np.testing.assert_array_equal(got["topk_ids"][1], golden["topk_ids"][1])


def test_decode_through_a_paged_cache_gives_the_forward_rows(model, tokens, ref):
    from moesnap.model.serve import Session

    s = Session(CandidateModel(model), n_seqs=1, capacity=N_TOKENS, paged=True)
    rows = s.prefill(tokens[:12])
    rows += [s.decode(t)[0] for t in tokens[12:]]
    for st in ("k_rope", "attn", "moe_out", "layer_out"):
        got = np.concatenate([r.case.layers[st] for r in rows], axis=1)       # [L, T, ...]
        assert close(got, ref.stacked()[st], FP32_REL), st


def test_decode_steps_on_static_buffers_equal_the_session(model, tokens):
    assert_static_decode_is_the_sessions(model, tokens, 16)


# --------------------------------------------------------------------------- planted faults of the families


def family_faults(cfg) -> list[str]:
    """The family faults that can fire in ``cfg`` (each at layer 1)."""
    kinds = ["renorm_flip", "rope_flip"] + ["qk_norm_flip"] * cfg.qk_norm
    kinds += ["shared_gate_off", "shared_off"] * cfg.shared_expert_gate
    return [f"{k}:layer=1" for k in kinds]


def test_family_faults_change_their_stage_first(model, tokens, clean):
    """Each fault leaves every stage before its target (layer 0's, and its own layer's before the target)
    as it was and changes the target."""
    cand = CandidateModel(model)
    order = FAMILY_STAGES[model.config.arch]
    for spec in family_faults(model.config):
        fault = parse_inject(spec, model.config)
        planted = cand.faults([fault])
        rec = ArrayRecorder()
        cand.forward(tokens, rec, faults=planted)
        got, i, target = rec.layers, fault.layer, fault.target_stage
        assert planted.fired == {fault}
        for s in order[:order.index(target)]:
            assert np.array_equal(got[s][i], clean.layers[s][i]), (spec, s)
        assert not np.allclose(got[target][i], clean.layers[target][i], atol=1e-3), spec
        assert np.array_equal(got["layer_out"][0], clean.layers["layer_out"][0]), spec


def test_family_faults_are_refused_where_they_cannot_fire(model):
    cfg = model.config
    arch = f"\\({cfg.arch}\\)"
    if not cfg.shared_expert_gate:
        for spec in ("shared_gate_off:layer=1", "shared_off:layer=1"):
            with pytest.raises(UsageError, match=rf"^--inject '{spec}': the model {arch} has no shared"):
                parse_inject(spec, cfg)
    if not cfg.qk_norm:
        with pytest.raises(UsageError, match=rf"the model {arch} has no q/k norm"):
            parse_inject("qk_norm_flip:layer=0", cfg)
    every = dataclasses.replace(cfg, n_expert_used=cfg.n_expert)
    with pytest.raises(UsageError, match=f"routes every token to all {cfg.n_expert} experts"):
        parse_inject("renorm_flip:layer=1", every)
    for spec in ("bias_off:layer=1", "scale_off:layer=1", "sink_off:layer=1"):
        with pytest.raises(UsageError, match=rf"the model {arch} has no"):
            parse_inject(spec, cfg)
    with pytest.raises(UsageError, match="cannot fire.*every prompt is one token"):
        check_injections([parse_inject("rope_flip:layer=0", cfg)], model, [1, 1])
    check_injections([parse_inject("rope_flip:layer=0", cfg)], model, [1, 2])           # accepted where it fires


def test_the_new_faults_are_refused_in_other_families_where_they_cannot_fire(tmp_path):
    tiny = GGUFModel.open(tiny_path()).config               # Qwen3-MoE: per-head q/k norm, renormalised
    for spec in ("shared_gate_off:layer=1", "shared_off:layer=1"):
        with pytest.raises(UsageError, match=r"\(qwen3moe\) has no shared"):
            parse_inject(spec, tiny)
    gpt = make_model(tmp_path / "g.gguf", preset("gpt-oss-tiny"))
    with pytest.raises(UsageError, match=r"\(gpt-oss\) has top-k weights that are a softmax over the k chosen"):
        parse_inject("renorm_flip:layer=1", GGUFModel.open(gpt).config)
    ds = GGUFModel.open(make_model(tmp_path / "d.gguf", preset("deepseek-v2-tiny"))).config
    with pytest.raises(UsageError, match="layer 0 is dense"):
        parse_inject("renorm_flip:layer=0", ds)
    parse_inject("rope_flip:layer=0", ds)                  # a dense layer has attention: accepted


@pytest.mark.parametrize("preset_name, spec, stage", [
    ("tiny", "qk_norm_flip:layer=1", "q_norm"),             # Qwen3-MoE: over the whole projection instead
    ("tiny", "renorm_flip:layer=1", "topk_weights"),        # Qwen3-MoE: kept instead of renormalised
    ("deepseek-v3-tiny", "renorm_flip:layer=1", "topk_weights"),
    ("deepseek-v2-tiny", "rope_flip:layer=0", "q_rope"),    # NeoX halves of the rope part instead of pairs
])
def test_the_new_faults_act_in_the_other_families(tmp_path, preset_name, spec, stage):
    path = tiny_path() if preset_name == "tiny" else make_model(tmp_path / "m.gguf", preset(preset_name))
    model = GGUFModel.open(path)
    toks = list(range(3, 3 + 12))
    cand = CandidateModel(model)
    fault = parse_inject(spec, model.config)
    assert fault.target_stage == stage
    clean, rec = ArrayRecorder(), ArrayRecorder()
    cand.forward(toks, clean)
    planted = cand.faults([fault])
    cand.forward(toks, rec, faults=planted)
    i = fault.layer
    assert planted.fired == {fault}
    order = [s for s in FAMILY_STAGES[model.config.arch] if s in clean.layers and i in clean.layers[s]]
    for s in order[:order.index(stage)]:
        assert np.array_equal(rec.layers[s][i], clean.layers[s][i]), s
    assert not np.allclose(rec.layers[stage][i], clean.layers[stage][i], atol=1e-4)


def test_fault_specs_round_trip(model):
    for spec in family_faults(model.config):
        inj = parse_inject(spec, model.config)
        assert inj.spec == spec and parse_inject(inj.spec, model.config) == inj and inj.target_layer == inj.layer
        assert inj == PartOff(layer=1, part=spec.split(":")[0])


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("expert_path", ["grouped_mm", "loop"])
def test_cuda_float32_agrees_with_reference(model, tokens, ref, expert_path):
    rec = ArrayRecorder()
    logits, _ = CandidateModel(model, device="cuda", expert_path=expert_path).forward(tokens, rec)
    assert logits.device.type == "cuda"
    r, c = ref.stacked(), rec.stacked()
    assert set(c) == set(r) == set(FAMILY_STAGES[model.config.arch])
    np.testing.assert_array_equal(c["topk_ids"], r["topk_ids"])
    for s in r:
        if s not in INTEGER_STAGES:
            assert close(c[s], r[s], FP32_REL), s


@pytest.mark.gpu
def test_cuda_graph_decode_is_the_static_decode(model, tokens):
    """The decode steps captured in a CUDA graph (shared expert and its gate, pairs RoPE, whole-projection
    q/k norm inside) give the same bits as the same static step run eagerly, in bfloat16."""
    from moesnap.model.serve import GraphDecoder, Session

    out = {}
    for graph in (False, True):
        s = Session(CandidateModel(model, device="cuda", dtype=torch.bfloat16), capacity=len(tokens) + 8)
        s.prefill(tokens)
        dec = GraphDecoder(s, graph=graph)
        out[graph] = [dec.decode(t)[0] for t in (3, 9, 27, 81, 5, 6)]
    for a, b in zip(out[False], out[True]):
        for st in a.case.layers:
            np.testing.assert_array_equal(a.case.layers[st], b.case.layers[st], err_msg=st)


def test_the_draft_proposes_the_references_tokens_and_keeps_what_it_promises(model, tokens):
    """Decode goldens of these families are proposed by the candidate (model/draft.py), whose kept weights
    (the shared expert and its gate, the q/k/v biases) are what kept_bytes() counts."""
    from moesnap.model.draft import Drafter, kept_bytes, propose

    d = Drafter(model)
    got = propose(d, tokens[:8], 4)
    ids = list(tokens[:8])
    for _ in range(4):
        ids.append(int(run_reference(model, ids)[-1].argmax()))
    assert got == ids[8:]
    assert sum(d.kept.values()) == kept_bytes(model)
