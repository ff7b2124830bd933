"""The HTML report: passing cells coloured by how close they come to failing, a detail panel for the
cells that fail or come near failing (the first divergence's open), the others summarised in their
tooltip, small at 48 layers, the text table's row labels, readable contrast, no ``None``, every colour
in the legend, and nothing loaded from outside the file."""

from __future__ import annotations

import copy
import dataclasses
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from moesnap import Report
from moesnap.case import Case
from moesnap.judge.compare import compare_cases
from moesnap.judge.html import MAX_PANELS, PANEL_AT, PASS_BINS, _classes, contrast, text_color, write_html
from moesnap.judge.report import table
from moesnap.judge.tolerances import Tolerances
from moesnap.model.recorder import ArrayRecorder
from moesnap.model.reference import run_reference
from moesnap.stages import FAMILY_STAGES

from judge_helpers import TOKENS  # noqa: E402  (the `golden` fixture: tests/judge/conftest.py)


class Page(HTMLParser):
    """The tables (one per mode and case: its row labels; its cells: row, stage, class, title, link),
    the panels (id, class) and every tag of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: list[dict] = []
        self.cells: list[dict] = []
        self.panels: list[dict] = []
        self.legend: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self._cell: dict | None = None
        self._label: list[str] | None = None
        self._row: str | None = None
        self._col = 0
        self._key = False
        self._in_table = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table" and "class" not in a:
            self.tables.append({"rows": [], "cells": []})
            self._in_table = True
        elif tag == "tr" and self._in_table:
            self._row, self._col = None, 0
        elif tag == "td" and self._in_table and "class" not in a:
            self._label = []
        elif tag == "td" and self._in_table:
            stage = FAMILY_STAGES["qwen3moe"][self._col] if self._row not in WHOLE else WHOLE[self._row]
            self._col += 1
            self._cell = {"row": self._row, "stage": stage, "class": a["class"].split(), "title": a.get("title"),
                          "href": None}
            self.tables[-1]["cells"].append(self._cell)
            if "title" in a:
                self.cells.append(self._cell)
        elif tag == "a" and self._cell is not None and self._cell["href"] is None:
            self._cell["href"] = a.get("href")
        elif tag == "section":
            self.panels.append({"id": a.get("id"), "class": a.get("class", "").split()})
        elif tag == "p" and a.get("class") == "key":
            self._key = True
        elif tag == "span" and self._key and a.get("class"):
            self.legend.append(a["class"])

    def handle_data(self, data):
        if self._label is not None:
            self._label.append(data)

    def handle_endtag(self, tag):
        if tag == "td":
            if self._label is not None:
                self._row = "".join(self._label)
                self.tables[-1]["rows"].append(self._row)
            self._cell, self._label = None, None
        elif tag == "table":
            self._in_table = False
        elif tag == "p":
            self._key = False


def page_of(tmp_path, golden, cand, *, replay=False, tols=None):
    tols = tols or Tolerances.defaults()
    free = compare_cases(golden, cand, tols, dtype="float32", name="case0")
    per = [compare_cases(golden, cand, tols, dtype="float32", name="case0", propagate=False, mode="replay")] \
        if replay else None
    return write(tmp_path, Report(cases=[free], golden="g@v0001", candidate="c", dtype="float32", replay=per))


def write(tmp_path, rep):
    path = tmp_path / "r.html"
    write_html(rep, path)
    text = path.read_text()
    return rep, text, Page(text)


#: the whole-model rows, by their label in the tables
WHOLE = {"embed": "embed", "fnorm": "final_norm", "logits": "logits"}


def cell(page: Page, layer: int | None, stage: str, table: int = 0) -> dict:
    """The cell of (layer, stage) in the page's ``table``-th table (free-running first, then replay)."""
    row = f"L{layer:02d}" if layer is not None else next(k for k, v in WHOLE.items() if v == stage)
    return next(c for c in page.tables[table]["cells"] if (c["row"], c["stage"]) == (row, stage))


def panel_of(text: str, c: dict) -> str:
    """The HTML of the panel a cell links to."""
    assert c["href"], c
    panel = text[text.index(f"id='{c['href'][1:]}'"):]
    return panel[:panel.index("</section>")]


def bars(panel: str) -> dict[str, int]:
    """The per-token bars of a panel's chart, counted by colour."""
    return {colour: len(re.findall(r"M\d+ ", d)) for colour, d in re.findall(r"<path fill='(#\w+)' d='([^']*)'", panel)}


def wants_panel(r) -> bool:
    """The rule, written out: a cell fails, ties, or uses at least PANEL_AT of its tolerance."""
    return (not r.result.passed or r.verdict.name == "ROUTING_TIE"
            or (r.worst is not None and r.worst.ratio >= PANEL_AT)) and not (
        r.result.metrics is not None and r.result.metrics.n == 0 and r.result.excluded_tokens)


def test_passing_cells_are_coloured_by_how_close_they_come_to_failing(tmp_path, golden):
    cand = copy.deepcopy(golden)
    cand.layers["moe_out"][1] += np.float32(2e-4)        # most of moe_out's float32 tolerance, still passing
    cand.layers["moe_out"][2] += np.float32(1e-5)        # a few percent of it
    rep, text, page = page_of(tmp_path, golden, cand)
    assert rep.verdict == "pass"
    close, far = cell(page, 1, "moe_out"), cell(page, 0, "moe_out")
    bins = [f"p{i}" for i in range(len(PASS_BINS))]
    i_close = bins.index(next(c for c in close["class"] if c in bins))
    i_far = bins.index(next(c for c in far["class"] if c in bins))
    assert i_close >= 5 > 2 >= i_far, (close, far)            # 30 % and more of its tolerance, vs far less
    assert 2 <= bins.index(next(c for c in cell(page, 2, "moe_out")["class"] if c in bins)) < i_close
    r = next(r for r in rep.results if (r.layer, r.stage) == (1, "moe_out"))
    assert f"error ÷ tolerance {r.worst.ratio:.2g}" in close["title"]
    assert len({c for x in page.cells for c in x["class"] if c in bins}) >= 3   # not one colour for every pass


def test_failing_and_near_failing_cells_open_a_panel_the_others_are_summarised(tmp_path, golden):
    cand = copy.deepcopy(golden)
    cand.layers["expert_out"][2, 3:5, 1, 7] = np.nan
    cand.layers["moe_out"][1] += np.float32(2e-4)              # uses 30 % and more of its tolerance, passes
    del cand.layers["q_norm"]                                 # MISSING: no metrics at all
    rep, text, page = page_of(tmp_path, golden, cand, replay=True)
    results = list(rep.results) + [r for c in rep.replay for r in c.results]
    panelled = [r for r in results if wants_panel(r)]
    assert {r.verdict.name for r in panelled} >= {"MISSING", "NAN_CANDIDATE"}
    ids = {p["id"] for p in page.panels}
    assert len(ids) == len(page.panels) == len(panelled) < len(results)
    for t, case in enumerate([*rep.cases, *rep.replay]):
        for r in case.results:
            c = cell(page, r.layer, r.stage, t)
            if wants_panel(r):
                assert c["href"] and c["href"][1:] in ids and "click for the details" in c["title"], c
            else:                                             # the numbers are in the tooltip
                assert c["href"] is None and "no detail panel" in c["title"] and "cosine " in c["title"], c
    near = next(r for r in rep.results if (r.layer, r.stage) == (1, "moe_out"))
    assert near.result.passed and (near.worst.ratio >= PANEL_AT) == bool(cell(page, 1, "moe_out")["href"])
    opened = [p for p in page.panels if "open" in p["class"]]
    first = rep.first_divergence
    assert (first.layer, first.stage) == (0, "q_norm") and len(opened) == 1
    first_cell = next(c for c in page.cells if "first" in c["class"])
    assert first_cell["href"] == "#" + opened[0]["id"]
    # a panel: the rules, the metrics, where it is worst, per-token error as bars (one per token)
    panel = panel_of(text, cell(page, 2, "expert_out"))
    for needle in ("non-finite", "2 NaN in the candidate", "worst index</td><td class=l>(3, ", "bad tokens</td><td class=l>2 (3, 4)",
                   "cosine", "rel_l2", "<svg"):
        assert needle in panel, needle
    assert sum(bars(panel).values()) == len(TOKENS)
    assert bars(panel)["#7a0177"] == 2                        # the two NaN tokens stand out


def test_many_tokens_are_grouped_into_at_most_64_bars(tmp_path, tiny_path):
    toks = list(range(3, 3 + 150))
    rec = ArrayRecorder()
    run_reference(tiny_path, toks, recorder=rec)
    g = Case(tokens=np.asarray(toks, np.int32), model={k: v for k, v in rec.model.items() if k != "tokens"},
             layers=rec.stacked())
    cand = copy.deepcopy(g)
    cand.layers["layer_out"][3, 7] += np.float32(1.0)         # fails: it has a panel
    _, text, page = page_of(tmp_path, g, cand)
    panel = panel_of(text, cell(page, 3, "layer_out"))
    assert sum(bars(panel).values()) == 50 and "3 per bar" in panel
    assert bars(panel)["#d7301f"] == 1                        # the bar of tokens 6-8


def test_the_rows_are_labelled_as_in_the_text_table(tmp_path, golden):
    rep, _, page = page_of(tmp_path, golden, copy.deepcopy(golden), replay=True)
    for t, case in enumerate([*rep.cases, *rep.replay]):
        text_rows = [line[:6].strip() for line in table(case)[2:]]
        assert page.tables[t]["rows"] == text_rows
    assert page.tables[0]["rows"][:2] == ["embed", "L00"] and page.tables[0]["rows"][-2:] == ["fnorm", "logits"]


@pytest.fixture(scope="module")
def golden24(tiny_path):
    """The reference's case of the tiny model on 24 tokens (a real check's prompt length)."""
    toks = [(7 * i + 5) % 250 + 3 for i in range(24)]
    rec = ArrayRecorder()
    run_reference(tiny_path, toks, recorder=rec)
    return Case(tokens=np.asarray(toks, np.int32), model={k: v for k, v in rec.model.items() if k != "tokens"},
                layers=rec.stacked())


def grown(case, n_layers: int, name: str):
    """``case`` (a CaseReport of the 4-layer tiny model) as one of ``n_layers``: layer k is layer k % 4."""
    L = 1 + max(r.layer for r in case.results if r.layer is not None)
    results = [r for r in case.results if r.stage == "embed"]
    results += [dataclasses.replace(r, layer=k, case=name) for k in range(n_layers) for r in case.results
                if r.layer == k % L]
    results += [dataclasses.replace(r, case=name) for r in case.results if r.layer is None and r.stage != "embed"]

    def keys(d):
        return {(k, s): m for (lay, s), m in d.items() for k in ([None] if lay is None else range(lay, n_layers, L))}

    return dataclasses.replace(case, case=name, results=results, judged=keys(case.judged), held=keys(case.held))


def big_report(golden, cand):
    """A 48-layer, 2-case check with replay, made of the tiny model's results."""
    tols = Tolerances.defaults()
    free = compare_cases(golden, cand, tols, dtype="float32", name="case0")
    per = compare_cases(golden, cand, tols, dtype="float32", name="case0", propagate=False, mode="replay")
    return Report(cases=[grown(free, 48, n) for n in ("case0", "case1")], golden="g@v0001", candidate="c",
                  dtype="float32", replay=[grown(per, 48, n) for n in ("case0", "case1")])


def test_a_48_layer_report_is_small_and_keeps_the_panels_of_what_fails(tmp_path, golden24):
    cand = copy.deepcopy(golden24)
    noise = np.random.default_rng(0)
    for k, v in cand.layers.items():                          # every cell some way from exact
        if v.dtype.kind == "f":
            cand.layers[k] = v + (noise.standard_normal(v.shape) * 1e-6 * np.abs(v).mean()).astype(v.dtype)
    cand.layers["attn"][1, 2] += np.float32(1.0)              # fails, at layers 1, 5, ..., 45
    cand.layers["moe_out"][2, 5, 3] += np.float32(3e-4)       # most of its tolerance: near failing
    rep, text, page = write(tmp_path, big_report(golden24, cand))
    size = len(text.encode())
    tables = [*rep.cases, *rep.replay]
    assert len(page.tables) == 4 and all(len(t["rows"]) == 48 + 3 for t in page.tables)
    assert size < 2_000_000, f"{size / 1e6:.2f} MB"
    ids = {p["id"] for p in page.panels}
    kinds = {"fail": 0, "near": 0, "far": 0}
    for t, case in enumerate(tables):
        for r in case.results:
            c = cell(page, r.layer, r.stage, t)
            kind = "fail" if not r.result.passed else "near" if wants_panel(r) else "far"
            kinds[kind] += 1
            assert (c["href"] is not None and c["href"][1:] in ids) == (kind != "far"), (t, r.explain(), c)
            assert "None" not in c["title"] and not re.search(r"\bnan\b", c["title"]), c["title"]
    assert kinds["fail"] == 4 * 12 and kinds["near"] == 4 * 12 and kinds["far"] > 3000, kinds
    assert len(page.panels) == kinds["fail"] + kinds["near"]
    first = rep.first_divergence                              # the replay's, on a tie
    t = next(t for t, case in enumerate(tables) if any(r is first for r in case.results))
    assert (first.case, first.layer, first.stage) == ("case0", 1, "attn")
    opened = [p["id"] for p in page.panels if "open" in p["class"]]
    assert "first" in cell(page, 1, "attn", t)["class"] and opened == [cell(page, 1, "attn", t)["href"][1:]]


def test_a_fault_that_spreads_opens_at_most_max_panels_per_table(tmp_path, golden24):
    cand = copy.deepcopy(golden24)
    for v in cand.layers.values():
        if v.dtype.kind == "f":
            v[1:] += np.float32(0.5)                          # every stage of layers 1-3 fails: 45 of 48 layers
    rep, text, page = write(tmp_path, big_report(golden24, cand))
    assert len(text.encode()) < 2_000_000, f"{len(text.encode()) / 1e6:.2f} MB"
    first = rep.first_divergence
    for t, case in enumerate([*rep.cases, *rep.replay]):
        failing = [r for r in case.results if not r.result.passed]
        assert len(failing) > MAX_PANELS
        linked = [r for r in failing if cell(page, r.layer, r.stage, t)["href"]]
        assert len(linked) == MAX_PANELS
        assert linked == failing[:MAX_PANELS] or first in linked          # the first ones, in the table's order
        rest = cell(page, failing[-1].layer, failing[-1].stage, t)
        assert rest["href"] is None and f"only the first {MAX_PANELS} of its table have one" in rest["title"]
    assert len(re.findall(rf"no panel for \d+ more failing, tied or near-failing cells of this table "
                          rf"\(only the first {MAX_PANELS} have one\)", text)) == 4
    t = next(t for t, case in enumerate([*rep.cases, *rep.replay]) if any(r is first for r in case.results))
    opened = [p["id"] for p in page.panels if "open" in p["class"]]
    assert opened == [cell(page, first.layer, first.stage, t)["href"][1:]]


def test_contrast_no_none_every_colour_in_the_legend_nothing_external(tmp_path, golden):
    cand = copy.deepcopy(golden)
    cand.layers["attn"][1, 2] += np.float32(1.0)
    cand.layers["moe_out"][3, 0, 0] = np.inf
    del cand.layers["k_rope"]
    rep, text, page = page_of(tmp_path, golden, cand, replay=True)
    for name, (bg, _) in _classes().items():
        assert contrast(bg, text_color(bg)) >= 4.5, name
        assert f".{name}{{background:{bg};color:{text_color(bg)}}}" in text
    used = {c for x in page.cells for c in x["class"] if c != "first"} | {
        a.get("class") for t, a in page.tags if t == "td" and a.get("class") == "abs"}
    assert used - {None} <= set(page.legend), used - set(page.legend)
    assert set(_classes()) <= set(page.legend)                # and the legend has every colour there is
    css = text[text.index("<style>"):text.index("</style>")]
    colours = set(re.findall(r"background:(#[0-9a-f]{6})", css))
    assert colours <= {bg for bg, _ in _classes().values()}
    assert "None" not in text and not re.search(r">\s*nan\s*<", text)
    assert all(c["title"] and "None" not in c["title"] for c in page.cells)
    assert "<script" not in text and "<link" not in text
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", text)
