"""Each family's SGLang (and vLLM) module paths land in its stages: dumper files written from a tiny preset's
golden under the names the engines' model code gives them (sglang/srt/models/{mixtral,olmoe,gpt_oss}.py;
vLLM's qwen2_moe.py), imported against that golden.  Mixtral's q/k are written in transformers' per-head
order, as the engines hold them, and must come back in the file's; names that are no stage (gpt-oss's
sinks, a weight; vLLM's gated shared expert) must be left out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flat_dumps import assert_refused, invoke, sglang_name
from moesnap.store.case import load_case

TOKENS = [1, 5, 9, 200, 17, 3, 3, 42, 100, 7]
PRESETS = {"llama": "mixtral-tiny", "olmoe": "olmoe-tiny", "gpt-oss": "gpt-oss-tiny", "qwen2moe": "qwen2-moe-tiny",
           "deepseek2": "deepseek-v3-tiny"}


@pytest.fixture(scope="module")
def goldens(tmp_path_factory):
    """family -> (store, golden name, case)."""
    import moesnap
    from moesnap.model.synth import make_model, preset

    root = tmp_path_factory.mktemp("names")
    out = {}
    for fam, name in PRESETS.items():
        suite = fam.replace("-", "")
        moesnap.generate(make_model(root / f"{name}.gguf", preset(name)), suite, [TOKENS], store=root / "store")
        out[fam] = (root / "store", f"{suite}@v0001", load_case(root / "store" / suite / "v0001" / "case0"))
    return out


def halves(x: np.ndarray) -> np.ndarray:
    """``[..., D]`` in the GGUF's per-head order (pairs) -> transformers' (halves): the inverse of
    moesnap.capture.hf_families.interleave."""
    D = x.shape[-1]
    return x.reshape(*x.shape[:-1], D // 2, 2).swapaxes(-1, -2).reshape(x.shape)


def write(d: Path, case, entries: list[tuple[str, int | None, np.ndarray]], meta: dict | None = None) -> Path:
    """The dumper's files of one prefill pass: bookkeeping, then ``entries`` (name, layer_id, values)."""
    d.mkdir(parents=True)
    T = case.tokens.size
    rows = [("input_ids", None, case.tokens.astype(np.int64)), ("positions", None, np.arange(T))] + entries
    for i, (name, layer, values) in enumerate(rows):
        tags = dict(step=0, rank=0, dump_index=i + 1, name=name, layer_id=layer)
        torch.save({"value": torch.from_numpy(np.ascontiguousarray(values)), "meta": {**tags, **(meta or {})}},
                   d / sglang_name(**tags))
    return d


def module_names(case, moe: str, *, router: str = "gate", paired: bool = False, whole_qk_norm: bool = False,
                 classic: bool = False) -> list[tuple[str, int | None, np.ndarray]]:
    """A Qwen3-MoE-like layer's module outputs as SGLang's hooks name them: the MoE block ``moe``, its router
    module ``router``; ``paired``: q/k in transformers' order; ``whole_qk_norm``: OLMoE's q_norm/k_norm
    over the projection; ``classic``: the residual as input_layernorm's second output."""
    L, T = case.n_layer, case.tokens.size
    g = {s: a for s, a in case.layers.items()}
    order = halves if paired else (lambda x: x)
    out: list[tuple[str, int | None, np.ndarray]] = [("non_intrusive__model.embed_tokens.output", None, case.model["embed"])]
    for n in range(L):
        p = f"non_intrusive__model.layers.{n}."
        if classic and n:
            out += [(p + "input_layernorm.output.0", n, g["attn_norm"][n]),
                    (p + "input_layernorm.output.1", n, g["layer_out"][n - 1])]
        else:                  # the residual a layer starts from is its input (the previous layer_out)
            out += [(p + "inputs.1", n, g["layer_out"][n - 1] if n else case.model["embed"]),
                    (p + "input_layernorm.output", n, g["attn_norm"][n])]
        qkv = [order(g["q"][n]), order(g["k"][n]), g["v"][n]]
        out.append((p + "self_attn.qkv_proj.output", n, np.concatenate([a.reshape(T, -1) for a in qkv], axis=1)))
        if whole_qk_norm:
            out += [(p + "self_attn.q_norm.output", n, g["q_norm"][n].reshape(T, -1)),
                    (p + "self_attn.k_norm.output", n, g["k_norm"][n].reshape(T, -1))]
        out += [(p + "self_attn.rotary_emb.output.0", n, order(g["q_rope"][n]).reshape(T, -1)),
                (p + "self_attn.rotary_emb.output.1", n, order(g["k_rope"][n]).reshape(T, -1)),
                (p + "self_attn.attn.output", n, g["attn"][n]), (p + "self_attn.o_proj.output", n, g["attn_out"][n]),
                (p + "post_attention_layernorm.output.0", n, g["ffn_norm"][n]),
                (p + "post_attention_layernorm.output.1", n, g["attn_resid"][n]),
                (p + f"{moe}.{router}.output", n, g["router_logits"][n]),
                (p + f"{moe}.topk.output.0", n, g["topk_weights"][n]), (p + f"{moe}.topk.output.1", n, g["topk_ids"][n]),
                (p + f"{moe}.topk.output.2", n, g["router_logits"][n])]
        if "shared_expert_out" not in g:
            out.append((p + f"{moe}.experts.output", n, g["moe_out"][n]))
        out.append((p + f"{moe}.output", n, g["moe_out"][n]))
    out += [("non_intrusive__model.norm.output.0", None, case.model["final_norm"]),
            ("non_intrusive__model.norm.output.1", None, g["layer_out"][L - 1]),
            ("non_intrusive__logits_processor.output.next_token_logits", None, case.model["logits"][-1:])]
    return out


def _import(goldens, fam: str, dump: Path, tmp: Path, fmt: str = "sglang"):
    store, golden, _ = goldens[fam]
    out = tmp / f"{fmt}.zarr"
    code, text, err = invoke(["import", "--format", fmt, str(dump), "--like", golden, "--store", str(store),
                              "--out", str(out)])
    assert code == 0, err
    code, text, err = invoke(["compare", golden, str(out), "--store", str(store), "--allow-missing", "--no-local",
                              "--json", str(tmp / f"{fmt}.json")])
    assert code in (0, 1), err
    return load_case(out), code, text, json.loads((tmp / f"{fmt}.json").read_text())


LAYERED = ("q", "k", "v", "q_rope", "k_rope", "attn", "attn_out", "attn_resid", "ffn_norm", "router_logits",
           "topk_ids", "topk_weights", "moe_out", "layer_out")


@pytest.mark.parametrize("fam", ["llama", "olmoe", "gpt-oss"])
def test_a_familys_module_paths_import_as_its_stages(tmp_path, goldens, fam):
    _, _, g = goldens[fam]
    if fam == "llama":      # Mixtral: block_sparse_moe; q/k in transformers' order, which is not the file's
        entries = module_names(g, "block_sparse_moe", paired=True)
        assert not np.array_equal(halves(g.layers["q"][0]), g.layers["q"][0])
    elif fam == "olmoe":    # OLMoE: Qwen3-MoE's names, q/k norm over the whole projection, classic residuals
        entries = module_names(g, "mlp", whole_qk_norm=True, classic=True)
    else:                   # gpt-oss: mlp.router; its sinks, a weight handed to the attention, are no stage
        entries = module_names(g, "mlp", router="router")
        entries += [(f"non_intrusive__model.layers.{n}.self_attn.attn.inputs.sinks", n,
                     np.linspace(-1, 1, g.layers["q"].shape[2]).astype(np.float32)) for n in range(g.n_layer)]
    case, code, text, rep = _import(goldens, fam, write(tmp_path / "dump", g, entries), tmp_path)
    want = LAYERED + (("q_norm", "k_norm") if fam == "olmoe" else ())
    for stage in want:
        assert np.array_equal(case.layers[stage], g.layers[stage]), stage
    assert "parted" not in case.attrs and code == 0 and rep["verdict"] == "pass", text
    assert rep["coverage"]["cells_held"] == rep["coverage"]["cells_judged"] > len(want) * g.n_layer * g.tokens.size
    if fam == "gpt-oss":
        assert "non_intrusive__model.layers.N.self_attn.attn.inputs.sinks" in case.attrs["ignored_names"]


def test_vllms_qwen2_moe_shared_expert_is_gated_inside_the_module(tmp_path, goldens):
    """vLLM's Qwen2MoeMLP applies the gate inside (shared_expert.output = sigmoid(gate) * shared) and its
    SharedFusedMoE returns (gated shared, routed): neither is a stage under --format vllm, where SGLang's
    shared_expert.output is the ungated shared_expert_out; the same file read as SGLang's is judged wrong."""
    _, _, g = goldens["qwen2moe"]
    entries = module_names(g, "mlp")
    gated = 1 / (1 + np.exp(-g.layers["shared_gate"].astype(np.float64))) * g.layers["shared_expert_out"]
    routed = g.layers["moe_out"] - gated
    for n in range(g.n_layer):
        p = f"non_intrusive__model.layers.{n}.mlp."
        entries += [(p + "shared_expert_gate.output", n, g.layers["shared_gate"][n]),
                    (p + "shared_expert.output", n, gated[n].astype(np.float32)),
                    (p + "experts.output.0", n, gated[n].astype(np.float32)),
                    (p + "experts.output.1", n, routed[n].astype(np.float32))]
    dump = write(tmp_path / "dump", g, entries)          # no parallel info: --format says whose
    case, code, text, rep = _import(goldens, "qwen2moe", dump, tmp_path, "vllm")
    assert case.attrs["producer"] == "vllm" and "shared_expert_out" not in case.layers
    assert np.array_equal(case.layers["shared_gate"], g.layers["shared_gate"])
    for name in ("shared_expert.output", "experts.output.0", "experts.output.1"):
        assert f"non_intrusive__model.layers.N.mlp.{name}" in case.attrs["ignored_names"], name
    assert code == 0 and rep["verdict"] == "pass", text
    case, code, text, rep = _import(goldens, "qwen2moe", dump, tmp_path, "sglang")
    assert case.attrs["producer"] == "sglang" and code == 1
    assert (rep["first_divergence"]["layer"], rep["first_divergence"]["stage"]) == (0, "shared_expert_out"), text


def test_vllms_deepseek_v3_names(tmp_path, goldens):
    """vLLM's DeepseekV2MLAAttention and DeepseekV2MoE: fused_qkv_a_proj (the q and kv latents side by side),
    the latent norms, q_b_proj, the rope part alone from rotary_emb and the MHA path's padded attention
    output (no stage), the MoE block's experts output (routed plus shared, as vLLM's FusedMoE returns it;
    no stage) and mlp.output: a dense layer's is its dense_ffn_out."""
    _, _, g = goldens["deepseek2"]
    T, lay = g.tokens.size, g.layers
    Dn = lay["q"].shape[-1] - 32                                          # deepseek-v3-tiny: rope width 32
    entries: list[tuple[str, int | None, np.ndarray]] = [("non_intrusive__model.embed_tokens.output", None,
                                                          g.model["embed"])]
    for n in range(g.n_layer):
        p = f"non_intrusive__model.layers.{n}."
        moe = n >= 1                                                      # one leading dense layer
        entries += [(p + "inputs.1", n, lay["layer_out"][n - 1] if n else g.model["embed"]),
                    (p + "input_layernorm.output", n, lay["attn_norm"][n]),
                    (p + "self_attn.fused_qkv_a_proj.output", n,
                     np.concatenate([lay["q_latent"][n], lay["kv_latent"][n]], axis=1)),
                    (p + "self_attn.q_a_layernorm.output", n, lay["q_latent_norm"][n]),
                    (p + "self_attn.q_b_proj.output", n, lay["q"][n].reshape(T, -1)),
                    (p + "self_attn.kv_a_layernorm.output", n, lay["kv_latent_norm"][n]),
                    (p + "self_attn.rotary_emb.output.0", n, lay["q_rope"][n][..., Dn:]),
                    (p + "self_attn.rotary_emb.output.1", n, lay["k_rope"][n][:, :1, Dn:]),
                    (p + "self_attn.attn.output", n, np.zeros((T, lay["q"].shape[2] * lay["q"].shape[3]), np.float32)),
                    (p + "self_attn.o_proj.output", n, lay["attn_out"][n]),
                    (p + "post_attention_layernorm.output.0", n, lay["ffn_norm"][n]),
                    (p + "post_attention_layernorm.output.1", n, lay["attn_resid"][n])]
        if moe:
            entries += [(p + "mlp.gate.output", n, lay["router_logits"][n]),
                        (p + "mlp.shared_experts.output", n, lay["shared_expert_out"][n]),
                        (p + "mlp.experts.output", n, lay["moe_out"][n])]
        entries.append((p + "mlp.output", n, lay["moe_out"][n] if moe else lay["dense_ffn_out"][n]))
    entries += [("non_intrusive__model.norm.inputs.0", None, lay["layer_out"][g.n_layer - 1]),
                ("non_intrusive__model.norm.output", None, g.model["final_norm"]),
                ("non_intrusive__logits_processor.output", None, g.model["logits"][-1:])]
    case, code, text, rep = _import(goldens, "deepseek2", write(tmp_path / "dump", g, entries), tmp_path, "vllm")
    for stage in ("q_latent", "kv_latent", "q_latent_norm", "kv_latent_norm", "q", "attn_out", "layer_out"):
        assert np.array_equal(case.layers[stage], lay[stage]), stage
    for stage in ("router_logits", "shared_expert_out", "moe_out"):
        assert np.array_equal(case.layers[stage][1:], lay[stage][1:]), stage
    assert np.array_equal(case.layers["dense_ffn_out"], lay["dense_ffn_out"][:1]) and "skipped" not in case.attrs
    assert not {"q_rope", "k_rope", "attn"} & set(case.layers)
    for name in ("self_attn.rotary_emb.output.0", "self_attn.attn.output", "mlp.experts.output"):
        assert f"non_intrusive__model.layers.N.{name}" in case.attrs["ignored_names"], name
    assert code == 0 and rep["verdict"] == "pass", text


def test_a_split_name_of_stages_the_golden_lacks_is_refused_naming_the_file(tmp_path, goldens):
    """DeepSeek's fused q/kv latent projection in a dump judged against a Qwen2-MoE golden: another model."""
    store, golden, g = goldens["qwen2moe"]
    name = "non_intrusive__model.layers.0.self_attn.fused_qkv_a_proj_with_mqa.output"
    dump = write(tmp_path / "dump", g, module_names(g, "mlp") + [(name, 0, np.zeros((g.tokens.size, 96), np.float32))])
    bad = next(p for p in dump.iterdir() if name in p.name)
    out = tmp_path / "o.zarr"
    assert_refused(["import", "--format", "sglang", str(dump), "--like", golden, "--store", str(store), "--out", str(out)],
                   f"{bad}: self_attn.fused_qkv_a_proj_with_mqa.output holds q_latent, kv_latent side by side, but the "
                   f"golden holds no q_latent, kv_latent")
    assert not out.exists()
