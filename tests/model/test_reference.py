"""The reference forward: stages, dtypes, laziness, and independence from recording."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moesnap.model.recorder import ArrayRecorder, NullRecorder
from moesnap.model.reference import run_reference
from moesnap.stages import FAMILY_STAGES
from moesnap.model.weights import GGUFModel

TOKENS = [3, 77, 104, 105, 200, 42, 9]


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return GGUFModel.open(tiny_path)


def _shapes(cfg, T):
    H, D, k = cfg.hidden, cfg.head_dim, cfg.n_expert_used
    return {
        "attn_norm": (T, H), "q": (T, cfg.n_head, D), "k": (T, cfg.n_head_kv, D), "v": (T, cfg.n_head_kv, D),
        "q_norm": (T, cfg.n_head, D), "k_norm": (T, cfg.n_head_kv, D), "q_rope": (T, cfg.n_head, D),
        "k_rope": (T, cfg.n_head_kv, D), "attn": (T, cfg.q_dim), "attn_out": (T, H), "attn_resid": (T, H),
        "ffn_norm": (T, H), "router_logits": (T, cfg.n_expert), "topk_ids": (T, k), "topk_weights": (T, k),
        "expert_out": (T, k, H), "moe_out": (T, H), "layer_out": (T, H),
    }


def test_every_stage_of_every_layer_is_recorded_with_its_shape(tiny):
    rec = ArrayRecorder()
    logits = run_reference(tiny, TOKENS, recorder=rec)
    cfg, T = tiny.config, len(TOKENS)
    layers = rec.stacked()
    assert set(layers) == set(FAMILY_STAGES["qwen3moe"])
    for stage, shape in _shapes(cfg, T).items():
        assert layers[stage].shape == (cfg.n_layer, *shape), stage
    assert rec.model["logits"].shape == (T, cfg.vocab_size)
    assert rec.model["embed"].shape == (T, cfg.hidden)
    assert rec.model["final_norm"].shape == (T, cfg.hidden)
    assert rec.model["tokens"].tolist() == TOKENS
    assert layers["topk_ids"].dtype == np.int32
    np.testing.assert_array_equal(rec.model["logits"], logits.numpy())


def test_stages_are_consistent_with_each_other(tiny):
    rec = ArrayRecorder()
    run_reference(tiny, TOKENS, recorder=rec)
    L = rec.stacked()
    # residuals: attn_resid = input + attn_out, layer_out = attn_resid + moe_out
    np.testing.assert_allclose(L["attn_resid"][0], rec.model["embed"] + L["attn_out"][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(L["attn_resid"][1], L["layer_out"][0] + L["attn_out"][1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(L["layer_out"], L["attn_resid"] + L["moe_out"], rtol=1e-6, atol=1e-6)
    # moe_out is the weighted sum of the unweighted expert outputs
    np.testing.assert_allclose(L["moe_out"], (L["expert_out"] * L["topk_weights"][..., None]).sum(2), rtol=1e-5, atol=1e-6)
    # renormalised weights sum to one, ids are the top-k of the router logits, by descending logit
    np.testing.assert_allclose(L["topk_weights"].sum(-1), 1.0, rtol=1e-6)
    k = L["topk_ids"].shape[-1]
    top = np.argsort(-L["router_logits"], axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(np.sort(top, -1), np.sort(L["topk_ids"], -1))
    assert (np.diff(L["topk_weights"], axis=-1) <= 0).all()
    # RoPE leaves position 0 unrotated and preserves norms
    np.testing.assert_allclose(L["q_rope"][:, 0], L["q_norm"][:, 0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(L["k_rope"], axis=-1), np.linalg.norm(L["k_norm"], axis=-1), rtol=1e-5)
    # causality: the first token's stages do not depend on later tokens
    rec2 = ArrayRecorder()
    run_reference(tiny, TOKENS[:3], recorder=rec2)
    np.testing.assert_allclose(rec2.stacked()["layer_out"], L["layer_out"][:, :3], rtol=1e-5, atol=1e-5)


def test_null_recorder_gives_the_same_logits(tiny):
    a = run_reference(tiny, TOKENS)
    b = run_reference(tiny, TOKENS, recorder=NullRecorder())
    c = run_reference(tiny, TOKENS, recorder=ArrayRecorder())
    assert torch.equal(a, b) and torch.equal(a, c)


def test_float32_agrees_with_float64(tiny):
    r32, r64 = ArrayRecorder(), ArrayRecorder(keep_dtype=True)
    l32 = run_reference(tiny, TOKENS, recorder=r32)
    l64 = run_reference(tiny, TOKENS, dtype=torch.float64, recorder=r64)
    assert l64.dtype == torch.float64 and r64.model["logits"].dtype == np.float64
    assert torch.allclose(l32.double(), l64, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.sort(r32.stacked()["topk_ids"], -1), np.sort(r64.stacked()["topk_ids"], -1))


def test_only_selected_experts_are_dequantized(tiny, monkeypatch):
    calls: list[tuple[int, str, int]] = []
    orig = GGUFModel.expert_matrix

    def spy(self, layer, tensor, e):
        calls.append((layer, tensor, e))
        return orig(self, layer, tensor, e)

    monkeypatch.setattr(GGUFModel, "expert_matrix", spy)
    rec = ArrayRecorder()
    run_reference(tiny, TOKENS[:2], recorder=rec)
    ids = rec.stacked()["topk_ids"]
    for layer in range(tiny.config.n_layer):
        want = set(np.unique(ids[layer]).tolist())
        got = {e for (l, _, e) in calls if l == layer}
        assert got == want
        assert len(want) < tiny.config.n_expert  # 2 tokens x top-k cannot cover all experts


def test_mixed_quant_types_are_all_read(tiny):
    q = tiny.qtypes()
    downs = {q[f"blk.{i}.ffn_down_exps"] for i in range(tiny.config.n_layer)}
    assert {"Q4_K", "Q6_K"} <= downs
    assert run_reference(tiny, TOKENS).isfinite().all()


def test_fast_dequant_path_is_identical_to_gguf_py(tiny):
    from gguf import quants

    for name in ("blk.0.ffn_down_exps", "blk.1.ffn_down_exps", "blk.0.ffn_gate_exps", "blk.2.attn_q", "output"):
        t = tiny.file.tensor(name)
        if t.data.ndim == 3:
            got = tiny.expert_matrix(int(name.split(".")[1]), name.split(".")[2], 5)
            want = quants.dequantize(np.asarray(t.data[5]), t.tensor_type)
        else:
            got = tiny.dense(name).numpy()
            want = quants.dequantize(np.asarray(t.data), t.tensor_type)
        assert got.tobytes() == np.ascontiguousarray(want, dtype=np.float32).tobytes(), name
