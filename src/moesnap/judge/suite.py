"""The one judging path: candidate cases against golden cases under one :class:`~moesnap.judge.policy.Policy`.

Every producer — moesnap's candidate (``check``), another engine's dump (``compare``), the
expert-parallel ranks, the pytest fixture — only makes candidate cases and hands them to
:func:`judge_suite` as :class:`Pair` values (one golden case, the candidate's case for it, and
optionally a per-layer judgement: the candidate's stage-local replay, or the reference recomputed
from the candidate's own inputs).  It returns a frozen :class:`~moesnap.judge.report.Report`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..case import Case
from .compare import PER_LAYER_MODES, CaseReport, compare_cases
from .policy import Policy
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
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pair:
    """What a producer hands the judge for one golden case: its name, the golden case, the candidate's
    case, and optionally its per-layer judgement.  ``notes``: what the report says about this case."""

    name: str
    golden: Case
    candidate: Case
    per_layer: PerLayer | None = None
    notes: tuple[str, ...] = ()


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
                single_case: bool = False) -> Report:
    """Judge every pair (consumed one at a time: a producer may make them lazily) under ``policy``.

    ``mode``: the free-running mode's name; ``per_layer``: the kind of the pairs' per-layer
    judgements (``"replay"`` or ``"local"``; None: none).  ``allow_missing``: stages the candidate
    lacks are skipped, not ``MISSING``.  The other keywords say what the report is about (see
    :class:`Report`)."""
    if per_layer is not None and per_layer not in PER_LAYER_MODES:
        raise ValueError(f"per_layer={per_layer!r}; expected one of {', '.join(PER_LAYER_MODES)}")
    tols = policy.tolerances
    cases: list[CaseReport] = []
    per: list[CaseReport] = []
    case_notes: list[str] = []
    dtypes: list[str] = []
    n_layer = 0
    for p in pairs:
        d = policy.dtype_of(p.candidate.attrs)
        dtypes.append(d)
        n_layer = max(n_layer, p.golden.n_layer)
        cases.append(compare_cases(p.golden, p.candidate, tols, dtype=d, name=p.name, allow_missing=allow_missing,
                                   mode=mode))
        case_notes += p.notes
        if p.per_layer is not None:
            pl = p.per_layer
            rep = compare_cases(pl.golden, pl.candidate, tols, dtype=d, name=p.name, allow_missing=True,
                                layers=pl.layers, propagate=False, mode=per_layer or "replay")
            rep.notes.extend(pl.notes)
            per.append(rep)
    dtype = _one_dtype(dtypes, policy)
    all_notes = list(notes) + case_notes + list(policy.notes)
    if cases:
        kind = _PER_LAYER_NAMES.get(per_layer or "") if per else None
        all_notes += drift_notes(policy, dtype if len(set(dtypes)) == 1 else max(dtypes, key=_width), n_layer, kind)
    suffix = {"replay": " + replay", "local": " + local re-reference"}.get(per_layer or "", "") if per else ""
    return Report(cases=tuple(cases), golden=golden, candidate=candidate, dtype=dtype, mode=mode + suffix,
                  replay=tuple(per) if per_layer is not None and per else None, notes=tuple(all_notes),
                  replay_kind=per_layer or "replay", hint=hint, golden_cases=tuple(golden_cases),
                  ignored={k: tuple(v) for k, v in (ignored or {}).items()}, case_hint=case_hint, single_case=single_case)


def _width(dtype: str) -> int:
    """Lower precision sorts higher (its drift is the wider one)."""
    return {"float64": 0, "float32": 1, "float16": 2, "bfloat16": 3}.get(dtype, 1)


def _one_dtype(dtypes: list[str], policy: Policy) -> str:
    """The report's dtype: the one every case was judged at, else the cases' dtypes joined."""
    if not dtypes:
        return policy.dtype or "float32"
    seen = list(dict.fromkeys(dtypes))
    return seen[0] if len(seen) == 1 else "/".join(seen)
