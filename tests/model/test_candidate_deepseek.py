"""The candidate forward of DeepSeek-V2/V3 (model/candidate_mla.py) against the reference, its routing and
router replay on ``router_select``, its KV cache, and the family's planted faults (``bias_off``,
``shared_off``, ``scale_off``) and their refusals.  All on the CPU, in seconds.

The presets: ``deepseek-v2-tiny`` (no q LoRA, softmax routing limited to 1 of 2 groups, 2 shared experts,
routed scale 1.5, DeepSeek's YaRN) and ``deepseek-v3-tiny`` (q LoRA, sigmoid + correction bias, 2 of 4
groups, renormalised x 2.5, 1 shared expert); layer 0 of each is dense.  Measured (torch 2.13 CPU, 20
tokens), the candidate in float32 against the reference: every float stage within 3e-6 of its largest
magnitude (router_select of V2 the largest), the same experts everywhere.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from family_files import assert_router_replay, assert_static_decode_is_the_sessions, close

from moesnap.errors import UsageError
from moesnap.model.candidate import CandidateModel
from moesnap.model.inject import BiasOff, ScaleOff, SharedOff, check_injections, parse_inject
from moesnap.model.kvcache import KVCache
from moesnap.model.recorder import ArrayRecorder
from moesnap.model.reference import run_reference
from moesnap.model.synth import make_model, preset, tiny_path
from moesnap.model.weights import GGUFModel
from moesnap.stages import FAMILY_STAGES, INTEGER_STAGES

N_TOKENS = 20
FP32_REL = 2e-5          # max abs error / max |reference|, every float stage and the logits
PRESETS = ("deepseek-v2-tiny", "deepseek-v3-tiny")


@pytest.fixture(scope="module", params=PRESETS)
def model(request, tmp_path_factory) -> GGUFModel:
    return GGUFModel.open(make_model(tmp_path_factory.mktemp("ds") / f"{request.param}.gguf", preset(request.param)))


@pytest.fixture(scope="module")
def tokens(model) -> list[int]:
    return np.random.default_rng(0).integers(0, model.config.vocab_size, N_TOKENS).tolist()


@pytest.fixture(scope="module")
def ref(model, tokens) -> ArrayRecorder:
    rec = ArrayRecorder()
    run_reference(model, tokens, recorder=rec)
    return rec


def run(model, tokens, *, dtype=torch.float32, expert_path=None, **kw) -> ArrayRecorder:
    rec = ArrayRecorder()
    CandidateModel(model, dtype=dtype, expert_path=expert_path).forward(tokens, rec, **kw)
    return rec


@pytest.mark.parametrize("expert_path", ["grouped_mm", "loop"])
def test_float32_agrees_with_reference_in_every_stage(model, tokens, ref, expert_path):
    cand = run(model, tokens, expert_path=expert_path)
    r, c = ref.stacked(), cand.stacked()
    assert set(c) == set(r) <= set(FAMILY_STAGES["deepseek2"])
    assert ("q_latent" in c) == bool(model.config.q_lora_rank)       # V2: no q LoRA, no such stage
    for s in r:
        assert c[s].shape == r[s].shape and c[s].dtype == r[s].dtype, s
        if s in INTEGER_STAGES:
            np.testing.assert_array_equal(c[s], r[s])       # the same experts, in the same order
        else:
            assert close(c[s], r[s], FP32_REL), s
    assert sorted(cand.layers["dense_ffn_out"]) == [0] and sorted(cand.layers["shared_expert_out"]) == [1, 2]
    for s in ("final_norm", "logits"):
        assert close(cand.model[s], ref.model[s], FP32_REL), s


def test_kv_b_whole_runs_as_split(tmp_path):
    """A file with one attn_kv_b (older converters) computes as the reference reads it."""
    m = GGUFModel.open(make_model(tmp_path / "whole.gguf", preset("deepseek-v3-tiny").with_(kv_b_split=False)))
    assert not m.config.kv_b_split
    toks = list(range(3, 3 + N_TOKENS))
    r, c = ArrayRecorder(), run(m, toks)
    run_reference(m, toks, recorder=r)
    for s in ("k", "v", "attn", "logits"):
        got, want = (c.stacked()[s], r.stacked()[s]) if s != "logits" else (c.model[s], r.model[s])
        assert close(got, want, FP32_REL), s


def test_weights_are_the_unbiased_scores_renormalised_and_scaled(model, tokens, ref):
    cfg = model.config
    c = run(model, tokens).stacked()
    logits = torch.from_numpy(c["router_logits"][1:])                    # [2, T, E] the MoE layers
    scores = torch.sigmoid(logits) if cfg.gating == "sigmoid_grouped" else torch.softmax(logits, -1)
    w = scores.gather(-1, torch.from_numpy(c["topk_ids"][1:].astype(np.int64)))
    if cfg.topk_norm:
        w = w / w.sum(-1, keepdim=True)
    np.testing.assert_allclose(c["topk_weights"][1:], (w * cfg.routed_scale).numpy(), rtol=1e-6, atol=1e-7)
    # the experts are the top k of router_select, best first, within the kept groups
    sel = np.take_along_axis(c["router_select"][1:], c["topk_ids"][1:].astype(np.int64), axis=-1)
    assert (np.diff(sel, axis=-1) <= 0).all()


@pytest.mark.parametrize("tie_tol, follows", [(1e9, True), (0.0, False)])
def test_router_replay_on_router_select(model, tokens, ref, tie_tol, follows):
    """A flipped token follows the golden's experts where the gap on the golden's router_select is within
    the tie width, weighted by its own unbiased scores; else the flip stays (a divergence)."""
    assert_router_replay(model, tokens, ref.stacked(), 2, tie_tol, follows, FP32_REL)


def test_decode_through_the_cache_gives_the_forward_rows(model, tokens, ref):
    """Prefill of 12 tokens, then 8 single-token steps through a paged cache of expanded k_rope / v
    (values v_dim wide): every row as the one causal forward's."""
    from moesnap.model.serve import Session

    cand = CandidateModel(model)
    s = Session(cand, n_seqs=1, capacity=N_TOKENS, paged=True)
    rows = s.prefill(tokens[:12])
    rows += [s.decode(t)[0] for t in tokens[12:]]
    assert s.cache.v[0].shape[-1] == model.config.v_dim < s.cache.k[0].shape[-1] == model.config.head_dim
    got = np.concatenate([r.case.layers["layer_out"] for r in rows], axis=1)       # [L, T, H]
    assert close(got, ref.stacked()["layer_out"], FP32_REL)
    attn = np.concatenate([r.case.layers["attn"] for r in rows], axis=1)
    assert close(attn, ref.stacked()["attn"], FP32_REL)


def test_decode_steps_on_static_buffers_equal_the_session(model, tokens):
    """The static decode step (CUDA graph on CUDA; eager here) computes what the session's step computes."""
    assert_static_decode_is_the_sessions(model, tokens, 16, ("k_rope", "attn", "moe_out", "layer_out"))


# --------------------------------------------------------------------------- planted faults of the family


def test_family_faults_change_their_stage_first(model, tokens):
    """Each fault leaves every stage before its target as it was and changes the target."""
    cfg = model.config
    cand = CandidateModel(model)
    clean = run(model, tokens).layers                                   # stage -> {layer: array}
    order = [s for s in FAMILY_STAGES["deepseek2"] if s in clean]
    faults = [SharedOff(layer=2), ScaleOff(layer=1)] + ([BiasOff(layer=1)] if cfg.router_probs_bias else [])
    for fault in faults:
        planted = cand.faults([fault])
        rec = ArrayRecorder()
        cand.forward(tokens, rec, faults=planted)
        got = rec.layers
        assert planted.fired == {fault}
        i, target = fault.layer, fault.target_stage
        for s in order[:order.index(target)]:
            if i in clean[s]:
                assert np.array_equal(got[s][i], clean[s][i]), (fault, s)
        assert not np.allclose(got[target][i], clean[target][i], atol=1e-3), fault
        assert np.array_equal(got["layer_out"][i - 1], clean["layer_out"][i - 1])


def test_family_faults_are_refused_where_they_cannot_fire(model):
    cfg = model.config
    with pytest.raises(UsageError, match=r"layer 0 is dense \(no router, no experts\); the MoE layers are 1\.\.2"):
        parse_inject("shared_off:layer=0", cfg)
    if not cfg.router_probs_bias:
        with pytest.raises(UsageError, match=r"\(deepseek2\) has no score-correction bias"):
            parse_inject("bias_off:layer=1", cfg)
    one = dataclasses.replace(cfg, routed_scale=1.0, n_shared_experts=0)
    with pytest.raises(UsageError, match="a routed scale of 1"):
        parse_inject("scale_off:layer=1", one)
    with pytest.raises(UsageError, match="has no shared experts"):
        parse_inject("shared_off:layer=1", one)
    tiny = GGUFModel.open(tiny_path()).config
    for spec in ("bias_off:layer=1", "shared_off:layer=1", "scale_off:layer=1"):
        with pytest.raises(UsageError, match=r"^--inject '.*': the model \(qwen3moe\) has no"):
            parse_inject(spec, tiny)
    check_injections([parse_inject("shared_off:layer=1", cfg)], model, [N_TOKENS])     # accepted where it fires
    # the generic faults on what a dense layer, or this model, does not have: refused, never a vacuous pass
    for spec, why in (("nan:layer=0,expert=1", "layer 0 is dense"), ("route:layer=0,token=1", "layer 0 is dense"),
                      ("scale:layer=0,stage=router_logits,factor=2", "not a stage of layer 0"),
                      ("scale:layer=1,stage=dense_ffn_out,factor=2", "not a stage of layer 1"),
                      ("qtype:layer=0,tensor=ffn_up_exps,as=q4_0", "tensor=ffn_up_exps is not in layer 0"),
                      ("qtype:layer=1,tensor=ffn_up,as=q4_0", "tensor=ffn_up is not in layer 1")):
        with pytest.raises(UsageError, match=why):
            parse_inject(spec, cfg)
    with pytest.raises(UsageError, match="stage=q_latent is not a stage of layer 1 of this qwen3moe model"):
        parse_inject("scale:layer=1,stage=q_latent,factor=2", tiny)


def test_fault_specs_round_trip(model):
    for spec in ("shared_off:layer=1", "scale_off:layer=2"):
        inj = parse_inject(spec, model.config)
        assert inj.spec == spec and parse_inject(inj.spec, model.config) == inj and inj.target_layer == inj.layer


def test_kv_cache_holds_values_of_their_own_width(model):
    cache = KVCache(model.config, n_seqs=2, capacity=5, paged=True, block_size=4)
    assert cache.k[0].shape[2:] == (model.config.n_head, model.config.head_dim)
    assert cache.v[0].shape[2:] == (model.config.n_head, model.config.v_dim)
