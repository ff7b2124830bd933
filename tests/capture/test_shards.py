"""Per-rank dumps reassembled (capture/shards.py): a committed golden case split into tensor- and
expert-parallel shards round-trips exactly and passes `moesnap compare`; every inconsistency is refused
in one line naming the rank and the stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

import moesnap
from flat_dumps import CASE0, REPO_GOLDENS, assert_refused, invoke
from moesnap.capture.shards import SPEC_FILE, load_sharded, parse_dims, parse_sharding, reassemble, split_case
from moesnap.errors import GoldenError
from moesnap.stages import LAYER_STAGES, MODEL_STAGES
from moesnap.store.case import load_case, save_case

#: tensor-parallel heads and vocabulary, expert-parallel router, slots and partial sums
SPEC = {"q": "t h[tp] d", "k": "t h[tp] d", "v": "t h[tp] d", "q_norm": "t h[tp] d", "k_norm": "t h[tp] d",
        "q_rope": "t h[tp] d", "k_rope": "t h[tp] d", "attn": "t (h[tp] d)", "attn_out": "t h[tp:partial]",
        "router_logits": "t e[ep]", "topk_weights": "t k[ep]", "expert_out": "t k[ep] h",
        "moe_out": "t h[ep:partial]", "logits": "t (v)[tp]", "embed": "t h # tp:replicated"}


@pytest.fixture(scope="module")
def golden():
    return load_case(CASE0)


def _same(a, b) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert np.array_equal(a, b, equal_nan=True)


def _assert_equal_cases(got, want) -> None:
    assert set(got.model) == set(want.model) and set(got.layers) == set(want.layers)
    for s in want.model:
        _same(got.model[s], want.model[s])
    for s in want.layers:
        _same(got.layers[s], want.layers[s])


def write_shards(d: Path, shards, spec: dict) -> Path:
    d.mkdir(parents=True)
    for r, c in enumerate(shards):
        save_case(d / f"rank{r}", c)
    (d / SPEC_FILE).write_text(json.dumps(spec))
    return d


def test_split_golden_round_trips_and_compare_passes(tmp_path, golden):
    shards = split_case(golden, parse_sharding(SPEC), 2)
    assert shards[1].layers["q"].shape[2] == golden.layers["q"].shape[2] // 2           # heads split
    assert shards[0].layers["router_logits"].shape[-1] == 4                             # experts 0-3
    assert np.isnan(shards[0].layers["expert_out"][golden.layers["topk_ids"] >= 4]).all()
    d = write_shards(tmp_path / "dump", shards, SPEC)
    _assert_equal_cases(load_sharded(d, load_case), golden)
    report = moesnap.compare("tiny", d, store=str(REPO_GOLDENS), local=False, show_progress=False)
    assert report.passed, report.summary()
    code, out, err = invoke(["compare", "tiny", str(d), "--store", str(REPO_GOLDENS), "--no-local"])
    assert code == 0 and "verdict: pass" in out, out + err


def test_a_fault_in_one_ranks_shard_is_judged_at_its_layer_and_stage(tmp_path, golden):
    shards = split_case(golden, parse_sharding(SPEC), 2)
    eo = shards[1].layers["expert_out"].copy()
    own = golden.layers["topk_ids"][2] >= 4
    eo[2][own] *= 1.05                           # rank 1's experts, layer 2
    shards[1].layers["expert_out"] = eo
    d = write_shards(tmp_path / "dump", shards, SPEC)
    report = moesnap.compare("tiny", d, store=str(REPO_GOLDENS), local=False, show_progress=False)
    fd = report.first_divergence
    assert not report.passed and fd is not None and (fd.layer, fd.stage) == (2, "expert_out"), report.summary()


@st.composite
def shardings(draw):
    """A random subset of the stages annotated, 1 or 2 ranks, expert ranges cut anywhere."""
    n = draw(st.sampled_from([1, 2]))
    spec = {s: d for s, d in SPEC.items() if draw(st.booleans())}
    cuts = sorted(draw(st.lists(st.integers(1, 7), min_size=n - 1, max_size=n - 1, unique=True)))
    if draw(st.booleans()):
        bounds = [0, *cuts, 8]
        spec["expert_ranges"] = [[bounds[r], bounds[r + 1]] for r in range(n)]
    return n, spec


@given(shardings())
def test_round_trip_of_any_sharding(golden, drawn):
    n, spec = drawn
    sh = parse_sharding(spec)
    _assert_equal_cases(reassemble(split_case(golden, sh, n), sh), golden)


@pytest.mark.parametrize("text, names, split, mark, partial", [
    ("t h[tp] d", ("t", "h", "d"), 1, "tp", False),
    ("t (h[tp] d)", ("t", "(h d)"), 1, "tp", False),
    ("t (num_heads*head_dim)[tp]", ("t", "(num_heads head_dim)"), 1, "tp", False),
    ("t k[ep] h", ("t", "k", "h"), 1, "ep", False),
    ("t h[tp:partial] # sum before the all-reduce", ("t", "h"), 1, "tp", True),
    ("t h # tp:replicated", ("t", "h"), None, None, False),
])
def test_parse_dims(text, names, split, mark, partial):
    d = parse_dims("x", text)
    assert (d.names, d.split, d.mark, d.partial) == (names, split, mark, partial)


@pytest.mark.parametrize("spec, needles", [
    ({"q": "t h[dp] d"}, ["q", "[dp]"]),
    ({"q": "t h[tp] d[tp]"}, ["q", "more than one axis"]),
    ({"attn": "t (h d[tp])"}, ["attn", "outer part"]),
    ({"attn_norm": "t h[ep]"}, ["attn_norm", "[ep]"]),
    ({"q": "t h{tp} d"}, ["q", "cannot read"]),
    ({"topk_ids": "t k[ep]"}, ["topk_ids", "replicated"]),
    ({"nosuch": "t h"}, ["nosuch", "no stage"]),
    ({"q": 3}, ["q", "dims must be a string"]),
    ({"expert_ranges": [[0, 4], [4]]}, ["expert_ranges"]),
    ([1, 2], ["JSON object"]),
])
def test_bad_specs_are_refused(spec, needles):
    with pytest.raises(GoldenError) as e:
        parse_sharding(spec)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def _edit(shards, rank, stage, f):
    c = shards[rank]
    where = c.layers if stage in LAYER_STAGES else c.model
    where[stage] = f(where[stage].copy())
    return shards


def _drop(shards, rank, stage):
    shards[rank].layers.pop(stage)
    return shards


def _perturb_layer2(a):
    a[2, 0, 0] += 1e-3
    return a


@pytest.mark.parametrize("spec, edit, needles", [
    (SPEC, lambda s: _edit(s, 1, "q", lambda a: a[:, :, :1]), ["rank 1", "q", "along h[tp]"]),
    (SPEC, lambda s: _edit(s, 1, "attn", lambda a: a[:, :3]), ["rank 1", "attn", "does not fit"]),
    (SPEC, lambda s: _edit(s, 0, "q", lambda a: a[..., None]), ["rank 0", "q", "dims"]),
    (SPEC, lambda s: _edit(s, 1, "attn_norm", _perturb_layer2), ["rank 1", "layer 2 / attn_norm", "differs"]),
    (SPEC, lambda s: _edit(s, 1, "logits", lambda a: a[:, :-1]), ["rank 1", "logits"]),
    (SPEC, lambda s: _drop(s, 1, "moe_out"), ["rank 1", "holds no moe_out"]),
    (SPEC, lambda s: _edit(s, 1, "topk_ids", lambda a: (a + 1) % 8), ["rank 1", "topk_ids", "differs"]),
    ({**SPEC, "expert_ranges": [[0, 5], [4, 8]]}, None, ["rank 1", "overlap rank 0", "[0, 5)"]),
    ({**SPEC, "expert_ranges": [[0, 3], [4, 8]]}, None, ["rank 1", "experts [3, 4) belong to no rank"]),
    ({**SPEC, "expert_ranges": [[0, 4], [4, 9]]}, None, ["router_logits"]),
    ({**SPEC, "expert_ranges": [[0, 8]]}, None, ["1 ranges for 2 ranks"]),
])
def test_inconsistent_shards_are_refused_naming_rank_and_stage(golden, spec, edit, needles):
    shards = split_case(golden, parse_sharding(SPEC), 2)
    if edit is not None:
        shards = edit(shards)
    with pytest.raises(GoldenError) as e:
        reassemble(shards, parse_sharding(spec))
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_tokens_that_differ_are_refused(golden):
    shards = split_case(golden, parse_sharding(SPEC), 2)
    shards[1].tokens = shards[1].tokens[::-1].copy()
    with pytest.raises(GoldenError, match="rank 1: tokens differ"):
        reassemble(shards, parse_sharding(SPEC))


def test_through_compare_a_missing_rank_or_bad_spec_exits_2_in_one_line(tmp_path, golden):
    shards = split_case(golden, parse_sharding(SPEC), 2)
    d = write_shards(tmp_path / "gap", [shards[0], shards[1], shards[1]], SPEC)
    (d / "rank1").rename(d / "other")
    assert_refused(["compare", "tiny", str(d), "--store", str(REPO_GOLDENS), "--no-local"],
                   "rank 1 is missing", "rank0, rank2")
    d = write_shards(tmp_path / "ranges", shards, {**SPEC, "expert_ranges": [[0, 5], [4, 8]]})
    assert_refused(["compare", "tiny", str(d), "--store", str(REPO_GOLDENS), "--no-local"],
                   "rank 1", "router_logits", "overlap")
    (d / SPEC_FILE).write_text("{not json")
    assert_refused(["compare", "tiny", str(d), "--store", str(REPO_GOLDENS), "--no-local"], SPEC_FILE, "unreadable")


def test_model_stages_follow_their_dims_too(golden):
    sh = parse_sharding({"logits": "t v[tp]", "final_norm": "t h[tp]"})
    shards = split_case(golden, sh, 2)
    assert shards[0].model["logits"].shape[1] == golden.model["logits"].shape[1] // 2
    _assert_equal_cases(reassemble(shards, sh), golden)
    assert set(MODEL_STAGES) - {"tokens"} == set(golden.model)
