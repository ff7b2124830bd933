"""Many `moesnap` processes at once without importing torch in each: a test double for the signal tests.

``python fork_cli.py`` imports torch and moesnap once, then reads one JSON request per line on
stdin, ``{"name", "argv", "stdout", "stderr", "write_delay", "linger"}``, and forks a child for each:
the child writes its stdout (line-buffered) and stderr to the files named, opens every golden
store with ``write_delay`` (as :mod:`slow_cli` does), and runs ``moesnap ARGV`` through main() as
the process's entry point (as the ``moesnap`` script does: SIGINT handled for the whole process);
with ``linger`` a thread is still busy for that many seconds when the command returns, as a pool's
worker threads are, which the interpreter joins before it exits.  On stdout this process says
``ready`` once imported, ``started NAME PID`` for each child and ``ended NAME STATUS`` (the exit
code, or minus the signal that ended it) as each one ends; it exits when stdin closes and every
child has ended.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback


def _child(req: dict) -> None:
    """In the forked child: never returns."""
    import moesnap.store
    from moesnap.cli.main import main
    from moesnap.store import LocalGoldenStore

    out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdout.reconfigure(line_buffering=True)     # the version line is in the file as it is printed
    delay = float(req.get("write_delay") or 0.0)
    moesnap.store.open_store = lambda root=None: LocalGoldenStore(root or moesnap.store.DEFAULT_ROOT,
                                                                  write_delay=delay)
    sys.argv = ["moesnap", *req["argv"]]
    try:
        code = main()
    finally:
        if req.get("linger"):
            threading.Thread(target=time.sleep, args=(float(req["linger"]),)).start()
    sys.exit(code)


def serve() -> None:
    import torch  # noqa: F401  (the slow import, once, before any child)

    import moesnap.cli.main  # noqa: F401

    children: dict[int, str] = {}
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    say("ready")
    for raw in sys.stdin:
        req = json.loads(raw)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                _child(req)            # ends in SystemExit: the child's interpreter shuts down as usual
            except SystemExit:
                raise
            except BaseException:
                traceback.print_exc()
                os._exit(99)           # never go on serving in the child
        children[pid] = req["name"]
        say(f"started {req['name']} {pid}")
    while children:
        pid, status = os.wait()
        code = os.waitstatus_to_exitcode(status)
        say(f"ended {children.pop(pid)} {code}")


if __name__ == "__main__":
    serve()
