"""Sub-commands beyond trace/model: goldens, compare, check, calibrate."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    return None
