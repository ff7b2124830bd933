"""What a candidate case says of its own rows, in its attributes, and what the judge makes of it.

``held_tokens`` (an imported dump that holds only some tokens' rows of a stage: :func:`held_tokens`,
:func:`golden_rows`, :func:`held_notes`), ``router_followed`` (a side that followed the other's experts
at a near tie: :func:`followed_routes`, :func:`own_ids`) and ``parted`` (an imported dump's second value
of a stage: :func:`seconds`).  A malformed attribute is a :class:`~moesnap.errors.GoldenError` naming
the case.
"""

from __future__ import annotations

from typing import Any

from dataclasses import dataclass

import numpy as np

from ..case import Case
from ..errors import GoldenError
from ..stages import DEFAULT_FAMILY, FAMILY_STAGES, LAYER_STAGES, MODEL_STAGES


def recorded_family(case: Case, *, where: str) -> str | None:
    """The model family a case records (``attrs.model.config.arch``, gguf-py's architecture name), or
    None where it records no model config (an imported dump; a golden from before families)."""
    model = case.attrs.get("model") if isinstance(case.attrs, dict) else None
    config = model.get("config") if isinstance(model, dict) else None
    if not isinstance(config, dict):
        return None
    arch = config.get("arch", DEFAULT_FAMILY)   # configs written before families: Qwen3-MoE's
    if not isinstance(arch, str) or arch not in FAMILY_STAGES:
        raise GoldenError(f"{where}: attribute 'model.config.arch' = {arch!r} is no family moesnap knows "
                          f"({', '.join(FAMILY_STAGES)})")
    return arch


def recorded_config(case: Case) -> dict[str, Any]:
    """The model config a case records (``attrs.model.config``), or {} where it records none: what
    says which stages each layer has (:func:`moesnap.stages.stages_of_layer`)."""
    model = case.attrs.get("model") if isinstance(case.attrs, dict) else None
    config = model.get("config") if isinstance(model, dict) else None
    return config if isinstance(config, dict) else {}


def family(golden: Case, candidate: Case, *, name: str) -> str:
    """The family ``golden`` was made from (Qwen3-MoE where it does not say); a candidate that records
    another family is refused: a golden of one family never judges a forward of another."""
    mine = recorded_family(golden, where=f"{name} (golden)") or DEFAULT_FAMILY
    theirs = recorded_family(candidate, where=f"{name} (candidate)")
    if theirs is not None and theirs != mine:
        raise GoldenError(f"{name}: the golden is of a {mine!r} model, the candidate of a {theirs!r} model: "
                          f"judge it against goldens of the same model")
    return mine


def followed_routes(case: Case, *, where: str) -> dict[int, dict[int, np.ndarray]]:
    """``attrs["router_followed"]`` as {layer: {token: own expert ids}}: where a case's
    ``topk_ids`` (and the stages after them) used other experts than its own router chose,
    because it followed the other side at a near tie (router replay, local re-reference)."""
    raw = case.attrs.get("router_followed") if isinstance(case.attrs, dict) else None
    if raw is None:
        return {}
    out: dict[int, dict[int, np.ndarray]] = {}
    ok = isinstance(raw, list)
    for item in raw if ok else ():
        if not (isinstance(item, list) and len(item) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                    for v in item[:2])
                and isinstance(item[2], list) and all(isinstance(e, int) and not isinstance(e, bool) for e in item[2])):
            ok = False
            break
        out.setdefault(item[0], {})[item[1]] = np.asarray(item[2], dtype=np.int64)
    if not ok:
        raise GoldenError(f"{where}: attribute 'router_followed' is not a list of [layer, token, [expert ids]]")
    return out


def held_tokens(case: Case, *, where: str) -> dict[tuple[int | None, str], np.ndarray]:
    """``attrs["held_tokens"]`` as {(layer, stage): token indices}: the (layer, stage) whose array holds
    only these tokens' rows (an imported dump that kept the last token alone, or lacks a layer: see
    :mod:`moesnap.capture._flat`); its other rows hold no values of the engine and are judged by no mode."""
    raw = case.attrs.get("held_tokens") if isinstance(case.attrs, dict) else None
    if raw is None:
        return {}
    T = int(case.tokens.shape[0])

    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    out: dict[tuple[int | None, str], np.ndarray] = {}
    for item in raw if isinstance(raw, list) else [None]:
        ok = (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
              and (item[1] is None if item[0] in MODEL_STAGES else item[0] in LAYER_STAGES and is_int(item[1])
                   and item[1] >= 0)
              and isinstance(item[2], list) and all(is_int(t) and 0 <= t < T for t in item[2]))
        if not ok or item is None:
            raise GoldenError(f"{where}: attribute 'held_tokens' is not a list of [stage, layer or null, "
                              f"[token indices below {T}]]")
        out[(item[1], item[0])] = np.unique(np.asarray(item[2], dtype=np.int64))
    return out


def golden_rows(golden: Case, candidate: Case, held: dict[tuple[int | None, str], np.ndarray]) -> Case:
    """``candidate`` with the rows it does not hold set to the golden's: rows every judgement excludes
    (classify counts a NaN even in an excluded row), never counted as held or judged."""
    if not held:
        return candidate
    model, layers = dict(candidate.model), dict(candidate.layers)
    copied: set[tuple[bool, str]] = set()
    for (layer, stage), keep in held.items():
        src = model if layer is None else layers
        a, g = src.get(stage), golden.stage(stage, layer)
        if a is None or g is None or (layer is not None and layer >= a.shape[0]):
            continue
        if (layer is None, stage) not in copied:
            src[stage] = a = np.array(a, copy=True)
            copied.add((layer is None, stage))
        c = a if layer is None else a[layer]
        if g.shape != c.shape:
            continue               # judged as of the wrong shape
        rows = np.setdiff1d(np.arange(c.shape[0]), keep)
        c[rows] = g[rows]
    return Case(tokens=candidate.tokens, model=model, layers=layers, attrs=candidate.attrs, ignored=candidate.ignored,
                extra=candidate.extra)


@dataclass(frozen=True)
class Second:
    """A second value of one stage in a candidate: an imported dump whose two names of the stage
    (``mlp.experts.output`` and ``mlp.output``) gave other values (``attrs["parted"]``, array ``parted/<i>``)."""

    stage: str
    layer: int | None
    name: str                   # the dump's name of this value (the earlier in the forward)
    kept: str                   # the name of the value the case's stage holds
    rows: np.ndarray            # [T or 1, ...]: every token's rows, or the last token's
    token: int | None           # the first token where the two differ
    rel_l2: float | None        # of their difference, relative to this value


def seconds(case: Case, *, where: str) -> dict[tuple[int | None, str], list[Second]]:
    """``attrs["parted"]`` with its arrays, as {(layer, stage): second values}; a malformed entry, or
    one whose array the case lacks, is refused naming the case."""
    raw = case.attrs.get("parted") if isinstance(case.attrs, dict) else None
    if raw is None:
        return {}
    out: dict[tuple[int | None, str], list[Second]] = {}
    for i, item in enumerate(raw if isinstance(raw, list) else [None]):
        ok = (isinstance(item, dict) and isinstance(item.get("stage"), str) and isinstance(item.get("array"), str)
              and (item.get("layer") is None if item["stage"] in MODEL_STAGES
                   else item["stage"] in LAYER_STAGES and _is_int(item.get("layer")) and item["layer"] >= 0))
        if not ok or item is None:
            raise GoldenError(f"{where}: attribute 'parted' entry {i} is not {{stage, layer, array, ...}} of a stage")
        rows = case.extra.get(item["array"])
        if rows is None:
            raise GoldenError(f"{where}: attribute 'parted' names array {item['array']!r}, which the case lacks")
        token, rel = item.get("token"), item.get("rel_l2")
        out.setdefault((item["layer"], item["stage"]), []).append(Second(
            item["stage"], item["layer"], str(item.get("other") or item["array"]), str(item.get("kept") or item["stage"]),
            np.asarray(rows), token if _is_int(token) else None, float(rel) if isinstance(rel, (int, float)) else None))
    return out


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def held_notes(name: str, held: dict[tuple[int | None, str], np.ndarray], T: int) -> list[str]:
    """One line per stage the candidate holds only in part: which tokens, at which layers."""
    by: dict[tuple[str, tuple[int, ...]], list[int | None]] = {}
    for (layer, stage), keep in held.items():
        by.setdefault((stage, tuple(int(t) for t in keep)), []).append(layer)
    out = []
    for (stage, rows), lays in sorted(by.items(), key=lambda x: _stage_order(x[0][0])):
        at = "" if lays == [None] else f" at layers {sorted(lay for lay in lays if lay is not None)}"
        if not rows:
            out.append(f"{name}: {stage}{at}: not in the dump")
        elif rows == (T - 1,):
            out.append(f"{name}: {stage}{at}: last token only (token {T - 1}): only it is judged")
        else:
            out.append(f"{name}: {stage}{at}: tokens {list(rows)} only: only they are judged")
    return out


def _stage_order(stage: str) -> int:
    return (MODEL_STAGES + LAYER_STAGES).index(stage) if stage in MODEL_STAGES + LAYER_STAGES else 1 << 30


def own_ids(used: np.ndarray | None, followed: dict[int, np.ndarray]) -> np.ndarray | None:
    """The ids a router chose itself: ``used`` with the followed tokens' own choice put back."""
    if used is None or not followed or used.ndim != 2:
        return used
    own = np.array(used, copy=True)
    for t, ids in followed.items():
        if 0 <= t < own.shape[0] and ids.shape == own[t].shape:
            own[t] = ids
    return own
