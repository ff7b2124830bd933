"""Walk two cases stage by stage, in computation order, and judge each stage.

The runner knows nothing of stores or forwards (STYLE.md §5): it takes two
:class:`~moesnap.case.Case` objects and a :class:`~moesnap.tolerances.Tolerances`
and returns a :class:`CaseReport`.

Order: ``tokens``, ``embed``, then each layer's stages in
:data:`moesnap.stages.LAYER_STAGES` order, then ``final_norm`` and ``logits``.

Routing: ``topk_ids`` are judged by :func:`~moesnap.classify.classify_routing`.
A tolerated flip (``ROUTING_TIE``) of token ``t`` at layer ``L`` means the
candidate legitimately computed a different function for ``t`` from there on,
so stages of layer ``L`` after routing are judged without ``t``, and every stage
of later layers (and ``final_norm``, ``logits``) without tokens ``>= t``
(causal attention carries the difference forward).  Each result lists the
tokens it left out.  Per-expert stages (``topk_weights``, ``expert_out``) are
put in expert-id order on both sides before they are compared.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from .case import Case
from .classify import Metrics, Result, Verdict, align_topk_weights, classify, classify_routing
from .errors import GoldenError, MoesnapError
from .stages import LAYER_STAGES, POST_ROUTING_STAGES
from .tolerances import Tolerances


@dataclass(frozen=True)
class StageResult:
    case: str
    layer: int | None
    stage: str
    result: Result

    @property
    def verdict(self) -> Verdict:
        return self.result.verdict

    @property
    def token(self) -> int | None:
        m = self.result.metrics
        if m is not None and m.first_bad_token is not None:
            return int(m.first_bad_token)
        if self.result.flipped_tokens and not self.result.passed:
            return int(self.result.flipped_tokens[0])
        return None

    def to_dict(self) -> dict:
        d = {"case": self.case, "layer": self.layer, "stage": self.stage}
        d.update(self.result.to_dict())
        return d


@dataclass
class CaseReport:
    case: str
    dtype: str
    results: list[StageResult] = field(default_factory=list)
    routing_notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.result.passed for r in self.results)

    @property
    def first_divergence(self) -> StageResult | None:
        return next((r for r in self.results if not r.result.passed), None)


def _pick(case: Case, stage: str, layer: int | None) -> np.ndarray | None:
    return case.stage(stage, layer)


def check_same_tokens(golden: Case, candidate: Case, *, where: str) -> None:
    g, c = np.asarray(golden.tokens), np.asarray(candidate.tokens)
    if g.shape != c.shape or not np.array_equal(g, c):
        raise GoldenError(
            f"{where}: the candidate ran other tokens than the golden "
            f"(golden {g.tolist()[:8]}{'...' if g.size > 8 else ''}, candidate {c.tolist()[:8]}{'...' if c.size > 8 else ''})"
        )


_POOL = ThreadPoolExecutor(max_workers=max(1, min(16, os.cpu_count() or 1)), thread_name_prefix="moesnap-classify")


def compare_cases(golden: Case, candidate: Case, tols: Tolerances, *, dtype: str, name: str = "case",
                  allow_missing: bool = False, layers: Iterable[int] | None = None,
                  propagate: bool = True) -> CaseReport:
    """Judge every stage of ``candidate`` against ``golden``.

    ``allow_missing``: stages the candidate does not have at all (an engine
    that dumps only a few stages) are skipped instead of reported ``MISSING``.
    ``propagate=False`` (replay, where every layer gets the golden input): a
    near-tie flip excuses its token in the rest of its own layer only.
    Stages are classified concurrently (numpy releases the GIL); results keep
    computation order.
    """
    check_same_tokens(golden, candidate, where=name)
    rep = CaseReport(case=name, dtype=dtype)
    pending: list = []  # StageResult or (name, layer, stage, Future)
    T = int(golden.tokens.shape[0])
    n_layer = golden.n_layer

    def has(stage: str, layer: int | None) -> bool:
        return (stage in candidate.model or stage == "tokens") if layer is None else stage in candidate.layers

    def judge(stage: str, layer: int | None, g, c, exclude=()) -> None:
        if c is None and allow_missing and not has(stage, layer):
            return
        fut = _POOL.submit(classify, g, c, tols.for_stage(stage, dtype), exclude_tokens=exclude)
        pending.append((name, layer, stage, fut))

    def judge_routing(layer: int, g, c, earlier: tuple[int, ...]) -> tuple[int, ...]:
        """Judge topk_ids as sets; return the tokens newly flipped at a near tie."""
        logits = golden.stage("router_logits", layer)
        if g is None or c is None or logits is None:
            judge("topk_ids", layer, g, c, earlier)
            return ()
        if earlier and g.shape == c.shape and g.ndim == 2:
            # tokens already excused by an earlier flip may route differently: do not judge them again
            c = c.copy()
            idx = np.asarray(earlier)
            c[idx[idx < c.shape[0]]] = g[idx[idx < g.shape[0]]]
        try:
            rres = classify_routing(g, c, logits, tols.tie_tol(dtype))
            metrics = None
            if g.shape == c.shape:  # exact set comparison of the sorted ids, for the metrics
                metrics = classify(np.sort(g, -1), np.sort(c, -1), tols.for_stage("topk_ids", dtype),
                                   exclude_tokens=earlier).metrics
        except MoesnapError as e:
            raise type(e)(f"{_where(name, layer, 'topk_ids')}: {e}") from None
        res = rres.as_result(metrics)
        new: tuple[int, ...] = ()
        if rres.verdict == Verdict.ROUTING_TIE:
            new = tuple(t for t in rres.flipped_tokens if inherited is None or t < inherited)
            if new:
                rep.routing_notes.append(
                    f"layer {layer}: tokens {list(new)} picked other experts at a near tie; "
                    f"later stages of layer {layer} are judged without them, "
                    f"later layers without tokens >= {min(new)}")
        res = Result(res.verdict, res.metrics, res.detail, res.flipped_tokens, earlier)
        pending.append(StageResult(name, layer, "topk_ids", res))
        return new

    judge("embed", None, _pick(golden, "embed", None), _pick(candidate, "embed", None))
    inherited: int | None = None  # first token left out because an earlier layer flipped it
    for layer in (range(n_layer) if layers is None else layers):
        earlier = tuple(range(inherited, T)) if inherited is not None else ()
        flipped_here: tuple[int, ...] = ()
        for stage in LAYER_STAGES:
            g, c = _pick(golden, stage, layer), _pick(candidate, stage, layer)
            if stage == "topk_ids":
                if c is None and allow_missing and not has(stage, layer):
                    continue
                flipped_here = judge_routing(layer, g, c, earlier)
                continue
            exclude = earlier
            if stage in POST_ROUTING_STAGES and flipped_here:
                exclude = tuple(sorted(set(earlier) | set(flipped_here)))
            if stage in ("topk_weights", "expert_out"):
                gi, ci = golden.stage("topk_ids", layer), candidate.stage("topk_ids", layer)
                if ci is None and stage == "topk_weights" and g is not None and c is not None:
                    # a dump without ids: compare the k weights of each token as a sorted multiset
                    g, c = -np.sort(-g, axis=-1), -np.sort(-c, axis=-1)
                else:
                    g, c = align_topk_weights(gi, g, ci, c)
            judge(stage, layer, g, c, exclude)
        if flipped_here and propagate:
            first = min(flipped_here)
            inherited = first if inherited is None else min(inherited, first)
            if inherited == 0 and layer + 1 < n_layer:
                rep.routing_notes.append(
                    f"from layer {layer + 1} on every token is excused by a near-tie flip, so the free-running "
                    f"comparison judges nothing further; use --replay to judge each layer on its golden input")
    tail = tuple(range(inherited, T)) if inherited is not None else ()
    judge("final_norm", None, _pick(golden, "final_norm", None), _pick(candidate, "final_norm", None), tail)
    judge("logits", None, _pick(golden, "logits", None), _pick(candidate, "logits", None), tail)
    for item in pending:
        if isinstance(item, StageResult):
            rep.results.append(item)
            continue
        try:
            rep.results.append(StageResult(item[0], item[1], item[2], item[3].result()))
        except MoesnapError as e:   # say which stage held the array it could not judge
            raise type(e)(f"{_where(item[0], item[1], item[2])}: {e}") from None
    return rep


def _where(case: str, layer: int | None, stage: str) -> str:
    return f"{case}/{stage}" if layer is None else f"{case}/layers/{stage} (layer {layer})"


@dataclass
class Report:
    """Results over every case of a golden version (or one case)."""

    cases: list[CaseReport]
    golden: str
    candidate: str
    dtype: str
    mode: str = "free-running"
    replay: list[CaseReport] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def results(self) -> list[StageResult]:
        return [r for c in self.cases for r in c.results]

    @property
    def passed(self) -> bool:
        ok = all(c.passed for c in self.cases)
        return ok and (self.replay is None or all(c.passed for c in self.replay))

    @property
    def first_divergence(self) -> StageResult | None:
        return next((c.first_divergence for c in self.cases if c.first_divergence is not None), None)

    def first_introduced(self) -> StageResult | None:
        """With replay: the first layer/stage whose own computation (golden input) diverges."""
        if self.replay is None:
            return None
        return next((c.first_divergence for c in self.replay if c.first_divergence is not None), None)

    def to_dict(self) -> dict:
        fd = self.first_divergence

        def loc(r: StageResult | None):
            if r is None:
                return None
            return {"case": r.case, "layer": r.layer, "stage": r.stage, "token": r.token, "verdict": r.verdict.name}

        d = {
            "verdict": "pass" if self.passed else "fail",
            "first_divergence": loc(fd),
            "golden": self.golden,
            "candidate": self.candidate,
            "dtype": self.dtype,
            "mode": self.mode,
            "results": [r.to_dict() for r in self.results],
            "routing_notes": [n for c in self.cases for n in c.routing_notes],
            "notes": list(self.notes),
        }
        if self.replay is not None:
            d["replay"] = {
                "first_introduced": loc(self.first_introduced()),
                "results": [r.to_dict() for c in self.replay for r in c.results],
            }
        return d


def worst_metric(results: list[StageResult]) -> Metrics | None:
    ms = [r.result.metrics for r in results if r.result.metrics is not None]
    return min(ms, key=lambda m: (m.cosine if m.cosine == m.cosine else -2.0), default=None)
