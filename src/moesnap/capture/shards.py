"""Per-rank dumps reassembled: a candidate written as one case group per rank, plus a sharding spec.

A tensor- or expert-parallel engine dumps what each rank holds.  Such a candidate is a directory::

    DIR/sharding.json     {"q": "t h[tp] d", "attn": "t (h[tp] d)", "router_logits": "t e[ep]",
                           "expert_out": "t k[ep] h", "logits": "t v[tp]",
                           "expert_ranges": [[0, 64], [64, 128]]}        (optional, see below)
    DIR/rank0/            a case group (the layout of moesnap.store.case), rank 0's values
    DIR/rank1/            ...

Each stage's *dims* (in the spirit of SGLang's dumper ``dims=`` annotations) name the axes of one
layer's value (per-layer stages: the axes after the layer axis), and mark at most one of them:

``name[tp]``            split over the ranks: concatenated in rank order; every rank holds the same size
``(h[tp] d)``, ``(h*d)[tp]``  a fused axis split on its outer part: concatenated the same way
``e[ep]``               the expert axis (``router_logits``): rank r holds the columns of its experts
``k[ep]``               the routed-slot axis (``topk_weights``, ``expert_out``): every rank holds the full
                        shape, and each (token, slot) is taken from the rank that owns the expert
                        ``topk_ids`` names there (the other ranks' values there are ignored)
``name[tp:partial]``, ``name[ep:partial]``  partial sums (before an all-reduce): the ranks' arrays add up

Text after ``#`` is a comment (SGLang's ``# tp:replicated``).  A stage the spec does not name is
replicated: it must be identical on every rank (NaN equal to NaN), and ``tokens`` always.  Expert
ranges are ``[lo, hi)`` per rank in rank order; without ``expert_ranges`` the ranks own equal
contiguous ranges of the expert count ``router_logits`` gives.  Inconsistent shards (a missing rank, a
stage one rank lacks, overlapping or gapped expert ranges, shapes that do not add up, a replicated
stage that differs) are refused with :class:`~moesnap.errors.GoldenError`, one line naming the rank
and the stage.  :func:`split_case` is the inverse (fixtures, tests).

May import what ``capture`` may; the groups are read by a ``load`` function the caller passes
(``moesnap.store.case.load_case``), since ``capture`` sits below ``store``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..case import Case
from ..errors import GoldenError, UsageError
from ..stages import LAYER_STAGES, MODEL_STAGES, canonical

SPEC_FILE = "sharding.json"
#: the parallel axes a mark may name
MARKS = ("tp", "ep")
_RANK_DIR = re.compile(r"rank(\d+)")
_AXIS = re.compile(r"\s*(?:\((?P<fused>[^()]*)\)|(?P<name>[A-Za-z_]\w*|\d+))(?:\[(?P<mark>[^\]]*)\])?")
_INNER = re.compile(r"\s*(?P<name>[A-Za-z_]\w*|\d+)(?:\[(?P<mark>[^\]]*)\])?\s*\*?")


@dataclass(frozen=True)
class Dims:
    """One stage's parsed dims: its axis names, and which one is split (index, parallel axis, partial)."""

    text: str
    names: tuple[str, ...]
    split: int | None = None
    mark: str | None = None          # "tp" or "ep"
    partial: bool = False

    @property
    def by_owner(self) -> bool:
        """``k[ep]``: each (token, slot) from the rank owning its expert."""
        return self.mark == "ep" and not self.partial and self.names[self.split or 0] == "k"


@dataclass(frozen=True)
class Sharding:
    """``sharding.json``: dims per stage (canonical names), and the expert range of each rank (or None)."""

    stages: dict[str, Dims]
    expert_ranges: tuple[tuple[int, int], ...] | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def _mark(stage: str, text: str, mark: str) -> tuple[str, bool]:
    kind, _, qual = mark.partition(":")
    if kind not in MARKS or qual not in ("", "partial"):
        raise GoldenError(f"{SPEC_FILE}: {stage}: {text!r}: unknown mark [{mark}]; moesnap reassembles "
                          f"[tp], [ep], [tp:partial] and [ep:partial]")
    return kind, qual == "partial"


def parse_dims(stage: str, text: str) -> Dims:
    """Parse one stage's dims (see the module docstring); refuse what cannot be reassembled."""
    body = text.split("#", 1)[0]
    names: list[str] = []
    marks: list[tuple[int, str, bool]] = []
    pos = 0
    while body[pos:].strip():
        m = _AXIS.match(body, pos)
        if m is None:
            raise GoldenError(f"{SPEC_FILE}: {stage}: cannot read dims {text!r} from {body[pos:].strip()!r}")
        pos = m.end()
        if m["fused"] is not None:
            inner = [x for x in _INNER.finditer(m["fused"]) if x.group(0).strip()]
            if not inner or "".join(x.group(0) for x in inner).strip() != m["fused"].strip():
                raise GoldenError(f"{SPEC_FILE}: {stage}: cannot read the fused axis ({m['fused']}) of {text!r}")
            if any(x["mark"] for x in inner[1:]):
                raise GoldenError(f"{SPEC_FILE}: {stage}: {text!r}: only the outer part of a fused axis may be split")
            names.append("(" + " ".join(x["name"] for x in inner) + ")")
            for mk in (inner[0]["mark"], m["mark"]):
                if mk:
                    marks.append((len(names) - 1, *_mark(stage, text, mk)))
        else:
            names.append(m["name"])
            if m["mark"]:
                marks.append((len(names) - 1, *_mark(stage, text, m["mark"])))
    if not names:
        raise GoldenError(f"{SPEC_FILE}: {stage}: empty dims {text!r}")
    if len(marks) > 1:
        raise GoldenError(f"{SPEC_FILE}: {stage}: {text!r} splits more than one axis; moesnap reassembles one")
    if not marks:
        return Dims(text, tuple(names))
    at, mark, partial = marks[0]
    if mark == "ep" and not partial and names[at] not in ("e", "k"):
        raise GoldenError(f"{SPEC_FILE}: {stage}: {text!r}: [ep] splits the expert axis 'e' or the routed-slot axis "
                          f"'k', not {names[at]!r}")
    return Dims(text, tuple(names), at, mark, partial)


def parse_sharding(raw: Any, where: str = SPEC_FILE) -> Sharding:
    """``sharding.json``'s content: ``{stage: dims, ..., "expert_ranges": [[lo, hi], ...]}``."""
    if not isinstance(raw, dict):
        raise GoldenError(f"{where}: expected a JSON object of stage -> dims, got {type(raw).__name__}")
    stages: dict[str, Dims] = {}
    ranges = None
    for key, value in raw.items():
        if key == "expert_ranges":
            ok = isinstance(value, list) and all(isinstance(r, list) and len(r) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in r) for r in value)
            if not ok or not value:
                raise GoldenError(f"{where}: expert_ranges must be a list of [lo, hi] per rank, got {value!r}")
            ranges = tuple((int(r[0]), int(r[1])) for r in value)
            continue
        stage = canonical(key)
        if stage is None or stage == "tokens":
            raise GoldenError(f"{where}: {key!r} names no stage moesnap knows (stage names and aliases: moesnap.stages)")
        if not isinstance(value, str):
            raise GoldenError(f"{where}: {key}: dims must be a string like \"t h[tp]\", got {value!r}")
        stages[stage] = parse_dims(stage, value)
        if stage == "topk_ids" and stages[stage].mark is not None:
            raise GoldenError(f"{where}: topk_ids: {value!r}: the expert ids must be replicated (k[ep] stages are "
                              f"reassembled by them)")
    return Sharding(stages, ranges, dict(raw))


# --------------------------------------------------------------------------- reassembly


def _arrays(case: Case) -> dict[str, np.ndarray]:
    return {**case.model, **case.layers}


def _lead(stage: str) -> int:
    """Axes before the dims: the layer axis of a per-layer stage."""
    return 1 if stage in LAYER_STAGES else 0


def _expert_ranges(sh: Sharding, n: int, n_expert: int | None, stage: str, where: str) -> list[tuple[int, int]]:
    """Each rank's ``[lo, hi)``, checked: one per rank, no overlap, no gap from 0."""
    if sh.expert_ranges is None:
        if n_expert is None:
            raise GoldenError(f"{where}: {stage} is split [ep], but neither expert_ranges nor router_logits "
                              f"says which experts each rank owns")
        if n_expert % n:
            raise GoldenError(f"{where}: {stage} is split [ep]: {n_expert} experts do not split evenly over "
                              f"{n} ranks; give expert_ranges")
        per = n_expert // n
        return [(r * per, (r + 1) * per) for r in range(n)]
    ranges = list(sh.expert_ranges)
    if len(ranges) != n:
        raise GoldenError(f"{where}: {stage}: expert_ranges has {len(ranges)} ranges for {n} ranks")
    for r, (lo, hi) in enumerate(ranges):
        if not 0 <= lo < hi:
            raise GoldenError(f"{where}: rank {r}: {stage}: expert range [{lo}, {hi}) is empty or negative")
    end = 0
    for r in sorted(range(n), key=lambda r: ranges[r]):
        lo, hi = ranges[r]
        if lo < end:
            other = next(q for q in range(n) if q != r and ranges[q][0] < hi and lo < ranges[q][1])
            raise GoldenError(f"{where}: rank {r}: {stage}: experts [{lo}, {hi}) overlap rank {other}'s "
                              f"[{ranges[other][0]}, {ranges[other][1]})")
        if lo > end:
            raise GoldenError(f"{where}: rank {r}: {stage}: experts [{end}, {lo}) belong to no rank")
        end = hi
    if n_expert is not None and end != n_expert:
        raise GoldenError(f"{where}: {stage}: the ranks own experts [0, {end}), the router has {n_expert}")
    return ranges


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))


def _replicated(stage: str, parts: list[np.ndarray], where: str) -> np.ndarray:
    for r, a in enumerate(parts[1:], 1):
        if a.shape != parts[0].shape:
            raise GoldenError(f"{where}: rank {r}: {stage} has shape {list(a.shape)}, rank 0's {list(parts[0].shape)} "
                              f"(an unannotated stage must be replicated)")
        if not _same(a, parts[0]):
            at = "" if _lead(stage) == 0 else \
                f"layer {next(i for i in range(a.shape[0]) if not _same(a[i], parts[0][i]))} / "
            raise GoldenError(f"{where}: rank {r}: {at}{stage} differs from rank 0's (a stage sharding.json "
                              f"does not annotate must be identical on every rank)")
    return parts[0]


def _check_shapes(stage: str, dims: Dims, parts: list[np.ndarray], where: str, sizes: list[int] | None) -> int:
    """Every axis but the split one as rank 0's; the split axis of size ``sizes[r]`` (None: as rank 0's)."""
    ax = _lead(stage) + (dims.split or 0)
    for r, a in enumerate(parts):
        if a.ndim != parts[0].ndim or a.ndim != _lead(stage) + len(dims.names):
            raise GoldenError(f"{where}: rank {r}: {stage} has shape {list(a.shape)}: {a.ndim - _lead(stage)} axes "
                              f"per layer, dims {dims.text!r} name {len(dims.names)}")
        other = [d for i, d in enumerate(a.shape) if i != ax or dims.by_owner or dims.partial]
        first = [d for i, d in enumerate(parts[0].shape) if i != ax or dims.by_owner or dims.partial]
        if other != first:
            raise GoldenError(f"{where}: rank {r}: {stage} has shape {list(a.shape)}, which does not fit rank 0's "
                              f"{list(parts[0].shape)} (dims {dims.text!r})")
        want = sizes[r] if sizes is not None else parts[0].shape[ax]
        if a.shape[ax] != want:
            axis = dims.names[dims.split or 0]
            raise GoldenError(f"{where}: rank {r}: {stage} holds {a.shape[ax]} along {axis}[{dims.mark}], expected "
                              f"{want} (dims {dims.text!r}" + (", its expert range)" if sizes else ", as rank 0)"))
    return ax


def _by_owner(stage: str, parts: list[np.ndarray], ids: np.ndarray | None, ranges: list[tuple[int, int]],
              where: str) -> np.ndarray:
    """``k[ep]``: each (token, slot) from the rank owning ``ids`` there; NaN where no rank owns it."""
    if ids is None or ids.shape != parts[0].shape[:ids.ndim]:
        raise GoldenError(f"{where}: {stage} is split k[ep], which needs topk_ids of shape "
                          f"{list(parts[0].shape[:3 if _lead(stage) else 2])}; the ranks hold "
                          f"{'none' if ids is None else list(ids.shape)}")
    out = np.full_like(parts[0], np.nan) if parts[0].dtype.kind == "f" else np.full_like(parts[0], -1)
    for (lo, hi), a in zip(ranges, parts):
        own = (ids >= lo) & (ids < hi)
        out[own] = a[own]
    return out


def reassemble(shards: Sequence[Case], sharding: Sharding, *, where: str = "shards") -> Case:
    """One case from the cases of ranks 0..N-1 (in that order) under ``sharding``."""
    n = len(shards)
    if n == 0:
        raise GoldenError(f"{where}: no rank's case to reassemble")
    for r, c in enumerate(shards[1:], 1):
        if not _same(np.asarray(c.tokens), np.asarray(shards[0].tokens)):
            raise GoldenError(f"{where}: rank {r}: tokens differ from rank 0's")
    held = [_arrays(c) for c in shards]
    names = [s for s in (*MODEL_STAGES, *LAYER_STAGES) if any(s in h for h in held)]
    for s in names:
        for r, h in enumerate(held):
            if s not in h:
                owner = next(q for q, g in enumerate(held) if s in g)
                raise GoldenError(f"{where}: rank {r}: holds no {s} (rank {owner} does)")
    out: dict[str, np.ndarray] = {}
    # replicated and tp stages first: k[ep] needs topk_ids, and default expert ranges router_logits
    order = sorted(names, key=lambda s: (s in sharding.stages and sharding.stages[s].mark == "ep", s != "router_logits"))
    for s in order:
        parts = [np.asarray(h[s]) for h in held]
        dims = sharding.stages.get(s)
        if dims is None or dims.mark is None:
            if dims is not None:
                _check_shapes(s, dims, parts, where, None)
            out[s] = _replicated(s, parts, where)
            continue
        if dims.mark == "ep":
            n_expert = out["router_logits"].shape[-1] if "router_logits" in out else None
            if s == "router_logits" and not dims.partial:   # e[ep] and no ranges given: the shards' widths
                n_expert = sum(p.shape[-1] for p in parts)
            ranges = _expert_ranges(sharding, n, n_expert, s, where)
        if dims.partial:
            _check_shapes(s, dims, parts, where, None)
            total = np.sum([p.astype(np.float64) for p in parts], axis=0)
            out[s] = total.astype(parts[0].dtype)
        elif dims.by_owner:
            _check_shapes(s, dims, parts, where, None)
            out[s] = _by_owner(s, parts, out.get("topk_ids"), ranges, where)
        elif dims.mark == "ep":   # e[ep]: each rank's expert columns, placed at its range
            ax = _check_shapes(s, dims, parts, where, [hi - lo for lo, hi in ranges])
            whole = list(parts[0].shape)
            whole[ax] = max(hi for _, hi in ranges)
            placed = np.empty(whole, dtype=parts[0].dtype)
            for (lo, hi), a in zip(ranges, parts):
                placed[(slice(None),) * ax + (slice(lo, hi),)] = a
            out[s] = placed
        else:
            out[s] = np.concatenate(parts, axis=_check_shapes(s, dims, parts, where, None))
    attrs = {k: v for k, v in shards[0].attrs.items() if k not in ("checksums", "schema")}
    attrs["sharding"] = {"ranks": n, **sharding.raw}
    ignored = tuple(sorted({x for c in shards for x in c.ignored}))
    return Case(tokens=np.asarray(shards[0].tokens), model={s: out[s] for s in names if s in MODEL_STAGES},
                layers={s: out[s] for s in names if s in LAYER_STAGES}, attrs=attrs, ignored=ignored)


def rank_dirs(path: str | Path) -> list[Path]:
    """``DIR/rank0``, ``DIR/rank1``, ...: every rank's group, refusing a gap."""
    p = Path(path)
    found = {int(m[1]): d for d in p.iterdir() if d.is_dir() and (m := _RANK_DIR.fullmatch(d.name))}
    if not found:
        raise GoldenError(f"{p}: holds {SPEC_FILE} but no rank group (rank0/, rank1/, ...)")
    for r in range(max(found) + 1):
        if r not in found:
            raise GoldenError(f"{p}: rank {r} is missing (found {', '.join(found[q].name for q in sorted(found))})")
    return [found[r] for r in range(len(found))]


def read_sharding(path: str | Path) -> Sharding:
    """``DIR/sharding.json``, parsed and checked."""
    f = Path(path) / SPEC_FILE
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GoldenError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
    return parse_sharding(raw, str(f))


def load_sharded(path: str | Path, load: Callable[[Path], Case]) -> Case:
    """The case a per-rank dump directory reassembles into; ``load`` reads one rank's case group."""
    sharding = read_sharding(path)
    return reassemble([load(d) for d in rank_dirs(path)], sharding, where=str(path))


def unshard(candidate: str | Path | Case, load: Callable[[Path], Case]) -> str | Path | Case:
    """``candidate`` as given, unless it is a directory holding ``sharding.json``: then its reassembled case."""
    if isinstance(candidate, (str, Path)) and (Path(candidate) / SPEC_FILE).is_file():
        return load_sharded(candidate, load)
    return candidate


# --------------------------------------------------------------------------- the inverse


def split_case(case: Case, sharding: Sharding, n_ranks: int) -> list[Case]:
    """What ``n_ranks`` ranks of an engine sharded as ``sharding`` would dump for ``case``: the inverse of
    :func:`reassemble` (tp splits even, a ``k[ep]`` rank's unowned slots NaN, partial sums on rank 0)."""
    whole = _arrays(case)
    ranges: list[tuple[int, int]] = []
    if any(d.mark == "ep" for d in sharding.stages.values()):
        n_expert = whole["router_logits"].shape[-1] if "router_logits" in whole else None
        ranges = _expert_ranges(sharding, n_ranks, n_expert, "expert_ranges", "split_case")
    per: list[dict[str, np.ndarray]] = [{} for _ in range(n_ranks)]
    for s, a in whole.items():
        dims = sharding.stages.get(s)
        ax = _lead(s) + (dims.split or 0) if dims is not None else 0
        for r in range(n_ranks):
            if dims is None or dims.mark is None:
                per[r][s] = a
            elif dims.partial:
                per[r][s] = a if r == 0 else np.zeros_like(a)
            elif dims.by_owner:
                ids = whole["topk_ids"]
                own = (ids >= ranges[r][0]) & (ids < ranges[r][1])
                per[r][s] = np.where(own.reshape(own.shape + (1,) * (a.ndim - own.ndim)), a,
                                     np.nan if a.dtype.kind == "f" else -1).astype(a.dtype)
            elif dims.mark == "ep":
                per[r][s] = np.take(a, range(*ranges[r]), axis=ax)
            else:
                if a.shape[ax] % n_ranks:
                    raise UsageError(f"{s}: {a.shape[ax]} along {dims.names[dims.split or 0]} does not split evenly "
                                     f"over {n_ranks} ranks")
                per[r][s] = np.split(a, n_ranks, axis=ax)[r]
    return [replace(case, model={s: a for s, a in p.items() if s in MODEL_STAGES},
                    layers={s: a for s, a in p.items() if s in LAYER_STAGES}, attrs=dict(case.attrs))
            for p in per]


__all__ = ["SPEC_FILE", "Dims", "Sharding", "parse_dims", "parse_sharding", "reassemble", "rank_dirs",
           "read_sharding", "load_sharded", "unshard", "split_case"]
