"""The HTML heat map of a Report: one table per mode and case, a cell per (layer, stage) coloured by
how close it came to failing, detail panels, readable contrast.  One self-contained file."""

from __future__ import annotations

import html
import math
from pathlib import Path

from .classify import Verdict
from .compare import PER_LAYER_MODES, StageResult
from .distribution import summary as next_token_summary
from .report import SYMBOL, Report, _atomic_write, _fmt_loc, _unjudged, columns, coverage_line, ratio_text, table_rows
from ..stages import LAYER_STAGES

#: passing cells, by how much of its tolerance the stage uses (error ÷ tolerance): upper bounds and colours
#: of a sequential scale (ColorBrewer YlGnBu: pale = far from failing, dark = close to it)
PASS_BINS: tuple[tuple[float, str, str], ...] = (
    (0.003, "#ffffcc", "< 0.3 %"), (0.01, "#c7e9b4", "0.3–1 %"), (0.03, "#7fcdbb", "1–3 %"),
    (0.1, "#41b6c4", "3–10 %"), (0.3, "#1d91c0", "10–30 %"), (0.6, "#225ea8", "30–60 %"),
    (math.inf, "#0c2c84", "60–100 %"),
)
#: failing cells, by verdict
FAIL_COLOR = {
    Verdict.DIVERGE: "#d7301f", Verdict.NAN_CANDIDATE: "#7a0177", Verdict.NAN_GOLDEN: "#e7298a",
    Verdict.NAN_BOTH: "#54278f", Verdict.MISSING: "#969696", Verdict.SHAPE_MISMATCH: "#252525",
}
TIE_COLOR, UNJUDGED_COLOR, ABSENT_COLOR = "#fdae61", "#d9d9d9", "#f0f0f0"
#: the per-token bar chart: at most this many bars (tokens are grouped, each bar the group's largest)
MAX_BARS = 64
#: a passing cell has a detail panel from this error ÷ tolerance up (a failing one always has one); the
#: others keep their numbers in their tooltip (a passing 48-layer, 2-case check with replay: 1.0 MB, was 11.7)
PANEL_AT = 0.5
#: at most this many detail panels per table (mode x case), the first in the table's order (the first
#: divergence's always): after a fault, every later stage of a free-running table fails, inherited
MAX_PANELS = 64
#: the table's rows, in computation order
_ROWS = ("embed",) + LAYER_STAGES + ("final_norm", "logits")


def _luminance(color: str) -> float:
    """WCAG relative luminance of ``#rrggbb``."""
    def lin(c: int) -> float:
        x = c / 255.0
        return x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4

    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b)


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two ``#rrggbb`` colours (1 to 21)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_color(background: str) -> str:
    """Black or white, whichever reads better on ``background``."""
    return "#000000" if contrast(background, "#000000") >= contrast(background, "#ffffff") else "#ffffff"


def _classes() -> dict[str, tuple[str, str]]:
    """Every cell class: (background, legend text)."""
    out = {f"p{i}": (c, label) for i, (_, c, label) in enumerate(PASS_BINS)}
    out.update({f"f{v.name}": (c, f"{SYMBOL[v]} {v.name}") for v, c in FAIL_COLOR.items()})
    out["tie"] = (TIE_COLOR, "~ ROUTING_TIE (passes: a near tie)")
    out["unj"] = (UNJUDGED_COLOR, "– not judged (every token excused by a routing flip)")
    out["abs"] = (ABSENT_COLOR, "blank: the candidate has no such stage")
    return out


def _cell_class(r: StageResult) -> str:
    if _unjudged(r):
        return "unj"
    if not r.result.passed:
        return f"f{r.verdict.name}" if r.verdict in FAIL_COLOR else "fDIVERGE"
    if r.verdict == Verdict.ROUTING_TIE:
        return "tie"
    ratio = r.worst.ratio if r.worst is not None else 0.0
    return f"p{next(i for i, (top, _, _) in enumerate(PASS_BINS) if ratio < top)}"


def _num(x: float | int | None) -> str:
    """A metric for people: 4 significant digits, ``–`` for what is undefined (never ``None``/``nan``)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, int):
        return str(x)
    return "inf" if math.isinf(x) else f"{x:.4g}"


def _has_panel(r: StageResult) -> bool:
    """Whether the cell gets a detail panel: it fails, is a routing near tie, or uses at least
    :data:`PANEL_AT` of its tolerance."""
    if _unjudged(r):
        return False
    if not r.result.passed or r.verdict == Verdict.ROUTING_TIE:
        return True
    return r.worst is not None and r.worst.ratio >= PANEL_AT


def _order(r: StageResult) -> tuple[int, int]:
    """Where ``r`` comes in its table: the row, then the column."""
    row = -1 if r.stage == "embed" else (1 << 20) if r.layer is None else r.layer
    return row, _ROWS.index(r.stage) if r.stage in _ROWS else len(_ROWS)


def _panelled(results: list[StageResult], first: StageResult | None) -> tuple[list[StageResult], int]:
    """The results of one table that get a detail panel (the first divergence and, in the table's
    order, up to :data:`MAX_PANELS` that fail, tie or come near failing), and how many more would have."""
    want = sorted((r for r in results if r is first or _has_panel(r)), key=lambda r: (r is not first, _order(r)))
    return want[:MAX_PANELS], max(0, len(want) - MAX_PANELS)


def _tip(r: StageResult, panel: bool) -> str:
    """The cell's tooltip: where, the verdict, what failed or how close it came; without a panel, its
    numbers too."""
    where = f"layer {r.layer} / {r.stage}" if r.layer is not None else r.stage
    if _unjudged(r):
        return f"{where}: not judged: every token was excused by an earlier near-tie routing flip"
    w = r.worst
    text = f"{where}: {r.verdict.name}"
    if w is not None:
        text += f"\n{'failed' if not r.result.passed else 'closest to failing'} ({w.rule}): {w.text}"
        if r.result.passed:
            text += f"\nerror ÷ tolerance {ratio_text(w.ratio)}"
    if panel:
        return text + "\nclick for the details"
    m = r.result.metrics
    if m is not None:
        text += (f"\ncosine {_num(m.cosine)}, rel_l2 {_num(m.rel_l2)}, max_abs {_num(m.max_abs)}, "
                 f"outside {m.n_outside} of {m.n}")
    why = f"only the first {MAX_PANELS} of its table have one" if _has_panel(r) else \
        f"error ÷ tolerance below {PANEL_AT:g}"
    return text + f"\nno detail panel: {why}"


def _bars(r: StageResult) -> str:
    """Per-token error ÷ tolerance (the largest element of each token) as an inline SVG bar chart on a
    log scale from 0.001 to 10; the line marks the tolerance (1)."""
    m = r.result.metrics
    if m is None or not m.token_closeness:
        return ""
    vals = list(m.token_closeness)
    T = len(vals)
    group = max(1, -(-T // MAX_BARS))
    bad, excl = set(m.bad_tokens), set(r.result.excluded_tokens)
    bars = []
    for i in range(0, T, group):
        toks = range(i, min(T, i + group))
        bars.append((max(vals[t] for t in toks), any(t in bad for t in toks), all(t in excl for t in toks)))
    w, h, top = max(6, min(24, 480 // len(bars))), 48, 4
    width = len(bars) * w

    def y(v: float) -> float:
        if v <= 0:
            return float(h)
        f = (math.log10(v) + 3.0) / 4.0 if math.isfinite(v) else 1.0
        return h - (h - top) * min(1.0, max(0.02, f))

    paths: dict[str, list[str]] = {}    # colour -> one subpath per bar (a path per colour: a tenth of the bytes)
    for i, (v, is_bad, ex) in enumerate(bars):
        color = "#bdbdbd" if ex else "#7a0177" if math.isinf(v) else "#d7301f" if is_bad or v > 1 else "#2c7fb8"
        yy = y(v) if not ex else h - 3
        paths.setdefault(color, []).append(f"M{i * w} {yy:.1f}h{w - 1}V{h}h-{w - 1}z")
    parts = [f"<path fill='{c}' d='{''.join(d)}'/>" for c, d in paths.items()]
    line = y(1.0)
    span = f"tokens 0–{T - 1}" + (f", {group} per bar (the largest)" if group > 1 else "")
    return (f"<figure><svg role='img' aria-label='per-token error ÷ tolerance' width='{width + 60}' height='{h + 14}' "
            f"viewBox='0 0 {width + 60} {h + 14}'>" + "".join(parts)
            + f"<line x1='0' x2='{width}' y1='{line:.1f}' y2='{line:.1f}' stroke='#000' stroke-dasharray='3 2'/>"
            f"<text x='{width + 3}' y='{line + 4:.1f}' font-size='10'>tolerance</text>"
            f"<text x='0' y='{h + 12}' font-size='10'>{html.escape(span)}</text></svg>"
            "<figcaption>per token: the largest |c−g| ÷ (atol + rtol·|g|) of its elements, log scale 0.001–10; "
            "red: a bad token (any rule), purple: NaN/Inf, grey: excluded</figcaption></figure>")


def _panel(r: StageResult, pid: str, is_first: bool) -> str:
    """The detail panel of one cell: what it was judged by, its metrics, where it is worst, per token."""
    m = r.result.metrics
    e = html.escape
    rows = "".join(f"<tr><td>{e(g.rule)}</td><td>{e(ratio_text(g.ratio))}</td><td class=l>{e(g.text)}</td></tr>"
                   for g in r.margins)
    out = [f"<section class='panel{' open' if is_first else ''}' id='{pid}'>",
           f"<h4>{e(r.explain())}</h4>"]
    w = r.worst
    if w is not None:
        out.append(f"<p><b>{'failed' if not r.result.passed else 'closest to failing'}</b> ({e(w.rule)}): "
                   f"{e(w.text)}</p>")
    if rows:
        out.append("<table class=m><tr><th>rule</th><th>error ÷ tolerance</th><th>detail</th></tr>" + rows + "</table>")
    if m is not None:
        metrics: list[tuple[str, str | float]] = [("cosine", m.cosine), ("rel_l2", m.rel_l2), ("max_abs", m.max_abs), ("mean_abs", m.mean_abs),
                   ("max_rel", m.max_rel), ("outside", f"{m.n_outside} of {m.n} ({100 * m.frac_outside:.3g} %)"),
                   *([("max row rel_l2", m.max_row_rel_l2)] if any(g.rule == "row_rel_l2" for g in r.margins) else []),
                   ("NaN golden/candidate", f"{m.nan_golden}/{m.nan_candidate}"),
                   ("Inf golden/candidate", f"{m.inf_golden}/{m.inf_candidate}"),
                   ("worst index", "–" if m.worst_index is None else str(m.worst_index)),
                   ("bad tokens", f"{m.n_bad_tokens} (" + ", ".join(map(str, m.bad_tokens))
                    + (", …" if m.n_bad_tokens > len(m.bad_tokens) else "") + ")" if m.n_bad_tokens else "none")]
        out.append("<table class=m>" + "".join(
            f"<tr><td>{e(k)}</td><td class=l>{e(v if isinstance(v, str) else _num(v))}</td></tr>" for k, v in metrics)
            + "</table>")
    if r.result.flipped_tokens:
        out.append(f"<p>flipped tokens: {e(', '.join(map(str, r.result.flipped_tokens)))}</p>")
    if r.result.excluded_tokens:
        ex = r.result.excluded_tokens
        out.append(f"<p>judged without tokens: {e(', '.join(map(str, ex[:32])))}{' …' if len(ex) > 32 else ''}</p>")
    out.append(_bars(r))
    if r.result.detail:
        out.append(f"<p class=d>{e(r.result.detail)}</p>")
    out.append("<p><a href='#top'>back to the tables</a></p></section>")
    return "\n".join(out)


def _cell(r: StageResult | None, pid: str | None, first: StageResult | None) -> str:
    """A table cell: coloured, labelled, a tooltip; a link to its panel where ``pid`` names one."""
    if r is None:
        return "<td class=abs></td>"
    cls = _cell_class(r)
    if cls == "unj":
        label = "–"
    elif not r.result.passed or r.verdict == Verdict.ROUTING_TIE:
        label = SYMBOL[r.verdict]
    else:
        ratio = r.worst.ratio if r.worst is not None else 0.0
        label = f"{round(100 * ratio)}" if ratio >= 0.005 else ""
    mark = " first" if first is not None and r is first else ""
    shown = html.escape(label) or "&nbsp;"
    return (f"<td class='{cls}{mark}' title='{html.escape(_tip(r, pid is not None), quote=True)}'>"
            + (f"<a href='#{pid}'>{shown}</a></td>" if pid is not None else f"{shown}</td>"))


def _css() -> str:
    cls = "".join(f".{k}{{background:{c};color:{text_color(c)}}}" for k, (c, _) in _classes().items())
    return ("body{font:13px system-ui,sans-serif;margin:16px;color:#111;background:#fff}"
            "table{border-collapse:collapse} td,th{border:1px solid #fff;padding:2px 4px;text-align:center;"
            "min-width:24px} th{font-weight:normal;writing-mode:vertical-rl;transform:rotate(180deg);height:90px}"
            "td a{color:inherit;text-decoration:none;display:block} td.first{outline:3px solid #000;"
            "outline-offset:-3px} .key span{display:inline-block;padding:2px 6px;margin:0 4px 4px 0;border:1px solid #ccc}"
            ".panel{display:none;border:1px solid #888;padding:8px 12px;margin:12px 0;max-width:980px}"
            ".panel:target,.panel.open{display:block} body:has(.panel:target) .panel.open:not(:target){display:none}"
            "table.m{margin:6px 0 10px} table.m td,table.m th{border:1px solid #ddd;writing-mode:horizontal-tb;"
            "transform:none;height:auto;text-align:left}"
            "td.l{text-align:left} p.d{font-family:monospace;white-space:pre-wrap;color:#333}"
            "figure{margin:8px 0} figcaption{font-size:11px;color:#333}" + cls)


def write_html(report: Report, path: str | Path, *, title: str = "moesnap check") -> None:
    """The heat map: one table per mode and case, a cell per (layer, stage) coloured by how close it came
    to failing (error ÷ tolerance, on a sequential scale) or by what failed.  A cell that fails, ties or
    comes near failing (:data:`PANEL_AT`) opens a panel with its rules, metrics, worst indices and
    per-token errors (the first divergence's is open); every other cell keeps its numbers in its
    tooltip.  One self-contained file: no script, no external style sheet."""
    e = html.escape
    first = report.first_divergence
    sections = [("free-running", report.cases)]
    if report.replay is not None:
        sections.append((PER_LAYER_MODES[report.replay_kind] + ": the error each layer introduces", report.replay))
    ids: dict[int, str] = {}        # the cells with a detail panel: its id
    panels: list[list[StageResult]] = []
    unpanelled: dict[tuple[int, int], int] = {}  # (section, case) -> cells past MAX_PANELS
    for si, (_, cases) in enumerate(sections):
        for ci, case in enumerate(cases):
            shown, unpanelled[si, ci] = _panelled(case.results, first)
            panels.append(shown)
            for r in shown:
                ids[id(r)] = f"s{si}c{ci}-{'m' if r.layer is None else r.layer}-{r.stage}" + ("-2" if r.source else "")
    verdict = report.verdict
    cases_line = report.cases_line()
    first_link = (f"<a href='#{ids[id(first)]}'>{e(_fmt_loc(first))}</a>" if first is not None and id(first) in ids
                  else e(_fmt_loc(first)))
    parts = [
        "<!doctype html><html lang=en><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>{_css()}</style></head><body id=top>",
        f"<h2>{e(title)}: {e(verdict.upper() if verdict != 'pass' else 'pass')}</h2>",
        f"<p><b>first divergence:</b> {first_link}</p>",
        f"<p>{e(coverage_line(report))}</p>",
        _next_token_chart(report),
        f"<p>{e(cases_line)}</p>" if cases_line else "",
        (f"<p><b>inconclusive:</b> {e(report.inconclusive_reason() or '')}</p>" if verdict == "inconclusive" else ""),
        f"<p>{e(report.verdict_line())}</p>",
        f"<p>golden <code>{e(report.golden)}</code>, candidate <code>{e(report.candidate)}</code>, "
        f"dtype {e(report.dtype)}, {e(report.mode)}</p>",
        "<p>A passing cell's colour and number: how much of its tolerance the stage uses (error ÷ tolerance, in %: "
        "the element that decides the elementwise rule, the worst row, the worst expert, or the widest routing gap, "
        "whichever is closest to its limit; blank below 0.5 %). A failing cell shows a letter. Hover a cell for "
        f"its numbers; a cell that fails, ties or uses {100 * PANEL_AT:g} % of its tolerance or more opens its details "
        "when clicked; the first divergence is outlined and its details are open below.</p>",
        "<p class=key>passing, by the share of its tolerance used: " + "".join(
            f"<span class={k}>{e(label)}</span>" for k, (_, label) in _classes().items() if k[0] == "p") + "</p>",
        "<p class=key>failing: " + "".join(
            f"<span class={k}>{e(label)}</span>" for k, (_, label) in _classes().items() if k[0] == "f") + "</p>",
        "<p class=key>other: " + "".join(
            f"<span class={k}>{e(label)}</span>" for k, (_, label) in _classes().items() if k[0] not in "pf")
        + "<span style='outline:3px solid #000;outline-offset:-3px'>first divergence</span></p>",
    ]
    parts += [f"<p>ignored: {e(n)}</p>" for n in report.ignored_lines()]
    for si, (label, cases) in enumerate(sections):
        for ci, case in enumerate(cases):
            parts.append(f"<h3>{e(label)} — case {e(case.case)}</h3><table><tr><th></th>")
            cols = columns(case)
            parts += [f"<th>{e(s)}</th>" for s in cols] + ["</tr>"]
            for label, layer, row in table_rows(case):
                cells = (cols if layer is not None else tuple(row))
                parts.append(f"<tr><td>{label}</td>" + "".join(
                    _cell(row.get(st), ids.get(id(row[st])) if st in row else None, first) for st in cells) + "</tr>")
            parts.append("</table>")
            if n := unpanelled[si, ci]:
                parts.append(f"<p>no panel for {n} more failing, tied or near-failing {'cell' if n == 1 else 'cells'} "
                             f"of this table (only the first {MAX_PANELS} have one): hover them for their numbers</p>")
            for line in case.routing_notes + case.notes:
                parts.append(f"<p>{e(line)}</p>")
    for line in report.notes:
        parts.append(f"<p>note: {e(line)}</p>")
    parts.append("<h3>details</h3><div class=panels>")
    parts += [_panel(r, ids[id(r)], r is first) for shown in panels for r in shown]
    parts.append("</div></body></html>")
    _atomic_write(Path(path), "\n".join(p for p in parts if p))


def _next_token_chart(report: Report) -> str:
    """The next-token figures over the rows judged, in position order per case: KL(golden ‖ candidate)
    on a log scale (one bar per row, red where the top-1 choice flipped at a clear gap, orange at a near
    tie), with the summary line above.  Empty without logits."""
    rows = report.next_tokens
    text = next_token_summary(rows)
    if not rows or text is None:
        return ""
    w, h, pad = 720, 120, 4
    n = len(rows)
    bw = max(1.0, (w - 2 * pad) / n)
    kls = [r.kl if math.isfinite(r.kl) and r.kl > 0 else 0.0 for r in rows]
    top = max(kls, default=0.0)
    lo = min([k for k in kls if k > 0], default=1e-12)
    span = max(1e-12, math.log10(max(top, lo * 10)) - math.log10(lo))

    def height(k: float) -> float:
        return 0.0 if k <= 0 else (h - 2 * pad) * (math.log10(k) - math.log10(lo) + 0.1 * span) / (1.1 * span)

    bars = []
    for i, (r, k) in enumerate(zip(rows, kls)):
        color = "#d7191c" if r.choice == "diverge" else "#fdae61" if r.choice == "tie" else "#2c7bb6"
        y = height(k)
        tip = (f"{r.case}, position {r.position}: KL {r.kl:.3g}, top-1 golden {r.golden_top1} / candidate "
               f"{r.candidate_top1} ({r.choice}), |d logprob| {r.dlogprob:.3g}")
        bars.append(f"<rect x='{pad + i * bw:.1f}' y='{h - pad - y:.1f}' width='{max(bw - 0.5, 0.5):.1f}' "
                    f"height='{max(y, 0.5):.1f}' fill='{color}'><title>{html.escape(tip)}</title></rect>")
    return (f"<h3>next token, row by row</h3><p>{html.escape(text)}</p>"
            f"<svg width='{w}' height='{h}' role='img' aria-label='KL per row, log scale'>"
            f"<rect width='{w}' height='{h}' fill='#f7f7f7'/>{''.join(bars)}</svg>"
            f"<p>bars: KL(golden ‖ candidate) per row on a log scale ({lo:.2g} to {top:.2g}), in position order "
            f"per case and step; blue: same top-1 token, orange: a near tie of the golden's logits, red: a clear "
            f"flip</p>")
