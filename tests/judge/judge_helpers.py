"""What several tests of the judge share: the tokens of the tiny model's golden case, and a classify run
both ways (the general path and the chunked one)."""

from __future__ import annotations

import moesnap.judge.classify as C

TOKENS = [5, 9, 200, 17, 3, 3, 64, 100]


def both(monkeypatch, g, c, tol, **kw):
    """classify(g, c, tol) by the general path (one chunk larger than anything) and by the chunked one."""
    monkeypatch.setattr(C, "CHUNK", 1 << 40)
    general = C.classify(g, c, tol, **kw)
    monkeypatch.setattr(C, "CHUNK", 1 << 11)
    chunked = C.classify(g, c, tol, **kw)
    return general, chunked
