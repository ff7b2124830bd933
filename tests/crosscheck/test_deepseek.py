"""moesnap's DeepSeek-V2/V3 reference against transformers' DeepseekV2ForCausalLM and
DeepseekV3ForCausalLM, on a small V2 and a small V3 configuration drawn at random per run (the seed
is printed; ``MOESNAP_CROSSCHECK_SEED=N`` repeats a run) plus the ``deepseek-v2-tiny`` and
``deepseek-v3-tiny`` presets.

Both read the same GGUF, in float32 with eager attention; every stage transformers exposes
(:mod:`.hf_deepseek`) must agree within a relative L2 error of 1e-5 per layer, the expert ids exactly
as sets.  The configurations make each DeepSeek feature bind (checked below): the q LoRA, a YaRN
factor with DeepSeek's mscale, groups that drop experts, the correction bias, renormalisation and
the routed scaling factor, shared experts, a leading dense layer, interleaved RoPE (the q LoRA binds
by construction: its latent and latent norm are stages compared on their own).

Run: ``pytest -m crosscheck -s tests/crosscheck/test_deepseek.py``.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

pytestmark = pytest.mark.crosscheck

REL_L2 = 1e-5
SEED = int(os.environ.get("MOESNAP_CROSSCHECK_SEED") or np.random.SeedSequence().entropy % 2**31)
TOKENS = 12


def _random_spec(seed: int, v3: bool):
    """A small DeepSeek spec drawn from ``seed``: 2-4 layers (1-2 dense), 2 or 4 heads, qk_nope/rope/v of
    16-48, kv_lora 32-96, q LoRA or not, 8-16 experts in 2-4 groups keeping 1..all, top-1..3,
    1-2 shared experts (none: the synthetic writer would write zero-width tensors), a routed scale of 1-2.5, YaRN or not, F32 or Q8_0 matrices."""
    from gguf import GGMLQuantizationType as QT
    from moesnap.model.synth import preset, qtype_kinds

    rng = np.random.default_rng([seed, int(v3)])
    n_group = int(rng.choice([2, 4]))
    n_expert = n_group * int(rng.choice([2, 4]))
    n_group_used = int(rng.integers(1, n_group + 1))
    n_used = int(rng.integers(1, min(3, n_group_used * n_expert // n_group) + 1))
    dense = int(rng.integers(1, 3))
    yarn = bool(rng.random() < 0.6)
    base = preset("deepseek-v3-tiny" if v3 else "deepseek-v2-tiny")
    return base.with_(
        n_layer=dense + int(rng.integers(1, 3)), n_dense_layers=dense, hidden=int(rng.choice([64, 96])),
        n_head=(h := int(rng.choice([2, 4]))), n_head_kv=h, head_dim=32 + (rope := int(rng.choice([16, 32]))),
        qk_rope_dim=rope, v_head_dim=int(rng.choice([32, 64])), kv_lora_rank=int(rng.choice([32, 64, 96])),
        q_lora_rank=int(rng.choice([0, 32, 64])), n_expert=n_expert, n_expert_used=n_used, n_group=n_group,
        n_group_used=n_group_used, n_shared_experts=int(rng.integers(1, 3)),
        routed_scale=float(rng.choice([1.0, 2.5])), topk_norm=v3 and bool(rng.random() < 0.8),
        expert_ff=int(rng.choice([32, 64])), vocab_size=int(rng.integers(260, 330)),
        rope_scaling="yarn" if yarn else "none", rope_factor=4.0 if yarn else 1.0, rope_orig_context=256 if yarn else 0,
        yarn_log_mul=0.0707 if yarn else 0.0, rope_base=float(rng.choice([1e4, 1e6])),
        qtypes={k: QT(rng.choice([QT.F32, QT.Q8_0])) for k in qtype_kinds("deepseek2")},
        seed=seed, name=f"deepseek-{'v3' if v3 else 'v2'}-random-{seed}")


def _preset(name: str):
    from moesnap.model.synth import preset

    return preset(name)


CONFIGS = {"random-v2": lambda: _random_spec(SEED, False), "random-v3": lambda: _random_spec(SEED, True),
           "deepseek-v2-tiny": lambda: _preset("deepseek-v2-tiny"), "deepseek-v3-tiny": lambda: _preset("deepseek-v3-tiny")}


def _run(spec, path, tokens):
    from moesnap.model.recorder import ArrayRecorder
    from moesnap.model.reference import run_reference
    from moesnap.model.weights import GGUFModel

    rec = ArrayRecorder()
    logits = run_reference(GGUFModel.open(path), tokens, recorder=rec)
    return {**rec.layers, "logits": logits.numpy()}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    pytest.importorskip("transformers", reason="transformers not installed (pip install -r requirements-crosscheck.txt)")
    from moesnap.model.synth import make_model

    from .hf_deepseek import hf_forward, load_hf_from_gguf

    spec = CONFIGS[request.param]()
    print(f"\n{request.param}: seed {SEED} (MOESNAP_CROSSCHECK_SEED={SEED} repeats it): {spec.config}")
    path = make_model(tmp_path_factory.mktemp("deepseek") / "m.gguf", spec)
    tokens = [1] + np.random.default_rng(SEED).integers(3, spec.vocab_size, TOKENS - 1).tolist()
    return request.param, spec, path, tokens, _run(spec, path, tokens), hf_forward(load_hf_from_gguf(path), tokens)


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _by_id(ids, values):
    """Per token, ``values`` in ascending expert-id order (transformers returns its k unsorted)."""
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(np.asarray(ids), order, -1), np.take_along_axis(np.asarray(values), order, -1)


def test_every_exposed_stage_agrees_with_transformers(pair):
    name, spec, _, _, ours, theirs = pair
    cfg = spec.config
    assert _rel_l2(ours["logits"], theirs["logits"]) < REL_L2
    judged = 0
    for stage, per in theirs.items():
        if stage in ("logits", "topk_weights"):
            continue
        for layer, hf in per.items():
            mine = ours[stage][layer]
            if stage == "topk_ids":
                assert (np.sort(mine, -1) == np.sort(hf, -1)).all(), (name, layer)
                ids, w = _by_id(hf, theirs["topk_weights"][layer])
                mids, mw = _by_id(mine, ours["topk_weights"][layer])
                assert (ids == mids).all() and _rel_l2(mw, w) < REL_L2, (name, layer)
            else:
                assert _rel_l2(mine.reshape(hf.shape), hf) < REL_L2, (name, stage, layer)
            judged += 1
    # the dense layers hold no router stage, on either side, and the MoE layers no dense one
    assert sorted(theirs["router_logits"]) == sorted(ours["router_logits"]) == list(range(cfg.n_dense_layers, cfg.n_layer))
    assert sorted(ours["dense_ffn_out"]) == list(range(cfg.n_dense_layers))
    assert ("q_latent" in ours) == bool(cfg.q_lora_rank) == ("q_latent" in theirs)
    assert judged >= cfg.n_layer * 14


@pytest.mark.parametrize("change", ["yarn_log_mul", "groups", "probs_bias", "topk_norm",
                                    "routed_scale", "shared", "dense", "rope_interleaved"])
def test_each_deepseek_feature_binds(pair, change, tmp_path):
    """Changing one DeepSeek feature of the reference (same weights, where the file allows) changes
    what it computes: the cross-check above exercises every one of them."""
    name, spec, path, tokens, ours, _ = pair
    if not name.endswith("tiny"):
        pytest.skip("the presets bind every feature by construction; a random draw may leave one off")
    from moesnap.model import reference
    from moesnap.model.weights import GGUFModel

    cfg = spec.config
    changed = {"yarn_log_mul": {"yarn_log_mul": 0.0},
               "groups": {"n_group": 1, "n_group_used": 1}, "probs_bias": None,
               "topk_norm": {"topk_norm": not cfg.topk_norm}, "routed_scale": {"routed_scale": 1.0 + cfg.routed_scale},
               "shared": {"n_shared_experts": 0}, "dense": None, "rope_interleaved": {"rope_interleaved": False}}[change]
    model = GGUFModel.open(path)
    if change == "yarn_log_mul" and cfg.rope_scaling != "yarn" or change == "probs_bias" and not cfg.router_probs_bias \
            or change == "groups" and cfg.n_group == 1:
        pytest.skip(f"{name} has no {change}")
    if change == "probs_bias":
        real = model.layer
        model.layer = lambda i, dtype=None, real=real: dataclasses.replace(real(i, dtype), probs_bias=None)  # type: ignore[method-assign]
    elif change == "dense":
        model.config = dataclasses.replace(cfg, n_dense_layers=0)
        real = model.layer

        def layer(i, dtype=None, real=real):
            return real(i, dtype) if i else dataclasses.replace(real(1, dtype), index=0)  # layer 1's MoE at 0
        model.layer = layer  # type: ignore[method-assign]
        model.release_layer = lambda i: None  # type: ignore[method-assign]
    else:
        model.config = dataclasses.replace(cfg, **changed)
    logits = reference.run_reference(model, tokens).numpy()
    assert _rel_l2(logits, ours["logits"]) > 1e-4, change

