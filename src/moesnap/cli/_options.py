"""Options and output that several commands share: report paths, tolerances, printing a report."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import UsageError
from ..judge.policy import PROFILE_CHOICES, Settings
from ..judge.report import STDOUT
from ..judge.report import Report
from ..util import published_version_above


def add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="write the JSON report here; - writes it to stdout "
                   "(and the table to stderr, so `... --json - | jq` works)")
    p.add_argument("--html", metavar="PATH", help="write the HTML heat map here")
    p.add_argument("--profile", choices=PROFILE_CHOICES, default="auto",
                   help="tolerance profile: ggml for engines that round matmul inputs to 8 bits (llama.cpp); "
                        "auto (default): ggml where the candidate's 'engine' attribute names a ggml engine")
    p.add_argument("--tol", action="append", default=[], metavar="[DTYPE:][STAGE.]KEY=VALUE",
                   help="tolerance override, e.g. moe_out.atol=1e-3 (repeatable)")
    p.add_argument("--config", metavar="PYPROJECT", help="read [tool.moesnap] from this file "
                   "(default: ./pyproject.toml when it has that table)")
    p.add_argument("--force", action="store_true", help="overwrite existing --json / --html files")


def check_report_outputs(a: argparse.Namespace, store: str | None = None) -> None:
    """Refuse bad --json / --html paths before any work (see :func:`check_output_file`)."""
    from ..store import DEFAULT_ROOT

    if a.html == STDOUT:
        raise UsageError("--html -: the HTML report goes to a file (only --json - writes to stdout)")
    given = [(opt, getattr(a, opt[2:], None)) for opt in ("--json", "--html")]
    paths: list[tuple[str, str]] = [(opt, v) for opt, v in given if v is not None and v != STDOUT]
    for opt, v in paths:
        check_output_file(v, force=a.force, option=opt, store=store or DEFAULT_ROOT)
    if len(paths) == 2 and Path(paths[0][1]).absolute() == Path(paths[1][1]).absolute():
        raise UsageError(f"--json and --html are the same file {paths[0][1]}")


def check_output_file(path: str | Path, *, force: bool = False, option: str = "output",
                      store: str | os.PathLike | None = None) -> Path:
    """Refuse an output file path before any work is done: a directory, a missing parent,
    a place inside a published golden version or inside the local golden ``store``, or an
    existing file without ``force``.  Raises :class:`~moesnap.errors.UsageError`."""
    p = Path(path)
    if not str(path):
        raise UsageError(f"{option}: empty path")
    if p.is_dir():
        raise UsageError(f"{p}: is a directory ({option} needs a file path)")
    if not p.parent.is_dir():
        raise UsageError(f"{p.parent}: output directory does not exist ({option} {p})")
    inside = published_version_above(p)
    if inside is not None:
        raise UsageError(f"{p}: inside the published golden version {inside}; refusing to write there ({option})")
    if store is not None and "://" not in os.fspath(store) and Path(store).is_dir():
        root = Path(os.path.realpath(store))
        if Path(os.path.realpath(p)).is_relative_to(root):
            raise UsageError(f"{p}: inside the golden store {store}; refusing to write there ({option})")
    if (p.exists() or p.is_symlink()) and not force:
        raise UsageError(f"{p}: exists (use --force to overwrite)")
    return p


def device_name(text: str) -> str:
    """``--device``: cpu, cuda or cuda:N, checked before torch loads (whether CUDA is there is asked later)."""
    if text in ("cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; choose cpu, cuda or cuda:N")


def dtype_arg(allowed: tuple[str, ...]):
    """``--dtype``'s type: one of ``allowed``, refused in the words every dtype error uses."""
    def parse(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose one of {', '.join(allowed)}")
        return text

    parse.__name__ = "dtype"
    return parse


def inject_syntax(spec: str) -> None:
    """A ``--inject`` spec's fault kind, checked before torch loads (the values need the model's config)."""
    from ..model.inject import EXAMPLE, KINDS

    kind, sep, _ = spec.strip().partition(":")
    if not sep and kind.strip().lower() not in KINDS:
        raise UsageError(f"--inject {spec!r}: expected KIND:KEY=VALUE,... (e.g. {EXAMPLE}); kinds: {', '.join(KINDS)}")
    if kind.strip().lower() not in KINDS:
        raise UsageError(f"--inject {spec!r}: unknown fault kind {kind.strip()!r}; choose one of {', '.join(KINDS)}")


def settings(a: argparse.Namespace, *, dtype: str | None = None, allowed: tuple[str, ...] | None = None) -> Settings:
    """The tolerance request of the command line (``--profile``, ``--config`` or ``./pyproject.toml``
    with a ``[tool.moesnap]`` table, ``--tol``, the candidate's ``dtype``), validated before any
    model or golden is read."""
    from ..judge.policy import DTYPES, ConfigFile

    return Settings(dtype=dtype, profile=a.profile, config=ConfigFile.find(a.config), overrides=tuple(a.tol),
                    allowed=allowed or DTYPES)


def emit(report: Report, a: argparse.Namespace, title: str) -> int:
    """Print the report (the table on stdout, or on stderr under ``--json -``), write ``--json`` / ``--html``;
    the exit code: 0 pass, 1 otherwise."""
    from ..judge.html import write_html
    from ..judge.report import text, write_json
    from ..util import printable

    to_stdout = a.json == STDOUT
    human = sys.stderr if to_stdout else sys.stdout
    for line in text(report):
        print(printable(line), file=human)
    if a.json:
        write_json(report, a.json)
        if not to_stdout:
            print(f"wrote {a.json}", file=human)
    if a.html:
        write_html(report, a.html, title=title)
        print(f"wrote {a.html}", file=human)
    return 0 if report.passed else 1
