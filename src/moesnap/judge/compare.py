"""Walk two cases stage by stage, in computation order, and judge each stage.

The runner knows nothing of stores or forwards (STYLE.md §5): it takes two
:class:`~moesnap.store.case.Case` objects and a :class:`~moesnap.judge.tolerances.Tolerances`
and returns a :class:`CaseReport`.

Order: ``tokens``, ``embed``, then each layer's stages in
:data:`moesnap.stages.LAYER_STAGES` order, then ``final_norm`` and ``logits``.

Routing: ``topk_ids`` are judged by :func:`~moesnap.judge.routing.classify_routing`.
A tolerated flip (``ROUTING_TIE``) of token ``t`` at layer ``L`` means the
candidate legitimately computed a different function for ``t`` from there on,
so stages of layer ``L`` after routing are judged without ``t``, and every stage
of later layers (and ``final_norm``, ``logits``) without tokens ``>= t``
(causal attention carries the difference forward).  Each result lists the
tokens it left out.  Per-expert stages (``topk_weights``, ``expert_out``) are
put in expert-id order on both sides before they are compared.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import numpy as np

from ..case import Case
from .classify import classify
from .pool import submit_stage
from .routing import RoutingResult, align_topk_weights, classify_routing, expert_scale_errors
from ..errors import GoldenError, MoesnapError
from ..stages import LAYER_STAGES, MODEL_STAGES, POST_ROUTING_STAGES
from .tolerances import Tolerance, Tolerances
from .verdict import Metrics, Result, Verdict, bad_tokens_text, json_float


#: what the second, per-layer mode of a report is called, by kind
PER_LAYER_MODES = {
    "replay": "stage-local replay (each stage fed the golden values of its inputs)",
    "local": "local re-reference (the reference recomputes each stage from the engine's own inputs)",
}


@dataclass(frozen=True)
class Margin:
    """How one stage stands against one rule of its tolerance: ``ratio`` is error ÷ limit, above 1
    where the rule fails (+inf for what no tolerance admits: NaN/Inf, a missing array, a wrong shape);
    ``text`` says it in a few words with the numbers (``frac_outside 0.8% > max_frac_outside 0.5%``)."""

    rule: str      # non-finite | missing | shape | elementwise | exact | row_rel_l2 | expert_scale | tie_tol
    ratio: float
    text: str

    @property
    def failed(self) -> bool:
        return self.ratio > 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "ratio": json_float(self.ratio), "text": self.text}


def _pct(x: float) -> str:
    return f"{100.0 * x:.2g}%"


def _non_finite_text(m: Metrics) -> str:
    def side(nan: int, inf: int, where: str) -> str:
        return " + ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n) + f" in the {where}"

    parts = [side(nan, inf, where) for nan, inf, where in ((m.nan_candidate, m.inf_candidate, "candidate"),
                                                          (m.nan_golden, m.inf_golden, "golden")) if nan or inf]
    return ", ".join(parts)


def margins(res: Result, tol: Tolerance | None, *, exact: bool = False,
            expert: tuple[int, float, float] | None = None) -> tuple[Margin, ...]:
    """Every rule ``res`` was judged by, as :class:`Margin` values, in the order the rules decide: what
    no tolerance admits, the elementwise rule, the row rule, the expert rule (``expert``: the worst
    expert's id, scale error and the limit it is held to).  ``tol`` None: the verdict's margin alone."""
    v, m = res.verdict, res.metrics
    if v == Verdict.MISSING:
        return (Margin("missing", math.inf, res.detail or "missing"),)
    if v == Verdict.SHAPE_MISMATCH:
        return (Margin("shape", math.inf, res.detail or "shapes differ"),)
    if m is None:
        return ()
    out: list[Margin] = []
    if m.nan_golden or m.nan_candidate or m.inf_golden or m.inf_candidate:
        out.append(Margin("non-finite", math.inf, _non_finite_text(m)))
    if tol is None:
        return tuple(out)
    if exact:
        out.append(Margin("exact", m.closeness, f"{m.n_outside} of {m.n} values differ (compared exactly)"
                          if m.n_outside else "every value equal (compared exactly)"))
    elif m.closeness > 1.0 and tol.max_frac_outside > 0.0:
        out.append(Margin("elementwise", m.closeness, f"frac_outside {_pct(m.frac_outside)} > max_frac_outside "
                          f"{_pct(tol.max_frac_outside)} (atol={tol.atol:g}, rtol={tol.rtol:g})"))
    elif m.closeness > 1.0:
        worst = "NaN/Inf among them" if out and math.isinf(m.closeness) else f"the worst {m.closeness:.3g}×"
        out.append(Margin("elementwise", m.closeness, f"{m.n_outside} of {m.n} elements beyond atol+rtol·|g|, "
                          f"{worst} (atol={tol.atol:g}, rtol={tol.rtol:g})"))
    else:
        out.append(Margin("elementwise", m.closeness, f"|c-g| at {m.closeness:.2g} of atol+rtol·|g| "
                          f"(atol={tol.atol:g}, rtol={tol.rtol:g}"
                          + (f", {_pct(m.frac_outside)} outside of {_pct(tol.max_frac_outside)} allowed"
                             if m.n_outside else "") + ")"))
    if math.isfinite(tol.row_rel_l2) and not exact:
        r = m.max_row_rel_l2 / tol.row_rel_l2
        out.append(Margin("row_rel_l2", r, f"row_rel_l2 {m.max_row_rel_l2:.3g} > limit {tol.row_rel_l2:g} "
                          f"in {m.n_bad_rows} row{'s' if m.n_bad_rows != 1 else ''}" if r > 1.0 else
                          f"row_rel_l2 {m.max_row_rel_l2:.2g} of limit {tol.row_rel_l2:g}"))
    if expert is not None:
        e, eps, limit = expert
        r = abs(eps) / limit if limit > 0 else (math.inf if eps else 0.0)
        out.append(Margin("expert_scale", r, f"expert {e} off by {100 * eps:+.3g}% "
                          + (">" if r > 1.0 else "of") + f" limit {_pct(limit)}"))
    return tuple(out)


def routing_margins(rres: RoutingResult, tie_tol: float, metrics: Metrics | None) -> tuple[Margin, ...]:
    """``topk_ids``'s margins: the widest flip's gap against ``tie_tol`` (no flip: 0)."""
    if rres.verdict in (Verdict.MISSING, Verdict.SHAPE_MISMATCH):
        return margins(rres.as_result(metrics), None)
    gap = rres.max_gap
    r = math.inf if math.isnan(gap) else gap / tie_tol if tie_tol > 0 else (math.inf if gap > 0 else 0.0)
    if not rres.flipped_tokens:
        return (Margin("tie_tol", 0.0, "every token picks the golden's experts"),)
    if rres.verdict == Verdict.DIVERGE:
        n = len(rres.diverged_tokens)
        return (Margin("tie_tol", max(r, math.nextafter(1.0, 2.0)),
                       f"{n} token{'s' if n != 1 else ''} picked other experts beyond tie_tol {tie_tol:g} "
                       f"(widest gap {gap:.3g}; token {rres.diverged_tokens[0]} first)"),)
    n = len(rres.tie_tokens)
    return (Margin("tie_tol", min(r, 1.0), f"{n} near-tie flip{'s' if n != 1 else ''}, widest gap {gap:.3g} "
                   f"of tie_tol {tie_tol:g}"),)


@dataclass(frozen=True)
class StageResult:
    case: str
    layer: int | None
    stage: str
    result: Result
    #: the rules it was judged by, error ÷ limit (see :func:`margins`)
    margins: tuple[Margin, ...] = ()

    @property
    def verdict(self) -> Verdict:
        return self.result.verdict

    @property
    def worst(self) -> Margin | None:
        """The margin that failed (the first in rule order), else the closest approach to failing."""
        if not self.margins:
            return None
        if not self.result.passed:
            return next((m for m in self.margins if m.failed), max(self.margins, key=lambda m: m.ratio))
        return max(self.margins, key=lambda m: m.ratio)

    def location(self) -> str:
        """``case0 / layer 2 / moe_out / token 1: DIVERGE`` (``logits`` for a whole-model stage)."""
        where = f"layer {self.layer} / {self.stage}" if self.layer is not None else self.stage
        tok = f" / token {self.token}" if self.token is not None else ""
        return f"{self.case} / {where}{tok}: {self.verdict.name}"

    def explain(self) -> str:
        """:meth:`location`, with what failed in parentheses where something did."""
        w = self.worst
        return self.location() + (f" ({w.text})" if w is not None and not self.result.passed else "")

    def bad_tokens_text(self) -> str:
        m = self.result.metrics
        return bad_tokens_text(m) if m is not None else "no bad token"

    @property
    def token(self) -> int | None:
        m = self.result.metrics
        if m is not None and m.first_bad_token is not None:
            return int(m.first_bad_token)
        if self.result.flipped_tokens and not self.result.passed:
            return int(self.result.flipped_tokens[0])
        return None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"case": self.case, "layer": self.layer, "stage": self.stage}
        d.update(self.result.to_dict())
        d["margins"] = [m.to_dict() for m in self.margins]
        w = self.worst
        d["worst"] = None if w is None else w.to_dict()
        return d


@dataclass
class CaseReport:
    """One case judged in one mode.

    ``judged`` maps each (layer, stage) the candidate holds to a boolean mask
    over tokens: True where a token was judged (or its stage failed outright:
    missing, wrong shape).  ``held`` maps the (layer, stage) whose array holds
    only some tokens' rows (an imported dump: attribute ``held_tokens``) to the
    mask of those; every other one holds every token.  ``skipped`` lists stages
    the candidate lacks that ``allow_missing`` let pass unjudged.
    """

    case: str
    dtype: str
    results: list[StageResult] = field(default_factory=list)
    routing_notes: list[str] = field(default_factory=list)
    mode: str = "free-running"
    n_tokens: int = 0
    judged: dict[tuple[int | None, str], np.ndarray] = field(default_factory=dict)
    skipped: list[tuple[int | None, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    held: dict[tuple[int | None, str], np.ndarray] = field(default_factory=dict)
    #: a decode step of a sequence: its number (None: a prompt, a chunk of one, or a whole forward)
    step: int | None = None
    #: the absolute positions of the candidate's rows (None: 0..n_tokens-1)
    positions: tuple[int, ...] | None = None

    @property
    def passed(self) -> bool:
        return all(r.result.passed for r in self.results)

    @property
    def first_divergence(self) -> StageResult | None:
        return next((r for r in self.results if not r.result.passed), None)

    def cells(self) -> tuple[int, int]:
        """(cells held, cells judged) over (layer, stage, token)."""
        held = sum(int(self.held[k].sum()) if k in self.held else self.n_tokens for k in self.judged)
        return held, int(sum(int(m.sum()) for m in self.judged.values()))


def _pick(case: Case, stage: str, layer: int | None) -> np.ndarray | None:
    return case.stage(stage, layer)


def check_same_tokens(golden: Case, candidate: Case, *, where: str) -> None:
    g, c = np.asarray(golden.tokens), np.asarray(candidate.tokens)
    if g.shape != c.shape or not np.array_equal(g, c):
        raise GoldenError(
            f"{where}: the candidate ran other tokens than the golden "
            f"(golden {g.tolist()[:8]}{'...' if g.size > 8 else ''}, candidate {c.tolist()[:8]}{'...' if c.size > 8 else ''})"
        )


def followed_routes(case: Case, *, where: str) -> dict[int, dict[int, np.ndarray]]:
    """``attrs["router_followed"]`` as {layer: {token: own expert ids}}: where a case's
    ``topk_ids`` (and the stages after them) used other experts than its own router chose,
    because it followed the other side at a near tie (router replay, local re-reference)."""
    raw = case.attrs.get("router_followed") if isinstance(case.attrs, dict) else None
    if raw is None:
        return {}
    out: dict[int, dict[int, np.ndarray]] = {}
    ok = isinstance(raw, list)
    for item in raw if ok else ():
        if not (isinstance(item, list) and len(item) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                    for v in item[:2])
                and isinstance(item[2], list) and all(isinstance(e, int) and not isinstance(e, bool) for e in item[2])):
            ok = False
            break
        out.setdefault(item[0], {})[item[1]] = np.asarray(item[2], dtype=np.int64)
    if not ok:
        raise GoldenError(f"{where}: attribute 'router_followed' is not a list of [layer, token, [expert ids]]")
    return out


def held_tokens(case: Case, *, where: str) -> dict[tuple[int | None, str], np.ndarray]:
    """``attrs["held_tokens"]`` as {(layer, stage): token indices}: the (layer, stage) whose array holds
    only these tokens' rows (an imported dump that kept the last token alone, or lacks a layer: see
    :mod:`moesnap.capture._flat`); its other rows hold no values of the engine and are judged by no mode."""
    raw = case.attrs.get("held_tokens") if isinstance(case.attrs, dict) else None
    if raw is None:
        return {}
    T = int(case.tokens.shape[0])

    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    out: dict[tuple[int | None, str], np.ndarray] = {}
    for item in raw if isinstance(raw, list) else [None]:
        ok = (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
              and (item[1] is None if item[0] in MODEL_STAGES else item[0] in LAYER_STAGES and is_int(item[1])
                   and item[1] >= 0)
              and isinstance(item[2], list) and all(is_int(t) and 0 <= t < T for t in item[2]))
        if not ok or item is None:
            raise GoldenError(f"{where}: attribute 'held_tokens' is not a list of [stage, layer or null, "
                              f"[token indices below {T}]]")
        out[(item[1], item[0])] = np.unique(np.asarray(item[2], dtype=np.int64))
    return out


def _golden_rows(golden: Case, candidate: Case, held: dict[tuple[int | None, str], np.ndarray]) -> Case:
    """``candidate`` with the rows it does not hold set to the golden's: rows every judgement excludes
    (classify counts a NaN even in an excluded row), never counted as held or judged."""
    if not held:
        return candidate
    model, layers = dict(candidate.model), dict(candidate.layers)
    copied: set[tuple[bool, str]] = set()
    for (layer, stage), keep in held.items():
        src = model if layer is None else layers
        a, g = src.get(stage), golden.stage(stage, layer)
        if a is None or g is None or (layer is not None and layer >= a.shape[0]):
            continue
        if (layer is None, stage) not in copied:
            src[stage] = a = np.array(a, copy=True)
            copied.add((layer is None, stage))
        c = a if layer is None else a[layer]
        if g.shape != c.shape:
            continue               # judged as of the wrong shape
        rows = np.setdiff1d(np.arange(c.shape[0]), keep)
        c[rows] = g[rows]
    return Case(tokens=candidate.tokens, model=model, layers=layers, attrs=candidate.attrs, ignored=candidate.ignored)


def _held_notes(name: str, held: dict[tuple[int | None, str], np.ndarray], T: int) -> list[str]:
    """One line per stage the candidate holds only in part: which tokens, at which layers."""
    by: dict[tuple[str, tuple[int, ...]], list[int | None]] = {}
    for (layer, stage), keep in held.items():
        by.setdefault((stage, tuple(int(t) for t in keep)), []).append(layer)
    out = []
    for (stage, rows), lays in sorted(by.items(), key=lambda x: _stage_order(x[0][0])):
        at = "" if lays == [None] else f" at layers {sorted(lay for lay in lays if lay is not None)}"
        if not rows:
            out.append(f"{name}: {stage}{at}: not in the dump")
        elif rows == (T - 1,):
            out.append(f"{name}: {stage}{at}: last token only (token {T - 1}): only it is judged")
        else:
            out.append(f"{name}: {stage}{at}: tokens {list(rows)} only: only they are judged")
    return out


def _stage_order(stage: str) -> int:
    return (MODEL_STAGES + LAYER_STAGES).index(stage) if stage in MODEL_STAGES + LAYER_STAGES else 1 << 30


def _own_ids(used: np.ndarray | None, followed: dict[int, np.ndarray]) -> np.ndarray | None:
    """The ids a router chose itself: ``used`` with the followed tokens' own choice put back."""
    if used is None or not followed or used.ndim != 2:
        return used
    own = np.array(used, copy=True)
    for t, ids in followed.items():
        if 0 <= t < own.shape[0] and ids.shape == own[t].shape:
            own[t] = ids
    return own


#: a stage judged at once (routing) or one whose classification runs on the stage tier (judge/pool.py):
#: (case, layer, stage, future)
_Pending = StageResult | tuple[str, int | None, str, Future[tuple[Result, tuple[Margin, ...]]]]
#: the expert rule's golden side: (ids [T, k], contribution of each (token, slot) [T, k, H], their sum or None)
_ExpertInputs = tuple[np.ndarray, np.ndarray, np.ndarray | None]

def compare_cases(golden: Case, candidate: Case, tols: Tolerances, *, dtype: str, name: str = "case",
                  allow_missing: bool = False, layers: Iterable[int] | None = None,
                  propagate: bool = True, mode: str = "free-running") -> CaseReport:
    """Judge every stage of ``candidate`` against ``golden``.

    ``allow_missing``: stages the candidate does not have at all (an engine
    that dumps only a few stages) are skipped instead of reported ``MISSING``,
    and listed in :attr:`CaseReport.skipped`.
    ``propagate=False`` (replay and local re-reference, where every layer gets
    an input of its own): a near-tie flip excuses its token in the rest of its
    own layer only.  A flip that one side followed (``router_followed``: both
    sides then used the same experts) excuses nothing.
    ``layers``: judge only these layers (and no whole-model stage but those
    the candidate holds).
    A candidate whose attribute ``held_tokens`` says an array holds only some
    tokens' rows (:func:`held_tokens`) is judged on those rows alone, and only
    they count as held; a (layer, stage) holding none is absent (skipped under
    ``allow_missing``).  In a per-layer mode each layer was recomputed from the
    candidate's own input to it (``embed``, the ``layer_out`` before;
    ``final_norm`` from the last ``layer_out``, ``logits`` from ``final_norm``):
    where that input holds only some tokens, the layer (stage) is not judged in
    that mode.
    Stages are classified concurrently (numpy releases the GIL); results keep
    computation order.
    """
    check_same_tokens(golden, candidate, where=name)
    T = int(golden.tokens.shape[0])
    rep = CaseReport(case=name, dtype=dtype, mode=mode, n_tokens=T)
    pending: list[_Pending] = []
    n_layer = golden.n_layer
    if candidate.n_layer > n_layer:
        extra = sorted(s for s, a in candidate.layers.items() if a.shape[0] > n_layer)
        raise GoldenError(f"{name}: the candidate holds {candidate.n_layer} layers of {', '.join(extra[:4])}, "
                          f"the golden {n_layer}: judge it against goldens of the same model")
    per_layer = mode in PER_LAYER_MODES   # each stage judged from its own inputs: the row rule applies
    g_follow = followed_routes(golden, where=f"{name} (golden)")
    c_follow = followed_routes(candidate, where=f"{name} (candidate)")
    held = held_tokens(candidate, where=f"{name} (candidate)")
    candidate = _golden_rows(golden, candidate, held)
    for key, keep in held.items():
        rep.held[key] = np.zeros(T, dtype=bool)
        rep.held[key][keep] = True
    if held and not per_layer:
        rep.notes.extend(_held_notes(name, held, T))

    def has(stage: str, layer: int | None) -> bool:
        if layer is None:
            return stage in candidate.model or stage == "tokens"
        a = candidate.layers.get(stage)
        return a is not None and layer < a.shape[0]

    def holds(stage: str, layer: int | None) -> bool:
        """The candidate holds a row of ``stage`` at ``layer``."""
        return has(stage, layer) and ((layer, stage) not in rep.held or bool(rep.held[(layer, stage)].any()))

    def partial(stage: str, layer: int | None) -> bool:
        return (layer, stage) in held and not rep.held[(layer, stage)].all()

    def not_held(stage: str, layer: int | None) -> tuple[int, ...]:
        mask = rep.held.get((layer, stage))
        return () if mask is None else tuple(int(t) for t in np.flatnonzero(~mask))

    def cover(stage: str, layer: int | None, exclude: tuple[int, ...] = ()) -> None:
        if stage == "tokens":
            return
        mask = np.ones(T, dtype=bool) if (layer, stage) not in rep.held else rep.held[(layer, stage)].copy()
        if exclude:
            mask[np.asarray([t for t in exclude if 0 <= t < T], dtype=np.int64)] = False
        rep.judged[(layer, stage)] = mask

    def judge(stage: str, layer: int | None, g: np.ndarray | None, c: np.ndarray | None,
              exclude: tuple[int, ...] = ()) -> None:
        if not holds(stage, layer):
            if allow_missing:
                rep.skipped.append((layer, stage))
                return
            c = None
        absent = not_held(stage, layer)
        exclude = tuple(sorted(set(exclude) | set(absent)))
        cover(stage, layer, exclude)
        if per_layer:
            tol = tols.for_stage(stage, dtype)
        else:   # the error carried through the layers before: wider with depth in low precision
            tol = tols.carried(stage, dtype, n_layer if layer is None and stage != "embed" else (layer or 0))
        experts = None
        if math.isfinite(tol.expert_scale) and stage in ("expert_out", "moe_out") and layer is not None:
            experts = _expert_inputs(golden, layer, stage)
        fut = submit_stage(_classify_stage, g, c, tol, exclude, experts, len(absent))
        pending.append((name, layer, stage, fut))

    def judge_routing(layer: int, g: np.ndarray | None, c: np.ndarray | None,
                      earlier: tuple[int, ...]) -> tuple[int, ...]:
        """Judge each side's own expert choice as sets; return the tokens newly flipped at a near tie
        whose two sides went on with different experts."""
        logits = golden.stage("router_logits", layer)
        g_own = _own_ids(g, g_follow.get(layer, {}))
        c_own = _own_ids(c, c_follow.get(layer, {}))
        if g is None or c is None or logits is None or g_own is None or c_own is None:
            judge("topk_ids", layer, g_own, c_own, earlier)
            return ()
        cover("topk_ids", layer, earlier)
        if earlier and g_own.shape == c_own.shape and g_own.ndim == 2:
            # tokens already excused by an earlier flip may route differently: do not judge them again
            c_own = c_own.copy()
            idx = np.asarray(earlier)
            c_own[idx[idx < c_own.shape[0]]] = g_own[idx[idx < g_own.shape[0]]]
        try:
            rres = classify_routing(g_own, c_own, logits,
                                    tols.tie_tol(dtype) if per_layer else tols.tie_tol_at(dtype, layer))
            metrics = None
            if g_own.shape == c_own.shape:  # exact set comparison of the sorted ids (ties aside), for the metrics
                metrics = classify(np.sort(g_own, -1), np.sort(c_own, -1), tols.for_stage("topk_ids", dtype),
                                   exclude_tokens=sorted(set(earlier) | set(rres.tie_tokens))).metrics
        except MoesnapError as e:
            raise type(e)(f"{_where(name, layer, 'topk_ids')}: {e}") from None
        res = rres.as_result(metrics)
        new: tuple[int, ...] = ()
        if rres.verdict == Verdict.ROUTING_TIE:
            ties = [t for t in rres.flipped_tokens if inherited is None or t < inherited]
            same_used = [t for t in ties if g.shape == c.shape and set(g[t].tolist()) == set(c[t].tolist())]
            new = tuple(t for t in ties if t not in same_used)
            if same_used:
                rep.routing_notes.append(
                    f"layer {layer}: tokens {same_used} picked other experts at a near tie; one side followed "
                    f"the other's experts, so every later stage and layer still judges them")
            if new:
                rep.routing_notes.append(
                    f"layer {layer}: tokens {list(new)} picked other experts at a near tie; "
                    f"later stages of layer {layer} are judged without them"
                    + (f", later layers without tokens >= {min(new)}" if propagate else ""))
        res = Result(res.verdict, res.metrics, res.detail, res.flipped_tokens, earlier)
        tie = tols.tie_tol(dtype) if per_layer else tols.tie_tol_at(dtype, layer)
        pending.append(StageResult(name, layer, "topk_ids", res, routing_margins(rres, tie, metrics)))
        return new

    whole_model = layers is None

    def model_stage(stage: str) -> bool:   # with ``layers``: only what both sides hold
        source = {"final_norm": ("layer_out", candidate.n_layer - 1), "logits": ("final_norm", None)}.get(stage)
        if per_layer and source is not None and partial(*source):
            rep.notes.append(f"{name}: {stage} is not judged in {mode} mode: its input ({source[0]}) is in the "
                             f"dump for some tokens only")
            return False
        return whole_model or (has(stage, None) and golden.stage(stage) is not None)

    if model_stage("embed"):
        judge("embed", None, _pick(golden, "embed", None), _pick(candidate, "embed", None))
    inherited: int | None = None  # first token left out because an earlier layer flipped it
    order = list(range(n_layer) if layers is None else layers)
    if per_layer and held:   # a layer recomputed from an input the candidate holds only in part: not judged
        gone = [lay for lay in order if partial(*(("embed", None) if lay == 0 else ("layer_out", lay - 1)))]
        order = [lay for lay in order if lay not in gone]
        if gone:
            rep.notes.append(f"{name}: layers {gone} are not judged in {mode} mode: their input (embed, the "
                             f"layer_out before) is in the dump for some tokens only")
    for layer in order:
        earlier = tuple(range(inherited, T)) if inherited is not None else ()
        flipped_here: tuple[int, ...] = ()
        for stage in LAYER_STAGES:
            g, c = _pick(golden, stage, layer), _pick(candidate, stage, layer)
            if stage == "topk_ids":
                if not holds(stage, layer):
                    if allow_missing:
                        rep.skipped.append((layer, stage))
                        continue
                    c = None
                flipped_here = judge_routing(layer, g, c, tuple(sorted(set(earlier) | set(not_held(stage, layer)))))
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
                    f"comparison judges nothing further")
    tail = tuple(range(inherited, T)) if inherited is not None else ()
    for stage in ("final_norm", "logits"):
        if model_stage(stage):
            judge(stage, None, _pick(golden, stage, None), _pick(candidate, stage, None), tail)
    for item in pending:
        if isinstance(item, StageResult):
            rep.results.append(item)
            continue
        try:
            res, ms = item[3].result()
            rep.results.append(StageResult(item[0], item[1], item[2], res, ms))
        except MoesnapError as e:   # say which stage held the array it could not judge
            raise type(e)(f"{_where(item[0], item[1], item[2])}: {e}") from None
    return rep


def _expert_inputs(golden: Case, layer: int, stage: str) -> _ExpertInputs | None:
    """(ids [T, k], golden contribution of each (token, slot) [T, k, H], what they sum to or None)
    for the expert rule, in the slot order the judged arrays have (``expert_out`` is compared in
    ascending id order)."""
    ids, eo, w = (golden.stage(s, layer) for s in ("topk_ids", "expert_out", "topk_weights"))
    if ids is None or eo is None or ids.ndim != 2 or eo.shape[:2] != ids.shape:
        return None
    if stage == "expert_out":
        order = np.argsort(ids, axis=1)
        return np.take_along_axis(ids, order, 1), np.take_along_axis(eo, order[..., None], 1), None
    if w is None or w.shape != ids.shape:
        return None
    return ids, eo.astype(np.float64) * w.astype(np.float64)[..., None], golden.stage("moe_out", layer)


#: an expert's scale error counts only beyond this many standard errors of rounding noise
EXPERT_Z = 6.0


def _classify_stage(g: np.ndarray | None, c: np.ndarray | None, tol: Tolerance, exclude: tuple[int, ...],
                    experts: _ExpertInputs | None, absent: int = 0) -> tuple[Result, tuple[Margin, ...]]:
    """classify, then (``experts`` given, the stage passed) the expert-scale rule of ``tol``; with the
    result, its margins.  ``absent``: how many of the ``exclude`` tokens are left out because the
    candidate does not hold them."""
    res = classify(g, c, tol, exclude_tokens=exclude, absent_tokens=absent)
    exact = g is not None and c is not None and g.dtype.kind in "biu" and c.dtype.kind in "biu"
    if experts is None or res.verdict != Verdict.MATCH or g is None or c is None or g.shape != c.shape:
        return res, margins(res, tol, exact=exact)
    ids, contrib, total = experts
    if contrib.shape[0] != c.shape[0] or (total is not None and total.shape != c.shape):
        return res, margins(res, tol, exact=exact)
    resid = c.astype(np.float64) - g.astype(np.float64)
    errs = expert_scale_errors(ids, contrib, resid, exclude, total)
    # an expert's error counts beyond expert_scale and beyond EXPERT_Z standard errors of noise
    near = max(errs, key=lambda e: abs(e[1]) / max(tol.expert_scale, EXPERT_Z * e[2]), default=None)
    expert = None if near is None else (near[0], near[1], max(tol.expert_scale, EXPERT_Z * near[2]))
    bad = [e for e in errs if abs(e[1]) > tol.expert_scale and abs(e[1]) > EXPERT_Z * e[2]]
    if not bad:
        return res, margins(res, tol, expert=expert)
    worst = max(bad, key=lambda e: abs(e[1]))
    first = min(e[4] for e in bad)
    detail = (f"expert {worst[0]}: its output is off by {100 * worst[1]:+.3g}% (±{100 * worst[2]:.2g}% noise) over "
              f"{worst[3]} routed (token, slot) pairs (expert_scale={tol.expert_scale:g}); "
              + (f"{len(bad)} experts beyond it; " if len(bad) > 1 else "") + res.detail)
    m = res.metrics
    assert m is not None   # a MATCH always carries metrics
    bad_tokens = sorted(set(m.bad_tokens) | {first})
    metrics = replace(m, first_bad_token=min(bad_tokens), bad_tokens=tuple(bad_tokens[:64]),
                      n_bad_tokens=max(m.n_bad_tokens, len(bad_tokens)))
    out = Result(Verdict.DIVERGE, metrics, detail, res.flipped_tokens, res.excluded_tokens)
    worst_limit = max(tol.expert_scale, EXPERT_Z * worst[2])
    return out, margins(out, tol, expert=(worst[0], worst[1], worst_limit))


def _where(case: str, layer: int | None, stage: str) -> str:
    return f"{case}/{stage}" if layer is None else f"{case}/layers/{stage} (layer {layer})"
