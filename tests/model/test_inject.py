"""Planted faults: parsing, and each fault first changes exactly its layer and stage."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch

from moesnap.model.candidate import CandidateModel
from moesnap.errors import UsageError
from moesnap.model.inject import (
    Injection, NanExpert, QtypeAs, RouteFlip, ScaleStage, SCALABLE_STAGES, parse_inject,
)
from moesnap.model.faults import Faults
from moesnap.model.recorder import ArrayRecorder
from moesnap.model.synth import tiny_path
from moesnap.model.weights import GGUFModel
from moesnap.stages import FAMILY_STAGES, LAYER_STAGES

stage_order = LAYER_STAGES.index

QT = gguf.GGMLQuantizationType
N_TOKENS = 16


@pytest.fixture(scope="module")
def model() -> GGUFModel:
    return GGUFModel.open(tiny_path())


@pytest.fixture(scope="module")
def cfg(model):
    return model.config


@pytest.fixture(scope="module")
def tokens(cfg) -> list[int]:
    return np.random.default_rng(1).integers(0, cfg.vocab_size, N_TOKENS).tolist()


@pytest.fixture(scope="module")
def clean(model, tokens) -> ArrayRecorder:
    rec = ArrayRecorder()
    CandidateModel(model).forward(tokens, rec)
    return rec


def run(model, tokens, *specs: str) -> ArrayRecorder:
    rec = ArrayRecorder()
    cand = CandidateModel(model)
    cand.forward(tokens, rec, faults=cand.faults([parse_inject(s, model.config) for s in specs]))
    return rec


def before(layer: int, stage: str, n_layer: int):
    """Every (layer, stage) computed before ``stage`` of ``layer``."""
    for i in range(n_layer):
        for s in LAYER_STAGES:
            if i < layer or (i == layer and stage_order(s) < stage_order(stage)):
                yield i, s


def assert_first_change(clean: ArrayRecorder, hit: ArrayRecorder, layer: int, stage: str) -> None:
    """All stages before (layer, stage) identical, (layer, stage) different."""
    np.testing.assert_array_equal(hit.model["embed"], clean.model["embed"])
    n_layer = len(clean.layers["layer_out"])
    for i, s in before(layer, stage, n_layer):
        if s in clean.layers:          # the schema's stages of other families are absent, never faked
            np.testing.assert_array_equal(hit.layers[s][i], clean.layers[s][i], err_msg=f"layer {i} {s}")
    assert not np.array_equal(hit.layers[stage][layer], clean.layers[stage][layer], equal_nan=True)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("spec, want", [
    ("nan:layer=2,expert=5", NanExpert(layer=2, expert=5)),
    (" NaN : expert=5 , layer=2 ", NanExpert(layer=2, expert=5)),
    ("qtype:layer=0,tensor=ffn_down_exps,as=q4_k", QtypeAs(layer=0, tensor="ffn_down_exps", as_qtype=QT.Q4_K)),
    ("qtype:layer=3,tensor=attn_v,as=Q6_K", QtypeAs(layer=3, tensor="attn_v", as_qtype=QT.Q6_K)),
    ("scale:layer=1,stage=attn_out,factor=1.01", ScaleStage(layer=1, stage="attn_out", factor=1.01)),
    ("scale:layer=1,stage=moe_out,factor=-2e-3", ScaleStage(layer=1, stage="moe_out", factor=-0.002)),
    ("route:layer=3,token=0", RouteFlip(layer=3, token=0)),
])
def test_parse(spec, want, cfg):
    got = parse_inject(spec, cfg)
    assert got == want
    assert parse_inject(got.spec, cfg) == got  # round trip
    assert str(got) == got.spec


def test_target_stages(cfg):
    assert parse_inject("nan:layer=1,expert=0", cfg).target_stage == "expert_out"
    assert parse_inject("route:layer=1,token=0", cfg).target_stage == "topk_ids"
    assert parse_inject("scale:layer=1,stage=k_rope,factor=2", cfg).target_stage == "k_rope"
    assert parse_inject("qtype:layer=1,tensor=attn_q,as=q8_0", cfg).target_stage == "q"
    assert parse_inject("qtype:layer=1,tensor=ffn_gate_inp,as=f16", cfg).target_stage == "router_logits"


def test_injections_are_frozen(cfg):
    inj = parse_inject("nan:layer=1,expert=2", cfg)
    assert isinstance(inj, Injection)
    with pytest.raises(dataclasses.FrozenInstanceError):
        inj.layer = 2  # type: ignore[misc]
    assert hash(inj) == hash(NanExpert(layer=1, expert=2))


@pytest.mark.parametrize("spec, message", [
    ("nan", "expected KIND:KEY=VALUE"),
    ("boom:layer=1", "unknown fault kind 'boom'"),
    ("nan:layer=99,expert=1", "layer=99 is out of range: the model has 4 layers"),
    ("nan:layer=-1,expert=1", "layer=-1 is out of range: the model has 4 layers"),
    ("nan:layer=1,expert=8", "expert=8 is out of range: the model has 8 experts"),
    ("nan:layer=one,expert=1", "layer='one' is not an integer"),
    ("nan:layer=1", "missing expert="),
    ("nan:layer=1,expert=2,colour=red", "unknown key 'colour' for nan"),
    ("nan:layer=1,layer=2,expert=2", "key 'layer' given twice"),
    ("nan:layer=1,expert", "'expert' is not KEY=VALUE"),
    ("nan:layer=1,expert=", "'expert=' is not KEY=VALUE"),
    ("qtype:layer=1,tensor=ffn_sideways,as=q4_k", "tensor='ffn_sideways' is not a layer tensor"),
    ("qtype:layer=1,tensor=ffn_down_exps,as=q9_k", "as='q9_k' is not a supported quant type"),
    ("scale:layer=1,stage=attn_soup,factor=2", "stage='attn_soup' is not a per-layer stage"),
    ("scale:layer=1,stage=logits,factor=2", "stage='logits' is not a per-layer stage"),
    ("scale:layer=1,stage=topk_ids,factor=2", "stage=topk_ids holds expert ids and cannot be scaled"),
    ("scale:layer=1,stage=q,factor=big", "factor='big' is not a number"),
    ("scale:layer=1,stage=q,factor=inf", "factor='inf' must be finite"),
    ("route:layer=1,token=-3", "token=-3 must be an integer >= 0"),
    ("route:layer=1,token=5000", "token=5000 is out of range"),
])
def test_parse_errors(spec, message, cfg):
    with pytest.raises(UsageError) as info:
        parse_inject(spec, cfg)
    text = str(info.value)
    assert message in text
    assert text.startswith(f"--inject {spec!r}: ")
    assert "\n" not in text


def test_route_needs_an_unselected_expert(cfg):
    every = dataclasses.replace(cfg, n_expert_used=cfg.n_expert)
    with pytest.raises(UsageError, match="all 8 experts"):
        parse_inject("route:layer=0,token=0", every)


def test_route_token_beyond_the_prompt(model, tokens):
    cm = CandidateModel(model)
    with pytest.raises(UsageError, match=f"token={N_TOKENS} is out of range: the prompt has {N_TOKENS} tokens"):
        cm.forward(tokens, faults=cm.faults([RouteFlip(layer=0, token=N_TOKENS)]))


def test_model_validates_injections_built_directly(model):
    with pytest.raises(UsageError, match="expert=12 is out of range"):
        Faults([NanExpert(layer=0, expert=12)], model)
    with pytest.raises(UsageError, match="stage='embed'"):
        CandidateModel(model).faults([ScaleStage(layer=0, stage="embed", factor=2.0)])
    with pytest.raises(UsageError, match="need the model"):
        Faults([NanExpert(layer=0, expert=1)])


# --------------------------------------------------------------------------- effects


@pytest.mark.parametrize("layer", [0, 3])
def test_nan_expert(model, tokens, clean, layer):
    ids = clean.layers["topk_ids"][layer]                                # [T, k]
    expert = int(np.bincount(ids.ravel()).argmax())                     # an expert with tokens
    hit = run(model, tokens, f"nan:layer={layer},expert={expert}")
    assert_first_change(clean, hit, layer, "expert_out")
    eo = hit.layers["expert_out"][layer]                                # [T, k, H]
    routed = ids == expert
    assert np.isnan(eo[routed]).all()
    np.testing.assert_array_equal(eo[~routed], clean.layers["expert_out"][layer][~routed])
    # the weighted sum is NaN exactly for the tokens routed to that expert
    np.testing.assert_array_equal(np.isnan(hit.layers["moe_out"][layer]).any(-1), routed.any(-1))
    assert np.isnan(hit.model["logits"]).any()


def test_nan_expert_without_tokens_changes_nothing(model, tokens):
    short = tokens[:2]                                                   # 2 tokens: at most 4 experts used
    rec = ArrayRecorder()
    clean_logits = CandidateModel(model).forward(short, rec).logits
    unused = sorted(set(range(model.config.n_expert)) - set(rec.layers["topk_ids"][1].ravel().tolist()))
    hit = run(model, short, f"nan:layer=1,expert={unused[0]}")
    np.testing.assert_array_equal(hit.model["logits"], clean_logits.numpy())


def test_qtype_q6k_read_as_q4k(model, tokens, clean):
    """The real bug: layer 0's Q6_K ffn_down_exps decoded by the Q4_K routine."""
    assert model.raw("blk.0.ffn_down_exps")[0] == QT.Q6_K
    hit = run(model, tokens, "qtype:layer=0,tensor=ffn_down_exps,as=q4_k")
    assert_first_change(clean, hit, 0, "expert_out")
    got, want = hit.layers["expert_out"][0], clean.layers["expert_out"][0]
    wrong = ~np.isfinite(got).all() or np.abs(got - want).max() > 10 * np.abs(want).max()
    assert wrong, "Q6_K bytes read as Q4_K should give non-finite or wildly wrong outputs"


def test_qtype_on_an_attention_tensor(model, tokens, clean):
    hit = run(model, tokens, "qtype:layer=2,tensor=attn_k,as=q4_0")
    assert_first_change(clean, hit, 2, "k")
    np.testing.assert_array_equal(hit.layers["q"][2], clean.layers["q"][2])


@pytest.mark.parametrize("stage", ["attn_norm", "q", "v", "k_rope", "attn", "attn_resid",
                                   "router_logits", "topk_weights", "expert_out", "moe_out", "layer_out"])
def test_scale(model, tokens, clean, stage):
    layer, factor = 1, 1.5
    hit = run(model, tokens, f"scale:layer={layer},stage={stage},factor={factor}")
    assert_first_change(clean, hit, layer, stage)
    np.testing.assert_allclose(hit.layers[stage][layer], clean.layers[stage][layer] * np.float32(factor),
                               rtol=1e-6, atol=0)
    if stage != "layer_out":  # ... and flows on downstream
        assert not np.array_equal(hit.layers["layer_out"][layer], clean.layers["layer_out"][layer])
    assert not np.array_equal(hit.model["logits"], clean.model["logits"])


def test_every_scalable_stage_is_reachable(model, tokens, clean):
    """A factor of 1 at any stage of the model's family reproduces the clean run bit for bit (a stage of
    another family's is refused: test_scale_of_a_stage_the_layer_lacks_is_refused)."""
    specs = [f"scale:layer=2,stage={s},factor=1" for s in SCALABLE_STAGES if s in FAMILY_STAGES["qwen3moe"]]
    hit = run(model, tokens, *specs)
    np.testing.assert_array_equal(hit.model["logits"], clean.model["logits"])


def test_scale_of_a_stage_the_layer_lacks_is_refused(model):
    with pytest.raises(UsageError, match="stage=shared_expert_out is not a stage of layer 2 of this qwen3moe model"):
        parse_inject("scale:layer=2,stage=shared_expert_out,factor=2", model.config)


@pytest.mark.parametrize("layer, token", [(0, 0), (2, 7), (3, N_TOKENS - 1)])
def test_route_flip(model, tokens, clean, layer, token):
    hit = run(model, tokens, f"route:layer={layer},token={token}")
    assert_first_change(clean, hit, layer, "topk_ids")
    k = model.config.n_expert_used
    got, was = hit.layers["topk_ids"][layer], clean.layers["topk_ids"][layer]
    others = np.arange(N_TOKENS) != token
    np.testing.assert_array_equal(got[others], was[others])
    # the first k-1 experts stay, the k-th is replaced by the (k+1)-th ranked one
    np.testing.assert_array_equal(got[token, :k - 1], was[token, :k - 1])
    ranked = np.argsort(-clean.layers["router_logits"][layer][token], kind="stable")
    assert got[token, k - 1] == ranked[k] != was[token, k - 1]
    assert len(set(got[token]) ^ set(was[token])) == 2
    # weights: renormalised softmax probabilities over the new set, still descending
    logits = hit.layers["router_logits"][layer][token].astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    w = p[got[token]] / p[got[token]].sum()
    np.testing.assert_allclose(hit.layers["topk_weights"][layer][token], w, rtol=1e-5)
    assert (np.diff(hit.layers["topk_weights"][layer][token]) <= 0).all()


def test_several_injections_at_once(model, tokens, clean):
    hit = run(model, tokens, "route:layer=1,token=3", "scale:layer=2,stage=q,factor=2")
    assert_first_change(clean, hit, 1, "topk_ids")
    assert not np.array_equal(hit.layers["q"][2], clean.layers["q"][2])


def test_injection_in_replay_hits_only_its_layer(model, tokens, clean):
    """With golden (here: clean) inputs for every layer, a fault stays in its layer."""
    L = model.config.n_layer
    inputs = {0: torch.from_numpy(clean.model["embed"])}
    inputs.update({i: torch.from_numpy(clean.layers["layer_out"][i - 1]) for i in range(1, L)})
    rec = ArrayRecorder()
    cand = CandidateModel(model)
    cand.forward(tokens, rec, layer_inputs=inputs,
                 faults=cand.faults([parse_inject("scale:layer=1,stage=attn_out,factor=3", model.config)]))
    for i in (0, 2, 3):
        np.testing.assert_array_equal(rec.layers["layer_out"][i], clean.layers["layer_out"][i])
    assert not np.array_equal(rec.layers["layer_out"][1], clean.layers["layer_out"][1])


def test_qtype_injection_that_changes_nothing_is_refused(tiny_path):
    from moesnap.model.candidate import CandidateModel
    from moesnap.errors import UsageError
    from moesnap.model.inject import parse_inject
    from moesnap.model.weights import GGUFModel

    model = GGUFModel.open(tiny_path)
    layer = next(i for i in range(model.config.n_layer) if model.qtypes()[f"blk.{i}.ffn_down_exps"] == "Q4_K")
    inj = parse_inject(f"qtype:layer={layer},tensor=ffn_down_exps,as=q4_k", model.config)
    with pytest.raises(UsageError, match="already is Q4_K"):
        CandidateModel(model).faults([inj])
