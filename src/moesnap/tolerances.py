"""Tolerances: how far a candidate may be from the golden and still match.

A :class:`Tolerance` is the elementwise rule the classifier applies: an element
is *outside* when ``|c - g| > atol + rtol * |g|``, and an array matches when
the fraction of elements outside is at most ``max_frac_outside``.

:class:`Tolerances` holds one per (candidate dtype, stage), plus the routing
``tie_tol`` per dtype (how close, in golden router-logit units, two experts
must be for a flip between them to count as a near tie).  Lookups fall back
from a stage's own entry to the dtype's ``"default"`` entry.  Integer stages
(``tokens``, ``topk_ids``) are compared exactly; their tolerance is zero and
cannot be overridden.

Sources, applied in this order: :data:`DEFAULT_TOLERANCES`, then
``[tool.moesnap]`` of a ``pyproject.toml`` (:meth:`Tolerances.from_pyproject`)::

    [tool.moesnap]
    tie_tol = {float32 = 1e-4, bfloat16 = 0.05}   # or one number for all dtypes

    [tool.moesnap.tolerance.float32]
    max_frac_outside = 0.0                       # bare key: every stage of float32
    default = {atol = 1e-4, rtol = 1e-3}         # stages without their own entry
    moe_out = {atol = 2e-4}                      # other keys keep their value

`default` is applied before the stage tables, so a stage table without some
key takes it from the (new) default unless the stage has a built-in entry.

then command-line overrides (:meth:`Tolerances.with_overrides`), each
``[DTYPE:][STAGE.]KEY=VALUE`` with KEY one of ``atol``, ``rtol``,
``max_frac_outside``, ``tie_tol``: ``moe_out.atol=1e-3`` (every dtype),
``bfloat16:moe_out.rtol=0.02``, ``atol=1e-4`` (every stage of every dtype),
``bfloat16:tie_tol=0.1``.  Every bad value raises :class:`ToleranceError`
with a message naming it.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from .errors import ToleranceError
from .stages import INTEGER_STAGES, canonical

DTYPES: tuple[str, ...] = ("float64", "float32", "bfloat16", "float16")
KEYS: tuple[str, ...] = ("atol", "rtol", "max_frac_outside")
DEFAULT = "default"


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ToleranceError(f"{name}={value!r} must be a number")
    value = float(value)
    if not math.isfinite(value):
        raise ToleranceError(f"{name}={value!r} must be finite")
    return value


@dataclass(frozen=True)
class Tolerance:
    """Elementwise rule ``|c - g| <= atol + rtol * |g|``, allowed to fail on a
    fraction ``max_frac_outside`` of the elements."""

    atol: float
    rtol: float
    max_frac_outside: float = 0.0

    def __post_init__(self) -> None:
        atol = _number("atol", self.atol)
        rtol = _number("rtol", self.rtol)
        max_frac_outside = _number("max_frac_outside", self.max_frac_outside)
        if atol < 0:
            raise ToleranceError(f"{atol=} must be >= 0")
        if rtol < 0:
            raise ToleranceError(f"{rtol=} must be >= 0")
        if not 0.0 <= max_frac_outside <= 1.0:
            raise ToleranceError(f"{max_frac_outside=} must be in [0, 1]")
        object.__setattr__(self, "atol", atol)
        object.__setattr__(self, "rtol", rtol)
        object.__setattr__(self, "max_frac_outside", max_frac_outside)

    def __str__(self) -> str:
        text = f"atol={self.atol:g}, rtol={self.rtol:g}"
        if self.max_frac_outside:
            text += f", max_frac_outside={self.max_frac_outside:g}"
        return text


EXACT = Tolerance(0.0, 0.0, 0.0)


class DtypeDefaults(NamedTuple):
    tie_tol: float                              # golden router-logit units
    max_frac_outside: float                     # for every stage of this dtype
    stages: Mapping[str, tuple[float, float]]   # stage -> (atol, rtol); "default" for the rest


# THE default numbers (the only place they live).  These are hand-picked
# starting values, to be replaced by measured calibration: `moesnap calibrate`
# will run the float32 and float64 references, take the per-stage spread of
# float32 against float64 times a safety margin, and rewrite the `stages`
# mapping of each dtype (stage -> (atol, rtol)).  Scaling by stage kind:
# residual-stream stages (embed, attn_resid, layer_out) and logits carry larger
# magnitudes, so a larger atol; topk_weights live in [0, 1], so a smaller one.
_RESIDUAL = ("embed", "attn_resid", "layer_out")
DEFAULT_TOLERANCES: Mapping[str, DtypeDefaults] = MappingProxyType({
    "float64": DtypeDefaults(
        tie_tol=1e-9,
        max_frac_outside=0.0,
        stages={
            DEFAULT: (1e-10, 1e-9),
            **{s: (1e-9, 1e-9) for s in _RESIDUAL},
            "logits": (1e-9, 1e-8),
            "topk_weights": (1e-11, 1e-9),
        },
    ),
    "float32": DtypeDefaults(
        tie_tol=1e-4,
        max_frac_outside=0.0,
        stages={
            DEFAULT: (1e-4, 1e-3),
            **{s: (1e-3, 1e-3) for s in _RESIDUAL},
            "logits": (1e-3, 1e-3),
            "topk_weights": (1e-5, 1e-3),
        },
    ),
    "float16": DtypeDefaults(
        tie_tol=1e-2,
        max_frac_outside=1e-3,
        stages={
            DEFAULT: (5e-3, 5e-3),
            **{s: (1e-2, 5e-3) for s in _RESIDUAL},
            "logits": (2e-2, 1e-2),
            "topk_weights": (2e-3, 5e-3),
        },
    ),
    "bfloat16": DtypeDefaults(
        tie_tol=5e-2,
        max_frac_outside=5e-3,
        stages={
            DEFAULT: (3e-2, 3e-2),
            **{s: (5e-2, 3e-2) for s in _RESIDUAL},
            "logits": (1e-1, 5e-2),
            "topk_weights": (1e-2, 3e-2),
        },
    ),
})


def _dtype_name(dtype: object) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ToleranceError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return name


def _stage_name(stage: str) -> str:
    if stage == DEFAULT:
        return DEFAULT
    name = canonical(stage)
    if name is None:
        raise ToleranceError(f"unknown stage {stage!r}")
    if name in INTEGER_STAGES:
        raise ToleranceError(f"stage {name!r} is compared exactly; tolerances do not apply to it")
    return name


class Override(NamedTuple):
    """One parsed ``[DTYPE:][STAGE.]KEY=VALUE`` setting; None means 'every'."""

    dtype: str | None
    stage: str | None
    key: str
    value: float


def parse_override(text: str) -> Override:
    """Parse ``[DTYPE:][STAGE.]KEY=VALUE`` (``bfloat16:moe_out.rtol=0.02``)."""
    spec, eq, raw = text.partition("=")
    if not eq or not spec.strip() or not raw.strip():
        raise ToleranceError(f"bad tolerance override {text!r}: expected [DTYPE:][STAGE.]KEY=VALUE")
    dtype, colon, rest = spec.strip().rpartition(":")
    stage, dot, key = rest.rpartition(".")
    key = key.strip()
    try:
        dtype_name = _dtype_name(dtype.strip()) if colon else None
        if key == "tie_tol":
            if dot:
                raise ToleranceError("tie_tol is per dtype, not per stage")
            stage_name = None
        elif key in KEYS:
            stage_name = _stage_name(stage.strip()) if dot else None
        else:
            raise ToleranceError(f"unknown key {key!r}; expected one of {', '.join(KEYS)}, tie_tol")
        try:
            value = float(raw.strip())
        except ValueError:
            raise ToleranceError(f"{key}={raw.strip()!r} is not a number") from None
        _number(key, value)
    except ToleranceError as err:
        raise ToleranceError(f"bad tolerance override {text!r}: {err}") from None
    return Override(dtype_name, stage_name, key, value)


@dataclass(frozen=True)
class Tolerances:
    """Tolerance per (candidate dtype, stage) and routing tie_tol per dtype."""

    stages: Mapping[str, Mapping[str, Tolerance]]   # dtype -> stage|"default" -> Tolerance
    tie_tols: Mapping[str, float]                   # dtype -> tie_tol

    def __post_init__(self) -> None:
        stages: dict[str, Mapping[str, Tolerance]] = {}
        for dtype in DTYPES:
            table = dict(self.stages.get(dtype, {}))
            if DEFAULT not in table:
                raise ToleranceError(f"tolerances for {dtype} have no {DEFAULT!r} entry")
            for stage, tol in table.items():
                _stage_name(stage)
                if not isinstance(tol, Tolerance):
                    raise ToleranceError(f"{dtype}:{stage} tolerance={tol!r} is not a Tolerance")
            stages[dtype] = MappingProxyType(table)
        unknown = set(self.stages) - set(DTYPES)
        if unknown:
            raise ToleranceError(f"unknown dtype {sorted(unknown)[0]!r}; expected one of {', '.join(DTYPES)}")
        tie_tols = {}
        for dtype in DTYPES:
            tie_tol = _number("tie_tol", self.tie_tols.get(dtype))
            if tie_tol < 0:
                raise ToleranceError(f"{tie_tol=} must be >= 0")
            tie_tols[dtype] = tie_tol
        object.__setattr__(self, "stages", MappingProxyType(stages))
        object.__setattr__(self, "tie_tols", MappingProxyType(tie_tols))

    def __hash__(self) -> int:
        stages = tuple((d, tuple(sorted(t.items()))) for d, t in self.stages.items())
        return hash((stages, tuple(self.tie_tols.items())))

    @classmethod
    def defaults(cls) -> Tolerances:
        """The built-in table :data:`DEFAULT_TOLERANCES`."""
        stages = {
            dtype: {
                stage: Tolerance(atol, rtol, d.max_frac_outside)
                for stage, (atol, rtol) in d.stages.items()
            }
            for dtype, d in DEFAULT_TOLERANCES.items()
        }
        return cls(stages, {dtype: d.tie_tol for dtype, d in DEFAULT_TOLERANCES.items()})

    def for_stage(self, stage: str, dtype: str) -> Tolerance:
        """Tolerance for ``stage`` (canonical name or alias) and candidate ``dtype``."""
        dtype = _dtype_name(dtype)
        name = canonical(stage)
        if name is None:
            raise ToleranceError(f"unknown stage {stage!r}")
        if name in INTEGER_STAGES:
            return EXACT
        table = self.stages[dtype]
        return table.get(name, table[DEFAULT])

    def tie_tol(self, dtype: str) -> float:
        """Routing near-tie width, in golden router-logit units, for ``dtype``."""
        return self.tie_tols[_dtype_name(dtype)]

    def with_overrides(
        self, overrides: Mapping[str, object] | Iterable[str | Override]
    ) -> Tolerances:
        """Apply ``[DTYPE:][STAGE.]KEY=VALUE`` strings (or a mapping from
        ``[DTYPE:][STAGE.]KEY`` to value), in order; later ones win."""
        if isinstance(overrides, str):
            overrides = [overrides]
        if isinstance(overrides, Mapping):
            items = [parse_override(f"{spec}={_value_text(spec, v)}") for spec, v in overrides.items()]
        else:
            items = [o if isinstance(o, Override) else parse_override(o) for o in overrides]
        stages = {dtype: dict(table) for dtype, table in self.stages.items()}
        tie_tols = dict(self.tie_tols)
        for o in items:
            for dtype in (o.dtype,) if o.dtype else DTYPES:
                try:
                    if o.key == "tie_tol":
                        if o.value < 0:
                            raise ToleranceError(f"tie_tol={o.value!r} must be >= 0")
                        tie_tols[dtype] = o.value
                    elif o.stage is None:
                        table = stages[dtype]
                        for stage, tol in table.items():
                            table[stage] = replace(tol, **{o.key: o.value})
                    else:
                        table = stages[dtype]
                        current = table.get(o.stage, table[DEFAULT])
                        table[o.stage] = replace(current, **{o.key: o.value})
                except ToleranceError as err:
                    where = f"{o.dtype + ':' if o.dtype else ''}{o.stage + '.' if o.stage else ''}{o.key}"
                    raise ToleranceError(f"tolerance override {where}={o.value!r}: {err}") from None
        return Tolerances(stages, tie_tols)

    @classmethod
    def from_pyproject(cls, path: str | Path, *, base: Tolerances | None = None) -> Tolerances:
        """``base`` (default: the built-in table) with ``[tool.moesnap]`` of ``path`` applied.

        Other keys of ``[tool.moesnap]`` belong to other parts of moesnap and are
        ignored here; inside ``tolerance`` and ``tie_tol`` every unknown dtype,
        stage or key is an error naming it and the file.
        """
        path = Path(path)
        base = base if base is not None else cls.defaults()
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ToleranceError(f"{path}: cannot read: {err.strerror or err}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ToleranceError(f"{path}: not valid TOML: {err}") from None
        section = data.get("tool", {}).get("moesnap", {})
        if not isinstance(section, dict):
            raise ToleranceError(f"{path}: [tool.moesnap] must be a table")
        try:
            items = list(_pyproject_overrides(section))
        except ToleranceError as err:
            raise ToleranceError(f"{path}: {err}") from None
        try:
            return base.with_overrides(items)
        except ToleranceError as err:
            raise ToleranceError(f"{path}: {err}") from None


def _value_text(spec: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ToleranceError(f"bad tolerance override {spec!r}: value {value!r} is not a number")
    return repr(float(value)) if not isinstance(value, str) else value


def _pyproject_overrides(section: dict) -> Iterable[Override]:
    tie = section.get("tie_tol")
    if tie is not None:
        if isinstance(tie, dict):
            for dtype, value in tie.items():
                if dtype not in DTYPES:
                    raise ToleranceError(f"[tool.moesnap] tie_tol: unknown dtype {dtype!r}")
                yield Override(dtype, None, "tie_tol", _number(f"tie_tol.{dtype}", value))
        else:
            yield Override(None, None, "tie_tol", _number("tie_tol", tie))
    tables = section.get("tolerance", {})
    if not isinstance(tables, dict):
        raise ToleranceError("[tool.moesnap] tolerance must be a table of dtypes")
    for dtype, table in tables.items():
        where = f"[tool.moesnap.tolerance.{dtype}]"
        if dtype not in DTYPES:
            raise ToleranceError(f"{where}: unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        if not isinstance(table, dict):
            raise ToleranceError(f"{where} must be a table")
        bare = {k: v for k, v in table.items() if not isinstance(v, dict)}
        for key, value in bare.items():
            if key not in KEYS:
                raise ToleranceError(f"{where}: unknown key {key!r}; expected a stage table or one of {', '.join(KEYS)}")
            yield Override(dtype, None, key, _number(f"{dtype}.{key}", value))
        stage_tables = sorted(
            ((s, e) for s, e in table.items() if isinstance(e, dict)), key=lambda se: se[0] != DEFAULT
        )
        for stage, entry in stage_tables:
            try:
                stage_name = _stage_name(stage)
            except ToleranceError as err:
                raise ToleranceError(f"{where}: {err}") from None
            for key, value in entry.items():
                if key not in KEYS:
                    raise ToleranceError(f"{where} {stage}: unknown key {key!r}; expected one of {', '.join(KEYS)}")
                yield Override(dtype, stage_name, key, _number(f"{dtype}:{stage}.{key}", value))
