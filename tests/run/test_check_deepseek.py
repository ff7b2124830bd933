"""``moesnap check`` of a DeepSeek golden: the tiny V2 and V3 models' goldens (reference, float32) judged
against moesnap's candidate, prefill and decode (contiguous, paged, batched, static buffers), float32 and
bfloat16, every cell judged; the family's planted faults named at their layer and stage in both dtypes.

bfloat16, measured (6 prompts of 24 tokens, each stage fed the golden's inputs): the largest row error of
the two MLP stages the family adds, ``dense_ffn_out`` 0.0092 (V2) / 0.0089 (V3) and ``shared_expert_out``
0.0099 / 0.0090, is ``expert_out``'s own (0.0098 / 0.0086; 0.0076 on the tiny Qwen3-MoE model): three
bfloat16 matmuls and a SwiGLU each.  The V3 prompts below have one ``dense_ffn_out`` row at 0.0112 (case 0,
layer 0, token 6) and one ``shared_expert_out`` row at 0.0117 (case 1, layer 1, token 2): above the default
row limit 0.01, calibrated for one matmul, so the built-in tables give the two stages ``expert_out``'s
limit, 0.02 (judge/tolerances.py).
"""

from __future__ import annotations

import pytest
from family_checks import assert_all_judged_pass, check, introduced, make_suite

import moesnap
from moesnap.judge.tolerances import Tolerances

PROMPTS = [[1, 5, 9, 200, 17, 3, 3, 64, 100, 7, 11, 12], [7, 8, 9, 10, 11, 12, 13, 14, 30]]
DECODE = 4


@pytest.fixture(scope="module", params=["deepseek-v2-tiny", "deepseek-v3-tiny"])
def suite(request, tmp_path_factory):
    return make_suite(tmp_path_factory.mktemp("ds_check"), request.param, PROMPTS, DECODE)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_check_judges_every_cell(suite, dtype):
    report = check(suite, "p", dtype)
    assert_all_judged_pass(report)
    stages = {r.stage for r in report.results}
    assert {"kv_latent", "kv_latent_norm", "router_select", "dense_ffn_out", "shared_expert_out"} <= stages
    assert not stages & {"q_norm", "k_norm"}


def test_the_default_row_limit_is_what_fails_v3_in_bfloat16(suite):
    """The module docstring's measurement: under the default row limit 0.01 (expert_out's 0.02 taken from
    the family's MLP stages) the clean V3 run fails stage-local replay on dense_ffn_out alone; V2 passes."""
    path, store = suite
    one_matmul = Tolerances.defaults().with_overrides(
        ["bfloat16:dense_ffn_out.row_rel_l2=0.01", "bfloat16:shared_expert_out.row_rel_l2=0.01"])
    report = moesnap.check(path, "p", store=store, dtype="bfloat16", tols=one_matmul, show_progress=False)
    assert report.coverage().judged == report.coverage().held
    if "v3" in path.name:
        assert report.verdict == "fail" and introduced(report) == (0, "dense_ffn_out"), report.summary()
    else:
        assert report.verdict == "pass", report.summary()


@pytest.mark.parametrize("dtype, opts", [
    ("float32", {}),
    ("float32", {"paged": True}),
    ("float32", {"paged": True, "batch": True}),
    ("float32", {"cuda_graph": True}),          # the static-buffer decode, eager on the CPU
    ("bfloat16", {"paged": True, "batch": True}),
])
def test_decode_check_judges_every_cell(suite, dtype, opts):
    report = check(suite, "d", dtype, decode=DECODE, **opts)
    assert_all_judged_pass(report)


# (spec, layer, stage, V3 only) each fault must be named at
FAULTS = [
    ("bias_off:layer=1", 1, "router_select", True),
    ("shared_off:layer=2", 2, "moe_out", False),
    ("shared_off:layer=1", 1, "moe_out", False),
    ("scale_off:layer=1", 1, "topk_weights", False),
    ("scale_off:layer=2", 2, "topk_weights", False),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("spec, layer, stage, v3", FAULTS, ids=[f[0] for f in FAULTS])
def test_planted_faults_are_named_at_their_layer_and_stage(suite, dtype, spec, layer, stage, v3):
    if v3 and "v3" not in suite[0].name:
        pytest.skip("V2 has no correction bias (its refusal: test_candidate_deepseek.py)")
    report = check(suite, "p", dtype, inject=[spec])
    fd = report.first_divergence
    assert report.verdict == "fail" and fd is not None, report.summary()
    assert (fd.layer, fd.stage) == (layer, stage), report.summary()
    if dtype == "bfloat16":
        assert introduced(report) == (layer, stage), report.summary()


def test_a_decode_fault_is_named(suite):
    report = check(suite, "d", "float32", decode=DECODE, paged=True, inject=["scale_off:layer=2"])
    fd = report.first_divergence
    assert report.verdict == "fail" and fd is not None and (fd.layer, fd.stage) == (2, "topk_weights")


def test_the_cli_refuses_a_fault_on_a_dense_layer_in_one_line(suite, capsys):
    from moesnap.cli.main import main

    path, store = suite
    code = main(["check", str(path), "--suite", "p", "--store", str(store), "--inject", "shared_off:layer=0"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert code == 2 and len(err) == 1 and "layer 0 is dense" in err[0], err


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
@pytest.mark.parametrize("spec, layer, stage, v3", FAULTS, ids=[f[0] for f in FAULTS])
def test_cuda_planted_faults_are_named(suite, spec, layer, stage, v3):
    if v3 and "v3" not in suite[0].name:
        pytest.skip("V2 has no correction bias")
    report = check(suite, "p", "bfloat16", device="cuda", inject=[spec])
    fd = report.first_divergence
    assert report.verdict == "fail" and fd is not None and (fd.layer, fd.stage) == (layer, stage), report.summary()
