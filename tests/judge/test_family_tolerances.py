"""A family's own calibrated free-running tolerances (moesnap.judge.family_tolerances): data the one
judge reads, Qwen3-MoE's tables untouched, the per-layer modes' tables untouched, and the stored
gpt-oss numbers covering what ``moesnap calibrate`` measures on the gpt-oss-tiny preset."""

from __future__ import annotations

import json

import pytest

from moesnap.cli.main import main
from moesnap.judge.family_tolerances import FAMILY_CARRIED, FAMILY_GGML_CARRIED, family_note
from moesnap.judge.policy import Settings
from moesnap.judge.tolerances import DEFAULT, DEFAULT_TOLERANCES, GGML_CARRIED, Tolerances
from moesnap.stages import FAMILY_STAGES, INTEGER_STAGES, MODEL_STAGES


def test_qwen3moe_keeps_the_built_in_tables_and_has_no_family_note():
    assert Tolerances.defaults("qwen3moe") == Tolerances.defaults()
    assert not Tolerances.defaults().carried_stages and not Tolerances.defaults().carried_tie_tols
    assert family_note("qwen3moe") is None
    assert Settings(profile="default").resolve(family="qwen3moe").notes == ()


@pytest.mark.parametrize("family", list(FAMILY_CARRIED))
def test_family_numbers_are_known_stages_never_below_the_built_in_ones(family):
    known = (set(FAMILY_STAGES[family]) | set(MODEL_STAGES)) - INTEGER_STAGES
    tables = [(dtype, own, DEFAULT_TOLERANCES[dtype]) for dtype, own in FAMILY_CARRIED[family].items()]
    if family in FAMILY_GGML_CARRIED:
        tables.append(("ggml float32", FAMILY_GGML_CARRIED[family], GGML_CARRIED))
    for dtype, own, built_in in tables:
        assert own.tie_tol >= built_in.tie_tol, dtype
        for stage, (atol, rtol) in own.stages.items():
            assert stage in known, (dtype, stage)
            base = built_in.stages.get(stage, built_in.stages[DEFAULT])
            assert atol >= base[0] and rtol >= base[1], (dtype, stage)


def test_gpt_oss_free_running_takes_its_own_numbers_and_the_per_layer_modes_do_not():
    qwen, oss = Tolerances.defaults(), Tolerances.defaults("gpt-oss")
    for depth in (0, 3):
        c = oss.carried("moe_out", "bfloat16", depth)
        assert (c.atol, c.rtol) == pytest.approx((8.7 * (1 + depth) ** 0.5, 0.5 * (1 + depth) ** 0.5))
        assert c.max_frac_outside == qwen.carried("moe_out", "bfloat16", depth).max_frac_outside
    assert oss.tie_tol_at("bfloat16", 0) == 1.4 and oss.tie_tol("bfloat16") == qwen.tie_tol("bfloat16")
    for dtype in ("float32", "bfloat16", "float16"):
        for stage in FAMILY_STAGES["gpt-oss"]:
            assert oss.for_stage(stage, dtype) == qwen.for_stage(stage, dtype), (dtype, stage)
    # a stage the family lists no number for keeps the built-in one, free-running too
    assert oss.carried("topk_ids", "bfloat16", 2) == qwen.carried("topk_ids", "bfloat16", 2)


def test_overrides_and_the_ggml_profile_still_apply_over_a_familys_numbers():
    tols = Settings(profile="default", overrides=("bfloat16:moe_out.atol=0.5",)).tolerances("default", "gpt-oss")
    assert tols.carried("moe_out", "bfloat16", 0).atol == 0.5 and tols.for_stage("moe_out", "bfloat16").atol == 0.5
    ggml, qwen_ggml = Tolerances.for_profile("ggml", "gpt-oss"), Tolerances.for_profile("ggml")
    assert qwen_ggml.carried("moe_out", "float32", 0).atol == GGML_CARRIED.stages["moe_out"][0]
    assert ggml.carried("moe_out", "float32", 0).atol == FAMILY_GGML_CARRIED["gpt-oss"].stages["moe_out"][0] == 4.0
    assert ggml.tie_tol_at("float32", 0) == 0.98 and qwen_ggml.tie_tol_at("float32", 0) == GGML_CARRIED.tie_tol
    assert ggml.carried("moe_out", "bfloat16", 0).atol == 8.7          # the family's default-profile bfloat16
    assert ggml.for_stage("moe_out", "float32") == qwen_ggml.for_stage("moe_out", "float32")   # per-layer: built-in
    policy = Settings(profile="auto").resolve(engine="transformers", family="gpt-oss")
    assert any("'gpt-oss' is judged with that family's own calibrated spread" in n for n in policy.notes)
    assert policy.tolerances == Tolerances.defaults("gpt-oss")


def test_calibrate_on_gpt_oss_tiny_measures_within_the_stored_numbers(tmp_path, capsys):
    from moesnap.model.synth import make_model, preset

    model = make_model(tmp_path / "gpt-oss-tiny.gguf", preset("gpt-oss-tiny"))
    js = tmp_path / "cal.json"
    assert main(["-q", "calibrate", str(model), "--tokens", "1,5,9,30,7,100,3,2,44,12,19,250", "--tokens",
                 "7,8,9,10,11,12", "--dtypes", "bfloat16,float16", "--margin", "2", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "q_norm" not in out and "attn_norm" in out, "the family's stages, no others"
    tols = Tolerances.defaults("gpt-oss")
    measured = json.loads(js.read_text())["dtypes"]
    for dtype, d in measured.items():
        assert set(d["spread"]) == (set(FAMILY_STAGES["gpt-oss"]) | {"embed", "final_norm", "logits"}) - INTEGER_STAGES
        for stage, sugg in d["suggested"].items():
            carried = tols.carried(stage, dtype, 0)
            assert carried.atol >= sugg["atol"] and carried.rtol >= sugg["rtol"], (dtype, stage, sugg, carried)
        built_in = Tolerances.defaults()
        wider = [s for s, sugg in d["suggested"].items() if sugg["atol"] > built_in.carried(s, dtype, 0).atol]
        assert wider, f"{dtype}: gpt-oss's measured spread exceeds the built-in table somewhere (why it has its own)"
