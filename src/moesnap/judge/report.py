"""Reports: the compact layer x stage table, the JSON report and the HTML heat map."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .classify import Verdict
from .compare import PER_LAYER_MODES, CaseReport, Report, StageResult
from ..errors import UsageError
from ..stages import LAYER_STAGES
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
}
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


def table(case: CaseReport, *, title: str | None = None) -> list[str]:
    """One row per layer: a symbol per stage, then the row's first failure and what failed, or (a
    passing row) how close it came to failing: the largest error ÷ tolerance of its stages."""
    by_layer: dict[int | None, dict[str, StageResult]] = {}
    for r in case.results:
        by_layer.setdefault(r.layer, {})[r.stage] = r
    head = "      " + "".join(f"{CODE[s]:>3}" for s in LAYER_STAGES) + " | " + WORST_HEAD
    lines = [title or f"case {case.case} ({case.dtype})", head]
    blank = " " * (3 * len(LAYER_STAGES) - 3)
    for stage in ("embed",):
        if stage in by_layer.get(None, {}):
            r = by_layer[None][stage]
            lines.append(f"{stage:<6}{_sym(r):>3}{blank} | {row_worst([r])}")
    for layer in sorted(k for k in by_layer if k is not None):
        row = by_layer[layer]
        cells = "".join(f"{_sym(row[s]) if s in row else ' ':>3}" for s in LAYER_STAGES)
        lines.append(f"L{layer:02d}   {cells} | {row_worst(list(row.values()))}")
    for stage in ("final_norm", "logits"):
        if stage in by_layer.get(None, {}):
            r = by_layer[None][stage]
            lines.append(f"{stage.replace('final_norm', 'fnorm'):<6}{_sym(r):>3}{blank} | {row_worst([r])}")
    return lines


def _sym(r: StageResult) -> str:
    return "-" if _unjudged(r) else SYMBOL[r.verdict]


def text(report: Report) -> list[str]:
    out: list[str] = []
    for case in report.cases:
        out += table(case)
        out.append("")
    out.append(LEGEND)
    out.append("columns: " + " ".join(f"{CODE[s]}={s}" for s in LAYER_STAGES))
    for n in (n for c in report.cases for n in c.routing_notes):
        out.append(f"routing: {n}")
    for n in (n for c in report.replay or [] for n in c.routing_notes):
        out.append(f"routing ({report.replay_kind}): {n}")
    for n in report.notes + [n for c in report.cases + (report.replay or []) for n in c.notes]:
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
        out.append(f"first layer that introduces a divergence: {_fmt_loc(report.first_introduced())}")
    out.append(f"first divergence: {_fmt_loc(fd)}")
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


def write_json(report: Report, path: str | Path, extra: dict | None = None) -> None:
    d = report.to_dict()
    if extra:
        d.update(extra)
    _atomic_write(Path(path), json.dumps(d, indent=1, allow_nan=False, ensure_ascii=False))


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


# ---------------------------------------------------------------- HTML: judge/html.py


def __getattr__(name: str):
    """``from moesnap.judge.report import write_html`` still works: the HTML lives in ``judge/html.py``."""
    if name == "write_html":
        from .html import write_html
        return write_html
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
