"""Sub-commands beyond trace/model: each module registers its own parser."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    from . import cli_compare

    cli_compare.register(sub)
    from . import cli_calibrate

    cli_calibrate.register(sub)
    from . import cli_check

    cli_check.register(sub)
    from . import cli_goldens

    cli_goldens.register(sub)
