"""The HTML report: passing cells coloured by how close they come to failing, a detail panel for every
cell (the first divergence's open), readable contrast, no ``None``, every colour in the legend, and
nothing loaded from outside the file."""

from __future__ import annotations

import copy
import re
from html.parser import HTMLParser

import numpy as np

from moesnap.case import Case
from moesnap.judge.compare import Report, compare_cases
from moesnap.judge.html import PASS_BINS, _classes, contrast, text_color, write_html
from moesnap.judge.tolerances import Tolerances
from moesnap.model.recorder import ArrayRecorder
from moesnap.model.reference import run_reference

from judge_helpers import TOKENS  # noqa: E402  (the `golden` fixture: tests/judge/conftest.py)


class Page(HTMLParser):
    """The cells (class, title, link), the panels (id, class) and every tag of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.cells: list[dict] = []
        self.panels: list[dict] = []
        self.legend: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self._cell: dict | None = None
        self._key = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "td" and "title" in a:
            self._cell = {"class": a.get("class", "").split(), "title": a["title"], "href": None}
            self.cells.append(self._cell)
        elif tag == "a" and self._cell is not None and self._cell["href"] is None:
            self._cell["href"] = a.get("href")
        elif tag == "section":
            self.panels.append({"id": a.get("id"), "class": a.get("class", "").split()})
        elif tag == "p" and a.get("class") == "key":
            self._key = True
        elif tag == "span" and self._key and a.get("class"):
            self.legend.append(a["class"])

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        if tag == "p":
            self._key = False


def page_of(tmp_path, golden, cand, *, replay=False, tols=None):
    tols = tols or Tolerances.defaults()
    free = compare_cases(golden, cand, tols, dtype="float32", name="case0")
    per = [compare_cases(golden, cand, tols, dtype="float32", name="case0", propagate=False, mode="replay")] \
        if replay else None
    rep = Report(cases=[free], golden="g@v0001", candidate="c", dtype="float32", replay=per)
    path = tmp_path / "r.html"
    write_html(rep, path)
    text = path.read_text()
    return rep, text, Page(text)


def cell(page: Page, layer: int | None, stage: str, section: int = 0) -> dict:
    want = f"#s{section}c0-{'m' if layer is None else layer}-{stage}"
    return next(c for c in page.cells if c["href"] == want)


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


def test_every_cell_opens_a_panel_and_the_first_divergence_is_open(tmp_path, golden):
    cand = copy.deepcopy(golden)
    cand.layers["expert_out"][2, 3:5, 1, 7] = np.nan
    del cand.layers["q_norm"]                                 # MISSING: no metrics at all
    rep, text, page = page_of(tmp_path, golden, cand, replay=True)
    ids = {p["id"] for p in page.panels}
    assert page.cells and all(c["href"] and c["href"][1:] in ids for c in page.cells)
    assert len(ids) == len(page.panels) == len(rep.results) + sum(len(c.results) for c in rep.replay)
    opened = [p for p in page.panels if "open" in p["class"]]
    first = rep.first_divergence
    assert (first.layer, first.stage) == (0, "q_norm") and len(opened) == 1
    first_cell = next(c for c in page.cells if "first" in c["class"])
    assert first_cell["href"] == "#" + opened[0]["id"]
    # a panel: the rules, the metrics, where it is worst, per-token error as bars (one per token)
    pid = cell(page, 2, "expert_out")["href"][1:]
    panel = text[text.index(f"id='{pid}'"):]
    panel = panel[:panel.index("</section>")]
    for needle in ("non-finite", "2 NaN in the candidate", "worst index</td><td class=l>(3, ", "bad tokens</td><td class=l>2 (3, 4)",
                   "cosine", "rel_l2", "<svg"):
        assert needle in panel, needle
    assert len(re.findall(r"<rect ", panel)) == len(TOKENS)
    assert panel.count("fill='#7a0177'") == 2                 # the two NaN tokens stand out


def test_many_tokens_are_grouped_into_at_most_64_bars(tmp_path, tiny_path):
    toks = list(range(3, 3 + 150))
    rec = ArrayRecorder()
    run_reference(tiny_path, toks, recorder=rec)
    g = Case(tokens=np.asarray(toks, np.int32), model={k: v for k, v in rec.model.items() if k != "tokens"},
             layers=rec.stacked())
    _, text, page = page_of(tmp_path, g, copy.deepcopy(g))
    pid = cell(page, 3, "layer_out")["href"][1:]
    panel = text[text.index(f"id='{pid}'"):]
    panel = panel[:panel.index("</section>")]
    assert len(re.findall(r"<rect ", panel)) == 50 and "3 per bar" in panel


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
