"""The report: a frozen value (:class:`Report`: what was judged, its verdict, its coverage, computed once)
and every word it says — the compact layer x stage table, the summary, the JSON.  The HTML heat map is
:mod:`moesnap.judge.html`; the judging that makes a report, :mod:`moesnap.judge.suite`."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .classify import Verdict
from .compare import PER_LAYER_MODES, CaseReport, StageResult
from .distribution import NextToken
from .distribution import summary as next_token_summary
from ..errors import UsageError
from ..stages import LAYER_STAGES, MODEL_STAGES
from ..util import write_text_atomic


SYMBOL = {
    Verdict.MATCH: ".", Verdict.ROUTING_TIE: "~", Verdict.DIVERGE: "D", Verdict.NAN_CANDIDATE: "N",
    Verdict.NAN_GOLDEN: "G", Verdict.NAN_BOTH: "B", Verdict.MISSING: "M", Verdict.SHAPE_MISMATCH: "S",
}
# two-letter column codes, in LAYER_STAGES order
CODE = {
    "attn_norm": "an", "q": "q", "k": "k", "v": "v", "q_norm": "qn", "k_norm": "kn", "q_rope": "qr",
    "k_rope": "kr", "attn": "at", "attn_out": "ao", "attn_resid": "ar", "ffn_norm": "fn",
    "router_logits": "rl", "topk_ids": "id", "topk_weights": "tw", "expert_out": "eo", "moe_out": "mo",
    "layer_out": "lo",
    # DeepSeek's
    "q_latent": "ql", "q_latent_norm": "qa", "kv_latent": "kl", "kv_latent_norm": "ka", "dense_ffn_out": "df",
    "router_select": "rs", "shared_expert_out": "se",
    # Qwen2-MoE's
    "shared_gate": "sg",
}
assert set(CODE) == set(LAYER_STAGES)
LEGEND = (". MATCH  ~ ROUTING_TIE  D DIVERGE  N NAN_CANDIDATE  G NAN_GOLDEN  B NAN_BOTH  "
          "M MISSING  S SHAPE_MISMATCH  - not judged (every token excused by a routing flip)")


def _fmt_loc(r: StageResult | None) -> str:
    return "none" if r is None else r.explain()


def ratio_text(x: float) -> str:
    """An error ÷ tolerance ratio in two significant digits: ``0.31``, ``0.0042``, ``1.2e-07``, ``0``."""
    if x == 0.0:
        return "0"
    if math.isinf(x):
        return "inf"
    return f"{x:.2g}"


#: the last column of the table
WORST_HEAD = "worst: error ÷ tolerance (stage, rule), or what failed"


def row_worst(rs: list[StageResult]) -> str:
    """The table's last column for a row: the first failing stage (in computation order) and what
    failed, else the closest approach to failing over its judged stages, as error ÷ tolerance."""
    order = {s: i for i, s in enumerate(("embed",) + LAYER_STAGES + ("final_norm", "logits"))}
    rs = sorted(rs, key=lambda r: order.get(r.stage, 1 << 20))
    bad = next((r for r in rs if not r.result.passed), None)
    if bad is not None:
        w = bad.worst
        return f"{bad.stage} {bad.verdict.name}" + (f": {w.text}" if w is not None else "")
    near = [(w, r) for r in rs if not _unjudged(r) and (w := r.worst) is not None]
    if not near:
        return "-"
    w, r = max(near, key=lambda x: x[0].ratio)
    return f"{ratio_text(w.ratio):<7} {r.stage} ({w.rule})"


def table_rows(case: CaseReport) -> list[tuple[str, int | None, dict[str, StageResult]]]:
    """A case's table rows in order — embed, each layer, final_norm, logits — as (label, layer, {stage:
    result}); a whole-model row holds its one stage.  The text table and the HTML both draw these."""
    by: dict[int | None, dict[str, StageResult]] = {}
    for r in case.results:
        row = by.setdefault(r.layer, {})
        old = row.get(r.stage)           # a stage judged twice (a dump's two values of it): the failing one
        if old is None or old.result.passed or not r.result.passed:
            row[r.stage] = r
    whole = by.get(None, {})
    out: list[tuple[str, int | None, dict[str, StageResult]]] = [
        (row_label(None, s), None, {s: whole[s]}) for s in ("embed",) if s in whole]
    out += [(row_label(layer, ""), layer, by[layer]) for layer in sorted(k for k in by if k is not None)]
    out += [(row_label(None, s), None, {s: whole[s]}) for s in ("final_norm", "logits") if s in whole]
    return out


def columns(case: CaseReport) -> tuple[str, ...]:
    """The layer stages a case's table shows, in :data:`~moesnap.stages.LAYER_STAGES` order: those
    judged or skipped in some layer (a family's own stages; the Qwen3-MoE table is as it always was)."""
    seen = {r.stage for r in case.results if r.layer is not None} | {s for lay, s in case.skipped if lay is not None}
    return tuple(s for s in LAYER_STAGES if s in seen)


def table(case: CaseReport, *, title: str | None = None) -> list[str]:
    """One row per layer: a symbol per stage, then the row's first failure and what failed, or (a
    passing row) how close it came to failing: the largest error ÷ tolerance of its stages."""
    cols = columns(case)
    head = "      " + "".join(f"{CODE[s]:>3}" for s in cols) + " | " + WORST_HEAD
    lines = [title or f"case {case.case} ({case.dtype})", head]
    blank = " " * max(3 * len(cols) - 3, 0)
    for label, layer, row in table_rows(case):
        if layer is None:
            (r,) = row.values()
            lines.append(f"{label:<6}{_sym(r):>3}{blank} | {row_worst([r])}")
        else:
            cells = "".join(f"{_sym(row[s]) if s in row else ' ':>3}" for s in cols)
            lines.append(f"{label:<6}{cells} | {row_worst(list(row.values()))}")
    return lines


def _sym(r: StageResult) -> str:
    return "-" if _unjudged(r) else SYMBOL[r.verdict]


def step_lines(report: Report) -> list[str]:
    """Decode steps, one line each (its positions, its first failing stage in free-running and in the
    per-layer mode, or pass), then the whole table of the first step that fails."""
    steps = [c for c in report.cases if c.step is not None]
    if not steps:
        return []
    per = {c.case: c for c in report.replay or () if c.step is not None}
    width = max(len(c.case) for c in steps)
    out = [f"decode steps: {len(steps)} (one line each: first failure free-running | "
           f"{'introduced (' + report.replay_kind + ')' if per else 'no per-layer mode'})"]
    for c in steps:
        pos = ",".join(str(p) for p in (c.positions or ()))
        free = c.first_divergence
        intro = per[c.case].first_divergence if c.case in per else None
        here = "pass" if free is None else f"{row_label(free.layer, free.stage)} {free.stage} {free.verdict.name}"
        there = ("" if c.case not in per else " | " + ("pass" if intro is None else
                 f"{row_label(intro.layer, intro.stage)} {intro.stage} {intro.verdict.name}"))
        out.append(f"  {c.case:<{width}}  position {pos:<5} {here}{there}")
    first = next((c for c in steps if not c.passed or (c.case in per and not per[c.case].passed)), None)
    if first is not None:
        out += ["", *table(first, title=f"first failing step: {first.case} (position "
                                           f"{','.join(str(p) for p in first.positions or ())}, {first.dtype})")]
        if first.case in per:
            out += ["", *table(per[first.case], title=f"{first.case}, {report.replay_kind}")]
    return out


def text(report: Report) -> list[str]:
    out: list[str] = []
    for case in report.cases:
        if case.step is None:
            out += table(case)
            out.append("")
    steps = step_lines(report)
    if steps:
        out += steps + [""]
    out.append(LEGEND)
    shown = {s for case in report.cases for s in columns(case)}
    out.append("columns: " + " ".join(f"{CODE[s]}={s}" for s in LAYER_STAGES if s in shown))
    for case in report.cases:
        out += [f"routing: {case.case}: {n}" for n in case.routing_notes]
    for case in report.replay or ():
        out += [f"routing ({report.replay_kind}): {case.case}: {n}" for n in case.routing_notes]
    for n in [*report.notes, *(n for c in [*report.cases, *(report.replay or ())] for n in c.notes)]:
        out.append(f"note: {n}")
    for n in report.ignored_lines():
        out.append(f"ignored: {n}")
    fd = report.first_divergence
    if fd is not None:
        out += detail_lines(fd)
    if report.replay is not None:
        out.append("")
        out.append(f"{PER_LAYER_MODES[report.replay_kind]}: error introduced vs inherited")
        width = max([4] + [len(c.case) for c in report.replay])
        out.append(f"{'case':<{width}}  layer | {'introduced (' + report.replay_kind + ')':<29} | inherited (free-running)")
        for case in report.replay:
            if case.step is not None:     # decode steps: their one line each above
                continue
            free = next((c for c in report.cases if c.case == case.case), None)
            per: dict[int, list[StageResult]] = {}
            for r in case.results:
                if r.layer is not None:
                    per.setdefault(r.layer, []).append(r)
            layers = sorted(set(per) | {lay for lay, _ in (free.judged if free else {}) if lay is not None})
            for layer in layers:
                intro = next((r for r in per.get(layer, []) if not r.result.passed), None)
                intro_text = ((intro.stage + " " + intro.verdict.name) if intro else "none") if layer in per \
                    else "not judged"
                out.append(f"{case.case:<{width}}  L{layer:02d}   | {intro_text:<29} | {_inherited(free, layer)}")
        out.append(f"first layer that introduces a divergence: {_introduced_text(report, fd)}")
    out.append(f"first divergence: {_fmt_loc(fd)}")
    nt = next_token_summary(report.next_tokens)
    if nt:
        out.append(nt)
    out.append(coverage_line(report))
    verdict = report.verdict
    cases = report.cases_line()
    reason = report.inconclusive_reason() if verdict == "inconclusive" else None
    if cases and (reason is None or cases not in reason):
        out.append(f"cases: {cases}")
    if reason:
        out.append(f"inconclusive: {reason}")
    out.append(report.verdict_line())
    return out


def coverage_line(report: Report) -> str:
    cov = report.coverage()
    modes = ", ".join(f"{m}: {n}" for m, n in cov.by_mode.items())
    pct = 100.0 * cov.judged / cov.held if cov.held else 100.0
    text = f"judged: {cov.judged} of {cov.held} (layer, stage, token) cells ({pct:.4g}%; {modes})"
    if cov.skipped_stages:
        text += f"; {cov.skipped_stages} (layer, stage) the candidate lacks skipped (--allow-missing)"
    for case, stage, lays, keep, n in cov.partial:   # an imported dump holding some tokens' rows only
        where = "" if lays == (None,) else f" at layers {', '.join(str(lay) for lay in lays)}"
        rows = "last token only" if keep == (n - 1,) else f"tokens {list(keep)} only"
        text += f"; {case}/{stage}{where}: {rows}"
    return text


def _inherited(free: CaseReport | None, layer: int) -> str:
    """The free-running verdict of ``layer``: its first failure, 'none', or how much was not judged."""
    if free is None:
        return "not judged"
    keys = [key for key in free.judged if key[0] == layer]
    masks = [free.judged[key] for key in keys]
    bad = next((r for r in free.results if r.layer == layer and not r.result.passed), None)
    if bad is not None:
        return f"{bad.stage} {bad.verdict.name}"
    if not masks or not any(m.any() for m in masks):
        return "not judged (every token excused by a routing flip)" if masks else "not judged"
    left = sum(int((free.held[k] & ~m if k in free.held else ~m).sum()) for k, m in zip(keys, masks))  # of held rows
    return "none" if left == 0 else f"none ({left} cells not judged)"


def _introduced_text(report: Report, fd: StageResult | None) -> str:
    """Where the per-layer mode found an error made, or, where it found none while a case it did not judge
    per layer failed (a decode step a local re-reference could not take), that it cannot say."""
    intro = report.first_introduced()
    if intro is not None or fd is None or any(c.case == fd.case for c in report.replay or ()):
        return _fmt_loc(intro)
    return (f"not known: {fd.case}, where the first divergence is, was judged free-running only (no "
            f"{report.replay_kind} judgement of it; see the notes)")


def detail_lines(r: StageResult) -> list[str]:
    """ndarrays_regression-style detail of one failing stage."""
    m = r.result.metrics
    lines = [f"first failing stage: {r.location()}"]
    w = r.worst
    if w is not None:
        lines.append(f"  failed ({w.rule} rule): {w.text}")
    if r.result.detail:
        lines.append(f"  {r.result.detail}")
    if m is not None:
        shown = ", ".join(map(str, m.bad_tokens[:8])) + (", …" if m.n_bad_tokens > 8 else "")
        lines.append(f"  elements outside tolerance: {m.n_outside} of {m.n} ({100 * m.frac_outside:.3g}%); "
                     + (f"{m.n_bad_tokens} bad token{'s' if m.n_bad_tokens != 1 else ''}: {shown}"
                        if m.n_bad_tokens else "no bad token"))
        lines.append(f"  cosine {m.cosine:.9g}  rel_l2 {m.rel_l2:.3g}  nmse {m.nmse:.3g}  max_abs {m.max_abs:.3g}  "
                     f"mean_abs {m.mean_abs:.3g}  max_rel {m.max_rel:.3g}  worst index {m.worst_index}")
        lines.append(f"  NaN golden/candidate {m.nan_golden}/{m.nan_candidate}  Inf golden/candidate "
                     f"{m.inf_golden}/{m.inf_candidate}")
    return lines


#: ``--json -``: the JSON goes to stdout
STDOUT = "-"


def write_json(obj: Report | Mapping[str, Any], path: str | Path, extra: Mapping[str, Any] | None = None) -> None:
    """The one JSON writer of moesnap: a report (or any JSON object: ``goldens diff``) to ``path``,
    atomically, or to stdout when ``path`` is ``-`` (ASCII there, so any terminal and jq read it).
    Compact, through the json module's C encoder: a 48-layer report of 32 decode steps is megabytes,
    which an indented encoding writes about six times slower (``jq .`` indents it)."""
    d = dict(obj.to_dict() if hasattr(obj, "to_dict") else obj)
    if extra:
        d.update(extra)
    if str(path) == STDOUT:
        sys.stdout.write(json.dumps(d, allow_nan=False, separators=_COMPACT) + "\n")
        sys.stdout.flush()
        return
    _atomic_write(Path(path), json.dumps(d, allow_nan=False, ensure_ascii=False, separators=_COMPACT) + "\n")


#: JSON without spaces (the C encoder; an ``indent`` would select the pure-Python one)
_COMPACT = (",", ":")


def _atomic_write(path: Path, content: str) -> None:
    if path.is_dir():
        raise UsageError(f"{path}: is a directory")
    if not path.parent.exists():
        raise UsageError(f"{path.parent}: directory does not exist")
    write_text_atomic(path, content)   # a non-UTF-8 file name in the text is written escaped


def _unjudged(r: StageResult) -> bool:
    """True when routing exclusions left no element of the stage to judge."""
    m = r.result.metrics
    return m is not None and m.n == 0 and bool(r.result.excluded_tokens)


def row_label(layer: int | None, stage: str) -> str:
    """A row's name in the tables, text and HTML: ``L07`` for a layer, else the whole-model stage
    (``embed``, ``fnorm`` for final_norm, ``logits``)."""
    return f"L{layer:02d}" if layer is not None else {"final_norm": "fnorm"}.get(stage, stage)


# ---------------------------------------------------------------- the report: a value, its verdict and its words


def _position(r: StageResult, case_order: dict[str, int]) -> tuple[int, int, int]:
    """Where ``r`` sits in computation order: case, then embed, layers by stage, final_norm, logits."""
    if r.layer is None:
        layer = -1 if r.stage in ("embed", "tokens") else 1 << 30
        idx = ("tokens", "embed", "final_norm", "logits").index(r.stage) if r.stage in MODEL_STAGES else 0
    else:
        layer, idx = r.layer, LAYER_STAGES.index(r.stage) if r.stage in LAYER_STAGES else 0
    return (case_order.get(r.case, 1 << 30), layer, idx)


@dataclass(frozen=True)
class Coverage:
    """What a report judged, in (layer, stage, token) cells of what the candidate holds."""

    held: int                       # cells the candidate holds (stages it lacks under --allow-missing excluded)
    judged: int                     # cells judged by at least one mode
    by_mode: dict[str, int]         # cells judged by each mode
    skipped_stages: int             # (case, layer, stage) the candidate lacks, skipped under --allow-missing
    unjudged: tuple[tuple[str, int | None, str, int], ...]   # first few (case, layer, stage, n tokens) left
    #: (case, stage, layers, tokens held, of n tokens) where the candidate holds only some tokens' rows
    partial: tuple[tuple[str, str, tuple[int | None, ...], tuple[int, ...], int], ...] = ()

    @property
    def complete(self) -> bool:
        return self.judged >= self.held

    def to_dict(self) -> dict[str, Any]:
        return {"cells_held": self.held, "cells_judged": self.judged, "judged_by_mode": dict(self.by_mode),
                "stages_skipped": self.skipped_stages,
                "unjudged": [{"case": c, "layer": lay, "stage": s, "tokens": n} for c, lay, s, n in self.unjudged],
                "partial": [{"case": c, "stage": s, "layers": list(lays), "tokens_held": list(keep),
                             "last_token_only": keep == (n - 1,)} for c, s, lays, keep, n in self.partial]}


def coverage_of(cases: Sequence[CaseReport], replay: Sequence[CaseReport]) -> Coverage:
    """What ``cases`` (free-running) and ``replay`` (a per-layer mode) judged together."""
    modes = [(c.mode, c) for c in cases] + [(c.mode, c) for c in replay]
    by_mode: dict[str, int] = {}
    union: dict[tuple[str, int | None, str], np.ndarray] = {}
    n_tok: dict[str, int] = {}
    skipped: set[tuple[str, int | None, str]] = set()
    for mode, c in modes:
        by_mode[mode] = by_mode.get(mode, 0) + c.cells()[1]
        n_tok[c.case] = c.n_tokens
        for key, mask in c.judged.items():
            k = (c.case, *key)
            union[k] = mask.copy() if k not in union else (union[k] | mask)
    for c in cases:   # what free-running skipped as absent is what the candidate lacks
        skipped |= {(c.case, *key) for key in c.skipped}
    held_rows = {(c.case, *key): m for _, c in modes for key, m in c.held.items()}
    rows = {k: held_rows[k] if k in held_rows else np.ones(n_tok[k[0]], dtype=bool) for k in union}
    held = sum(int(rows[k].sum()) for k in union)
    judged = sum(int((m & rows[k]).sum()) for k, m in union.items())
    left = [(k[0], k[1], k[2], int((rows[k] & ~m).sum())) for k, m in union.items() if (rows[k] & ~m).any()]
    left.sort(key=lambda x: (x[0], -1 if x[1] is None else x[1], x[2]))
    part: dict[tuple[str, str, tuple[int, ...]], list[int | None]] = {}
    for (case, layer, stage), m in held_rows.items():
        if m.any() and not m.all() and (case, layer, stage) in union:
            part.setdefault((case, stage, tuple(int(t) for t in np.flatnonzero(m))), []).append(layer)
    partial = tuple((case, stage, tuple(sorted(lays, key=lambda x: -1 if x is None else x)), keep, n_tok[case])
                    for (case, stage, keep), lays in sorted(part.items()))
    return Coverage(held, judged, by_mode, len(skipped - set(union)), tuple(left[:12]), partial)


@dataclass(frozen=True)
class Report:
    """Results over every case of a golden version (or one case): a value, made by :func:`judge_suite`.

    ``cases`` is the free-running comparison (the candidate's own run, against
    the golden); ``replay`` (optional) a per-layer mode that tells the error a
    layer introduces from the one it inherits: ``replay_kind`` ``"replay"``
    (moesnap's candidate fed each layer's golden input) or ``"local"`` (another
    engine's layers recomputed by the reference from that engine's own inputs).

    The verdict is ``fail`` when any stage of any mode fails, ``inconclusive``
    when nothing failed but some (layer, stage, token) the candidate holds was
    judged by no mode, or some case of the golden (``golden_cases``) was not
    judged at all (the candidate, a set of cases, lacks it), and ``pass`` only
    when every cell of every golden case was judged.  A candidate that is one
    case (``single_case``: a case group, or a case in memory, matched to the
    golden case of its tokens) is judged as that case: its verdict is that
    case's, and the report names the golden's other cases as not judged.
    ``ignored`` lists, per case, the candidate's arrays that name no stage
    moesnap knows (not judged).
    """

    cases: tuple[CaseReport, ...]
    golden: str
    candidate: str
    dtype: str
    mode: str = "free-running"
    replay: tuple[CaseReport, ...] | None = None
    notes: tuple[str, ...] = ()
    replay_kind: str = "replay"
    #: what to run to judge what this report could not (for an inconclusive verdict)
    hint: str | None = None
    #: every case of the golden, judged or not (empty: those judged are all it has)
    golden_cases: tuple[str, ...] = ()
    #: per case, the candidate's arrays that name no stage (read, not judged)
    ignored: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: what to do to judge the golden cases not judged
    case_hint: str | None = None
    #: the candidate is one case, judged as that case (see the class docstring)
    single_case: bool = False
    #: per row that holds logits: the next-token figures (:mod:`moesnap.judge.distribution`)
    next_tokens: tuple[NextToken, ...] = ()
    #: steps not judged, and why (the engine left the golden's sequence): the verdict is then inconclusive
    unjudged_steps: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "cases", tuple(self.cases))
        object.__setattr__(self, "notes", tuple(self.notes))
        if self.replay is not None:
            object.__setattr__(self, "replay", tuple(self.replay))
        object.__setattr__(self, "ignored", {k: tuple(v) for k, v in self.ignored.items()})

    def with_notes(self, *lines: str) -> Report:
        """This report with ``lines`` added to its notes (a new value)."""
        return replace(self, notes=self.notes + tuple(lines))

    @property
    def cases_judged(self) -> list[str]:
        """The golden cases judged (a case's decode steps count as that case)."""
        return list(dict.fromkeys(c.case.rsplit("/", 1)[0] if c.step is not None else c.case for c in self.cases))

    @property
    def cases_not_judged(self) -> list[str]:
        """The golden's cases the candidate held nothing for."""
        judged = set(self.cases_judged)
        return [n for n in self.golden_cases if n not in judged]

    @property
    def results(self) -> list[StageResult]:
        return [r for c in self.cases for r in c.results]

    @property
    def failed(self) -> bool:
        """A stage failed in some mode, or a row's next-token choice flipped at a clear gap."""
        if any(r.choice == "diverge" for r in self.next_tokens):
            return True
        ok = all(c.passed for c in self.cases)
        return not (ok and (self.replay is None or all(c.passed for c in self.replay)))

    @cached_property
    def _coverage(self) -> Coverage:
        return coverage_of(self.cases, self.replay or ())

    def coverage(self) -> Coverage:
        """What was judged (computed once)."""
        return self._coverage

    @property
    def verdict(self) -> str:
        """``pass``, ``fail`` or ``inconclusive`` (see the class docstring)."""
        if self.failed:
            return "fail"
        every_case = self.single_case or not self.cases_not_judged
        return "pass" if self.coverage().complete and every_case and not self.unjudged_steps else "inconclusive"

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def first_divergence(self) -> StageResult | None:
        """The first failing stage in computation order over both modes.  Free-running shows where an
        error is first *seen* (it may be a later effect of an error too small to see where it was made,
        at the tolerance that drift needs); the per-layer mode shows where it is *made*.  The earlier of
        the two wins, the per-layer one on a tie."""
        free = next((c.first_divergence for c in self.cases if c.first_divergence is not None), None)
        intro = self.first_introduced()
        if free is None or intro is None:
            return free if intro is None else intro
        order = {c.case: i for i, c in enumerate(self.cases)}
        return intro if _position(intro, order) <= _position(free, order) else free

    def first_introduced(self) -> StageResult | None:
        """With a per-layer mode: the first layer/stage whose own computation diverges."""
        if self.replay is None:
            return None
        return next((c.first_divergence for c in self.replay if c.first_divergence is not None), None)

    # -- its words
    def cases_line(self) -> str | None:
        """``judged 1 of 3 golden cases (case0); not judged: case1, case2 (…)``, or None when every one was."""
        left = self.cases_not_judged
        if not left:
            return None
        which = ", ".join(self.cases_judged) or "none"
        if self.single_case and len(self.cases) == 1:
            which += ", the one with the candidate's tokens"
        return (f"judged {len(self.cases)} of {len(self.golden_cases)} golden cases ({which}); not judged: "
                f"{', '.join(left)} (the candidate holds no case for {'it' if len(left) == 1 else 'them'})")

    def verdict_line(self) -> str:
        """``verdict: pass``, saying which case a one-case candidate's verdict is about."""
        scope = (f" (golden case {self.cases[0].case} only: {len(self.cases_not_judged)} of the golden's "
                 f"{len(self.golden_cases)} cases not judged)"
                 if self.single_case and self.cases_not_judged and len(self.cases) == 1 else "")
        return f"verdict: {self.verdict}{scope}"

    def ignored_lines(self) -> list[str]:
        """One line per case whose candidate held arrays naming no stage."""
        out = []
        for case, names in self.ignored.items():
            if names:
                shown = ", ".join(names[:12]) + (f", … ({len(names) - 12} more)" if len(names) > 12 else "")
                out.append(f"{case}: {len(names)} candidate array{'s' if len(names) != 1 else ''} name no stage "
                           f"moesnap knows, not judged: {shown} (stage names and aliases: moesnap.stages)")
        return out

    def summary(self) -> str:
        """A few lines: the verdict, what was judged, and where it first went wrong.

        >>> print(report.summary())    # doctest: +SKIP
        fail: golden tiny@v0001, candidate moesnap-candidate (float32)
        first divergence: case0 / layer 2 / moe_out / token 0: DIVERGE (frac_outside 41% > max_frac_outside 0%)
        judged 3825 of 3825 (layer, stage, token) cells
        """
        cov = self.coverage()
        cand = self.candidate if self.dtype in self.candidate else f"{self.candidate} ({self.dtype})"
        lines = [f"{self.verdict}: golden {self.golden}, candidate {cand}"]
        fd = self.first_divergence
        if fd is not None:
            lines.append(f"first divergence: {fd.explain()}")
        lines.append(f"judged {cov.judged} of {cov.held} (layer, stage, token) cells")
        reason = self.inconclusive_reason()
        if reason:
            lines.append(reason)
        cases = self.cases_line()
        if cases and (self.single_case or reason is None):
            lines.append(cases)
        return "\n".join(lines)

    def inconclusive_reason(self) -> str | None:
        """What was not judged, and how to judge it (None when everything was)."""
        cov = self.coverage()
        parts = []
        if not cov.complete:
            where = ", ".join(f"{c}/{'L%d ' % lay if lay is not None else ''}{s} ({n} tokens)"
                              for c, lay, s, n in cov.unjudged[:4])
            text = (f"{cov.held - cov.judged} of {cov.held} (layer, stage, token) cells were judged by no mode "
                    f"(first: {where})")
            parts.append(text + (f"; to judge them: {self.hint}" if self.hint else ""))
        cases = self.cases_line()
        if cases and not self.single_case:
            parts.append(cases + (f"; {self.case_hint}" if self.case_hint else ""))
        if self.unjudged_steps:
            n = len(self.unjudged_steps)
            parts.append(f"{n} step{'s' if n != 1 else ''} not judged ({self.unjudged_steps[0]})")
        return "; ".join(parts) or None

    def to_dict(self) -> dict[str, Any]:
        fd = self.first_divergence

        where = {c.case: c for c in [*self.cases, *(self.replay or ())]}

        def loc(r: StageResult | None) -> dict[str, Any] | None:
            if r is None:
                return None
            w = r.worst
            c = where.get(r.case)
            pos = c.positions if c is not None else None
            return {"case": r.case, "layer": r.layer, "stage": r.stage, **({"source": r.source} if r.source else {}),
                    "token": r.token, "verdict": r.verdict.name,
                    "step": c.step if c is not None else None,
                    "position": (pos[r.token] if pos is not None and r.token is not None and r.token < len(pos)
                                 else r.token),
                    "failed": None if w is None else w.to_dict()}

        verdict = self.verdict
        d: dict[str, Any] = {
            "verdict": verdict,
            "first_divergence": loc(fd),
            "golden": self.golden,
            "candidate": self.candidate,
            "dtype": self.dtype,
            "mode": self.mode,
            "coverage": self.coverage().to_dict(),
            "cases": {"golden": list(self.golden_cases or self.cases_judged), "judged": self.cases_judged,
                      "not_judged": self.cases_not_judged, "single_case": self.single_case},
            "ignored": {case: list(names) for case, names in self.ignored.items() if names},
            "inconclusive": self.inconclusive_reason() if verdict == "inconclusive" else None,
            "results": [r.to_dict() for r in self.results],
            "steps": [{"case": c.case, "step": c.step, "positions": list(c.positions or ()), "passed": c.passed}
                      for c in self.cases if c.step is not None],
            "unjudged_steps": list(self.unjudged_steps),
            "next_token": {"summary": next_token_summary(self.next_tokens),
                           "rows": [r.to_dict() for r in self.next_tokens]},
            "routing_notes": [n for c in self.cases for n in c.routing_notes],
            "notes": list(self.notes) + [n for c in [*self.cases, *(self.replay or ())] for n in c.notes],
        }
        if self.replay is not None:
            block = {
                "kind": self.replay_kind,
                "first_introduced": loc(self.first_introduced()),
                "results": [r.to_dict() for c in self.replay for r in c.results],
                "routing_notes": [n for c in self.replay for n in c.routing_notes],
            }
            d["replay" if self.replay_kind == "replay" else "local"] = block
        return d
