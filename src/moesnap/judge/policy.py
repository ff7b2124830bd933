"""The judging policy: the candidate's dtype, the tolerance profile and the tolerances, decided once.

Every producer of candidate cases (moesnap's candidate, another engine's dump, the expert-parallel
ranks, the pytest fixture) and ``goldens diff`` judge under one :class:`Policy`.  It is built from
one ordered list of sources, later ones winning:

1. the built-in tables of the tolerance profile (:data:`~moesnap.judge.tolerances.PROFILES`);
   ``auto`` picks ``ggml`` where the candidate's ``engine`` attribute names a ggml engine; with the
   golden's family's own calibrated numbers where it has them (data:
   :mod:`~moesnap.judge.family_tolerances`);
2. ``[tool.moesnap]`` of a ``pyproject.toml`` (``--config``, else ``./pyproject.toml`` when it has
   that table), read and parsed once (:class:`ConfigFile`);
3. overrides (``--tol``, the fixture's ``tol=``), ``[DTYPE:][STAGE.]KEY=VALUE``.

What the user asked for is a :class:`Settings`; :meth:`Settings.resolve` turns it into a
:class:`Policy` once the candidate is known (its ``engine`` attribute may choose the profile).
The dtype is the one the user named, else each candidate case's ``dtype`` attribute, else float32
(:meth:`Policy.dtype_of`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..stages import CHECK_DTYPES, DEFAULT_FAMILY, DTYPES, GOLDEN_DTYPES
from .family_tolerances import family_note
from .tolerances import PROFILES, Tolerances, profile_for, read_section

if TYPE_CHECKING:
    import torch

#: ``--profile`` choices: a profile, or ``auto`` (from the candidate's engine)
PROFILE_CHOICES: tuple[str, ...] = ("auto", *PROFILES)

__all__ = ["CHECK_DTYPES", "DTYPES", "GOLDEN_DTYPES", "PROFILE_CHOICES", "ConfigFile", "Policy", "Settings",
           "dtype_name", "torch_dtype"]


def dtype_name(value: object, *, allowed: Sequence[str] = DTYPES, what: str = "dtype") -> str:
    """The name of a precision (``"bfloat16"``, or ``torch.bfloat16``), refused in one line naming the
    bad value unless it is one of ``allowed``.  The one dtype validator of moesnap."""
    name = str(value).removeprefix("torch.") if value is not None else "None"
    if not isinstance(value, str) and type(value).__name__ != "dtype":
        raise UsageError(f"{what}={value!r}: expected one of {', '.join(allowed)}")
    if name not in allowed:
        raise UsageError(f"unknown {what} {name!r}; choose one of {', '.join(allowed)}")
    return name


def torch_dtype(name: object, *, allowed: Sequence[str] = DTYPES) -> torch.dtype:
    """The torch dtype of ``name`` (validated by :func:`dtype_name`)."""
    import torch

    dt = getattr(torch, dtype_name(name, allowed=allowed))
    assert isinstance(dt, torch.dtype)
    return dt


@dataclass(frozen=True)
class ConfigFile:
    """``[tool.moesnap]`` of one ``pyproject.toml``, read and parsed once.  ``named``: given
    explicitly (``--config``): the report then says so even when it holds no tolerance setting."""

    path: Path
    section: Mapping[str, Any] = field(default_factory=dict)
    named: bool = False

    @classmethod
    def read(cls, path: str | Path, *, named: bool = False) -> ConfigFile:
        """Parse ``path``; a file that cannot be read or is not TOML is refused naming it."""
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"{p}: no such file")
        section = read_section(p)
        return cls(p, MappingProxyType(section), named)

    @classmethod
    def find(cls, config: str | Path | None = None, *, directory: str | Path | None = None) -> ConfigFile | None:
        """``config`` (must exist), else ``pyproject.toml`` in ``directory`` (default: the current one)
        when it has a ``[tool.moesnap]`` table; None when neither applies."""
        if config is not None:
            return cls.read(config, named=True)
        p = Path(directory or ".") / "pyproject.toml"
        if not p.is_file():
            return None
        try:
            if "[tool.moesnap" not in p.read_text(encoding="utf-8", errors="replace"):
                return None
        except OSError:
            return None
        return cls.read(p)

    def tolerance_settings(self) -> list[str]:
        """The tolerance settings it holds, in ``--tol`` syntax (``DTYPE:STAGE.KEY``)."""
        found: list[str] = []
        tie = self.section.get("tie_tol")
        if isinstance(tie, dict):
            found += [f"{d}:tie_tol" for d in tie]
        elif tie is not None:
            found.append("tie_tol")
        tables = self.section.get("tolerance", {})
        for dtype, table in (tables.items() if isinstance(tables, dict) else ()):
            for key, entry in (table.items() if isinstance(table, dict) else ()):
                if isinstance(entry, dict):
                    found += [f"{dtype}:{key}.{k}" for k in entry]
                else:
                    found.append(f"{dtype}:{key}")
        return found


@dataclass(frozen=True)
class Settings:
    """What the user asked for: a dtype (None: each candidate case's own), a profile (``auto``: from
    the candidate's engine), a config file, overrides.  Validated on construction, so a bad value is
    refused before any model or golden is read."""

    dtype: str | None = None
    profile: str = "auto"
    config: ConfigFile | None = None
    overrides: Sequence[str] | Mapping[str, object] = ()
    #: the dtypes this producer can run (a check's candidate: float32, bfloat16, float16)
    allowed: tuple[str, ...] = DTYPES

    def __post_init__(self) -> None:
        if self.dtype is not None:
            object.__setattr__(self, "dtype", dtype_name(self.dtype, allowed=self.allowed))
        if self.profile not in PROFILE_CHOICES:
            raise UsageError(f"unknown tolerance profile {self.profile!r}; choose one of {', '.join(PROFILE_CHOICES)}")
        if isinstance(self.overrides, str):
            object.__setattr__(self, "overrides", (self.overrides,))
        elif not isinstance(self.overrides, Mapping):
            object.__setattr__(self, "overrides", tuple(self.overrides))
        self.tolerances("default")       # every override and the config file parse, or are refused now

    def tolerances(self, profile: str, family: str = DEFAULT_FAMILY) -> Tolerances:
        """``profile``'s built-in tables for a golden of ``family``, then the config file, then the overrides."""
        tols = Tolerances.for_profile(profile, family)
        if self.config is not None:
            tols = Tolerances.from_section(self.config.section, base=tols, where=str(self.config.path))
        return tols.with_overrides(self.overrides) if self.overrides else tols

    def resolve(self, *, engine: object = None, family: str | None = None) -> Policy:
        """The policy for a candidate whose ``engine`` attribute is ``engine`` (None: unknown), judged
        against a golden of ``family`` (None: Qwen3-MoE's tables; a family with its own calibrated
        numbers, :mod:`~moesnap.judge.family_tolerances`, gets them, and the report says so)."""
        auto = self.profile == "auto"
        profile = profile_for(engine) if auto else self.profile
        notes: list[str] = []
        if profile == "ggml":
            why = f" (the candidate's engine is {engine})" if auto else ""
            notes.append(f"tolerance profile ggml{why}: free-running tolerances admit 8-bit activation rounding "
                         f"carried through the layers; the local re-reference rounds every matmul input as ggml does")
        family = family or DEFAULT_FAMILY
        own = family_note(family)
        if own is not None:
            notes.append(own)
        note = self._config_note()
        if note is not None:
            notes.append(note)
        return Policy(self.dtype, profile, self.tolerances(profile, family), tuple(notes))

    def _config_note(self) -> str | None:
        cfg = self.config
        if cfg is None:
            return None
        settings = cfg.tolerance_settings()
        where = cfg.path.absolute()
        if not settings:
            return (f"tolerances: {where} has no tolerance settings in [tool.moesnap]; the built-in ones apply"
                    if cfg.named else None)
        shown = ", ".join(settings[:8]) + (f", … ({len(settings) - 8} more)" if len(settings) > 8 else "")
        return (f"tolerances: [tool.moesnap] of {where} applied over the built-in ones "
                f"({len(settings)} setting{'s' if len(settings) != 1 else ''}: {shown})"
                + ("; --tol over both" if self.overrides else ""))


@dataclass(frozen=True)
class Policy:
    """How candidates are judged: resolved once, used by every producer and ``goldens diff``."""

    #: the candidate's dtype; None: each candidate case's ``dtype`` attribute, else float32
    dtype: str | None
    #: the tolerance profile (:data:`~moesnap.judge.tolerances.PROFILES`)
    profile: str
    tolerances: Tolerances
    #: what the report says about where the tolerances came from
    notes: tuple[str, ...] = ()

    @classmethod
    def default(cls, dtype: str | None = None) -> Policy:
        """The built-in tables, no config file, no override."""
        return Settings(dtype=dtype, profile="default").resolve()

    @property
    def rounds_activations(self) -> bool:
        """The local re-reference rounds every matmul input to 8 bits as ggml does (profile ``ggml``)."""
        return self.profile == "ggml"

    def dtype_of(self, attrs: Mapping[str, Any] | None = None) -> str:
        """The dtype a candidate case (its attributes ``attrs``) is judged at."""
        if self.dtype is not None:
            return self.dtype
        d = (attrs or {}).get("dtype") or "float32"
        return dtype_name(d, what="candidate dtype attribute")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype or "float32")
