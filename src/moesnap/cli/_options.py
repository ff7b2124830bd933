"""Options and output that several commands share: report paths, tolerances, printing a report."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

from ..errors import UsageError
from ..judge.compare import Report
from ..judge.tolerances import Tolerances


def add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="write the JSON report here; - writes it to stdout "
                   "(and the table to stderr, so `... --json - | jq` works)")
    p.add_argument("--html", metavar="PATH", help="write the HTML heat map here")
    p.add_argument("--profile", choices=("auto", "default", "ggml"), default="auto",
                   help="tolerance profile: ggml for engines that round matmul inputs to 8 bits (llama.cpp); "
                        "auto (default): ggml where the candidate's 'engine' attribute names a ggml engine")
    p.add_argument("--tol", action="append", default=[], metavar="[DTYPE:][STAGE.]KEY=VALUE",
                   help="tolerance override, e.g. moe_out.atol=1e-3 (repeatable)")
    p.add_argument("--config", metavar="PYPROJECT", help="read [tool.moesnap] from this file "
                   "(default: ./pyproject.toml when it has that table)")
    p.add_argument("--force", action="store_true", help="overwrite existing --json / --html files")


def check_report_outputs(a: argparse.Namespace, store: str | None = None) -> None:
    """Refuse bad --json / --html paths before any work (see :func:`moesnap.util.check_output_file`)."""
    from ..store import DEFAULT_ROOT
    from ..util import check_output_file

    if a.html == STDOUT:
        raise UsageError("--html -: the HTML report goes to a file (only --json - writes to stdout)")
    given = [(opt, getattr(a, opt[2:], None)) for opt in ("--json", "--html")]
    paths: list[tuple[str, str]] = [(opt, v) for opt, v in given if v is not None and v != STDOUT]
    for opt, v in paths:
        check_output_file(v, force=a.force, option=opt, store=store or DEFAULT_ROOT)
    if len(paths) == 2 and Path(paths[0][1]).absolute() == Path(paths[1][1]).absolute():
        raise UsageError(f"--json and --html are the same file {paths[0][1]}")


#: ``--json -``: the JSON report on stdout
STDOUT = "-"


def config_file(a: argparse.Namespace) -> Path | None:
    """The file whose ``[tool.moesnap]`` applies: ``--config``, else ``./pyproject.toml`` when it has that table."""
    cfg = Path(a.config) if a.config else Path("pyproject.toml")
    if a.config and not cfg.is_file():
        raise UsageError(f"{cfg}: no such file")
    if cfg.is_file() and (a.config or "[tool.moesnap" in cfg.read_text(encoding="utf-8", errors="replace")):
        return cfg
    return None


def load_tolerances(a: argparse.Namespace, profile: str = "default") -> Tolerances:
    """The ``profile``'s built-in tables, then ``[tool.moesnap]`` of the config file, then ``--tol``."""
    tols = Tolerances.for_profile(profile)
    cfg = config_file(a)
    if cfg is not None:
        tols = Tolerances.from_pyproject(cfg, base=tols)
    return tols.with_overrides(a.tol) if a.tol else tols


def config_note(a: argparse.Namespace) -> str | None:
    """What the report says about tolerances taken from a config file: None when none applied, unless
    --config named a file without any (a [tool.moesnap] holding only, say, the pytest plugin's
    snapshot_store says nothing)."""
    cfg = config_file(a)
    if cfg is None:
        return None
    settings = _settings(cfg)
    where = cfg.absolute()
    if not settings:
        return None if not a.config else f"tolerances: {where} has no tolerance settings in [tool.moesnap]; the built-in ones apply"
    shown = ", ".join(settings[:8]) + (f", … ({len(settings) - 8} more)" if len(settings) > 8 else "")
    return (f"tolerances: [tool.moesnap] of {where} applied over the built-in ones "
            f"({len(settings)} setting{'s' if len(settings) != 1 else ''}: {shown})"
            + ("; --tol over both" if a.tol else ""))


def _settings(cfg: Path) -> list[str]:
    """The tolerance settings of ``cfg``'s ``[tool.moesnap]`` in ``--tol`` syntax (``DTYPE:STAGE.KEY``);
    load_tolerances has already refused a file that does not parse."""
    try:
        section = tomllib.loads(cfg.read_text(encoding="utf-8")).get("tool", {}).get("moesnap", {})
    except (OSError, ValueError, AttributeError):
        return []
    found: list[str] = []
    tie = section.get("tie_tol")
    if isinstance(tie, dict):
        found += [f"{d}:tie_tol" for d in tie]
    elif tie is not None:
        found.append("tie_tol")
    tables = section.get("tolerance", {})
    for dtype, table in (tables.items() if isinstance(tables, dict) else ()):
        for key, entry in (table.items() if isinstance(table, dict) else ()):
            if isinstance(entry, dict):
                found += [f"{dtype}:{key}.{k}" for k in entry]
            else:
                found.append(f"{dtype}:{key}")
    return found


def emit(report: Report, a: argparse.Namespace, title: str) -> int:
    """Print the report (the table on stdout, or on stderr under ``--json -``), write ``--json`` / ``--html``;
    the exit code: 0 pass, 1 otherwise."""
    from ..judge.report import text, write_html, write_json

    from ..util import printable

    note = config_note(a)
    if note is not None:
        report.notes.append(note)
    to_stdout = a.json == STDOUT
    human = sys.stderr if to_stdout else sys.stdout
    for line in text(report):
        print(printable(line), file=human)
    if to_stdout:
        sys.stdout.write(json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n")   # ASCII: any terminal, jq
        sys.stdout.flush()
    elif a.json:
        write_json(report, a.json)
        print(f"wrote {a.json}", file=human)
    if a.html:
        write_html(report, a.html, title=title)
        print(f"wrote {a.html}", file=human)
    return 0 if report.passed else 1
