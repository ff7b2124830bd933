"""`check --help` names every fault kind `--inject` takes (the help is written without importing torch)."""

from __future__ import annotations

import re
import subprocess
import sys

from moesnap.cli import check as check_cli
from moesnap.model.inject import KINDS, PARTS


def test_the_help_names_every_fault_kind():
    assert check_cli._PARTS == tuple(PARTS)
    out = subprocess.run([sys.executable, "-m", "moesnap", "check", "--help"], capture_output=True, text=True,
                         check=True).stdout
    text = " ".join(out.split())
    named = {k for k in KINDS if re.search(rf"(?<![\w_]){re.escape(k)}[:\[]", text)}
    assert named == set(KINDS), sorted(set(KINDS) - named)
