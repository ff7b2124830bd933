"""The command line over slowed stores, a test double for the crash and concurrency tests.

``python slow_cli.py WRITE_DELAY READ_DELAY ARGS...`` runs ``moesnap ARGS...`` with every golden
store it opens built with ``write_delay=WRITE_DELAY, read_delay=READ_DELAY`` (seconds after each
array written, before each case read), which widens the window in which a test kills the writer
or the server.  Exits 3 if the command never opened a store (the double would then test nothing).
main() runs as the process's entry point, as the ``moesnap`` script runs it (SIGINT handled for the
whole process).
"""

from __future__ import annotations

import os
import sys

import moesnap.store
from moesnap.cli.main import main
from moesnap.store import GoldenStore, LocalGoldenStore, RemoteGoldenStore


def run(argv: list[str]) -> int:
    write_delay, read_delay, args = float(argv[0]), float(argv[1]), argv[2:]
    opened: list[str] = []

    def open_slow(root: str | os.PathLike | None = None) -> GoldenStore:
        text = os.fspath(root if root is not None else moesnap.store.DEFAULT_ROOT)
        opened.append(text)
        cls = RemoteGoldenStore if "://" in text else LocalGoldenStore
        return cls(text, write_delay=write_delay, read_delay=read_delay)

    moesnap.store.open_store = open_slow   # the command line and run/ import it from here when called
    sys.argv = ["moesnap", *args]
    code = main()                          # without arguments: the process's entry point
    if not opened:
        print("slow_cli: the command opened no store", file=sys.stderr)
        return 3
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
