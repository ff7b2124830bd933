"""The one judging path: candidate cases against golden cases under one :class:`~moesnap.judge.policy.Policy`.

Every producer — moesnap's candidate (``check``), another engine's dump (``compare``), the
expert-parallel ranks, the pytest fixture — only makes candidate cases and hands them to
:func:`judge_suite` as :class:`Pair` values (one golden case, the candidate's case for it, and
optionally a per-layer judgement: the candidate's stage-local replay, or the reference recomputed
from the candidate's own inputs).  It returns a frozen :class:`~moesnap.judge.report.Report`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..case import Case
from ..errors import GoldenError
from .compare import PER_LAYER_MODES, CaseReport, compare_cases
from .device import judge_device
from .distribution import NextToken, next_tokens
from .policy import Policy
from .pool import blas_one_thread, case_processes, submit_case
from .report import Report

#: what a per-layer mode is called in the drift note, by kind
_PER_LAYER_NAMES = {"replay": "stage-local replay", "local": "local re-reference"}


@dataclass(frozen=True)
class PerLayer:
    """A per-layer judgement of one case, each layer from an input of its own: ``golden`` is the side
    held right, ``candidate`` the side judged.  Stage-local replay: the golden case and the candidate's
    replay; local re-reference: the reference recomputed from the candidate's inputs, and the candidate
    (``layers``: the layers it recomputed)."""

    golden: Case
    candidate: Case
    layers: tuple[int, ...] | None = None
    notes: Sequence[str] = ()
    #: one side still being made as it is judged, on a thread of its own (the ``golden``: the local
    #: re-reference; the ``candidate``: a check's stage-local replay): ``ready(l)`` returns once its layer
    #: ``l`` is written, ``ready(None)`` once all of it is (``notes`` then complete too); the judge of each
    #: layer waits for it (:func:`~moesnap.judge.compare.compare_cases`).  None: made already
    ready: Callable[[int | None], None] | None = None


@dataclass(frozen=True)
class Pair:
    """What a producer hands the judge for one golden case: its name, the golden case, the candidate's
    case, and optionally its per-layer judgement.  ``notes``: what the report says about this case."""

    name: str
    golden: Case
    candidate: Case
    per_layer: PerLayer | None = None
    notes: tuple[str, ...] = ()
    #: the decode step these rows are (None: a prompt, a chunk of one, a whole forward); the candidate's
    #: rows sit at ``candidate.positions`` of the golden sequence and are judged against its rows there
    step: int | None = None
    #: a ``candidate`` still being made as it is judged (a check's forward, on a thread of its own), as
    #: :attr:`PerLayer.ready`.  None: made already
    ready: Callable[[int | None], None] | None = None


def drift_notes(policy: Policy, dtype: str, n_layer: int, per_layer: str | None) -> list[str]:
    """How much the free-running tolerances widened, and what judged each stage's own error."""
    f = policy.tolerances.drift(dtype, n_layer - 1)
    if f <= 1.0:
        return []
    return [f"free-running tolerances widen with depth in {dtype} (the rounding every layer carries): "
            f"x{f:.2g} at layer {n_layer - 1}; "
            + (f"each stage's own error is judged by {per_layer} at one operation's tolerance"
               if per_layer else "nothing judged each stage's own error at one operation's tolerance")]


def judge_suite(pairs: Iterable[Pair], policy: Policy, *, golden: str, candidate: str,
                mode: str = "free-running", per_layer: str | None = None, allow_missing: bool = False,
                notes: Sequence[str] = (), hint: str | None = None, golden_cases: Sequence[str] = (),
                ignored: Mapping[str, Sequence[str]] | None = None, case_hint: str | None = None,
                single_case: bool = False, device: Any = None, judge: str | None = None) -> Report:
    """Judge every pair (consumed one at a time: a producer may make them lazily) under ``policy``.

    ``mode``: the free-running mode's name; ``per_layer``: the kind of the pairs' per-layer
    judgements (``"replay"`` or ``"local"``; None: none).  ``allow_missing``: stages the candidate
    lacks are skipped, not ``MISSING``.  ``device``: the torch device the candidate ran on (None: no
    torch forward); with ``judge`` (``auto``, ``cpu``, ``device``; None: ``$MOESNAP_JUDGE``) it decides
    where the statistics are computed (:func:`moesnap.judge.device.judge_device`).  The other keywords
    say what the report is about (see :class:`Report`).  numpy's BLAS runs on one thread meanwhile
    (:func:`moesnap.judge.pool.blas_one_thread`)."""
    with blas_one_thread():
        return _judge_suite(pairs, policy, golden=golden, candidate=candidate, mode=mode, per_layer=per_layer,
                            allow_missing=allow_missing, notes=notes, hint=hint, golden_cases=golden_cases,
                            ignored=ignored, case_hint=case_hint, single_case=single_case, device=device,
                            judge=judge)


def _judge_suite(pairs: Iterable[Pair], policy: Policy, *, golden: str, candidate: str, mode: str,
                 per_layer: str | None, allow_missing: bool, notes: Sequence[str], hint: str | None,
                 golden_cases: Sequence[str], ignored: Mapping[str, Sequence[str]] | None, case_hint: str | None,
                 single_case: bool, device: Any, judge: str | None) -> Report:
    if per_layer is not None and per_layer not in PER_LAYER_MODES:
        raise ValueError(f"per_layer={per_layer!r}; expected one of {', '.join(PER_LAYER_MODES)}")
    tols = policy.tolerances
    on = judge_device(device, judge)
    cases: list[CaseReport] = []
    per: list[CaseReport] = []
    case_notes: list[str] = []
    dtypes: list[str] = []
    dist: list[NextToken] = []
    left: dict[str, str] = {}          # sequence -> why its later steps are not judged
    off_golden: list[str] = []
    n_layer = 0
    # decode steps (one row each, GIL-bound to judge) go to worker processes where there are some, while
    # the producer makes the next step; every result is taken in pair order (``settle``)
    processes = case_processes() > 0
    pending: list[tuple[Pair, Case, str, CaseReport | Future[CaseReport], CaseReport | Future[CaseReport] | None]] = []

    def start(p: Pair, golden_rows: Case, d: str) -> None:
        pl = p.per_layer
        being_made = p.ready is not None or (pl is not None and pl.ready is not None)
        run = submit_case if processes and p.step is not None and not being_made else _now
        where = None if run is submit_case else on      # a worker process judges with numpy
        free = run(compare_cases, golden_rows, p.candidate, tols, dtype=d, name=p.name, allow_missing=allow_missing,
                   mode=mode, device=where, ready=p.ready)
        per_rep = None
        if pl is not None:
            pg = pl.golden if pl.golden.tokens.shape == pl.candidate.tokens.shape else pl.golden.rows(pl.candidate.positions)
            per_rep = run(compare_cases, pg, pl.candidate, tols, dtype=d, name=p.name, allow_missing=True,
                          layers=pl.layers, propagate=False, mode=per_layer or "replay", device=where,
                          ready=pl.ready)
        pending.append((p, golden_rows, d, free, per_rep))
        if run is _now:     # judged already: taken now, so that a large case is not held to the end
            settle()

    def settle() -> list[NextToken]:
        """Every pending judgement taken, in pair order; the next-token figures so far."""
        for p, golden_rows, d, free, per_rep in pending:
            rep = _result(free)
            rep.step, rep.positions = p.step, _positions(p.candidate)
            cases.append(rep)
            # rows a routing flip excused at the logits are not the golden's function: no next-token figure
            dist.extend(next_tokens(p.golden, golden_rows, p.candidate, p.name, p.step, policy, d,
                                    judged=rep.judged.get((None, "logits"))))
            case_notes.extend(p.notes)
            if per_rep is not None:
                assert p.per_layer is not None
                prep = _result(per_rep)
                if p.per_layer.ready is not None:
                    p.per_layer.ready(None)     # made to the end: its notes are complete
                prep.notes.extend(p.per_layer.notes)
                prep.step, prep.positions = p.step, _positions(p.per_layer.candidate)
                per.append(prep)
        pending.clear()
        return dist

    for p in pairs:
        seq = p.name.rsplit("/", 1)[0] if p.step is not None else p.name
        if seq in left:                # the engine left the golden's sequence: nothing after is the golden's
            off_golden.append(p.name)
            continue
        d = policy.dtype_of(p.candidate.attrs)
        golden_rows, why = _golden_rows(p, settle)
        if why is not None:
            left[seq] = why
            off_golden.append(p.name)
            continue
        dtypes.append(d)
        n_layer = max(n_layer, p.golden.n_layer)
        start(p, golden_rows, d)
    settle()
    dtype = _one_dtype(dtypes, policy)
    all_notes = list(notes) + case_notes + list(policy.notes)
    if cases:
        kind = _PER_LAYER_NAMES.get(per_layer or "") if per else None
        all_notes += drift_notes(policy, dtype if len(set(dtypes)) == 1 else max(dtypes, key=_width), n_layer, kind)
    if on is not None:
        all_notes.append(f"judge: statistics computed by {on}" + (
            f" (arrays of {on.min_elements:,} elements or more; numpy the rest)" if on.min_elements else ""))
    suffix = {"replay": " + replay", "local": " + local re-reference"}.get(per_layer or "", "") if per else ""
    unjudged = tuple(f"{name}: {left[name.rsplit('/', 1)[0]] if name.rsplit('/', 1)[0] in left else left[name]}"
                     for name in off_golden)
    return Report(cases=tuple(cases), golden=golden, candidate=candidate, dtype=dtype, mode=mode + suffix,
                  replay=tuple(per) if per_layer is not None and per else None, notes=tuple(all_notes),
                  replay_kind=per_layer or "replay", hint=hint, golden_cases=tuple(golden_cases),
                  ignored={k: tuple(v) for k, v in (ignored or {}).items()}, case_hint=case_hint, single_case=single_case,
                  next_tokens=tuple(dist), unjudged_steps=unjudged)


def _positions(c: Case) -> tuple[int, ...] | None:
    return tuple(int(x) for x in c.attrs["positions"]) if "positions" in c.attrs else None


def _now(fn: Callable[..., CaseReport], /, *args: Any, **kwargs: Any) -> CaseReport:
    return fn(*args, **kwargs)


def _result(r: CaseReport | Future[CaseReport]) -> CaseReport:
    return r.result() if isinstance(r, Future) else r


def _golden_rows(p: Pair, settled: Callable[[], Sequence[NextToken]]) -> tuple[Case, str | None]:
    """The golden's rows at the candidate's positions, and None; or, where the candidate's tokens left
    the golden's sequence because the engine decoded on its own choice, why the rest is not judged
    (``settled``: the next-token figures of the pairs before, every pending judgement taken).
    Positions beyond the golden, or tokens that differ otherwise, are refused naming the case and
    position (a step judged against rows it did not compute would be a vacuous pass)."""
    g, c = p.golden, p.candidate
    if "positions" not in c.attrs and c.tokens.shape == g.tokens.shape:
        return g, None          # the whole sequence (the judge compares its tokens)
    pos = c.positions
    T = int(g.tokens.shape[0])
    if pos.shape != c.tokens.shape:
        raise GoldenError(f"{p.name}: {pos.size} positions for {c.tokens.size} tokens")
    if pos.size and (int(pos.min()) < 0 or int(pos.max()) >= T):
        bad = int(pos.max()) if int(pos.max()) >= T else int(pos.min())
        raise GoldenError(f"{p.name}: position {bad} is outside the golden's {T} tokens (0..{T - 1}); generate "
                          f"the golden with --decode N (or --continuation) to cover the steps")
    diff = np.flatnonzero(g.tokens[pos] != c.tokens)
    if diff.size:
        at = int(pos[diff[0]])
        own = next((d for d in reversed(settled()) if d.case.rsplit("/", 1)[0] == p.name.rsplit("/", 1)[0]), None)
        if own is not None and own.position == at - 1 and own.candidate_top1 == int(c.tokens[diff[0]]):
            return g, (f"from position {at} on the engine decoded its own choice ({int(c.tokens[diff[0]])}, the "
                       f"golden's token is {int(g.tokens[at])}): its steps are not the golden's sequence; to judge "
                       f"them, feed the golden's tokens (--continuation with the golden's ids), or make a golden "
                       f"with the engine's tokens as --continuation")
        raise GoldenError(f"{p.name}: the candidate ran other tokens than the golden: position {at} holds token "
                          f"{int(c.tokens[diff[0]])}, the golden's is {int(g.tokens[at])}")
    return g.rows(pos), None


def _width(dtype: str) -> int:
    """Lower precision sorts higher (its drift is the wider one)."""
    return {"float64": 0, "float32": 1, "float16": 2, "bfloat16": 3}.get(dtype, 1)


def _one_dtype(dtypes: list[str], policy: Policy) -> str:
    """The report's dtype: the one every case was judged at, else the cases' dtypes joined."""
    if not dtypes:
        return policy.dtype or "float32"
    seen = list(dict.fromkeys(dtypes))
    return seen[0] if len(seen) == 1 else "/".join(seen)
