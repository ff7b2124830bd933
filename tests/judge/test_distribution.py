"""The next-token figures (moesnap.judge.distribution.next_tokens) worked in blocks on the chunk threads
give, row for row, the figures of the one-row-at-a-time loop they replaced, bit for bit, whatever the
block size and the number of threads: KL, top-1 on each side, the golden's next token, |Δ logprob|, the
gap and the tie/diverge choice, with rows that are not finite, rows left out (not judged, not held) and
the last position (whose next token is the golden's own top-1)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moesnap.case import Case
from moesnap.judge import distribution, pool
from moesnap.judge.policy import Policy


def _loop(golden, rows, candidate, name, step, policy, dtype, judged=None):
    """The per-row loop as it was before the blocks went to threads (the reference of this test)."""
    g_all, c_all = rows.model["logits"], candidate.model["logits"]
    held = candidate.attrs.get("held_tokens")
    keep = {t for stage, _, toks in held if stage == "logits" for t in toks} if held else set()
    only = bool(held) and any(stage == "logits" for stage, _, _ in held)
    pos = candidate.positions if "positions" in candidate.attrs else np.arange(g_all.shape[0])
    T = int(golden.tokens.shape[0])
    tol = policy.tolerances.carried("logits", dtype, golden.n_layer)
    out = []
    for lo in range(0, g_all.shape[0], 32):
        g = g_all[lo:lo + 32].astype(np.float64)
        c = c_all[lo:lo + 32].astype(np.float64)
        with np.errstate(all="ignore"):
            lg, lc = distribution._log_softmax(g), distribution._log_softmax(c)
            kl = np.sum(np.exp(lg) * (lg - lc), axis=-1)
        for j in range(g.shape[0]):
            r = lo + j
            if (only and r not in keep) or (judged is not None and not judged[r]):
                continue
            p = int(pos[r])
            finite = bool(np.isfinite(g[j]).all() and np.isfinite(c[j]).all())
            gt, ct = int(np.argmax(g[j])), int(np.argmax(c[j])) if finite else -1
            token = int(golden.tokens[p + 1]) if p + 1 < T else gt
            gap = float(g[j, gt] - g[j, ct]) if finite else math.nan
            width = 2.0 * (tol.atol + tol.rtol * abs(float(g[j, gt])))
            choice = "match" if gt == ct else "tie" if finite and gap <= width else "diverge"
            out.append(distribution.NextToken(name, step, p, float(kl[j]) if finite else math.nan, gt, ct, token,
                                              abs(float(lg[j, token] - lc[j, token])) if finite else math.nan,
                                              choice, gap if gt != ct else 0.0))
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for field in x.__dataclass_fields__:
            u, v = getattr(x, field), getattr(y, field)
            if isinstance(u, float) and math.isnan(u):
                assert isinstance(v, float) and math.isnan(v), (field, x, y)
            else:
                assert u == v, (field, x, y)


def _cases(seed: int, T: int = 37, V: int = 301, positions: bool = False):
    rng = np.random.default_rng(seed)
    g = rng.normal(0, 3, (T, V)).astype(np.float32)
    c = (g + rng.normal(0, 0.05, (T, V))).astype(np.float32)
    c[3, :] = g[3, :]
    c[4, np.argmax(g[4])] -= 1.0                                # a clear flip of row 4's top-1
    top2 = np.argsort(g[5])[-2:]
    g[5, top2[0]] = np.nextafter(g[5, top2[1]], np.float32(-np.inf))   # a near tie in row 5: one ulp apart
    c[5, top2[0]], c[5, top2[1]] = g[5, top2[1]], g[5, top2[0]]
    c[6, 7], g[8, 9], c[9, 0] = np.nan, np.inf, -np.inf          # rows that are not finite
    tokens = rng.integers(0, V, T + 2).astype(np.int32)
    golden = Case(tokens=tokens, model={"logits": g}, layers={})
    attrs = {"positions": list(range(2, T + 2))} if positions else {}
    rows_tokens = tokens[2:] if positions else tokens[:T]
    rows = Case(tokens=rows_tokens, model={"logits": g}, layers={})
    cand = Case(tokens=rows_tokens, model={"logits": c}, layers={}, attrs=attrs)
    return golden if positions else rows, rows, cand


@pytest.mark.parametrize("block", [1, 3, 8, 32, 64])
@pytest.mark.parametrize("threads", [1, 3])
def test_blocks_on_threads_give_the_loops_figures(block, threads, monkeypatch):
    monkeypatch.setattr(distribution, "_ROWS", block)
    monkeypatch.setattr(pool, "_EXECUTORS", {})
    monkeypatch.setattr(pool, "workers", lambda: threads)
    policy = Policy.default()
    for seed, positions in ((0, False), (1, True)):
        golden, rows, cand = _cases(seed, positions=positions)
        for judged in (None, np.arange(rows.tokens.shape[0]) % 3 != 1):
            new = distribution.next_tokens(golden, rows, cand, "case0", None, policy, "float32", judged=judged)
            _same(new, _loop(golden, rows, cand, "case0", None, policy, "float32", judged=judged))
            assert len(new) == (rows.tokens.shape[0] if judged is None else int(judged.sum()))
    choices = {r.choice for r in distribution.next_tokens(*_cases(0), "c", None, policy, "float32")}
    assert choices == {"match", "tie", "diverge"}      # the crafted rows reach every branch
    for ex in pool._EXECUTORS.values():
        ex.shutdown(wait=True)


def test_held_rows_only_and_the_last_position(monkeypatch):
    monkeypatch.setattr(distribution, "_ROWS", 4)
    golden, rows, cand = _cases(2)
    held = Case(tokens=cand.tokens, model=cand.model, layers={},
                attrs={"held_tokens": [["logits", None, [0, 5, 36]], ["attn", 0, [1]]]})
    policy = Policy.default()
    new = distribution.next_tokens(golden, rows, held, "c", 2, policy, "bfloat16")
    _same(new, _loop(golden, rows, held, "c", 2, policy, "bfloat16"))
    assert [r.position for r in new] == [0, 5, 36]
    last = new[-1]        # position 36 of 37 tokens: the golden's own top-1 is its next token
    assert last.token == last.golden_top1
