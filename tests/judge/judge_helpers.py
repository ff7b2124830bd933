"""What several tests of the judge share: the tokens of the tiny model's golden case, and a classify run
both ways (the general path and the chunked one)."""

from __future__ import annotations

import moesnap.judge.chunked as K
import moesnap.judge.classify as C

TOKENS = [5, 9, 200, 17, 3, 3, 64, 100]


def both(monkeypatch, g, c, tol, **kw):
    """classify(g, c, tol) by the general path (one chunk larger than anything) and by the chunked one,
    each seen to take its path (the chunked one maps chunks; the general one maps none)."""
    mapped: list[int] = []
    real = K.map_chunks
    monkeypatch.setattr(K, "map_chunks", lambda fn, items: mapped.append(len(items)) or real(fn, items))
    monkeypatch.setattr(K, "CHUNK", 1 << 40)
    general = C.classify(g, c, tol, **kw)
    assert not mapped, "the general path ran chunks"
    monkeypatch.setattr(K, "CHUNK", 1 << 11)
    chunked = C.classify(g, c, tol, **kw)
    assert mapped and mapped[0] > 1, "the chunked path did not run"
    return general, chunked
