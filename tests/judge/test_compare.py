"""The stage walker's routing rules, on cases whose routing is edited by hand."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from moesnap.case import Case
from moesnap.judge.classify import Verdict
from moesnap.judge.compare import compare_cases
from moesnap.model.recorder import ArrayRecorder
from moesnap.model.reference import run_reference
from moesnap.judge.tolerances import Tolerances

TOKENS = [5, 9, 200, 17, 3, 3, 64, 100]


@pytest.fixture(scope="module")
def golden(tiny_path):
    rec = ArrayRecorder()
    run_reference(tiny_path, TOKENS, recorder=rec)
    return Case(tokens=np.asarray(TOKENS, np.int32), model={k: v for k, v in rec.model.items() if k != "tokens"},
                layers=rec.stacked())


def swap_to(case: Case, layer: int, token: int, rank: int) -> float:
    """Replace the token's k-th expert by the expert ranked ``rank`` (0-based) in the golden router; return the gap."""
    logits = case.layers["router_logits"][layer, token].astype(np.float64)
    order = np.argsort(-logits)
    k = case.layers["topk_ids"].shape[-1]
    ids = case.layers["topk_ids"][layer, token]
    ids[list(ids).index(order[k - 1])] = order[rank]
    return float(logits[order[k - 1]] - logits[order[rank]])


def by(rep, layer, stage):
    return next(r for r in rep.results if r.layer == layer and r.stage == stage)


def test_flip_of_an_already_excused_token_is_not_judged_again(golden):
    cand = copy.deepcopy(golden)
    k = golden.layers["topk_ids"].shape[-1]
    gap = swap_to(cand, 0, 2, k)            # layer 0, token 2: the next-ranked expert (a near tie)
    swap_to(cand, 2, 5, golden.layers["router_logits"].shape[-1] - 1)  # layer 2, token 5: the worst expert
    tols = Tolerances.defaults().with_overrides([f"float32:tie_tol={gap * 1.01 + 1e-9}"])
    rep = compare_cases(golden, cand, tols, dtype="float32")
    assert by(rep, 0, "topk_ids").verdict == Verdict.ROUTING_TIE
    assert by(rep, 0, "topk_ids").result.flipped_tokens == (2,)
    # token 5 >= 2 was excused from layer 1 on, so its flip at layer 2 is not a divergence
    assert by(rep, 2, "topk_ids").verdict == Verdict.MATCH
    assert set(by(rep, 2, "moe_out").result.excluded_tokens) == set(range(2, len(TOKENS)))
    assert rep.passed


def test_non_tie_flip_diverges_and_replay_does_not_propagate(golden):
    cand = copy.deepcopy(golden)
    k = golden.layers["topk_ids"].shape[-1]
    gap = swap_to(cand, 0, 2, k)
    tols = Tolerances.defaults().with_overrides([f"float32:tie_tol={gap * 1.01 + 1e-9}"])
    swap_to(cand, 2, 5, golden.layers["router_logits"].shape[-1] - 1)
    rep = compare_cases(golden, cand, tols, dtype="float32", propagate=False)
    # without propagation (replay) the layer-2 flip of token 5 is judged, and it is no tie
    assert by(rep, 2, "topk_ids").verdict == Verdict.DIVERGE
    assert by(rep, 1, "layer_out").result.excluded_tokens == ()
    strict = compare_cases(golden, cand, Tolerances.defaults().with_overrides(["float32:tie_tol=0"]), dtype="float32")
    assert by(strict, 0, "topk_ids").verdict == Verdict.DIVERGE
    assert strict.first_divergence.layer == 0 and strict.first_divergence.token == 2


def test_topk_weights_compare_by_expert_id_not_slot(golden):
    cand = copy.deepcopy(golden)
    ids, w = cand.layers["topk_ids"], cand.layers["topk_weights"]
    cand.layers["topk_ids"] = ids[..., ::-1].copy()       # same experts, other slot order
    cand.layers["topk_weights"] = w[..., ::-1].copy()
    cand.layers["expert_out"] = cand.layers["expert_out"][:, :, ::-1].copy()
    rep = compare_cases(golden, cand, Tolerances.defaults(), dtype="float32")
    assert rep.passed, [(r.layer, r.stage, r.verdict) for r in rep.results if not r.result.passed]
