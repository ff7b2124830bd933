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

The walk is plain functions over values: :class:`_Walk` holds what every judgement reads (both
sides, the rules, the mode, the rows held), each stage's judgement comes back as a :class:`_Judged`
(the tokens judged, the result or the future of its classification on the stage tier of
:mod:`moesnap.judge.pool`), a layer's routing also returns the tokens it newly flipped and its notes,
and the :class:`CaseReport` is assembled from them at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..case import Case
from ..errors import GoldenError, MoesnapError
from ..stages import DEFAULT_FAMILY, LAYER_STAGES, POST_ROUTING_STAGES, ROUTING_SCORES, layer_stages, stages_of_layer
from .attrs import (Second, family, followed_routes, golden_rows, held_notes, held_tokens, own_ids, recorded_config,
                    seconds)
from .classify import classify
from .device import JudgeDevice
from .experts import classify_stage, expert_inputs
from .margins import Margin, margins, routing_margins
from .pool import submit_stage_of
from .routing import align_topk_weights, classify_routing
from .tolerances import Tolerance, Tolerances
from .verdict import Result, Verdict, bad_tokens_text

__all__ = ["PER_LAYER_MODES", "CaseReport", "Margin", "StageResult", "check_same_tokens", "compare_cases", "margins"]


#: what the second, per-layer mode of a report is called, by kind
PER_LAYER_MODES = {
    "replay": "stage-local replay (each stage fed the golden values of its inputs)",
    "local": "local re-reference (the reference recomputes each stage from the engine's own inputs)",
}


@dataclass(frozen=True)
class StageResult:
    case: str
    layer: int | None
    stage: str
    result: Result
    #: the rules it was judged by, error ÷ limit (see :func:`margins`)
    margins: tuple[Margin, ...] = ()
    #: a second value of the stage (an imported dump's other name of it, ``attrs["parted"]``): its name;
    #: None for the value the candidate's stage holds
    source: str | None = None

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
        if self.source is not None:
            where += f" ({self.source})"
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
        if self.source is not None:
            d["source"] = self.source
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



def check_same_tokens(golden: Case, candidate: Case, *, where: str) -> None:
    g, c = np.asarray(golden.tokens), np.asarray(candidate.tokens)
    if g.shape != c.shape or not np.array_equal(g, c):
        raise GoldenError(
            f"{where}: the candidate ran other tokens than the golden "
            f"(golden {g.tolist()[:8]}{'...' if g.size > 8 else ''}, candidate {c.tolist()[:8]}{'...' if c.size > 8 else ''})"
        )


# ---------------------------------------------------------------- the walk


#: the classification of one stage on the stage tier: its result and margins
_Classified = Future[tuple[Result, tuple[Margin, ...]]]


@dataclass(frozen=True)
class _Walk:
    """What judging one case reads and never writes: both sides, the rules, the mode, the rows held."""

    name: str
    golden: Case
    candidate: Case              # with the rows it does not hold set to the golden's (attrs.golden_rows)
    tols: Tolerances
    dtype: str
    mode: str
    per_layer: bool              # each stage judged from its own inputs: no error carried through layers
    propagate: bool
    allow_missing: bool
    n_tokens: int
    n_layer: int
    #: (layer, stage) whose array holds only some tokens' rows -> the mask of those tokens
    held: Mapping[tuple[int | None, str], np.ndarray]
    #: each side's followed routes, {layer: {token: own expert ids}} (attrs.followed_routes)
    g_follow: Mapping[int, dict[int, np.ndarray]]
    c_follow: Mapping[int, dict[int, np.ndarray]]
    #: the candidate's second values of a stage (attrs.seconds), judged beside the value its stage holds
    seconds: Mapping[tuple[int | None, str], list[Second]] = field(default_factory=dict)
    #: where the statistics are computed (:mod:`moesnap.judge.device`; None: numpy)
    device: JudgeDevice | None = None
    #: the layer stages of the golden's family (:data:`moesnap.stages.FAMILY_STAGES`), in order
    layer_stages: tuple[str, ...] = LAYER_STAGES
    #: the golden's family and recorded config: which stages each layer has (dense layers: no router)
    family: str = DEFAULT_FAMILY
    config: Mapping[str, Any] = field(default_factory=dict)

    def stages_at(self, layer: int) -> tuple[str, ...]:
        """The stages layer ``layer`` of the golden's model has (:func:`moesnap.stages.stages_of_layer`)."""
        return stages_of_layer(self.family, dict(self.config), layer)

    def has(self, stage: str, layer: int | None) -> bool:
        if layer is None:
            return stage in self.candidate.model or stage == "tokens"
        a = self.candidate.layers.get(stage)
        return a is not None and layer < a.shape[0]

    def holds(self, stage: str, layer: int | None) -> bool:
        """The candidate holds a row of ``stage`` at ``layer``."""
        return self.has(stage, layer) and ((layer, stage) not in self.held or bool(self.held[(layer, stage)].any()))

    def partial(self, stage: str, layer: int | None) -> bool:
        return (layer, stage) in self.held and not self.held[(layer, stage)].all()

    def not_held(self, stage: str, layer: int | None) -> tuple[int, ...]:
        mask = self.held.get((layer, stage))
        return () if mask is None else tuple(int(t) for t in np.flatnonzero(~mask))

    def judged_mask(self, stage: str, layer: int | None, exclude: tuple[int, ...]) -> np.ndarray | None:
        """The tokens of ``stage`` judged: those held, less ``exclude`` (None for ``tokens``)."""
        if stage == "tokens":
            return None
        T = self.n_tokens
        mask = np.ones(T, dtype=bool) if (layer, stage) not in self.held else self.held[(layer, stage)].copy()
        if exclude:
            mask[np.asarray([t for t in exclude if 0 <= t < T], dtype=np.int64)] = False
        return mask

    def tolerance(self, stage: str, layer: int | None) -> Tolerance:
        if self.per_layer:
            return self.tols.for_stage(stage, self.dtype)
        # the error carried through the layers before: wider with depth in low precision
        return self.tols.carried(stage, self.dtype, self.n_layer if layer is None and stage != "embed" else (layer or 0))

    def tie_tol(self, layer: int) -> float:
        return self.tols.tie_tol(self.dtype) if self.per_layer else self.tols.tie_tol_at(self.dtype, layer)


@dataclass(frozen=True)
class _Judged:
    """One (layer, stage) as the walk leaves it: its result (judged at once, or the future of its
    classification) and the tokens it judged, or no result where it was skipped (``allow_missing``)."""

    layer: int | None
    stage: str
    result: StageResult | _Classified | None
    judged: np.ndarray | None = None
    second: Second | None = None         # a second value of the stage (attrs.seconds), not the stage's own


def _walk(golden: Case, candidate: Case, tols: Tolerances, *, dtype: str, name: str, mode: str, propagate: bool,
          allow_missing: bool, device: JudgeDevice | None = None) -> _Walk:
    """The walk of ``candidate`` against ``golden``: what its attributes say read (and refused where
    malformed), the rows it does not hold set to the golden's; a candidate of more layers refused."""
    n_layer = golden.n_layer
    if candidate.n_layer > n_layer:
        extra = sorted(s for s, a in candidate.layers.items() if a.shape[0] > n_layer)
        raise GoldenError(f"{name}: the candidate holds {candidate.n_layer} layers of {', '.join(extra[:4])}, "
                          f"the golden {n_layer}: judge it against goldens of the same model")
    T = int(golden.tokens.shape[0])
    fam = family(golden, candidate, name=name)
    g_follow = followed_routes(golden, where=f"{name} (golden)")
    c_follow = followed_routes(candidate, where=f"{name} (candidate)")
    held = held_tokens(candidate, where=f"{name} (candidate)")
    masks: dict[tuple[int | None, str], np.ndarray] = {}
    for key, keep in held.items():
        masks[key] = np.zeros(T, dtype=bool)
        masks[key][keep] = True
    return _Walk(name=name, golden=golden, candidate=golden_rows(golden, candidate, held), tols=tols, dtype=dtype,
                 mode=mode, per_layer=mode in PER_LAYER_MODES, propagate=propagate, allow_missing=allow_missing,
                 n_tokens=T, n_layer=n_layer, held=masks, g_follow=g_follow, c_follow=c_follow,
                 seconds=seconds(candidate, where=f"{name} (candidate)"), device=device,
                 layer_stages=layer_stages(fam), family=fam, config=recorded_config(golden))


def compare_cases(golden: Case, candidate: Case, tols: Tolerances, *, dtype: str, name: str = "case",
                  allow_missing: bool = False, layers: Iterable[int] | None = None,
                  propagate: bool = True, mode: str = "free-running", device: JudgeDevice | None = None,
                  ready: Callable[[int | None], None] | None = None) -> CaseReport:
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
    tokens' rows (:func:`moesnap.judge.attrs.held_tokens`) is judged on those rows alone, and only
    they count as held; a (layer, stage) holding none is absent (skipped under
    ``allow_missing``).  In a per-layer mode each layer was recomputed from the
    candidate's own input to it (``embed``, the ``layer_out`` before;
    ``final_norm`` from the last ``layer_out``, ``logits`` from ``final_norm``):
    where that input holds only some tokens, the layer (stage) is not judged in
    that mode.
    Stages are classified concurrently (numpy releases the GIL: :mod:`moesnap.judge.pool`); results
    keep computation order.  ``device``: their statistics computed in torch there
    (:func:`moesnap.judge.device.judge_device`); None: by numpy.
    ``ready``: one side is still being made on a thread of its own (the golden: the local
    re-reference; the candidate: moesnap's forward in a check), its arrays allotted and filled layer by
    layer: each layer is judged once ``ready(layer)`` returned (``embed`` too, once ``ready(0)`` did),
    ``final_norm`` and ``logits`` once ``ready(None)`` did, so that judging a layer overlaps making the
    next.  What the walk reads of the sides' attributes is read again after each ``ready`` (the routes
    each side followed grow layer by layer); attributes about whole arrays (``held_tokens``,
    ``parted``) wait for all of it first.
    """
    check_same_tokens(golden, candidate, where=name)
    if ready is not None and any(side.attrs.get(key) for side in (golden, candidate) for key in _WHOLE_ATTRS):
        ready(None)        # e.g. the rows the candidate does not hold are set to the golden's (attrs.golden_rows)
    w = _walk(golden, candidate, tols, dtype=dtype, name=name, mode=mode, propagate=propagate,
              allow_missing=allow_missing, device=device)
    notes = [] if not w.held or w.per_layer else held_notes(
        name, {key: np.flatnonzero(mask) for key, mask in w.held.items()}, w.n_tokens)
    model_stages, model_notes = _model_stages(w, whole_model=layers is None)
    order, layer_notes = _layer_order(w, layers)
    if ready is not None and "embed" in model_stages:
        ready(0)           # made with the first layer
    items = [*_seconds(w, "embed", None, ()),
             _judge_stage(w, "embed", None, w.golden.stage("embed"), w.candidate.stage("embed"))
             ] if "embed" in model_stages else []
    routing_notes: list[str] = []
    inherited: int | None = None  # first token left out because an earlier layer flipped it
    for layer in order:
        if ready is not None:
            ready(layer)   # its followed routes too: appended as the layer is made
            w = replace(w, g_follow=followed_routes(golden, where=f"{name} (golden)"),
                        c_follow=followed_routes(candidate, where=f"{name} (candidate)"))
        judged, flipped, said = _judge_layer(w, layer, inherited)
        items += judged
        routing_notes += said
        if flipped and propagate:
            first = min(flipped)
            inherited = first if inherited is None else min(inherited, first)
            if inherited == 0 and layer + 1 < w.n_layer:
                routing_notes.append(
                    f"from layer {layer + 1} on every token is excused by a near-tie flip, so the free-running "
                    f"comparison judges nothing further")
    tail = tuple(range(inherited, w.n_tokens)) if inherited is not None else ()
    if ready is not None:
        ready(None)
    for stage in ("final_norm", "logits"):
        if stage in model_stages:
            items += _seconds(w, stage, None, tail)
            items.append(_judge_stage(w, stage, None, w.golden.stage(stage), w.candidate.stage(stage), tail))
    return _case_report(w, items, notes + layer_notes + model_notes, routing_notes)


#: attributes about a side's whole arrays: a side being made is judged against them once all of it is made
_WHOLE_ATTRS = ("held_tokens", "parted")


def _model_stages(w: _Walk, *, whole_model: bool) -> tuple[tuple[str, ...], list[str]]:
    """The whole-model stages judged (with ``layers``: only what both sides hold), and a note for each
    that a per-layer mode cannot judge (its input held for some tokens only)."""
    judged, notes = [], []
    for stage in ("embed", "final_norm", "logits"):
        source = {"final_norm": ("layer_out", w.candidate.n_layer - 1), "logits": ("final_norm", None)}.get(stage)
        if w.per_layer and source is not None and w.partial(*source):
            notes.append(f"{w.name}: {stage} is not judged in {w.mode} mode: its input ({source[0]}) is in the "
                         f"dump for some tokens only")
        elif whole_model or (w.has(stage, None) and w.golden.stage(stage) is not None):
            judged.append(stage)
    return tuple(judged), notes


def _layer_order(w: _Walk, layers: Iterable[int] | None) -> tuple[list[int], list[str]]:
    """The layers judged, in order, and a note on those a per-layer mode cannot judge (their input
    held for some tokens only)."""
    order = list(range(w.n_layer) if layers is None else layers)
    if not (w.per_layer and w.held):
        return order, []
    gone = [lay for lay in order if w.partial(*(("embed", None) if lay == 0 else ("layer_out", lay - 1)))]
    notes = [f"{w.name}: layers {gone} are not judged in {w.mode} mode: their input (embed, the layer_out before) "
             f"is in the dump for some tokens only"] if gone else []
    return [lay for lay in order if lay not in gone], notes


def _judge_layer(w: _Walk, layer: int, inherited: int | None) -> tuple[list[_Judged], tuple[int, ...], list[str]]:
    """Every stage of ``layer`` in computation order (``inherited``: the first token an earlier layer's
    flip excused; it and those after are judged nowhere here); with the tokens newly flipped at its
    routing, which its later stages leave out, and its routing notes."""
    earlier = tuple(range(inherited, w.n_tokens)) if inherited is not None else ()
    flipped: tuple[int, ...] = ()
    notes: list[str] = []
    out: list[_Judged] = []
    for stage in w.stages_at(layer):
        g, c = w.golden.stage(stage, layer), w.candidate.stage(stage, layer)
        if stage == "topk_ids":
            if not w.holds(stage, layer):
                if w.allow_missing:
                    out.append(_Judged(layer, stage, None))
                    continue
                c = None
            before = tuple(sorted(set(earlier) | set(w.not_held(stage, layer))))
            item, flipped, notes = _judge_routing(w, layer, g, c, before, inherited)
            out += _seconds(w, stage, layer, earlier, inherited)
            out.append(item)
            continue
        exclude = earlier
        if stage in POST_ROUTING_STAGES and flipped:
            exclude = tuple(sorted(set(earlier) | set(flipped)))
        if stage in ("topk_weights", "expert_out"):
            gi, ci = w.golden.stage("topk_ids", layer), w.candidate.stage("topk_ids", layer)
            if ci is None and stage == "topk_weights" and g is not None and c is not None:
                # a dump without ids: compare the k weights of each token as a sorted multiset
                g, c = -np.sort(-g, axis=-1), -np.sort(-c, axis=-1)
            else:
                g, c = align_topk_weights(gi, g, ci, c)
        out += _seconds(w, stage, layer, exclude, inherited)
        out.append(_judge_stage(w, stage, layer, g, c, exclude))
    return out, flipped, notes


def _seconds(w: _Walk, stage: str, layer: int | None, exclude: tuple[int, ...],
             inherited: int | None = None) -> list[_Judged]:
    """Each second value of ``stage`` at ``layer`` (an imported dump's other name of it) judged as the
    stage's own value is, against the same golden rows and without the same tokens; a value of the last
    token alone is judged on that token.  They come before the stage's own value: the earlier in the forward."""
    out: list[_Judged] = []
    T = w.n_tokens
    g = w.golden.stage(stage, layer)
    for sec in w.seconds.get((layer, stage), ()):
        c, ex, absent = sec.rows, set(exclude), 0
        if g is not None and c.shape[0] == 1 < T and c.shape[1:] == g.shape[1:]:
            c = np.array(g, dtype=np.result_type(g.dtype, c.dtype), copy=True)   # rows it lacks: never judged
            c[-1] = sec.rows[0]
            ex |= set(range(T - 1))
            absent = T - 1
        if stage == "topk_ids" and layer is not None:
            item = _judge_routing(w, layer, g, c, tuple(sorted(ex)), inherited)[0]
            out.append(replace(item, second=sec))
            continue
        gs: np.ndarray | None = g
        cs: np.ndarray | None = c
        if stage in ("topk_weights", "expert_out") and layer is not None:
            gi, ci = w.golden.stage("topk_ids", layer), w.candidate.stage("topk_ids", layer)
            if ci is None and stage == "topk_weights" and g is not None:
                gs, cs = -np.sort(-g, axis=-1), -np.sort(-c, axis=-1)
            else:
                gs, cs = align_topk_weights(gi, g, ci, c)
        tol = w.tolerance(stage, layer)
        experts = None
        if math.isfinite(tol.expert_scale) and stage in ("expert_out", "moe_out") and layer is not None:
            experts = expert_inputs(w.golden, layer, stage)
        mask = np.ones(T, dtype=bool)
        mask[[t for t in ex if 0 <= t < T]] = False
        out.append(_Judged(layer, stage, submit_stage_of(_values(gs, cs), classify_stage, gs, cs, tol,
                                                           tuple(sorted(ex)), experts, absent),
                           mask, second=sec))
    return out


def _judge_stage(w: _Walk, stage: str, layer: int | None, g: np.ndarray | None, c: np.ndarray | None,
                 exclude: tuple[int, ...] = ()) -> _Judged:
    """``stage`` at ``layer`` classified on the stage tier, without the ``exclude`` tokens nor those the
    candidate does not hold; skipped where the candidate lacks it under ``allow_missing``."""
    if not w.holds(stage, layer):
        if w.allow_missing:
            return _Judged(layer, stage, None)
        c = None
    absent = w.not_held(stage, layer)
    exclude = tuple(sorted(set(exclude) | set(absent)))
    mask = w.judged_mask(stage, layer, exclude)
    tol = w.tolerance(stage, layer)
    experts = None
    if math.isfinite(tol.expert_scale) and stage in ("expert_out", "moe_out") and layer is not None:
        experts = expert_inputs(w.golden, layer, stage)
    return _Judged(layer, stage, submit_stage_of(_values(g, c), classify_stage, g, c, tol, exclude, experts,
                                                 len(absent), w.device), mask)


def _values(g: np.ndarray | None, c: np.ndarray | None) -> int:
    """How many values judging a stage reads on its larger side (what decides the thread it runs on)."""
    return max(0 if g is None else int(np.size(g)), 0 if c is None else int(np.size(c)))


def _judge_routing(w: _Walk, layer: int, g: np.ndarray | None, c: np.ndarray | None, earlier: tuple[int, ...],
                   inherited: int | None) -> tuple[_Judged, tuple[int, ...], list[str]]:
    """Judge each side's own expert choice as sets (``earlier``: tokens already left out), at once; with
    the tokens newly flipped at a near tie whose two sides went on with different experts (before
    ``inherited``, the first token an earlier layer's flip excused), and the notes saying so."""
    logits = w.golden.stage(ROUTING_SCORES[w.family], layer)   # what the family's selection ranks by
    g_own = own_ids(g, w.g_follow.get(layer, {}))
    c_own = own_ids(c, w.c_follow.get(layer, {}))
    if g is None or c is None or logits is None or g_own is None or c_own is None:
        return _judge_stage(w, "topk_ids", layer, g_own, c_own, earlier), (), []
    mask = w.judged_mask("topk_ids", layer, earlier)
    if earlier and g_own.shape == c_own.shape and g_own.ndim == 2:
        # tokens already excused by an earlier flip may route differently: do not judge them again
        c_own = c_own.copy()
        idx = np.asarray(earlier)
        c_own[idx[idx < c_own.shape[0]]] = g_own[idx[idx < g_own.shape[0]]]
    try:
        tie = w.tie_tol(layer)
        rres = classify_routing(g_own, c_own, logits, tie)
        metrics = None
        if g_own.shape == c_own.shape:  # exact set comparison of the sorted ids (ties aside), for the metrics
            metrics = classify(np.sort(g_own, -1), np.sort(c_own, -1), w.tols.for_stage("topk_ids", w.dtype),
                               exclude_tokens=sorted(set(earlier) | set(rres.tie_tokens))).metrics
    except MoesnapError as e:
        raise type(e)(f"{_where(w.name, layer, 'topk_ids')}: {e}") from None
    new: tuple[int, ...] = ()
    notes: list[str] = []
    if rres.verdict == Verdict.ROUTING_TIE:
        ties = [t for t in rres.flipped_tokens if inherited is None or t < inherited]
        same_used = [t for t in ties if g.shape == c.shape and set(g[t].tolist()) == set(c[t].tolist())]
        new = tuple(t for t in ties if t not in same_used)
        if same_used:
            notes.append(f"layer {layer}: tokens {same_used} picked other experts at a near tie; one side followed "
                         f"the other's experts, so every later stage and layer still judges them")
        if new:
            notes.append(f"layer {layer}: tokens {list(new)} picked other experts at a near tie; "
                         f"later stages of layer {layer} are judged without them"
                         + (f", later layers without tokens >= {min(new)}" if w.propagate else ""))
    res = rres.as_result(metrics)
    res = Result(res.verdict, res.metrics, res.detail, res.flipped_tokens, earlier)
    return _Judged(layer, "topk_ids", StageResult(w.name, layer, "topk_ids", res, routing_margins(rres, tie, metrics)),
                   mask), new, notes


def _case_report(w: _Walk, items: list[_Judged], notes: list[str], routing_notes: list[str]) -> CaseReport:
    """The report of the walk's items, in their order (a classification that failed names its stage)."""
    results: list[StageResult] = []
    judged: dict[tuple[int | None, str], np.ndarray] = {}
    skipped: list[tuple[int | None, str]] = []
    pairs: list[tuple[Second, StageResult]] = []
    for item in items:
        if item.result is None:
            skipped.append((item.layer, item.stage))
            continue
        if item.judged is not None and item.second is None:    # a second value is no cell of its own
            judged[(item.layer, item.stage)] = item.judged
        if isinstance(item.result, StageResult):
            results.append(item.result if item.second is None else replace(item.result, source=item.second.name))
        else:
            try:
                res, ms = item.result.result()
            except MoesnapError as e:   # say which stage held the array it could not judge
                raise type(e)(f"{_where(w.name, item.layer, item.stage)}: {e}") from None
            results.append(StageResult(w.name, item.layer, item.stage, res, ms,
                                       source=None if item.second is None else item.second.name))
        if item.second is not None:
            pairs.append((item.second, results[-1]))
    mode = {"local": "local re-reference", "replay": "stage-local replay"}.get(w.mode, w.mode)
    label = w.name if not w.per_layer else f"{w.name} ({mode})"
    notes = notes + _absent_notes(w, label, skipped) + _parted_notes(label, pairs, results)
    return CaseReport(case=w.name, dtype=w.dtype, results=results, routing_notes=routing_notes, mode=w.mode,
                      n_tokens=w.n_tokens, judged=judged, skipped=skipped, notes=notes, held=dict(w.held))


#: stages an engine may fuse away (no value to dump), each with the stages after it that carry its error,
#: nearest first: SGLang on CUDA fuses q/k norm (and RoPE) into one kernel; fused MoE kernels keep no
#: per-expert output
ABSORBED: dict[str, tuple[str, ...]] = {
    "q_norm": ("q_rope", "attn"), "k_norm": ("k_rope", "attn"), "q_rope": ("attn",), "k_rope": ("attn",),
    "expert_out": ("moe_out",),
}
#: what the local re-reference recomputes an absorbed stage's successor from (moesnap.run.rereference)
_FROM = {"attn": "the engine's own q, k, v through the reference's q/k norm (where the family has one) and RoPE",
         "q_rope": "the engine's own q through the reference's q norm", "k_rope": "the engine's own k through "
         "the reference's k norm", "moe_out": "the engine's own ffn_norm and routing through the reference's experts"}


def _absent_notes(w: _Walk, label: str, skipped: list[tuple[int | None, str]]) -> list[str]:
    """For the stages the candidate lacks (skipped under ``allow_missing``) that a later stage of the
    same layer carries (:data:`ABSORBED`): which stage judges them, at which layers."""
    by: dict[str, dict[str, list[int]]] = {}    # judging stage -> absent stage -> layers
    for layer, stage in skipped:
        if layer is None or stage not in ABSORBED:
            continue
        after = next((s for s in ABSORBED[stage] if w.holds(s, layer)), None)
        if after is not None:
            by.setdefault(after, {}).setdefault(stage, []).append(layer)
    out = []
    for after, absent in by.items():
        layers = sorted({lay for lays in absent.values() for lay in lays})
        names = ", ".join(s for s in ABSORBED if s in absent)
        them = "them" if len(absent) > 1 else "it"
        how = (f"{after} is recomputed from {_FROM[after]}, so {after} judges {them} with it" if w.per_layer
               else f"{after} carries {'their' if len(absent) > 1 else 'its'} error")
        why = ("a fused MoE kernel keeps no per-expert output" if after == "moe_out" else
               "an engine computes them where no hook sees them: SGLang on CUDA fuses q/k norm and RoPE into one "
               "kernel and decodes DeepSeek's latent attention without q/k/v rows; transformers applies RoPE inside "
               "the attention")
        out.append(f"{label}: {names} not in the candidate at layers {_span(layers)} ({why}): judged through "
                   f"{after} of the same layer ({how})")
    return out


def _span(xs: list[int]) -> str:
    return f"{xs[0]}-{xs[-1]}" if len(xs) > 1 and xs == list(range(xs[0], xs[-1] + 1)) else ", ".join(map(str, xs))


def _parted_notes(name: str, pairs: list[tuple[Second, StageResult]], results: list[StageResult]) -> list[str]:
    """Where a stage's two values part, and which of them the golden holds against."""
    if not pairs:
        return []
    own = {(r.layer, r.stage): r for r in results if r.source is None}
    out = []
    for sec, r2 in pairs:
        r1 = own.get((sec.layer, sec.stage))
        at = (f"layer {sec.layer} / " if sec.layer is not None else "") + sec.stage
        part = "" if sec.token is None else f"; they part from token {sec.token}" + (
            "" if sec.rel_l2 is None else f" (rel L2 {sec.rel_l2:.3g} between them)")
        if r1 is None:
            out.append(f"{name}: {at}: {sec.name} {r2.verdict.name}; the stage's own value ({sec.kept}) was not "
                       f"judged{part}")
            continue
        if r2.result.passed and not r1.result.passed:
            why = f"the error arises between {sec.name} and {sec.kept}"
        elif not r2.result.passed and not r1.result.passed:
            why = f"the error arises at or before {sec.name}"
        elif not r2.result.passed:
            why = f"only the earlier value, {sec.name}, is off"
        else:
            why = "both within tolerance"
        out.append(f"{name}: {at} has two values in the dump: {sec.name} {r2.verdict.name}, {sec.kept} (the "
                   f"stage's own) {r1.verdict.name}{part}: {why}")
    return out


def _where(case: str, layer: int | None, stage: str) -> str:
    return f"{case}/{stage}" if layer is None else f"{case}/layers/{stage} (layer {layer})"
