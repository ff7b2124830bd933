"""docs/cli.md is what tools/cli_reference.py makes of the parser today (issue 13, item 5)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from moesnap.cli.main import build_parser, subcommands

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "tools" / "cli_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_cli_md_is_up_to_date():
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == _tool().reference(build_parser()), \
        "docs/cli.md is out of date with the parser: run python tools/cli_reference.py and commit docs/cli.md"


def test_the_reference_names_every_command_and_option():
    text = _tool().reference(build_parser())
    parser = build_parser()
    for p in [parser, *subcommands(parser)]:
        assert f"\n## {p.prog}\n" in text
        for action in p._actions:
            if not isinstance(action, argparse._HelpAction):
                for opt in action.option_strings:
                    assert f"`{opt}" in text or f", {opt}" in text, (p.prog, opt)


def test_check_mode_reports_a_stale_page(tmp_path, capsys):
    tool = _tool()
    page = tmp_path / "cli.md"
    assert tool.main(["--out", str(page)]) == 0
    assert tool.main(["--check", "--out", str(page)]) == 0
    page.write_text(page.read_text() + "edited by hand\n")
    assert tool.main(["--check", "--out", str(page)]) == 1
    assert "out of date" in capsys.readouterr().err


def test_readme_points_at_the_reference():
    assert "Full reference: docs/cli.md" in (ROOT / "README.md").read_text(encoding="utf-8")
