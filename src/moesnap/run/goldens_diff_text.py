"""``moesnap goldens diff`` in lines: a summary per case (or per check of a pytest snapshot suite)
and, with ``--details``, every provenance key that differs and a line per changed stage or array."""

from __future__ import annotations

import json
from typing import Any

from ..judge.classify import Verdict
from ..util import plural, printable
from .goldens import SNAPSHOT_KIND
from .goldens_diff import DiffReport, StageChange, TokenChange


def _provenance_lines(rep: DiffReport, *, details: bool) -> list[str]:
    """The provenance that differs: each key and both values when ``details`` or when they are few
    and short, else the keys.  The generating command shows the words where the two commands differ
    (whole with ``details``)."""
    shown = [(k, *(_word_change(x, y, width=None if details else 80)
                   if k == "command" and isinstance(x, str) and isinstance(y, str) else (_short(x), _short(y))))
             for k, x, y in rep.provenance]
    if details or (len(shown) <= 2 and all(len(x + y) <= 40 for _, x, y in shown)):
        return [f"  provenance {k}: {x} -> {y}" for k, x, y in shown]
    if not rep.provenance:
        return []
    keys = [k for k, _, _ in rep.provenance]
    return [f"  provenance: {plural(len(keys), 'key')} differ{'s' if len(keys) == 1 else ''}: {', '.join(keys[:6])}"
            + (", …" if len(keys) > 6 else "")
            + " (values: --details)"]


def _head_and_groups(rep: DiffReport, details: bool) -> tuple[list[str], dict[str, list[StageChange]]]:
    """A diff's first lines (the versions, the provenance that changed, the case notes; with ``details``
    each case over other tokens: both sides' ids from a little before the first difference, and both
    prompts whole) and its stage changes grouped by case (or check)."""
    lines = [f"{rep.a} -> {rep.b}", *_provenance_lines(rep, details=details)]
    tokens = {t.note(rep.a, rep.b): t for t in rep.token_changes}
    for note in rep.case_notes:
        lines.append(f"  {note}")
        if details and note in tokens:
            lines.extend(f"    {line}" for line in _token_lines(tokens[note], rep.a, rep.b))
    groups: dict[str, list[StageChange]] = {}
    for s in rep.stages:
        groups.setdefault(s.case, []).append(s)
    return lines, groups


def diff_lines(rep: DiffReport, *, details: bool = False) -> list[str]:
    """A compact summary: provenance that changed, one line per case (how many stages changed, whether
    any beyond tolerance, the first such or the largest change), a total.  ``details``: every
    provenance key and one line per changed stage.  A snapshot suite: :func:`snapshot_diff_lines`."""
    if rep.kind == SNAPSHOT_KIND:
        return snapshot_diff_lines(rep, details=details)
    lines, by_case = _head_and_groups(rep, details)
    for case, stages in by_case.items():
        changed = [s for s in stages if s.changed]
        dtype_only = sum(1 for s in stages if s.same_values and not s.identical)
        other = f"; {dtype_only} other in dtype only" if dtype_only else ""
        if not changed:
            lines.append(f"  case {case}: all {plural(len(stages), 'stage')} unchanged{other}")
            continue
        beyond = [s for s in changed if not s.passed]
        if beyond:
            head = f"{len(beyond)} beyond tolerance, the first: {_stage_text(beyond[0], why=True)}"
        else:
            big = max(changed, key=lambda s: s.worst.ratio if s.worst is not None else 0.0)
            where = ("" if big.layer is None else f"layer {big.layer} ") + big.stage
            head = (f"none beyond tolerance (closest: {where}, {_num(big.worst.ratio)} of it)" if big.worst is not None
                    else "none beyond tolerance")
        lines.append(f"  case {case}: {len(changed)} of {plural(len(stages), 'stage')} changed, {head}{other}")
        if details:
            for s in changed + [s for s in stages if s.same_values and not s.identical]:
                lines.append("    " + _stage_text(s, why=not s.passed, metrics=True))
    n, beyond_n = len(rep.changed), sum(1 for s in rep.changed if not s.passed)
    if rep.any_changed:
        lines.append(f"changed: {plural(n, 'stage')}, {beyond_n} beyond tolerance" +
                     (f", {plural(len(rep.case_notes), 'case difference')}" if rep.case_notes else "")
                     + ("" if details or not rep.changed else " (each stage: --details)"))
    else:
        same = sum(1 for s in rep.stages if s.identical)
        lines.append(f"identical: all {plural(len(rep.stages), 'stage')} bit for bit" if same == len(rep.stages) else
                     f"unchanged: all {plural(len(rep.stages), 'stage')} hold the same values ({same} bit for bit)")
    return [printable(line) for line in lines]


#: changed arrays a check's summary names (the rest: --details)
SUMMARY_ARRAYS = 4


def snapshot_diff_lines(rep: DiffReport, *, details: bool = False) -> list[str]:
    """A pytest snapshot suite's diff: provenance that changed, then per check the arrays added and
    removed and each changed array (beyond tolerance first, up to :data:`SUMMARY_ARRAYS`) with its
    dtype, shape, largest abs and relative difference and whether beyond tolerance; a total.
    ``details``: every provenance key and one line per array of each check, unchanged ones too."""
    lines, by_check = _head_and_groups(rep, details)
    for check, arrays in by_check.items():
        added = [s for s in arrays if s.added]
        removed = [s for s in arrays if s.removed]
        changed = [s for s in arrays if s.changed and not (s.added or s.removed)]
        dtype_only = [s for s in arrays if s.same_values and not s.identical]
        beyond = [s for s in changed if s.beyond]
        parts = []
        if changed:
            parts.append(f"{len(changed)} of {plural(len(arrays), 'array')} changed, "
                         + (f"{len(beyond)} beyond tolerance" if beyond else "none beyond tolerance"))
        for what, group in (("added", added), ("removed", removed)):
            if group:
                parts.append(f"{what}: " + ", ".join(_array_text(s) for s in group[:6])
                             + (f", … {len(group) - 6} more" if len(group) > 6 else ""))
        if dtype_only:
            parts.append(f"{len(dtype_only)} in another dtype only")
        if not (changed or added or removed):
            parts.insert(0, f"all {plural(len(arrays), 'array')} unchanged")
        lines.append(f"  check {check}: " + "; ".join(parts))
        if details:
            width = max(len(s.stage) for s in arrays)
            lines.extend(f"    {s.stage:<{width}}  {_array_detail(s)}" for s in arrays)
            continue
        shown = sorted(changed, key=lambda s: (not s.beyond, -(s.worst.ratio if s.worst is not None else 0.0)))
        lines.extend(f"    {_array_text(s)}: {_array_change(s)}" for s in shown[:SUMMARY_ARRAYS])
        if len(shown) > SUMMARY_ARRAYS:
            lines.append(f"    … {len(shown) - SUMMARY_ARRAYS} more changed (each array: --details)")
    both = [s for s in rep.stages if not (s.added or s.removed)]
    changed_n = sum(1 for s in both if s.changed)
    beyond_n = sum(1 for s in both if s.beyond)
    added_n = sum(1 for s in rep.stages if s.added)
    removed_n = sum(1 for s in rep.stages if s.removed)
    if rep.any_changed:
        lines.append(f"changed: {plural(changed_n, 'array')}, {beyond_n} beyond tolerance"
                     + (f", {added_n} added" if added_n else "") + (f", {removed_n} removed" if removed_n else "")
                     + (f", {plural(len(rep.case_notes), 'check difference')}" if rep.case_notes else "")
                     + ("" if details or not changed_n else " (each array: --details)"))
    else:
        same = sum(1 for s in rep.stages if s.identical)
        lines.append(f"identical: all {plural(len(rep.stages), 'array')} bit for bit" if same == len(rep.stages) else
                     f"unchanged: all {plural(len(rep.stages), 'array')} hold the same values ({same} bit for bit)")
    return [printable(line) for line in lines]


#: token ids a ``--details`` line shows of each side of a case over other tokens
TOKEN_WINDOW = 16


def _token_lines(t: TokenChange, ref_a: str, ref_b: str) -> list[str]:
    """Both sides' token ids from a little before the first difference, and both prompts whole."""
    at = t.first_difference
    start = max(0, at - 4)
    width = max(len(ref_a), len(ref_b))
    lines = []
    for ref, ids in zip((ref_a, ref_b), t.tokens):
        shown = ", ".join(map(str, ids[start:start + TOKEN_WINDOW]))
        more = len(ids) - start - TOKEN_WINDOW
        lines.append(f"ids in {ref:<{width}} from position {start}: [{'…, ' if start else ''}{shown}"
                     + (f", … {more} more" if more > 0 else "") + "]")
    if any(p is not None for p in t.prompts):
        lines.extend(f"prompt in {ref:<{width}}: " + ("(token ids)" if p is None else json.dumps(p, ensure_ascii=False))
                     for ref, p in zip((ref_a, ref_b), t.prompts))
    return lines


def _dims(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else "[" + ", ".join(map(str, shape)) + "]"


def _array_text(s: StageChange) -> str:
    """``hidden float32 [3, 4]``; what changed between the sides, ``->``: ``ids int32 -> int64 [5]``."""
    (da, db), (sa, sb) = s.dtypes, s.shapes
    if s.added:
        return f"{s.stage} {db} {_dims(sb)}"
    if s.removed:
        return f"{s.stage} {da} {_dims(sa)}"
    dtype = da if da == db else f"{da} -> {db}"
    shape = _dims(sa) if sa == sb else f"{_dims(sa)} -> {_dims(sb)}"
    return f"{s.stage} {dtype} {shape}"


def _array_change(s: StageChange) -> str:
    """How much a changed array moved: ``max_abs 0.5, max_rel 0.1, beyond tolerance (what failed)``."""
    m = s.metrics or {}
    size = ""
    if m and s.verdict != Verdict.SHAPE_MISMATCH:
        finite = " (finite elements)" if any(m.get(k) for k in ("nan_golden", "nan_candidate", "inf_golden",
                                                                  "inf_candidate")) else ""
        size = f"max_abs {_num(m.get('max_abs'))}, max_rel {_num(m.get('max_rel'))}{finite}, "
    w = s.worst
    if s.beyond:
        return f"{size}beyond tolerance ({w.text if w is not None else s.verdict.name})"
    return size + "within tolerance" + (f" ({_num(w.ratio)} of it)" if w is not None else "")


def _array_detail(s: StageChange) -> str:
    """One array of a check under ``--details``: its state, dtype and shape, and for a changed one
    the verdict, metrics and the rule that failed or came closest."""
    head = _array_text(s).removeprefix(s.stage + " ")
    state = ("added" if s.added else "removed" if s.removed else "identical" if s.identical
             else "dtype only" if s.same_values else "changed")
    text = f"{state:<10}  {head}"
    if state != "changed":
        return text
    text += f"  {s.verdict.name}"
    m = s.metrics or {}
    if m:
        text += (f"  max_abs {_num(m.get('max_abs'))}  max_rel {_num(m.get('max_rel'))}  "
                 f"mean_abs {_num(m.get('mean_abs'))}  rel_l2 {_num(m.get('rel_l2'))}  cosine {_num(m.get('cosine'))}")
        if m.get("n_outside"):
            text += f"  {m['n_outside']} of {m.get('n')} outside"
        if m.get("worst_index") is not None:
            text += f"  worst at {tuple(m['worst_index'])}"
    w = s.worst
    if w is not None:
        text += f"  ({w.text})" if s.beyond else f"  ({_num(w.ratio)} of tolerance, {w.rule})"
    return text


def _stage_text(s: StageChange, *, why: bool, metrics: bool = False) -> str:
    """``layer 2 moe_out DIVERGE (frac_outside …)``; with ``metrics`` the size of the change."""
    where = "" if s.layer is None else f"layer {s.layer} "
    if s.same_values and not s.identical:
        return f"{where}{s.stage}: same values, dtype {s.dtypes[0]} -> {s.dtypes[1]}"
    text = f"{where}{s.stage} {s.verdict.name}"
    w = s.worst
    if metrics:
        m = s.metrics or {}
        text = (f"{where:>9}{s.stage:<14} {s.verdict.name:<14} max_abs {_num(m.get('max_abs'))}  "
                f"rel_l2 {_num(m.get('rel_l2'))}  cosine {_num(m.get('cosine'))}")
        if w is not None and s.passed:
            text += f"  {_num(w.ratio)} of tolerance"
    if w is not None and (why or not s.passed):
        text += f" ({w.text})" if not s.passed else ("" if metrics else f" ({_num(w.ratio)} of tolerance, {w.rule})")
    return text


def _word_change(a: str, b: str, context: int = 1, width: int | None = 80) -> tuple[str, str]:
    """Where two command lines differ, word by word, with ``context`` words before and ``…`` for what
    both share: ``… --dtype float32`` and ``… --dtype float64``."""
    wa, wb = a.split(" "), b.split(" ")
    first = next((i for i, (x, y) in enumerate(zip(wa, wb)) if x != y), min(len(wa), len(wb)))
    last = 0                         # words both end with, after the first difference
    while last < min(len(wa), len(wb)) - first and wa[-1 - last] == wb[-1 - last]:
        last += 1
    start = max(0, first - context)

    def part(words: list[str]) -> str:
        text = ("… " if start else "") + " ".join(words[start:len(words) - last]) + (" …" if last else "")
        return text if width is None else _short(text, width)

    return part(wa), part(wb)


def _short(x: Any, width: int = 80) -> str:
    text = json.dumps(x, ensure_ascii=False) if not isinstance(x, str) else x
    return text if len(text) <= width else text[:width - 3] + "..."


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.3g}"

