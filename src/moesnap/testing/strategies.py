"""Hypothesis strategies for moesnap's classifier (like zarr's ``testing/strategies.py``).

Every strategy takes keyword-only arguments; ``allow_nan`` / ``allow_infinity``
default to False so that non-finite values appear only where a test asks.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np

from ..judge.tolerances import Tolerance

FLOAT_DTYPES: tuple[str, ...] = ("float16", "float32", "float64")
INT_DTYPES: tuple[str, ...] = ("int8", "int32", "int64", "uint8")
TIE_TOLS: tuple[float, ...] = (0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


def shapes(*, min_dims: int = 1, max_dims: int = 3, min_side: int = 0, max_side: int = 6
           ) -> st.SearchStrategy[tuple[int, ...]]:
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side)


def float_dtypes() -> st.SearchStrategy[np.dtype]:
    return st.sampled_from(FLOAT_DTYPES).map(np.dtype)


def _resolve(value, default):
    if value is None:
        return default
    return value if isinstance(value, st.SearchStrategy) else st.just(value)


def arrays(
    *,
    dtype: object = None,
    shape: object = None,
    allow_nan: bool = False,
    allow_infinity: bool = False,
    allow_subnormal: bool = True,
    max_magnitude: float | None = None,
) -> st.SearchStrategy[np.ndarray]:
    """Arrays of ``dtype`` (a dtype, a strategy, or None: any float dtype) and
    ``shape`` (a tuple, a strategy, or None: :func:`shapes`).  Integer dtypes
    take their whole range; float elements may be limited to ``max_magnitude``."""

    @st.composite
    def build(draw):
        dt = np.dtype(draw(_resolve(dtype, float_dtypes())))
        shp = draw(_resolve(shape, shapes()))
        if dt.kind == "f":
            kwargs = {"allow_nan": allow_nan, "allow_infinity": allow_infinity,
                      "allow_subnormal": allow_subnormal}
            if max_magnitude is not None:
                with np.errstate(over="ignore"):
                    bound = float(dt.type(max_magnitude))    # nearest value of this width
                bound = min(bound, float(np.finfo(dt).max))
                kwargs.update(min_value=-bound, max_value=bound)
            elements = st.floats(width=8 * dt.itemsize, **kwargs)
        else:
            elements = hnp.from_dtype(dt)
        return draw(hnp.arrays(dt, shp, elements=elements))

    return build()


def shared_precision_values() -> st.SearchStrategy[float]:
    """Values exact in float16 *and* bfloat16 (and so in float32/float64):
    an integer of at most 8 bits times a power of two within float16's
    normal range, or (signed) zero."""
    nonzero = st.builds(lambda m, e: float(np.ldexp(m, e)),
                        st.integers(-255, 255).filter(bool), st.integers(-14, 7))
    return st.one_of(nonzero, st.sampled_from([0.0, -0.0]))


def shared_precision_arrays(*, shape: object = None) -> st.SearchStrategy[np.ndarray]:
    """float64 arrays of :func:`shared_precision_values`."""
    return _resolve(shape, shapes()).flatmap(
        lambda shp: hnp.arrays(np.float64, shp, elements=shared_precision_values()))


def _sprinkle(draw, a: np.ndarray, values: list[float]) -> np.ndarray:
    """Copy of ``a`` with some positions set to values drawn from ``values``."""
    a = a.copy()
    if a.size and values:
        for flat in draw(st.lists(st.integers(0, a.size - 1), max_size=4)):
            a.reshape(-1)[flat] = draw(st.sampled_from(values))
    return a


@st.composite
def array_pairs(
    draw,
    *,
    dtype: object = None,
    shape: object = None,
    allow_nan: bool = False,
    allow_infinity: bool = False,
    max_magnitude: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(golden, candidate) of one shape and dtype.  The candidate is a copy,
    a small relative perturbation, a scaled copy, or independent; zeros and,
    when allowed, NaN / +-Inf are sprinkled into either side."""
    dt = np.dtype(draw(_resolve(dtype, float_dtypes())))
    shp = draw(_resolve(shape, shapes()))
    golden = draw(arrays(dtype=dt, shape=shp, max_magnitude=max_magnitude))
    how = draw(st.sampled_from(["copy", "perturb", "scale", "independent"]))
    if how == "independent" or dt.kind != "f":
        candidate = draw(arrays(dtype=dt, shape=shp, max_magnitude=max_magnitude))
    elif how == "copy":
        candidate = golden.copy()
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            if how == "scale":
                factor = draw(st.sampled_from([0.5, 0.95, 1.0 + 2.0**-20, 1.05, 2.0, -1.0]))
                candidate = (golden.astype(np.float64) * factor).astype(dt)
            else:
                noise = draw(hnp.arrays(np.float64, shp, elements=st.floats(-1e-3, 1e-3)))
                candidate = (golden.astype(np.float64) * (1.0 + noise)).astype(dt)
        candidate = np.where(np.isfinite(candidate), candidate, golden)
    specials: list[float] = [0.0, -0.0] if dt.kind == "f" else [0]
    if dt.kind == "f":
        specials += [np.nan] * allow_nan + [np.inf, -np.inf] * allow_infinity
    golden = _sprinkle(draw, golden, specials if draw(st.booleans()) else [])
    candidate = _sprinkle(draw, candidate, specials if draw(st.booleans()) else [])
    return golden, candidate


@st.composite
def tolerances(
    draw,
    *,
    max_atol: float = 1.0,
    max_rtol: float = 1.0,
    allow_frac: bool = True,
    allow_row: bool = False,
) -> Tolerance:
    """Valid :class:`Tolerance` values, zero and round numbers included; with ``allow_row`` the
    row rule (``row_rel_l2``) is drawn too, off (inf) or in (0, 1]."""

    def magnitude(top: float) -> st.SearchStrategy[float]:
        return st.one_of(st.just(0.0), st.sampled_from([1e-6, 1e-4, 1e-3, 1e-2, 0.1]).filter(
            lambda v: v <= top), st.floats(0.0, top))

    frac = st.one_of(st.just(0.0), st.floats(0.0, 1.0)) if allow_frac else st.just(0.0)
    row = draw(st.one_of(st.just(math.inf), st.sampled_from([1e-3, 1e-2, 0.1]),
                         st.floats(1e-6, 1.0))) if allow_row else math.inf
    return Tolerance(draw(magnitude(max_atol)), draw(magnitude(max_rtol)), draw(frac), row)


@dataclass(frozen=True)
class RoutingCase:
    """Golden ids are the top-k of ``logits``.  Tokens in ``random_tokens``
    got an arbitrary candidate set; every other token's candidate set is a
    top-k of ``logits + delta`` with ``|delta| <= max_perturbation`` (a
    swap of the k-th and (k+1)-th expert counts as half their gap).  All
    numbers are small multiples of 1/256, so their sums and differences are
    exact."""

    golden_ids: np.ndarray        # [T, k]
    candidate_ids: np.ndarray     # [T, k]
    logits: np.ndarray            # [T, E] float32
    tie_tol: float
    max_perturbation: float
    random_tokens: tuple[int, ...]


def _top_k(row: np.ndarray, k: int, order: np.ndarray) -> np.ndarray:
    """Top-k of ``row``, ties broken by the rank of each expert in ``order``."""
    keys = np.lexsort((order, -row))
    return keys[:k]


ROUTING_MODES: tuple[str, ...] = ("same", "perturb", "swap", "random")


@st.composite
def routing_cases(
    draw,
    *,
    max_tokens: int = 5,
    max_experts: int = 10,
    modes: tuple[str, ...] = ROUTING_MODES,
) -> RoutingCase:
    """Per token the candidate set is drawn by one of ``modes``: ``same``
    (the golden set, reordered), ``perturb`` (top-k of perturbed logits),
    ``swap`` (the k-th and (k+1)-th experts swapped, as ``--inject route``
    does) or ``random`` (any k experts).  Logits sit on a 1/8 grid in [-1, 1]
    so that near and exact ties are common."""
    n_tokens = draw(st.integers(1, max_tokens))
    n_experts = draw(st.integers(1, max_experts))
    k = draw(st.integers(1, n_experts))
    grid = st.integers(-8, 8).map(lambda i: i / 8)
    logits = draw(hnp.arrays(np.float32, (n_tokens, n_experts), elements=grid))
    tie_tol = draw(st.sampled_from(TIE_TOLS))
    golden = np.empty((n_tokens, k), dtype=np.int32)
    candidate = np.empty((n_tokens, k), dtype=np.int32)
    max_pert, random_tokens = 0.0, []
    for t in range(n_tokens):
        row = logits[t].astype(np.float64)
        ranked = _top_k(row, n_experts, np.arange(n_experts))
        golden[t] = draw(st.permutations(list(ranked[:k])))
        how = draw(st.sampled_from(modes))
        if how == "same" or (how == "swap" and k == n_experts):
            chosen = golden[t]
        elif how == "swap":
            chosen = np.concatenate([ranked[:k - 1], ranked[k:k + 1]])
            max_pert = max(max_pert, float(row[ranked[k - 1]] - row[ranked[k]]) / 2)
        elif how == "perturb":
            amp = draw(st.sampled_from(TIE_TOLS))
            delta = draw(hnp.arrays(np.float64, n_experts,
                                    elements=st.integers(-4, 4).map(lambda i: i * amp / 4)))
            max_pert = max(max_pert, float(np.abs(delta).max()))
            tie_break = np.array(draw(st.permutations(range(n_experts))))
            chosen = _top_k(row + delta, k, tie_break)
        else:
            random_tokens.append(t)
            chosen = draw(st.permutations(range(n_experts)))[:k]
        candidate[t] = draw(st.permutations(list(chosen)))
    return RoutingCase(golden, candidate, logits, tie_tol, max_pert, tuple(random_tokens))
