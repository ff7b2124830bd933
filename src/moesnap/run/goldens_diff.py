"""``moesnap goldens diff``: which stages of one version differ from another's, and by how much (the
classifier), or for two versions of a pytest snapshot suite which arrays of each check; the report
as a value (:class:`DiffReport`) and as JSON.  Saying it in lines is :mod:`moesnap.run.goldens_diff_text`."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import GoldenError, UsageError
from ..judge.classify import Verdict
from ..judge.compare import Margin
from ..store import GoldenVersion
from ..util import plural, progress, write_text_atomic
from .goldens import SNAPSHOT_KIND, is_snapshot

@dataclass(frozen=True)
class StageChange:
    """One stage of one case in two versions: ``identical`` bit for bit; ``same_values`` the same shape
    and values (NaN where NaN), perhaps stored in another dtype; ``changed`` when the values differ."""

    case: str
    layer: int | None
    stage: str
    identical: bool
    verdict: Verdict
    metrics: dict | None
    detail: str = ""
    same_values: bool = False
    #: the rule closest to failing, or the one that failed (``moesnap.judge.compare.Margin``)
    worst: Margin | None = None
    dtypes: tuple[str, str] = ("", "")
    #: each side's shape; None on the side that does not hold the array
    shapes: tuple[tuple[int, ...] | None, tuple[int, ...] | None] = ((), ())

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    @property
    def changed(self) -> bool:
        return not (self.identical or self.same_values)

    @property
    def added(self) -> bool:
        """Only the newer version holds it."""
        return self.shapes[0] is None and self.shapes[1] is not None

    @property
    def removed(self) -> bool:
        """Only the older version holds it."""
        return self.shapes[1] is None and self.shapes[0] is not None

    @property
    def beyond(self) -> bool:
        """Held by both versions, changed beyond its tolerance."""
        return self.changed and not self.passed and not (self.added or self.removed)

    def to_dict(self) -> dict:
        return {"case": self.case, "layer": self.layer, "stage": self.stage, "identical": self.identical,
                "changed": self.changed, "dtypes": list(self.dtypes),
                "shapes": [None if s is None else list(s) for s in self.shapes],
                "added": self.added, "removed": self.removed,
                "verdict": self.verdict.name, "metrics": self.metrics, "detail": self.detail,
                "worst": None if self.worst is None else self.worst.to_dict()}


@dataclass(frozen=True)
class TokenChange:
    """A case that both versions hold over other token ids (its stages are not compared): each
    side's ids and the prompt they came from (None: given as token ids)."""

    case: str
    tokens: tuple[tuple[int, ...], tuple[int, ...]]
    prompts: tuple[str | None, str | None] = (None, None)

    @property
    def first_difference(self) -> int:
        """The first position whose token differs (the shorter side's length where one side is the
        other's beginning)."""
        a, b = self.tokens
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    def note(self, ref_a: str, ref_b: str) -> str:
        """One line: ``case case1: other tokens in B: 20 tokens each, the first difference at position 3
        (104 in A, 105 in B); prompt "..." -> "..."; stages not compared``."""
        a, b = self.tokens
        at = self.first_difference
        counts = f"{plural(len(a), 'token')} each" if len(a) == len(b) else f"{len(a)} -> {plural(len(b), 'token')}"
        if at < len(a) and at < len(b):
            where = f"the first difference at position {at} ({a[at]} in {ref_a}, {b[at]} in {ref_b})"
        else:
            longer, ref = (b, ref_b) if len(b) > len(a) else (a, ref_a)
            where = f"the first {plural(at, 'token')} the same, then {ref} goes on with {longer[at]}"
        text = f"case {self.case}: other tokens in {ref_b}: {counts}, {where}"
        pa, pb = self.prompts
        if pa != pb:
            text += f"; prompt {_prompt(pa)} -> {_prompt(pb)}"
        return text + "; stages not compared"

    def to_dict(self) -> dict:
        return {"case": self.case, "first_difference": self.first_difference,
                "tokens": [list(t) for t in self.tokens], "prompts": list(self.prompts)}


def _prompt(text: str | None, width: int = 60) -> str:
    """A prompt in a note: JSON-quoted (a newline shows as \\n), shortened; ``(token ids)`` for none."""
    if text is None:
        return "(token ids)"
    shown = json.dumps(text, ensure_ascii=False)
    return shown if len(shown) <= width else shown[:width - 4] + "...\""


@dataclass
class DiffReport:
    """Two versions compared.  ``kind`` ``forward``: a forward's cases, stage by stage;
    ``moesnap_snapshot``: a pytest snapshot suite, each check's named arrays (a :class:`StageChange`
    each, its ``case`` the check, its ``stage`` the array's name, ``layer`` None)."""

    a: str
    b: str
    provenance: list[tuple[str, Any, Any]] = field(default_factory=list)
    stages: list[StageChange] = field(default_factory=list)
    case_notes: list[str] = field(default_factory=list)
    kind: str = "forward"
    #: the cases both versions hold over other token ids (each has its line in ``case_notes`` too)
    token_changes: list[TokenChange] = field(default_factory=list)

    @property
    def changed(self) -> list[StageChange]:
        """The stages whose values changed (a stage stored in another dtype with the same values has not)."""
        return [s for s in self.stages if s.changed]

    @property
    def any_changed(self) -> bool:
        return bool(self.changed or self.case_notes)

    def to_dict(self) -> dict:
        return {
            "a": self.a, "b": self.b, "kind": self.kind,
            "verdict": "changed" if self.any_changed else "identical",
            "n_stages": len(self.stages),
            "n_changed": len(self.changed),
            "n_dtype_only": sum(1 for s in self.stages if s.same_values and not s.identical),
            "n_beyond_tolerance": sum(1 for s in self.stages if s.beyond),
            "n_added": sum(1 for s in self.stages if s.added),
            "n_removed": sum(1 for s in self.stages if s.removed),
            "provenance": [{"key": k, "a": x, "b": y} for k, x, y in self.provenance],
            "case_notes": list(self.case_notes),
            "token_changes": [t.to_dict() for t in self.token_changes],
            "results": [s.to_dict() for s in self.stages],
        }


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, Mapping):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def _bitwise_equal(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def _same_values(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """The same shape and values, whatever the dtypes (NaN where NaN)."""
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "biu" and b.dtype.kind in "biu":
        return bool(np.array_equal(a, b))
    return bool(np.array_equal(a.astype(np.float64), b.astype(np.float64), equal_nan=True))


def _ids(tokens: np.ndarray) -> tuple[int, ...]:
    return tuple(int(t) for t in np.asarray(tokens).reshape(-1).tolist())


def _shape_of(a: np.ndarray | None) -> tuple[int, ...] | None:
    return None if a is None else tuple(int(n) for n in a.shape)


def _provenance(va: GoldenVersion, vb: GoldenVersion) -> list[tuple[str, Any, Any]]:
    """Every provenance key whose value differs, the generating command's included (not the checksums,
    the cases, which have their own notes, the creation time or how long generating took)."""
    skip = ("checksums", "cases", "created", "layer_timing")
    fa = _flatten({k: v for k, v in va.meta.items() if k not in skip})
    fb = _flatten({k: v for k, v in vb.meta.items() if k not in skip})
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def _named_arrays(v: GoldenVersion) -> bool:
    """A snapshot suite's version, or one whose every case group holds named arrays (``add_arrays``)."""
    from ..store.arrays import LAYOUT

    cases = v.meta.get("cases") or []
    return is_snapshot(v) or bool(cases) and all(c.get("layout") == LAYOUT for c in cases)


def diff(va: GoldenVersion, vb: GoldenVersion, *, tols=None) -> DiffReport:
    """Which stages of ``vb`` differ from ``va`` (the golden side), and by how much (the classifier);
    for two versions of a pytest snapshot suite, which arrays of each check (:func:`diff_snapshots`)."""
    from ..judge.compare import compare_cases
    from ..judge.pool import blas_one_thread
    from ..judge.tolerances import Tolerances

    if _named_arrays(va) != _named_arrays(vb):
        snap, other = (va, vb) if _named_arrays(va) else (vb, va)
        raise UsageError(f"{snap.ref} is a pytest snapshot suite (named arrays) and {other.ref} a golden of a "
                         f"forward's cases: goldens diff compares two versions of one kind")
    tols = tols or Tolerances.defaults()
    if _named_arrays(va):
        return diff_snapshots(va, vb, tols=tols)
    rep = DiffReport(va.ref, vb.ref)
    rep.provenance = _provenance(va, vb)
    dtypes = {str(va.meta.get("dtype") or "float32"), str(vb.meta.get("dtype") or "float32")}
    dtype = "float32" if "float32" in dtypes or len(dtypes) > 1 else dtypes.pop()
    common = _common_cases(rep, va, vb, "case")
    for name in progress(common, desc="diff"):
        ca, cb = va.read_case(name), vb.read_case(name)
        if ca.tokens.shape != cb.tokens.shape or not np.array_equal(ca.tokens, cb.tokens):
            change = TokenChange(name, (_ids(ca.tokens), _ids(cb.tokens)),
                                 (va.case_info(name).get("prompt"), vb.case_info(name).get("prompt")))
            rep.token_changes.append(change)
            rep.case_notes.append(change.note(va.ref, vb.ref))
            continue
        with blas_one_thread():
            report = compare_cases(ca, cb, tols, dtype=dtype, name=name)
        for r in report.results:
            a, b = ca.stage(r.stage, r.layer), cb.stage(r.stage, r.layer)
            same = _bitwise_equal(a, b)
            stored = (str(a.dtype) if a is not None else "-", str(b.dtype) if b is not None else "-")
            rep.stages.append(StageChange(name, r.layer, r.stage, same, r.verdict,
                                          r.result.metrics.to_dict() if r.result.metrics else None,
                                          r.result.detail, same or _same_values(a, b), r.worst, stored,
                                          (_shape_of(a), _shape_of(b))))
    return rep


def _common_cases(rep: DiffReport, va: GoldenVersion, vb: GoldenVersion, word: str) -> list[str]:
    """The case (``word``: case or check) names both versions hold, in ``va``'s order; a note in ``rep`` for
    each that only one holds."""
    names_a, names_b = va.case_names(), vb.case_names()
    for name in sorted(set(names_a) - set(names_b)):
        rep.case_notes.append(f"{word} {name}: only in {va.ref}")
    for name in sorted(set(names_b) - set(names_a)):
        rep.case_notes.append(f"{word} {name}: only in {vb.ref}")
    return [n for n in names_a if n in names_b]


def _array_tolerance(tols, name: str, a: np.ndarray | None, b: np.ndarray | None):
    """The default tolerance of a snapshot array, as the fixture picks it: an array named like a
    moesnap stage (``logits``, ``layers/moe_out``) takes that stage's, any other its dtype's
    ``default``; the dtype's table when both sides are stored in that dtype, else float32's (the
    dtype a check declared is not recorded in the version's provenance)."""
    from ..judge.tolerances import DEFAULT
    from ..stages import DTYPES, canonical

    kinds = {str(x.dtype) for x in (a, b) if x is not None}
    dtype = next(iter(kinds)) if len(kinds) == 1 and next(iter(kinds)) in DTYPES else "float32"
    stage = canonical(name.rsplit("/", 1)[-1])
    return tols.for_stage(stage, dtype) if stage is not None else tols.stages[dtype][DEFAULT]


def diff_snapshots(va: GoldenVersion, vb: GoldenVersion, *, tols=None) -> DiffReport:
    """Two versions of a pytest snapshot suite: for each check both hold, every array of either
    (sorted by name): added, removed, bit for bit identical, the same values in another dtype, or
    changed, judged by the classifier at the default tolerances (no token axis, as the fixture
    judges).  Checks only one version holds are ``case_notes``."""
    from ..judge.classify import classify
    from ..judge.compare import StageResult, margins
    from ..judge.tolerances import Tolerances
    from ..store.arrays import strip_prefix

    tols = tols or Tolerances.defaults()
    rep = DiffReport(va.ref, vb.ref, kind=SNAPSHOT_KIND)
    rep.provenance = _provenance(va, vb)
    common = _common_cases(rep, va, vb, "check")
    for name in progress(common, desc="diff"):
        ga, gb = strip_prefix(va.read_arrays(name)), strip_prefix(vb.read_arrays(name))
        for array in sorted(set(ga) | set(gb)):
            a, b = ga.get(array), gb.get(array)
            tol = _array_tolerance(tols, array, a, b)
            res = classify(a, b, tol, token_axis=None)
            exact = a is not None and b is not None and a.dtype.kind in "biu" and b.dtype.kind in "biu"
            worst = StageResult(name, None, array, res, margins(res, tol, exact=exact)).worst
            same = _bitwise_equal(a, b)
            stored = (str(a.dtype) if a is not None else "-", str(b.dtype) if b is not None else "-")
            rep.stages.append(StageChange(name, None, array, same, res.verdict,
                                          res.metrics.to_dict() if res.metrics else None, res.detail,
                                          same or _same_values(a, b), worst, stored, (_shape_of(a), _shape_of(b))))
    return rep



# ---------------------------------------------------------------- JSON


#: ``--json -``: the report on stdout
STDOUT = "-"


def json_text(rep: DiffReport, *, where: str = "the report") -> str:
    """The diff as JSON (ASCII, any terminal and ``jq`` read it); a value JSON cannot hold is a GoldenError."""
    try:
        return json.dumps(rep.to_dict(), indent=2, allow_nan=False) + "\n"
    except ValueError as e:
        raise GoldenError(f"{where}: cannot write the diff as JSON ({e})") from None


def write_json(rep: DiffReport, path: str | Path) -> None:
    """Write the diff as JSON to ``path`` (atomically), or to stdout when ``path`` is ``-``."""
    if str(path) == STDOUT:
        sys.stdout.write(json_text(rep, where="stdout"))
        sys.stdout.flush()
        return
    p = Path(path)
    if not p.parent.is_dir():
        raise UsageError(f"{p.parent}: output directory does not exist")
    write_text_atomic(p, json_text(rep, where=str(p)))
