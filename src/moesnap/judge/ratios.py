"""Error ÷ tolerance: the per-element ratios of the elementwise rule and the ``closeness`` they decide
(how near a stage comes to failing; defined in :mod:`moesnap.judge.classify`), shared by the general
path and the chunked one (:mod:`moesnap.judge.chunked`).  Pure numpy, float64.
"""

from __future__ import annotations

import math

import numpy as np


def admitted(n: int, max_frac_outside: float) -> int:
    """The most outside elements of ``n`` the rule admits: the largest ``a`` with ``a / n <=
    max_frac_outside`` in float64, as the verdict compares ``frac_outside``."""
    if n == 0:
        return 0
    a = min(n, int(math.floor(max_frac_outside * n)))
    while a < n and (a + 1) / n <= max_frac_outside:
        a += 1
    while a > 0 and a / n > max_frac_outside:
        a -= 1
    return a


def ratios(d: np.ndarray, thr: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """Per element ``d / thr`` (error ÷ tolerance), 0 where both are 0; above 1 exactly where
    ``outside`` (``d > thr``: correctly rounded division is monotone, and ``d > thr > 0`` gives a
    quotient of at least 1 + 2**-52)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = d / thr
    bad = np.isnan(r)          # 0/0, inf/inf
    if bad.any():
        r[bad] = np.where(outside[bad], math.inf, 0.0)
    return r


def _deciding(top: np.ndarray, k: int) -> float:
    """The ``k``-th largest of ``top`` (``k >= 1``; 0.0 when it has fewer values)."""
    if k > top.size:
        return 0.0
    if k == 1:
        return float(top.max())
    return float(np.partition(top, top.size - k)[top.size - k])


def largest(r: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest values of ``r`` (all of them when it has fewer), in no order, in a new array.

    Partitioning a whole chunk costs more than everything else done to it; so the candidates are
    cut first: the k largest values lie in blocks whose maxima are at least the k-th largest
    block maximum ``m`` (k blocks hold k values >= m), so every one of them is >= ``m``.
    """
    if k >= r.size:
        return r.copy()
    if k == 1:
        return np.asarray([r.max()])
    block = min(256, r.size // (8 * k))   # at least 8k blocks, so few values pass the cut
    if block >= 16:
        maxima = np.maximum.reduceat(r, np.arange(0, r.size, block))
        m = np.partition(maxima, maxima.size - k)[maxima.size - k]
        cand = r[r >= m]
        return cand if cand.size <= k else np.partition(cand, cand.size - k)[cand.size - k:]
    return np.partition(r, r.size - k)[r.size - k:]


def closeness_of(r: np.ndarray, n: int, n_nonfinite: int, max_frac_outside: float) -> float:
    """``closeness`` (:mod:`moesnap.judge.classify`) from the ratios ``r`` of the judged finite elements."""
    if n == 0:
        return 0.0
    k = admitted(n, max_frac_outside) + 1 - n_nonfinite
    return math.inf if k <= 0 else _deciding(r, k)
