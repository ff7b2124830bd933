"""Qwen2-MoE, the model side: its config from GGUF metadata, its tensor table, the presets, the shared
expert and its gate, top-k weights as the softmax gives them, and goldens judged by the one judge.  All
on the CPU, in seconds; the comparison with transformers is tests/crosscheck/test_llama_like.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gguf import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES, GGMLQuantizationType as QT, GGUFValueType

from moesnap.errors import ModelFileError
from moesnap.model.recorder import ArrayRecorder
from moesnap.model.reference import run_reference
from moesnap.model.synth import make_model, preset
from moesnap.model.tensors import table
from moesnap.model.weights import GGUFModel

from family_files import TOKENS, judge_goldens, rewrite


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("q2") / "q2.gguf", preset("qwen2-moe-tiny"))


def test_the_file_reads_back_as_its_spec(tiny):
    cfg, want = GGUFModel.open(tiny).config, preset("qwen2-moe-tiny").config
    assert dataclasses.replace(cfg, rms_eps=want.rms_eps) == want and cfg.rms_eps == pytest.approx(want.rms_eps)
    assert (cfg.shared_expert_ff, cfg.n_shared_experts, cfg.shared_expert_gate, cfg.gating) == (128, 1, True, "softmax_topk")


def test_the_tensor_table_is_gguf_pys():
    tab = table("qwen2moe")
    assert {TENSOR_NAMES[k.tensor] for k in tab.kinds} == {TENSOR_NAMES[t] for t in MODEL_TENSORS[MODEL_ARCH.QWEN2MOE]}
    assert {"attn_q.bias", "attn_k.bias", "attn_v.bias"} <= set(tab.by_name) and "attn_output.bias" not in tab.by_name
    assert "ffn_gate_inp_shexp" in tab.f32_tensors and tab.by_name["ffn_gate_inp_shexp"].stage == "shared_gate"


def test_the_a2_7b_preset_has_the_real_shape_and_a_q4_k_m_mix():
    spec = preset("qwen1.5-moe-a2.7b")
    c = spec.config
    assert (c.n_layer, c.hidden, c.n_head, c.n_head_kv, c.head_dim, c.n_expert, c.n_expert_used, c.expert_ff,
            c.shared_expert_ff, c.vocab_size) == (24, 2048, 16, 16, 128, 60, 4, 1408, 5632, 151936)
    # rows of 1408 are no multiple of 256: the down projections fall back from Q6_K/Q4_K to Q8_0/Q5_0
    assert (spec.qtype("ffn_down_exps", 0), spec.qtype("ffn_down_exps", 1)) == (QT.Q8_0, QT.Q5_0)
    assert spec.qtype("ffn_gate_exps", 0) == QT.Q4_K and spec.qtype("ffn_down_shexp", 0) == QT.Q6_K
    assert spec.qtype("ffn_gate_inp_shexp", 0) == QT.F32


def test_the_shared_expert_is_gated_and_the_top_k_weights_are_not_renormalised(tiny):
    model = GGUFModel.open(tiny)
    rec = ArrayRecorder()
    run_reference(model, TOKENS, recorder=rec)
    L = rec.layers
    for i in range(model.config.n_layer):
        gate, shared = torch.as_tensor(L["shared_gate"][i]), torch.as_tensor(L["shared_expert_out"][i])
        x = torch.as_tensor(L["ffn_norm"][i])
        assert gate.shape == (len(TOKENS), 1)
        assert torch.allclose(gate[:, 0], x @ model.layer(i).shexp_gate, atol=1e-6)
        w, eo = torch.as_tensor(L["topk_weights"][i]), torch.as_tensor(L["expert_out"][i])
        routed = (eo * w[..., None]).sum(1)
        assert torch.allclose(torch.as_tensor(L["moe_out"][i]), routed + torch.sigmoid(gate) * shared, atol=1e-5)
        probs = torch.softmax(torch.as_tensor(L["router_logits"][i]), -1)
        assert torch.allclose(w, probs.gather(1, torch.as_tensor(L["topk_ids"][i]).long()))   # the softmax's own
        assert float(w.sum(-1).min()) < 0.99 and (w.sum(-1) <= 1 + 1e-6).all()               # not renormalised
    assert 0.1 < float(torch.sigmoid(gate).std()) and 0.05 < float(torch.sigmoid(gate).mean()) < 0.95   # gates spread


@pytest.mark.parametrize("drop, override, message", [
    (("qwen2moe.expert_shared_feed_forward_length", "qwen2moe.feed_forward_length"), {},
     "missing metadata key 'qwen2moe.feed_forward_length'"),
    ((), {"qwen2moe.rope.scaling.type": ("yarn", GGUFValueType.STRING)}, "RoPE scaling is not supported for Qwen2-MoE"),
    ((), {"qwen2moe.attention.key_length": (8, GGUFValueType.UINT32)}, "tensor 'blk.0.attn_q' has shape"),
])
def test_a_bad_qwen2moe_file_is_one_line(tiny, tmp_path, drop, override, message):
    out = rewrite(tiny, tmp_path / "bad.gguf", drop=drop, override=override)
    with pytest.raises(ModelFileError, match=message) as e:
        GGUFModel.open(out)
    assert str(e.value).startswith(str(out)) and "\n" not in str(e.value)


def test_without_expert_keys_the_widths_are_llama_cpps(tiny, tmp_path):
    """No expert_feed_forward_length: feed_forward_length / expert_used_count; no shared length: feed_forward_length."""
    spec = preset("qwen2-moe-tiny").with_(expert_ff=32, shared_expert_ff=128, dense_ff=128)   # 128 / top-4 = 32
    src = make_model(tmp_path / "w.gguf", spec)
    cfg = GGUFModel.open(rewrite(src, tmp_path / "cut.gguf", drop=("qwen2moe.expert_feed_forward_length",
                                                                  "qwen2moe.expert_shared_feed_forward_length"))).config
    assert (cfg.expert_ff, cfg.shared_expert_ff) == (32, 128)


def test_goldens_judge_a_qwen2moe_model_and_its_candidate(tiny, tmp_path, capsys):
    config = judge_goldens(tiny, "qwen2moe", tmp_path, capsys)
    assert config["shared_expert_gate"] is True and config["gating"] == "softmax_topk"
