"""The text report explains: each row says what failed (or how close it came to failing, as
error ÷ tolerance), and every location names its case."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest

from moesnap.judge.compare import compare_cases
from moesnap.judge.report import Report
from moesnap.judge.report import WORST_HEAD, detail_lines, text
from moesnap.judge.tolerances import Tolerances



def report_of(golden, cand, tols=None, *, replay=False, name="prompt0"):
    tols = tols or Tolerances.defaults()
    free = compare_cases(golden, cand, tols, dtype="float32", name=name)
    per = [compare_cases(golden, cand, tols, dtype="float32", name=name, propagate=False, mode="replay")] \
        if replay else None
    return Report(cases=[free], golden="g@v0001", candidate="c", dtype="float32", replay=per)


def row(lines: list[str], label: str, case: str = "") -> str:
    return next(ln for ln in lines if ln.startswith(case + label))


def tail(line: str) -> str:
    return line.split(" | ", 1)[1]


def test_a_passing_row_shows_how_close_it_came_to_failing(golden):
    cand = copy.deepcopy(golden)
    cand.layers["moe_out"][1] += np.float32(1e-4)      # well inside moe_out's atol 3.3e-4 + rtol|g|
    rep = report_of(golden, cand)
    lines = text(rep)
    assert WORST_HEAD in lines[1] and "max 1-cos" not in "\n".join(lines)
    t = tail(row(lines, "L01"))
    m = re.fullmatch(r"(\S+)\s+(\w+) \((\w+)\)", t)
    assert m and m[2] == "moe_out" and m[3] == "elementwise", t
    r = next(r for r in rep.results if (r.layer, r.stage) == (1, "moe_out"))
    assert 0.05 < float(m[1]) <= 1.0 and float(m[1]) == pytest.approx(r.worst.ratio, rel=0.05)
    assert tail(row(lines, "L00")) != t                 # untouched layers are far from their tolerance
    assert tail(row(lines, "embed")).startswith("0 ")   # the embedding is read exactly


def test_a_nan_row_names_the_count_not_a_cosine(golden):
    cand = copy.deepcopy(golden)
    cand.layers["moe_out"][2, 1, 5] = np.nan
    lines = text(report_of(golden, cand))
    assert tail(row(lines, "L02")) == "moe_out NAN_CANDIDATE: 1 NaN in the candidate"
    assert not re.search(r"\de-1[0-9]", "\n".join(lines))     # no ~1e-13 cosine gaps on failing rows


def test_a_five_percent_scale_that_leaves_cosine_at_one_names_the_rule(golden):
    cand = copy.deepcopy(golden)
    cand.layers["attn_out"][1] *= np.float32(1.05)
    # loose elementwise bounds and a row rule: only the row rule sees a uniform 5 % scale
    tols = Tolerances.defaults().with_overrides(["float32:attn_out.atol=1", "float32:attn_out.rtol=1",
                                                 "float32:attn_out.row_rel_l2=0.01"])
    rep = report_of(golden, cand, tols, replay=True)
    r = next(r for r in rep.replay[0].results if (r.layer, r.stage) == (1, "attn_out"))
    assert r.result.metrics.cosine > 1 - 1e-9 and not r.result.passed
    assert r.worst.rule == "row_rel_l2" and r.worst.text.startswith("row_rel_l2 0.05 > limit 0.01")
    lines = text(rep)
    assert "first layer that introduces a divergence: prompt0 / layer 1 / attn_out / token 0: DIVERGE " \
           "(row_rel_l2 0.05 > limit 0.01 in 8 rows)" in lines


def test_frac_outside_against_max_frac_outside(golden):
    cand = copy.deepcopy(golden)
    cand.layers["q"][0, :2] += np.float32(1.0)        # 2 of 8 tokens far off
    tols = Tolerances.defaults().with_overrides(["float32:q.max_frac_outside=0.1"])
    lines = text(report_of(golden, cand, tols))
    assert tail(row(lines, "L00")).startswith("q DIVERGE: frac_outside 25% > max_frac_outside 10%")


def test_an_expert_scale_error_names_the_expert(golden):
    cand = copy.deepcopy(golden)
    ids = golden.layers["topk_ids"][2]
    e = int(np.bincount(ids.ravel()).argmax())         # the busiest expert of layer 2
    sel = ids == e
    cand.layers["expert_out"][2][sel] *= np.float32(1.01)
    tols = Tolerances.defaults().with_overrides(["float32:expert_out.atol=1", "float32:expert_out.rtol=1"])
    rep = report_of(golden, cand, tols, replay=True)
    r = next(r for r in rep.replay[0].results if (r.layer, r.stage) == (2, "expert_out"))
    assert r.worst.rule == "expert_scale" and r.worst.text.startswith(f"expert {e} off by +1% > limit")


def test_a_routing_divergence_says_the_gap(golden):
    cand = copy.deepcopy(golden)
    logits = golden.layers["router_logits"][0, 3]
    cand.layers["topk_ids"][0, 3, -1] = int(np.argmin(logits))   # the least likely expert
    lines = text(report_of(golden, cand))
    assert tail(row(lines, "L00")).startswith("topk_ids DIVERGE: 1 token picked other experts beyond tie_tol")


def test_every_location_names_the_case_and_the_replay_table_has_a_case_column(golden):
    cand = copy.deepcopy(golden)
    cand.layers["moe_out"][2, 4:7, 5] = np.nan
    lines = text(report_of(golden, cand, replay=True))
    assert "first divergence: prompt0 / layer 2 / moe_out / token 4: NAN_CANDIDATE (3 NaN in the candidate)" in lines
    assert "first failing stage: prompt0 / layer 2 / moe_out / token 4: NAN_CANDIDATE" in lines
    head = next(ln for ln in lines if "| introduced" in ln)
    assert head.split()[:3] == ["case", "layer", "|"]
    assert row(lines, "prompt0  L02", "").split("|")[1].strip() == "moe_out NAN_CANDIDATE"
    # the columns line up
    assert head.index("|") == row(lines, "prompt0  L00").index("|")
    assert head.rindex("|") == row(lines, "prompt0  L00").rindex("|")


def test_detail_says_how_many_tokens_are_bad_and_which(golden):
    cand = copy.deepcopy(golden)
    cand.layers["v"][1, [5, 6, 7]] += np.float32(1.0)
    rep = report_of(golden, cand)
    d = "\n".join(detail_lines(rep.first_divergence))
    assert "3 bad tokens, the first is token 5" in d and "3 bad tokens: 5, 6, 7" in d
    assert "of 3 bad" not in d
    assert "failed (elementwise rule): " in d


def test_json_carries_each_stages_margins(golden):
    cand = copy.deepcopy(golden)
    cand.layers["moe_out"][2, 1, 5] = np.nan
    d = report_of(golden, cand).to_dict()
    r = next(r for r in d["results"] if (r["layer"], r["stage"]) == (2, "moe_out"))
    assert r["worst"] == {"rule": "non-finite", "ratio": "inf", "text": "1 NaN in the candidate"}
    ok = next(r for r in d["results"] if (r["layer"], r["stage"]) == (1, "moe_out"))
    assert ok["worst"]["rule"] == "elementwise" and 0 <= ok["worst"]["ratio"] <= 1
    assert d["first_divergence"]["failed"]["text"] == "1 NaN in the candidate"


def test_the_introducing_layer_is_not_claimed_none_where_the_failing_case_had_no_per_layer_judgement(golden):
    """A foreign dump's decode step that the local re-reference could not take fails free-running; the
    prompt it did take is clean: the line must not say that no layer introduces the divergence."""
    tols = Tolerances.defaults()
    clean = compare_cases(golden, golden, tols, dtype="float32", name="case0")
    bad = copy.deepcopy(golden)
    bad.layers["attn_out"][1] *= np.float32(1.05)
    step = compare_cases(golden, bad, tols, dtype="float32", name="case0/step1")
    per = [compare_cases(golden, golden, tols, dtype="float32", name="case0", propagate=False, mode="local")]
    rep = Report(cases=[clean, step], golden="g@v0001", candidate="c", dtype="float32", replay=per,
                 replay_kind="local")
    line = next(ln for ln in text(rep) if ln.startswith("first layer that introduces a divergence"))
    assert "none" not in line and "not known: case0/step1" in line, line
    # where the failing case was judged per layer and nothing was introduced there, "none" stands
    rep2 = Report(cases=[step], golden="g@v0001", candidate="c", dtype="float32",
                  replay=[compare_cases(golden, golden, tols, dtype="float32", name="case0/step1", propagate=False,
                                        mode="local")], replay_kind="local")
    line2 = next(ln for ln in text(rep2) if ln.startswith("first layer that introduces a divergence"))
    assert line2.endswith(": none"), line2
