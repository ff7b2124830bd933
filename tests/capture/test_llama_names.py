"""llama.cpp's graph names onto moesnap stages (capture/llama_names.py), on nodes made up here as the
eval callback hands them over (name, ggml op, array): which node of a name is which stage in each
family's graph, what latent attention leaves out, dense layers, and the contiguity test that decides
which nodes are read at all.  No llama.cpp needed."""

from __future__ import annotations

import dataclasses

import numpy as np

from moesnap.capture.llama import GGML_MAX_DIMS, _contiguous, ggml_tensor
from moesnap.capture.llama_names import map_stages, stacked, unsupported
from moesnap.model.synth import preset

T = 3


def _a(*shape: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _config(name: str):
    return preset(name).config


def test_q_is_the_last_node_before_rope_and_q_rope_the_rope_node_in_each_graph():
    cfg = _config("olmoe-tiny")                               # 4 heads of 16
    proj, reshaped, roped = _a(T, 64, seed=1), _a(T, 4, 16, seed=2), _a(T, 4, 16, seed=3)
    # Qwen3-MoE / Mixtral: projection, reshape, rope; OLMoE: projection (its norm is Qcur_normed), rope
    for nodes, want_q in (([("Qcur-0", "MUL_MAT", proj), ("Qcur-0", "RESHAPE", reshaped), ("Qcur-0", "ROPE", roped)],
                           reshaped),
                          ([("Qcur-0", "MUL_MAT", proj), ("Qcur-0", "ROPE", roped)], proj.reshape(T, 4, 16))):
        _, layers = map_stages(nodes + [("Vcur-0", "MUL_MAT", proj), ("Vcur-0", "RESHAPE", reshaped)], T, cfg)
        np.testing.assert_array_equal(layers["q"][0], want_q)
        np.testing.assert_array_equal(layers["q_rope"][0], roped)
        np.testing.assert_array_equal(layers["v"][0], reshaped)
    _, layers = map_stages([("Qcur_normed-0", "MUL", proj)], T, cfg)      # OLMoE's norm over the projection
    assert layers["q_norm"][0].shape == (T, 4, 16)


def test_the_later_name_of_a_stage_wins_and_a_name_its_last_node():
    cfg = _config("deepseek-v3-tiny")
    w, norm, scaled = _a(T, 2, 1, seed=1), _a(T, 2, seed=2), _a(T, 2, 1, seed=3)
    view, normed = _a(T, 64, seed=4), _a(T, 64, seed=5)
    _, layers = map_stages([("ffn_moe_logits-1", "MUL_MAT", _a(T, 8, seed=0)), ("ffn_moe_weights-1", "GET_ROWS", w),
                            ("ffn_moe_weights_norm-1", "DIV", norm), ("ffn_moe_weights_scaled-1", "SCALE", scaled),
                            ("kv_cmpr-1", "VIEW", view), ("kv_cmpr-1", "MUL", normed)], T, cfg)
    np.testing.assert_array_equal(layers["topk_weights"][1], scaled.reshape(T, 2))
    np.testing.assert_array_equal(layers["kv_latent_norm"][1], normed)   # a one-row step's view comes first


def test_latent_attention_names_the_q_lora_and_the_roped_part_and_no_k_or_v():
    cfg = _config("deepseek-v3-tiny")                        # q LoRA 64, 4 heads of 32 + 32
    q_a, q_a_norm, q = _a(T, 64, seed=1), _a(T, 64, seed=2), _a(T, 256, seed=3)
    q_pe = _a(T, 4, 32, seed=4)
    absorbed = _a(T, 4, 96, seed=5)
    nodes = [("q-1", "MUL_MAT", q_a), ("norm-1", "RMS_NORM", q_a), ("q-1", "MUL", q_a_norm), ("q-1", "MUL_MAT", q),
             ("q-1", "RESHAPE", q.reshape(T, 4, 64)), ("q_pe-1", "ROPE", q_pe), ("Qcur-1", "CONCAT", absorbed),
             ("Kcur-1", "CONCAT", _a(T, 1, 96, seed=6)), ("Vcur-1", "RESHAPE", _a(T, 1, 64, seed=7))]
    _, layers = map_stages(nodes, T, cfg)
    assert set(layers) == {"q_latent", "q_latent_norm", "q", "q_rope"}, "Qcur/Kcur/Vcur are latent forms: no stage"
    np.testing.assert_array_equal(layers["q_latent"][1], q_a)
    np.testing.assert_array_equal(layers["q_latent_norm"][1], q_a_norm)
    np.testing.assert_array_equal(layers["q_rope"][1][..., :32], q.reshape(T, 4, 64)[..., :32])
    np.testing.assert_array_equal(layers["q_rope"][1][..., 32:], q_pe)
    no_lora = dataclasses.replace(cfg, q_lora_rank=0)
    _, layers = map_stages([("q-1", "MUL_MAT", q), ("q-1", "RESHAPE", q.reshape(T, 4, 64))], T, no_lora)
    assert set(layers) == {"q"}


def test_a_dense_layers_ffn_out_is_dense_ffn_out_and_a_moe_layers_is_moe_out():
    cfg = _config("deepseek-v3-tiny")
    dense, moe, routed = _a(T, 64, seed=1), _a(T, 64, seed=2), _a(T, 64, seed=3)
    nodes = [("ffn_out-0", "MUL_MAT", dense), ("ffn_moe_logits-1", "MUL_MAT", _a(T, 8, seed=4)),
             ("ffn_moe_out-1", "ADD", routed), ("ffn_shexp-1", "MUL_MAT", _a(T, 64, seed=5)), ("ffn_out-1", "ADD", moe)]
    _, layers = map_stages(nodes, T, cfg)
    assert sorted(layers["dense_ffn_out"]) == [0] and sorted(layers["moe_out"]) == [1]
    np.testing.assert_array_equal(layers["moe_out"][1], moe)        # routed + shared, not the routed mixture
    arrays = stacked(layers, cfg.n_layer)
    assert arrays["moe_out"].shape == (1, T, 64) and arrays["_layers.moe_out"].tolist() == [1]


def test_qwen2_moe_names_the_shared_expert_before_its_gate_and_the_gate_logit():
    cfg = _config("qwen2-moe-tiny")
    shexp, gate = _a(T, 64, seed=1), _a(T, 1, seed=2)
    _, layers = map_stages([("ffn_shexp-2", "MUL_MAT", shexp), ("ffn_shexp_gate_inp-2", "MUL_MAT", gate),
                            ("ffn_shexp_out-2", "MUL", _a(T, 64, seed=3))], T, cfg)
    assert set(layers) == {"shared_expert_out", "shared_gate"}
    assert layers["shared_gate"][2].shape == (T, 1)


def _tensor(ne: tuple[int, ...], nb: tuple[int, ...]) -> ggml_tensor:
    t = ggml_tensor()
    for i in range(GGML_MAX_DIMS):
        t.ne[i], t.nb[i] = ne[i], nb[i]
    return t


def test_a_view_that_steps_over_a_rows_other_columns_is_not_contiguous():
    # DeepSeek's k_pe: 32 columns of each 96-wide row of kv_cmpr_pe, [32, 1, T] with a row stride of 384 bytes
    assert not _contiguous(_tensor((32, 1, 6, 1), (4, 384, 384, 2304)))
    assert _contiguous(_tensor((32, 1, 1, 1), (4, 384, 384, 384)))        # one row of it: its elements in a row
    assert _contiguous(_tensor((64, 6, 1, 1), (4, 256, 1536, 1536)))
    assert not _contiguous(_tensor((32, 4, 6, 1), (4, 256, 1024, 6144)))  # q_pe: 32 of each head's 64


def test_llama_cpp_reads_a_deepseek_file_without_q_lora_only_at_v2_lites_depth():
    v2 = _config("deepseek-v2-tiny")
    assert v2.q_lora_rank == 0 and "26 or 27 layers" in (unsupported(v2) or "")
    assert unsupported(dataclasses.replace(v2, n_layer=27)) is None
    assert unsupported(dataclasses.replace(v2, q_lora_rank=64)) is None
    assert all(unsupported(_config(p)) is None for p in ("qwen2-moe-tiny", "mixtral-tiny", "olmoe-tiny", "tiny"))


def test_every_stage_the_tables_name_is_in_the_schema():
    from moesnap.capture.llama_names import MLA_BY_OP, MODEL_NAMES, NAMES, ROPED
    from moesnap.stages import LAYER_STAGES, MODEL_STAGES

    named = set(NAMES.values()) | {s for pair in ROPED.values() for s in pair if s}
    named |= {s for by_op in MLA_BY_OP.values() for s in by_op.values() if not s.startswith("_")}
    assert named <= set(LAYER_STAGES) and set(MODEL_NAMES.values()) <= set(MODEL_STAGES)
