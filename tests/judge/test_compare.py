"""The stage walker's routing rules, on cases whose routing is edited by hand."""

from __future__ import annotations

import copy

import numpy as np

from moesnap.case import Case
from moesnap.judge.classify import Verdict
from moesnap.judge.compare import compare_cases
from moesnap.judge.tolerances import Tolerances

from judge_helpers import TOKENS  # noqa: E402  (the `golden` fixture: tests/judge/conftest.py)


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


def _held(golden: Case, held: list, scale: dict | None = None) -> Case:
    """A candidate holding moe_out, layer_out and logits only, with the rows ``held`` says it lacks set to NaN."""
    layers = {s: golden.layers[s].copy() for s in ("moe_out", "layer_out")}
    model = {"logits": golden.model["logits"].copy()}
    for stage, layer, rows in held:
        a = model[stage] if layer is None else layers[stage][layer]
        a[np.setdiff1d(np.arange(len(TOKENS)), rows)] = np.nan
    for (stage, layer, token), f in (scale or {}).items():
        layers[stage][layer, token] *= f
    return Case(tokens=golden.tokens, model=model, layers=layers, attrs={"held_tokens": held})


def test_held_tokens_are_judged_alone_and_counted_alone(golden):
    """An imported dump holding the last token only (attribute held_tokens): those rows are judged, only they
    count as held, a layer held by no row is absent; the NaN rows stand for nothing."""
    T, last = len(TOKENS), len(TOKENS) - 1
    held = [["logits", None, [last]], ["moe_out", 1, [last]], ["layer_out", 2, []]]
    tols = Tolerances.defaults()
    rep = compare_cases(golden, _held(golden, held), tols, dtype="float32", allow_missing=True)
    assert rep.passed, [r.result.detail for r in rep.results if not r.result.passed]
    assert (2, "layer_out") in rep.skipped and not any(r.layer == 2 and r.stage == "layer_out" for r in rep.results)
    held_cells, judged = rep.cells()
    n_full = len([k for k in rep.judged if k not in rep.held])        # stages holding every token
    assert held_cells == judged == n_full * T + 2
    assert by(rep, 1, "moe_out").result.metrics.n == golden.layers["moe_out"].shape[-1]
    assert any("moe_out at layers [1]: last token only" in n for n in rep.notes)
    bad = _held(golden, held, {("moe_out", 1, last): 1.05})
    rep = compare_cases(golden, bad, tols, dtype="float32", allow_missing=True)
    assert by(rep, 1, "moe_out").verdict == Verdict.DIVERGE and by(rep, 1, "moe_out").token == last
    rep = compare_cases(golden, _held(golden, held), tols, dtype="float32")            # no --allow-missing
    assert by(rep, 2, "layer_out").verdict == Verdict.MISSING
    rep = compare_cases(golden, _held(golden, held), tols, dtype="float32", allow_missing=True, mode="local",
                        propagate=False)
    # a per-layer mode recomputed layer 3 from layer 2's layer_out, which the candidate lacks: not judged there
    assert not any(r.layer == 3 for r in rep.results) and any(r.layer == 2 for r in rep.results)
    assert any("layers [3] are not judged in local mode" in n for n in rep.notes)
