"""Write the command-line reference, docs/cli.md, from moesnap's argparse parser:
``python tools/cli_reference.py`` (``--check``: exit 1 when docs/cli.md is out of date).

Every command in the order ``moesnap --help`` lists them, its usage line and every argument with
its help text.  The usage lines are built here rather than by argparse, whose wrapping depends on
the terminal's width and on the Python version; the page is the same everywhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "cli.md"


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper()


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _usage_item(action: argparse.Action) -> str:
    if not action.option_strings:
        return _metavar(action) + (" ..." if isinstance(action, argparse._SubParsersAction) else "")
    opt = max(action.option_strings, key=len)       # the long form
    text = f"{opt} {_metavar(action)}" if _takes_value(action) else opt
    if isinstance(action, argparse._AppendAction):
        text += " ..." if action.required else ""
        return text if action.required else f"[{text}]..."
    return text if action.required else f"[{text}]"


def _shown(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS]


def usage(parser: argparse.ArgumentParser) -> str:
    """``moesnap check MODEL --suite SUITE [--store STORE] ...``: positionals and required options first;
    a command's subcommands (``COMMAND ...``) last."""
    shown = _shown(parser)
    sub = [a for a in shown if isinstance(a, argparse._SubParsersAction)]
    first = [a for a in shown if (not a.option_strings or a.required) and a not in sub]
    rest = [a for a in shown if a.option_strings and not a.required]
    return " ".join([parser.prog, *(_usage_item(a) for a in first + rest + sub)])


def _help(action: argparse.Action, prog: str) -> str:
    """The help text as ``--help`` shows it (``%(default)s`` and the like expanded), on one line."""
    text = str(action.help or "")
    if "%" in text:
        params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
        params["prog"] = prog
        text = text % params
    return " ".join(text.split())


def _argument(action: argparse.Action) -> str:
    if not action.option_strings:
        return _metavar(action)
    forms = sorted(action.option_strings, key=len, reverse=True)
    return ", ".join(f"{o} {_metavar(action)}" if _takes_value(action) else o for o in forms)


def _commands(parser: argparse.ArgumentParser, help_line: str = "") -> list[tuple[argparse.ArgumentParser, str]]:
    """(parser, its one-line help in the parent's listing), depth first, in the order --help lists them."""
    found = [(parser, help_line)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {c.dest: str(c.help or "") for c in action._choices_actions}
            for name, child in action.choices.items():
                found += _commands(child, listed.get(name, ""))
    return found


def reference(parser: argparse.ArgumentParser) -> str:
    lines = ["# moesnap command-line reference", "",
             "Generated from the parser (`moesnap.cli.main.build_parser`) by `python tools/cli_reference.py`; do not "
             "edit by hand (`tests/cli/test_cli_reference.py` fails when this page is out of date).", "",
             "Exit codes: 0 pass, 1 a divergence or an inconclusive check, 2 bad input or usage (one line on stderr), "
             "3 an internal error.", ""]
    lines += ["Commands:", ""]
    commands = _commands(parser)
    for p, help_line in commands[1:]:
        anchor = p.prog.replace(" ", "-")
        lines.append(f"- [`{p.prog}`](#{anchor}){' — ' + help_line if help_line else ''}")
    lines.append("")
    for p, help_line in commands:
        lines += [f"## {p.prog}", ""]
        about = help_line or p.description or ""
        if about:
            lines += [" ".join(about.split()), ""]
        lines += ["```", usage(p), "```", ""]
        for action in _shown(p):
            lines.append(f"- `{_argument(action)}`: {_help(action, p.prog)}"
                         + (" (required)" if action.option_strings and action.required else ""))
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/cli.md differs from what the parser gives")
    ap.add_argument("--out", type=Path, default=OUT, help="where to write (default docs/cli.md)")
    a = ap.parse_args(argv)

    from moesnap.cli.main import build_parser

    text = reference(build_parser())
    if a.check:
        current = a.out.read_text(encoding="utf-8") if a.out.is_file() else ""
        if current != text:
            print(f"{a.out} is out of date: run python tools/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text, encoding="utf-8")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
