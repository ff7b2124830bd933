"""SGLang 0.5.23's own dumper (unmodified) on module trees named and called as SGLang's Mixtral, OLMoE and
gpt-oss (tests/capture/sglang_more_families.py), and on its Qwen2-MoE (sglang_families.py) through decode
passes, and all but DeepSeek-V2 over two tensor-parallel ranks, built from the tiny presets, imported against
each preset's golden and judged.  Skipped with the reason where sglang is not installed (``pip install --no-deps
sglang==0.5.23`` and pyzmq).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flat_dumps import compare_run, golden_of_run, import_sglang_run, invoke
from moesnap.store.case import load_case

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sglang_tree import require_dumper  # noqa: E402

TOKENS = [1, 5, 9, 200, 17, 3, 3, 42, 100, 7, 250, 64]
PROMPT, DECODE = TOKENS[:10], 3
PRESETS = {"mixtral": "mixtral-tiny", "olmoe": "olmoe-tiny", "oss": "gpt-oss-tiny", "qwen2": "qwen2-moe-tiny",
           "v3": "deepseek-v3-tiny", "ds": "deepseek-v2-tiny"}
MORE, FAMILIES = HERE / "sglang_more_families.py", HERE / "sglang_families.py"
#: the goldens of PROMPT and DECODE steps (the reference's continuation), by preset
DECODE_GOLDENS = {"dec": "qwen2", "dsdec": "ds", "ossdec": "oss"}
#: run name -> (preset, golden, tree, the tree's arguments)
RUNS = {
    "mixtral": ("mixtral", "mixtral", MORE, []),
    "mixtral_rope_fault": ("mixtral", "mixtral", MORE, ["--fault-rope", "1"]),
    "olmoe_bf16": ("olmoe", "olmoe", MORE, ["--dtype", "bfloat16"]),
    "olmoe_q_norm_fault": ("olmoe", "olmoe", MORE, ["--fault-qk-norm", "1"]),
    "oss": ("oss", "oss", MORE, []),
    "oss_sinks_fault": ("oss", "oss", MORE, ["--fault-sinks", "2"]),
    "qwen2_decode": ("qwen2", "dec", FAMILIES, ["--unfused-gate", "--decode", str(DECODE)]),
    "qwen2_decode_fault": ("qwen2", "dec", FAMILIES,
                           ["--unfused-gate", "--decode", str(DECODE), "--fault-cache", "1,1"]),
    "qwen2_decode_fault_bf16": ("qwen2", "dec", FAMILIES, ["--unfused-gate", "--decode", str(DECODE), "--dtype",
                                                           "bfloat16", "--fault-cache", "1,1"]),
    "ds_decode": ("ds", "dsdec", FAMILIES, ["--decode", str(DECODE)]),
    "oss_decode": ("oss", "ossdec", MORE, ["--decode", str(DECODE)]),
    "ds_decode_fault": ("ds", "dsdec", FAMILIES, ["--decode", str(DECODE), "--fault-cache", "2,2"]),
    "qwen2_tp2": ("qwen2", "qwen2", FAMILIES, ["--unfused-gate", "--tp", "2", "--port", "29671"]),
    "v3_tp2": ("v3", "v3", FAMILIES, ["--tp", "2", "--port", "29673"]),
    "mixtral_tp2": ("mixtral", "mixtral", MORE, ["--tp", "2", "--port", "29675"]),
    "olmoe_tp2_bf16": ("olmoe", "olmoe", MORE, ["--tp", "2", "--port", "29677", "--dtype", "bfloat16"]),
    "oss_tp2": ("oss", "oss", MORE, ["--tp", "2", "--port", "29679"]),
    "mixtral_tp2_rope_fault_rank1": ("mixtral", "mixtral", MORE,
                                     ["--tp", "2", "--port", "29681", "--fault-rope", "1", "--fault-rank", "1"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each run's (dump directory, golden store, golden name)."""
    require_dumper()
    import moesnap
    from moesnap.model.synth import make_model, preset

    root = tmp_path_factory.mktemp("sgmore")
    store = root / "store"
    models = {k: make_model(root / f"{name}.gguf", preset(name)) for k, name in PRESETS.items()}
    tokens = {}
    for golden, k in DECODE_GOLDENS.items():                  # their continuations feed the trees
        moesnap.generate(models[k], golden, [PROMPT], store=store, decode=DECODE)
        tokens[golden] = ",".join(map(str, load_case(store / golden / "v0001" / "case0").tokens))
    procs = {run: subprocess.Popen([sys.executable, str(tree), str(root / run), "--model", str(models[k]), "--tokens",
                                    tokens.get(golden, ",".join(map(str, TOKENS))), *args],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for run, (k, golden, tree, args) in RUNS.items()}
    for k in ("mixtral", "olmoe", "oss", "qwen2", "v3"):            # the prefill goldens while the trees run
        moesnap.generate(models[k], k, [TOKENS], store=store)
    for p in procs.values():
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-2000:]
    return {run: (root / run / "exp", store, f"{golden}@v0001") for run, (_, golden, _, _) in RUNS.items()}


_imported, _compare, _golden = import_sglang_run, compare_run, golden_of_run


def _held(rep: dict, stage: str, case: str = "case0") -> list[int]:
    return sorted(r["layer"] for r in rep["results"] if r["stage"] == stage and r["case"] == case
                  and r["verdict"] != "MISSING")


#: run -> (layers, the stages every layer holds, the dtype judged)
CLEAN = {
    "mixtral": (3, ("q", "k", "v", "q_rope", "k_rope", "attn", "attn_out", "attn_norm", "ffn_norm", "router_logits",
                    "topk_ids", "topk_weights", "moe_out", "layer_out"), "float32"),
    "olmoe_bf16": (3, ("q", "q_norm", "k_norm", "q_rope", "k_rope", "attn", "router_logits", "topk_weights",
                       "moe_out", "layer_out"), "bfloat16"),
    "oss": (4, ("q", "k", "v", "q_rope", "k_rope", "attn", "attn_out", "router_logits", "topk_ids", "topk_weights",
                "moe_out", "layer_out"), "float32"),
}


@pytest.mark.parametrize("run", list(CLEAN))
def test_a_clean_dump_of_mixtral_olmoe_and_gpt_oss_passes_with_every_cell_judged(tmp_path, runs, run):
    """Mixtral's block_sparse_moe, OLMoE's whole-projection q/k norm and its residual-passing layers
    (layer_out from input_layernorm.output.1 and norm.output.1), gpt-oss's mlp.router, biases, sinks and
    sliding layers: each lands in its stages and passes."""
    case, cand = _imported(runs, run, tmp_path)
    n_layer, stages, dtype = CLEAN[run]
    code, text, rep = _compare(runs, run, cand, tmp_path)
    assert code == 0 and rep["verdict"] == "pass", text
    assert rep["dtype"] == dtype
    cov = rep["coverage"]
    assert cov["cells_held"] == cov["cells_judged"] > 0 and cov["stages_skipped"] == n_layer   # expert_out alone
    for stage in stages:
        assert _held(rep, stage) == list(range(n_layer)), stage
    ignored = case.attrs["ignored_names"]
    if run == "mixtral":          # transformers' q/k rows in the dump, put into the GGUF's order
        golden = _golden(runs, run)
        assert np.allclose(case.layers["q_rope"], golden.layers["q_rope"], rtol=1e-4, atol=1e-5)
        assert "non_intrusive__model.layers.N.block_sparse_moe.inputs.0" in ignored
    elif run == "oss":            # the sinks go into attn as a keyword: a weight, no stage
        assert "non_intrusive__model.layers.N.self_attn.attn.inputs.sinks" in ignored
    else:
        assert "non_intrusive__model.layers.N.output.0" in ignored     # the mlp's output beside the residual


#: run -> (layer, stage) the fault is named at
FAULTS = {"mixtral_rope_fault": (1, "q_rope"), "olmoe_q_norm_fault": (1, "q_norm"), "oss_sinks_fault": (2, "attn")}


@pytest.mark.parametrize("run", list(FAULTS))
def test_a_planted_fault_of_each_family_is_named_at_its_layer_and_stage(tmp_path, runs, run):
    """Mixtral's rope style flipped (GPT-J pairs of transformers' rows), OLMoE's q norm per head, gpt-oss's
    sinks left out of a (full-attention) layer: named where they are, by both modes."""
    _, cand = _imported(runs, run, tmp_path)
    code, text, rep = _compare(runs, run, cand, tmp_path)
    assert code == 1 and rep["verdict"] == "fail"
    fd, intro = rep["first_divergence"], rep["local"]["first_introduced"]
    layer, stage = FAULTS[run]
    assert (fd["layer"], fd["stage"]) == (intro["layer"], intro["stage"]) == (layer, stage), text
    verdicts = [r["verdict"] for r in rep["results"] if r["stage"] == stage]
    assert verdicts[:layer] == ["MATCH"] * layer and verdicts[layer] == "DIVERGE"
    assert rep["coverage"]["cells_held"] == rep["coverage"]["cells_judged"]


def test_qwen2_moe_decode_passes_are_judged_against_a_decode_golden(tmp_path, runs):
    """A prefill of the golden's prompt, then one decode pass per token of its continuation (the dumper's
    step 1..3): imported as steps at positions 10, 11, 12, each step's every cell judged."""
    case, cand = _imported(runs, "qwen2_decode", tmp_path)
    golden = _golden(runs, "qwen2_decode")
    assert golden.attrs["prompt_tokens"] == len(PROMPT) and case.tokens.tolist() == PROMPT
    assert [s.attrs["positions"] for s in case.steps] == [[10], [11], [12]]
    assert [int(s.tokens[0]) for s in case.steps] == golden.tokens[len(PROMPT):].tolist()
    assert np.allclose(case.steps[2].layers["shared_gate"], golden.layers["shared_gate"][:, 12:], rtol=1e-4, atol=1e-5)
    code, text, rep = _compare(runs, "qwen2_decode", cand, tmp_path)
    assert code == 0 and rep["verdict"] == "pass", text
    assert [(s["case"], s["passed"]) for s in rep["steps"]] == [(f"case0/step{i}", True) for i in range(DECODE)]
    cov = rep["coverage"]
    assert cov["cells_held"] == cov["cells_judged"] and not cov["unjudged"]
    for step in range(DECODE):
        for stage in ("q_rope", "attn", "shared_expert_out", "shared_gate", "moe_out", "layer_out"):
            assert _held(rep, stage, f"case0/step{step}") == [0, 1, 2], (step, stage)


def test_a_decode_only_fault_is_named_at_its_step(tmp_path, runs):
    """Decode pass 1 of layer 1 reads its KV cache without the first row: the prefill and step 0 pass,
    step 1 fails first at layer 1's attn (step 2 inherits it through the cache of layer 2)."""
    _, cand = _imported(runs, "qwen2_decode_fault", tmp_path)
    code, text, rep = _compare(runs, "qwen2_decode_fault", cand, tmp_path)
    assert code == 1 and rep["verdict"] == "fail"
    fd = rep["first_divergence"]
    assert (fd["case"], fd["step"], fd["position"], fd["layer"], fd["stage"]) == ("case0/step1", 1, 11, 1, "attn"), text
    assert [s["passed"] for s in rep["steps"]] == [True, False, False]
    assert all(r["verdict"] == "MATCH" for r in rep["results"] if r["case"] in ("case0", "case0/step0"))
    assert "first failing step: case0/step1 (position 11, float32)" in text
    # the local re-reference takes the prompt and its steps as one sequence, the prompt's last-row logits aside
    assert "first layer that introduces a divergence: case0/step1 / layer 1 / attn" in text


def test_local_re_reference_names_the_step_and_layer_of_a_bfloat16_decode_fault(tmp_path, runs):
    """The same KV-cache fault in a bfloat16 dump, judged with the golden's model at hand: the prompt (its
    logits held for the last row only, as SGLang keeps them) and its steps re-referenced as one sequence, so
    the layer that introduces the step's error is named, not only where it is first seen."""
    _, cand = _imported(runs, "qwen2_decode_fault_bf16", tmp_path)
    _, store, golden = runs["qwen2_decode_fault_bf16"]
    model = next(Path(store).parent.glob("qwen2-moe-tiny.gguf"))
    code, text, err = invoke(["compare", golden, str(cand), "--store", str(store), "--allow-missing", "--model",
                              str(model)])
    assert code == 1, err
    assert "first failing step: case0/step1 (position 11, bfloat16)" in text
    assert "first layer that introduces a divergence: case0/step1 / layer 1 / attn" in text, text


def test_gpt_oss_decode_passes_through_sliding_windows_and_sinks_pass(tmp_path, runs):
    """gpt-oss's decode passes: each step's query sees the last 4 positions on the sliding layers 0 and 2
    (a prompt of 10 crosses the window) and every position on 1 and 3, with the sinks; every cell judged."""
    case, cand = _imported(runs, "oss_decode", tmp_path)
    assert [s.attrs["positions"] for s in case.steps] == [[10], [11], [12]]
    code, text, rep = _compare(runs, "oss_decode", cand, tmp_path)
    assert code == 0 and rep["verdict"] == "pass", text
    assert [s["passed"] for s in rep["steps"]] == [True] * DECODE
    cov = rep["coverage"]
    assert cov["cells_held"] == cov["cells_judged"] and not cov["unjudged"]
    for step in range(DECODE):
        for stage in ("q_rope", "k_rope", "attn", "router_logits", "moe_out", "layer_out"):
            assert _held(rep, stage, f"case0/step{step}") == [0, 1, 2, 3], (step, stage)


def test_deepseek_decode_passes_run_the_absorbed_mla_and_are_judged(tmp_path, runs):
    """DeepSeek-V2's decode passes take SGLang's absorbed path (attn_mqa in the latent space, w_kc and w_vc
    as bmm): no q_rope, k_rope, v in a step, its attn from o_proj's input (DUMPER_ALIASES), every cell judged."""
    case, cand = _imported(runs, "ds_decode", tmp_path)
    assert [s.attrs["positions"] for s in case.steps] == [[10], [11], [12]]
    assert "non_intrusive__model.layers.N.self_attn.attn_mqa.inputs.0" in case.attrs["ignored_names"]
    for s in case.steps:
        assert not {"q_rope", "k_rope", "v"} & set(s.layers) and {"q", "kv_latent_norm", "attn"} <= set(s.layers)
    code, text, rep = _compare(runs, "ds_decode", cand, tmp_path)
    assert code == 0 and rep["verdict"] == "pass", text
    cov = rep["coverage"]
    assert cov["cells_held"] == cov["cells_judged"] and not cov["unjudged"]
    for step in range(DECODE):
        for stage in ("kv_latent", "q", "attn", "attn_out", "layer_out"):
            assert _held(rep, stage, f"case0/step{step}") == [0, 1, 2], (step, stage)
        assert _held(rep, "moe_out", f"case0/step{step}") == [1, 2] and _held(rep, "v", f"case0/step{step}") == []
    assert _held(rep, "v") == [0, 1, 2]                      # the prefill's MHA path


def test_a_fault_in_deepseeks_absorbed_decode_attention_is_named_at_its_step(tmp_path, runs):
    _, cand = _imported(runs, "ds_decode_fault", tmp_path)
    code, text, rep = _compare(runs, "ds_decode_fault", cand, tmp_path)
    assert code == 1 and rep["verdict"] == "fail"
    fd = rep["first_divergence"]
    assert (fd["case"], fd["step"], fd["layer"], fd["stage"]) == ("case0/step2", 2, 2, "attn"), text
    assert [s["passed"] for s in rep["steps"]] == [True, True, False]


#: run -> (the stages sharded by heads, those the ranks hold partial sums of, replicated ones, stages held at
#: every layer, a stage's layers)
TP = {
    "qwen2_tp2": (("q", "k", "v", "q_rope", "k_rope", "attn"), ("attn_out", "moe_out", "shared_expert_out"),
                  ("router_logits", "shared_gate"),
                  ("q", "k", "v", "attn", "attn_out", "shared_expert_out", "shared_gate", "moe_out", "layer_out"),
                  ("shared_expert_out", [0, 1, 2])),
    "v3_tp2": (("q", "v", "q_rope", "k_rope", "attn"), ("attn_out", "moe_out", "shared_expert_out", "dense_ffn_out"),
               ("q_latent", "kv_latent", "kv_latent_norm", "router_logits"),
               ("q_latent", "kv_latent", "q", "q_rope", "k_rope", "v", "attn", "attn_out", "layer_out"),
               ("shared_expert_out", [1, 2])),
}


@pytest.mark.parametrize("run", list(TP))
def test_qwen2_moe_and_deepseek_over_two_tensor_parallel_ranks_are_merged_and_pass(tmp_path, runs, run):
    """TP = 2: each rank's heads put side by side (DeepSeek: q_b_proj's and kv_b_proj's, the latents
    replicated), its o_proj, routed experts (EP) and shared experts (intermediate split, down_proj row
    parallel; DeepSeek's dense layer 0 likewise) partial sums added up; the router replicated."""
    heads, partial, replicated, every, (stage, layers) = TP[run]
    case, cand = _imported(runs, run, tmp_path)
    assert case.attrs["ranks"] == [0, 1] and case.attrs["sharding"]["sglang_parallel_info"]["tp_size"] == 2
    sharding = case.attrs["sharding"]
    assert all(sharding[s] == ("t (h[tp] d)" if s == "attn" else "t h[tp] d") for s in heads), sharding
    assert all(sharding[s] == "t h[tp:partial]" for s in partial), sharding
    assert not set(replicated) & set(sharding) and set(replicated) <= set(case.layers)
    golden = _golden(runs, run)
    assert np.allclose(case.layers[stage][layers], golden.layers[stage][layers], rtol=1e-4, atol=1e-5)
    code, text, rep = _compare(runs, run, cand, tmp_path)
    assert code == 0 and rep["verdict"] == "pass", text
    cov = rep["coverage"]
    assert cov["cells_held"] == cov["cells_judged"] > 0
    for s in every:
        assert _held(rep, s) == [0, 1, 2], s
    assert _held(rep, stage) == layers


#: run -> (layers, the dtype judged, the stages sharded by heads, those the ranks hold partial sums of, those
#: reduced inside their module (identical on every rank), stages held at every layer)
TP_MORE = {
    "mixtral_tp2": (3, "float32", ("q", "k", "v", "q_rope", "k_rope", "attn"), ("attn_out", "moe_out"), (),
                    ("q", "k", "v", "q_rope", "k_rope", "attn", "attn_out", "router_logits", "topk_ids",
                     "topk_weights", "moe_out", "layer_out")),
    "olmoe_tp2_bf16": (3, "bfloat16", ("q", "k", "v", "q_norm", "k_norm", "q_rope", "k_rope", "attn"), (),
                       ("attn_out", "moe_out"),
                       ("q", "q_norm", "k_norm", "q_rope", "k_rope", "attn", "attn_out", "router_logits",
                        "topk_weights", "moe_out", "layer_out")),
    "oss_tp2": (4, "float32", ("q", "k", "v", "q_rope", "k_rope", "attn"), ("attn_out", "moe_out"), (),
                ("q", "k", "v", "q_rope", "k_rope", "attn", "attn_out", "router_logits", "topk_ids", "topk_weights",
                 "moe_out", "layer_out")),
}


@pytest.mark.parametrize("run", list(TP_MORE))
def test_mixtral_olmoe_and_gpt_oss_over_two_tensor_parallel_ranks_are_merged_and_pass(tmp_path, runs, run):
    """TP = 2 as SGLang shards these three at tp_size=2 without EP: each rank's q/k/v heads (gpt-oss: their
    biases and sinks too), o_proj row parallel (gpt-oss: its bias on rank 0), every expert's intermediate
    width split (FusedMoE's moe_tp_size = 2; gpt-oss's down bias on rank 0), the router replicated.  Mixtral's
    and gpt-oss's o_proj and experts are reduced after the module (partial sums in the dump, added up by the
    importer); OLMoE's inside it (reduce_results=True: the same on both ranks), its whole-projection q/k norm
    the tp-aware one (the mean square all-reduced), its normed heads split like q and k."""
    n_layer, dtype, heads, partial, reduced, every = TP_MORE[run]
    case, cand = _imported(runs, run, tmp_path)
    sharding = case.attrs["sharding"]
    info = sharding["sglang_parallel_info"]
    assert case.attrs["ranks"] == [0, 1] and info["tp_size"] == 2
    assert (info["moe_tp_size"], info["moe_ep_size"]) == (2, 1)
    assert all(sharding[s] == ("t (h[tp] d)" if s == "attn" else "t h[tp] d") for s in heads), sharding
    assert all(sharding[s] == "t h[tp:partial]" for s in partial), sharding
    assert not {"router_logits", "topk_ids", "topk_weights", *reduced} & set(sharding)
    golden = _golden(runs, run)
    for s in ("q_rope", "attn", *partial, *reduced):           # merged in the golden's shapes (and values)
        assert case.layers[s].shape == golden.layers[s].shape, s
        assert dtype != "float32" or np.allclose(case.layers[s], golden.layers[s], rtol=1e-4, atol=1e-5), s
    code, text, rep = _compare(runs, run, cand, tmp_path)
    assert code == 0 and rep["verdict"] == "pass", text
    assert rep["dtype"] == dtype
    cov = rep["coverage"]
    assert cov["cells_held"] == cov["cells_judged"] > 0 and not cov["unjudged"]
    for s in every:
        assert _held(rep, s) == list(range(n_layer)), s


def test_a_fault_on_one_tensor_parallel_rank_alone_is_named_at_its_layer_and_stage(tmp_path, runs):
    """Mixtral at TP = 2, rank 1's heads of layer 1 turned as GPT-J pairs, rank 0's right: the merged
    q_rope diverges at layer 1 (in rank 1's half of the heads alone), named there by both modes."""
    run = "mixtral_tp2_rope_fault_rank1"
    case, cand = _imported(runs, run, tmp_path)
    golden = _golden(runs, run)
    half = golden.layers["q_rope"].shape[-2] // 2
    got, want = case.layers["q_rope"][1], golden.layers["q_rope"][1]                    # [T, H, D]
    assert np.allclose(got[:, :half], want[:, :half], rtol=1e-4, atol=1e-5)           # rank 0's heads
    assert not np.allclose(got[:, half:], want[:, half:], rtol=1e-2, atol=1e-2)       # rank 1's
    code, text, rep = _compare(runs, run, cand, tmp_path)
    assert code == 1 and rep["verdict"] == "fail"
    fd, intro = rep["first_divergence"], rep["local"]["first_introduced"]
    assert (fd["layer"], fd["stage"]) == (intro["layer"], intro["stage"]) == (1, "q_rope"), text
    verdicts = [r["verdict"] for r in rep["results"] if r["stage"] == "q_rope"]
    assert verdicts[:2] == ["MATCH", "DIVERGE"]
    assert rep["coverage"]["cells_held"] == rep["coverage"]["cells_judged"]


@pytest.mark.parametrize("argv, needle", [
    (["--tp", "2", "--fault-rank", "1"], "--fault-rank 1: no fault planted"),
    (["--tp", "2", "--fault-rope", "1", "--fault-rank", "2"], "--fault-rank 2: the run has ranks 0-1"),
])
def test_a_fault_on_a_rank_that_cannot_fire_is_refused_by_the_tree(tmp_path, argv, needle):
    require_dumper()
    from moesnap.model.synth import make_model, preset

    model = make_model(tmp_path / "m.gguf", preset(PRESETS["mixtral"]))
    p = subprocess.run([sys.executable, str(MORE), str(tmp_path / "out"), "--model", str(model), "--tokens", "1,2",
                        *argv], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.startswith(needle) and p.stderr.count("\n") == 1, p.stderr
    assert not (tmp_path / "out").exists()
