"""``moesnap check`` of Qwen2-MoE, Mixtral and OLMoE goldens: the tiny presets' goldens (reference, float32)
judged against moesnap's candidate, prefill and decode (contiguous, paged, batched, static buffers),
float32, bfloat16 and float16 with the built-in tolerances, every cell judged; the family faults named at
their layer and stage in float32 and bfloat16.  The built-in tables judge ``shared_expert_out`` by
``expert_out``'s row limit and Qwen2-MoE's ``shared_gate`` (one logit per token) elementwise only
(judge/tolerances.py says why, with the figures measured).
"""

from __future__ import annotations

import pytest
from family_checks import assert_all_judged_pass, check, introduced, make_suite

PROMPTS = [[1, 5, 9, 200, 17, 3, 3, 64, 100, 7, 11, 12], [7, 8, 9, 10, 11, 12, 13, 14, 30]]
DECODE = 4


@pytest.fixture(scope="module", params=["qwen2-moe-tiny", "mixtral-tiny", "olmoe-tiny"])
def suite(request, tmp_path_factory):
    return make_suite(tmp_path_factory.mktemp("ll_check"), request.param, PROMPTS, DECODE)


def family(suite) -> str:
    return suite[0].name.split("-")[0]          # qwen2, mixtral, olmoe


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_prefill_check_judges_every_cell(suite, dtype):
    report = check(suite, "p", dtype)
    assert_all_judged_pass(report)
    stages = {r.stage for r in report.results}
    assert ({"shared_expert_out", "shared_gate"} <= stages) == (family(suite) == "qwen2")
    assert ({"q_norm", "k_norm"} <= stages) == (family(suite) == "olmoe")


@pytest.mark.parametrize("dtype, opts", [
    ("float32", {}),
    ("float32", {"paged": True, "batch": True}),
    ("float32", {"cuda_graph": True}),          # the static-buffer decode, eager on the CPU
    ("bfloat16", {"paged": True, "batch": True}),
])
def test_decode_check_judges_every_cell(suite, dtype, opts):
    report = check(suite, "d", dtype, decode=DECODE, **opts)
    assert_all_judged_pass(report)


# (spec, layer, stage, the families it fires in)
FAULTS = [
    ("shared_gate_off:layer=1", 1, "moe_out", ("qwen2",)),
    ("shared_off:layer=2", 2, "moe_out", ("qwen2",)),
    ("renorm_flip:layer=1", 1, "topk_weights", ("qwen2", "mixtral", "olmoe")),
    ("renorm_flip:layer=2", 2, "topk_weights", ("qwen2", "mixtral", "olmoe")),
    ("rope_flip:layer=1", 1, "q_rope", ("qwen2", "mixtral", "olmoe")),
    ("qk_norm_flip:layer=2", 2, "q_norm", ("olmoe",)),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("spec, layer, stage, where", FAULTS, ids=[f[0] for f in FAULTS])
def test_planted_faults_are_named_at_their_layer_and_stage(suite, dtype, spec, layer, stage, where):
    if family(suite) not in where:
        pytest.skip(f"{suite[0].name} lacks what {spec} breaks (its refusal: test_candidate_llama_like.py)")
    report = check(suite, "p", dtype, inject=[spec])
    fd = report.first_divergence
    assert report.verdict == "fail" and fd is not None, report.summary()
    assert (fd.layer, fd.stage) == (layer, stage), report.summary()
    if dtype == "bfloat16":
        assert introduced(report) == (layer, stage), report.summary()


def test_a_decode_fault_is_named(suite):
    report = check(suite, "d", "float32", decode=DECODE, paged=True, inject=["renorm_flip:layer=2"])
    fd = report.first_divergence
    assert report.verdict == "fail" and fd is not None and (fd.layer, fd.stage) == (2, "topk_weights")


def test_the_cli_refuses_a_fault_the_family_lacks_in_one_line(suite, capsys):
    from moesnap.cli.main import main

    path, store = suite
    spec = "qk_norm_flip:layer=0" if family(suite) != "olmoe" else "shared_gate_off:layer=0"
    code = main(["check", str(path), "--suite", "p", "--store", str(store), "--inject", spec])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert code == 2 and len(err) == 1 and spec in err[0] and " has no " in err[0], err


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, opts", [
    ("float32", {}),
    ("bfloat16", {}),
    ("float32", {"decode": DECODE, "paged": True, "cuda_graph": True}),
    ("bfloat16", {"decode": DECODE, "paged": True, "batch": True, "cuda_graph": True}),
])
def test_cuda_check_judges_every_cell(suite, dtype, opts):
    report = check(suite, "d" if opts else "p", dtype, device="cuda", **opts)
    assert_all_judged_pass(report)


@pytest.mark.gpu
@pytest.mark.parametrize("spec, layer, stage, where", FAULTS, ids=[f[0] for f in FAULTS])
def test_cuda_planted_faults_are_named(suite, spec, layer, stage, where):
    if family(suite) not in where:
        pytest.skip(f"{suite[0].name} lacks what {spec} breaks")
    report = check(suite, "p", "bfloat16", device="cuda", inject=[spec])
    fd = report.first_divergence
    assert report.verdict == "fail" and fd is not None and (fd.layer, fd.stage) == (layer, stage), report.summary()
