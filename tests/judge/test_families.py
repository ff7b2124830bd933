"""The judge walks the stages of the golden's family (stages.FAMILY_STAGES): a stage the family lacks
is neither a missing stage of the candidate nor a cell a pass claims, and a golden of one family never
judges a case of another."""

from __future__ import annotations

import copy

import pytest

from moesnap.case import Case
from moesnap.errors import GoldenError
from moesnap.judge.classify import Verdict
from moesnap.judge.compare import compare_cases
from moesnap.judge.tolerances import Tolerances
from moesnap.stages import FAMILY_STAGES, LAYER_STAGES

from judge_helpers import TOKENS  # noqa: E402  (the `golden` fixture: tests/judge/conftest.py)

NORMS = ("q_norm", "k_norm")


def of_family(case: Case, arch: str | None, drop: tuple[str, ...] = ()) -> Case:
    """A copy of ``case`` recording ``arch`` (None: no model config at all), without the ``drop`` stages."""
    out = copy.deepcopy(case)
    for s in drop:
        out.layers.pop(s)
    if arch is not None:
        out.attrs["model"] = {"config": {"n_layer": case.n_layer, "arch": arch}}
    return out


def judge(golden: Case, cand: Case):
    return compare_cases(golden, cand, Tolerances.defaults(), dtype="float32")


def test_gpt_oss_has_no_qk_norm_stages_and_every_other_one():
    assert set(FAMILY_STAGES["qwen3moe"]) - set(FAMILY_STAGES["gpt-oss"]) == set(NORMS)
    # Qwen3-MoE's stages are the schema's less DeepSeek's own, in the schema's order
    deepseek_only = {"q_latent", "q_latent_norm", "kv_latent", "kv_latent_norm", "dense_ffn_out", "router_select"}
    shared = {"shared_expert_out", "shared_gate"}
    assert FAMILY_STAGES["qwen3moe"] == tuple(s for s in LAYER_STAGES if s not in deepseek_only | shared)
    assert set(LAYER_STAGES) - set(FAMILY_STAGES["deepseek2"]) == {*NORMS, "shared_gate"}
    # Qwen2-MoE: gpt-oss's stages and its gated shared expert; Mixtral: gpt-oss's; OLMoE: Qwen3-MoE's
    assert set(FAMILY_STAGES["qwen2moe"]) == set(FAMILY_STAGES["gpt-oss"]) | shared
    assert FAMILY_STAGES["llama"] == FAMILY_STAGES["gpt-oss"] and FAMILY_STAGES["olmoe"] == FAMILY_STAGES["qwen3moe"]
    for family in FAMILY_STAGES.values():     # in the schema's order
        assert list(family) == sorted(family, key=LAYER_STAGES.index)


def test_a_stage_the_family_lacks_is_not_missing_nor_claimed(golden):
    g = of_family(golden, "gpt-oss", NORMS)
    rep = judge(g, of_family(golden, None, NORMS))
    assert rep.passed, [(r.layer, r.stage, r.verdict) for r in rep.results if not r.result.passed]
    stages = {r.stage for r in rep.results}
    assert not stages & set(NORMS) and {"q", "q_rope", "attn"} <= stages
    # the cells a pass claims are those of the family's stages only
    full = judge(golden, copy.deepcopy(golden))
    per_stage = len(TOKENS) * golden.n_layer
    assert full.cells()[1] - rep.cells()[1] == len(NORMS) * per_stage
    # a candidate that has the stages anyway (an engine dumping more) is judged on the family's only
    assert {r.stage for r in judge(g, copy.deepcopy(golden)).results} == stages


def test_the_same_stages_absent_from_a_qwen3_golden_are_missing(golden):
    for arch in (None, "qwen3moe"):   # a golden from before families is Qwen3-MoE's
        rep = judge(of_family(golden, arch, NORMS), of_family(golden, None, NORMS))
        assert not rep.passed
        assert {(r.stage, r.verdict) for r in rep.results if not r.result.passed} == {
            (s, Verdict.MISSING) for s in NORMS}


def test_a_stage_the_family_has_stays_missing_when_absent(golden):
    rep = judge(of_family(golden, "gpt-oss", NORMS), of_family(golden, None, (*NORMS, "q")))
    bad = {(r.stage, r.verdict) for r in rep.results if not r.result.passed}
    assert bad == {("q", Verdict.MISSING)}


def test_a_golden_of_one_family_never_judges_another(golden):
    g = of_family(golden, "gpt-oss", NORMS)
    with pytest.raises(GoldenError, match="golden is of a 'gpt-oss' model, the candidate of a 'qwen3moe' model"):
        judge(g, of_family(golden, "qwen3moe"))
    with pytest.raises(GoldenError, match="is of a 'qwen3moe' model, the candidate of a 'gpt-oss'"):
        judge(of_family(golden, None), of_family(golden, "gpt-oss", NORMS))


@pytest.mark.parametrize("arch", ["mamba", 7, None])
def test_an_unknown_family_is_refused_in_one_line(golden, arch):
    g = copy.deepcopy(golden)
    g.attrs["model"] = {"config": {"arch": arch}}
    with pytest.raises(GoldenError, match=r"case \(golden\): attribute 'model.config.arch' = .* is no family") as e:
        judge(g, copy.deepcopy(golden))
    assert "\n" not in str(e.value)
