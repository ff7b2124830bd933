"""Options and output that several commands share: report paths, tolerances, printing a report."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError
from ..judge.compare import Report
from ..judge.tolerances import Tolerances


def add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="write the JSON report here")
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

    given = [(opt, getattr(a, opt[2:], None)) for opt in ("--json", "--html")]
    paths: list[tuple[str, str]] = [(opt, v) for opt, v in given if v is not None]
    for opt, v in paths:
        check_output_file(v, force=a.force, option=opt, store=store or DEFAULT_ROOT)
    if len(paths) == 2 and Path(paths[0][1]).absolute() == Path(paths[1][1]).absolute():
        raise UsageError(f"--json and --html are the same file {paths[0][1]}")


def load_tolerances(a: argparse.Namespace, profile: str = "default") -> Tolerances:
    """The ``profile``'s built-in tables, then ``[tool.moesnap]`` of the config file, then ``--tol``."""
    tols = Tolerances.for_profile(profile)
    cfg = Path(a.config) if a.config else Path("pyproject.toml")
    if a.config and not cfg.is_file():
        raise UsageError(f"{cfg}: no such file")
    if cfg.is_file() and (a.config or "[tool.moesnap" in cfg.read_text(encoding="utf-8", errors="replace")):
        tols = Tolerances.from_pyproject(cfg, base=tols)
    return tols.with_overrides(a.tol) if a.tol else tols


def emit(report: Report, a: argparse.Namespace, title: str) -> int:
    from ..judge.report import text, write_html, write_json

    from ..util import printable

    for line in text(report):
        print(printable(line))
    if a.json:
        write_json(report, a.json)
        print(f"wrote {a.json}")
    if a.html:
        write_html(report, a.html, title=title)
        print(f"wrote {a.html}")
    return 0 if report.passed else 1
