"""Ctrl-C on `moesnap goldens generate`: a real SIGINT at several points of a real process (issue 19).

Wherever it lands, the command says ``moesnap: interrupted`` and nothing else on stderr (no
traceback, from the command or from the interpreter's shutdown), exits 130, and leaves the store
with no staging or trash directory and a version that is either published whole (its checksums
verified) or absent.  The runs go at once, each on its own store, each interrupted when its point
is reached (a file appearing in the store, the version line), forked from one process that has
imported torch already (:mod:`fork_cli`): a few seconds in all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from moesnap.cli.main import main
from moesnap.store import LocalGoldenStore

FORK_CLI = Path(__file__).with_name("fork_cli.py")
INPUTS = ["--prompt", "def main():\n    return 0", "--tokens", "4,5"]


@dataclass
class Run:
    """One `goldens generate` interrupted by SIGINT where ``ready`` first holds, ``after`` seconds later."""

    name: str
    ready: Callable[["Run"], bool]
    write_delay: float = 0.0       # seconds after each array written
    after: float = 0.0
    published: bool | None = None  # True: must be published; False: must not; None: either
    linger: float = 0.0            # a thread still busy this long when the command returns
    root: Path = Path()
    pid: int | None = None
    code: int | None = None
    failure: str | None = None

    @property
    def suite(self) -> Path:
        return self.root / "s"

    @property
    def out(self) -> Path:
        return self.root.parent / "stdout"

    @property
    def err(self) -> Path:
        return self.root.parent / "stderr"

    def staged(self, pattern: str) -> bool:
        return any(self.suite.glob(f".staging-*/{pattern}"))

    def request(self, model: Path, tmp_path: Path) -> str:
        self.root = tmp_path / self.name.replace(" ", "_").replace("+", "plus") / "goldens"
        self.root.parent.mkdir(parents=True)
        argv = ["goldens", "generate", str(model), "--suite", "s", "--store", str(self.root), *INPUTS]
        return json.dumps({"name": self.name, "argv": argv, "stdout": str(self.out), "stderr": str(self.err),
                           "write_delay": self.write_delay, "linger": self.linger})

    def interrupt(self, timeout: float = 60.0) -> None:
        """Wait for the point (on a thread of its own), then send SIGINT."""
        assert self.pid is not None
        t0 = time.monotonic()
        while not self.ready(self):
            if self.code is not None:
                self.failure = f"{self.name}: the command ended ({self.code}) before its point"
                return
            if time.monotonic() - t0 > timeout:
                self.failure = f"{self.name}: its point never came"
                return
            time.sleep(0.001)
        time.sleep(self.after)
        os.kill(self.pid, signal.SIGINT)


def version_line(run: Run) -> bool:
    """The version line is on stdout (line-buffered in these runs): the version is published."""
    return run.out.is_file() and run.out.read_text().startswith("s@v")


RUNS = [
    # the first case's forward under way (its staging area is there, nothing written in it yet)
    Run("forward", lambda r: any(r.suite.glob(".staging-*")), write_delay=0.01, published=False),
    # the first case's arrays being written (slowed: 10 ms after each array)
    Run("writing", lambda r: r.staged("case0/layers/*/c"), write_delay=0.01, published=False),
    # between the cases: the second case's group being written
    Run("second case", lambda r: r.staged("case1/layers/*/c"), write_delay=0.01, published=False),
    # the last array of the last case written: publishing, held until whole
    Run("publishing", lambda r: r.staged("case1/logits/c"), write_delay=0.01),
    # the version line printed: the version stays, whole, while the interpreter joins a thread
    Run("version line", version_line, published=True, linger=1.0),
    Run("version line + 50 ms", version_line, after=0.05, published=True, linger=1.0),
]


def _said(line: str) -> tuple[str, str, int]:
    """``started NAME PID`` / ``ended NAME CODE`` (a name may hold spaces)."""
    word, _, rest = line.rstrip("\n").partition(" ")
    name, _, number = rest.rpartition(" ")
    return word, name, int(number)


def _run_all(runs: list[Run], model: Path, tmp_path: Path) -> None:
    server = subprocess.Popen([sys.executable, str(FORK_CLI)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "MOESNAP_NO_PROGRESS": "1"})
    assert server.stdin is not None and server.stdout is not None
    try:
        assert server.stdout.readline() == "ready\n"
        by_name = {run.name: run for run in runs}
        for run in runs:
            server.stdin.write(run.request(model, tmp_path) + "\n")
        server.stdin.close()
        for _ in runs:
            word, name, pid = _said(server.stdout.readline())
            assert word == "started"
            by_name[name].pid = pid
        watchers = [threading.Thread(target=run.interrupt) for run in runs]
        for w in watchers:
            w.start()
        for _ in runs:
            word, name, code = _said(server.stdout.readline())
            assert word == "ended"
            by_name[name].code = code
        for w in watchers:
            w.join()
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        for run in runs:             # no child outlives the test
            if run.pid is not None and run.code is None:
                try:
                    os.kill(run.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_sigint_at_any_point_says_interrupted_and_leaves_the_store_whole(tiny_path, tmp_path, capsys):
    runs = [Run(r.name, r.ready, r.write_delay, r.after, r.published, r.linger) for r in RUNS]
    _run_all(runs, Path(tiny_path), tmp_path)
    for run in runs:
        assert run.failure is None, run.failure
        err = run.err.read_text()
        assert run.code == 130 and err == "moesnap: interrupted\n", (run.name, run.code, err)
        left = sorted(p.name for p in run.suite.iterdir()) if run.suite.is_dir() else []
        assert not [n for n in left if n.startswith(".")], (run.name, left)      # no staging, no trash
        versions = LocalGoldenStore(run.root).versions("s") if run.suite.is_dir() else []
        published = versions == ["v0001"]
        assert published or versions == [], (run.name, left)
        if run.published is not None:
            assert published == run.published, (run.name, versions)
        assert (run.out.read_text() == "s@v0001\n") == published, run.name
        if published:                                      # whole: every case there, every checksum right
            capsys.readouterr()
            assert main(["-q", "goldens", "show", "s", "--store", str(run.root)]) == 0, run.name
            out = capsys.readouterr().out
            assert "case case1: 2 tokens" in out and "44 arrays, all verified" in out, out


def test_interrupted_in_process_the_writer_removes_its_staging_area(tiny_path, tmp_path, monkeypatch):
    """A KeyboardInterrupt inside generate (main called with arguments: no signal handling of its own)
    unwinds through the writer, which removes what it wrote; generate raises it on."""
    import moesnap.run.goldens as goldens

    real = goldens.status
    seen = []

    def interrupt_on_second_case(message, **kw):
        seen.append(message)
        if "(2 of 3)" in message:
            raise KeyboardInterrupt
        real(message, **kw)

    monkeypatch.setattr(goldens, "status", interrupt_on_second_case)
    root = tmp_path / "goldens"
    with pytest.raises(KeyboardInterrupt):
        goldens.generate(tiny_path, "s", store=LocalGoldenStore(root),
                         inputs=[("tokens", [1, 2, 3]), ("tokens", "4,5"), ("prompt", "hi")])
    assert any("(2 of 3)" in m for m in seen)
    assert sorted(p.name for p in (root / "s").iterdir()) == []


def test_a_sigint_while_the_store_publishes_is_delivered_after_it():
    """interrupts_held: a SIGINT during the block raises KeyboardInterrupt once the block is done."""
    from moesnap.store.base import interrupts_held

    done = []
    before = signal.signal(signal.SIGINT, signal.default_int_handler)    # Python's own: raises KeyboardInterrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)          # the handler would have run here, between bytecodes
                done.append("the block ran to its end")
        assert done == ["the block ran to its end"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_sigint_inside_an_import_comes_again_once_it_is_done(tmp_path):
    """torch's import runs Python code from C++, where a KeyboardInterrupt ends the process in
    std::terminate: the entry point's handler lets an import finish and raises the interrupt then."""
    (tmp_path / "slow_module.py").write_text(
        "import os, signal, time\n"
        "os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C in the middle of this import\n"
        "time.sleep(0.2)\n"
        "DONE = True\n")
    code = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from moesnap.cli.main import _Interrupts\n"
        "_Interrupts().install()\n"
        "try:\n"
        "    import slow_module\n"
        "    print('imported', slow_module.DONE, flush=True)\n"
        "    time.sleep(5)\n"
        "    print('never interrupted', flush=True)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted after the import', flush=True)\n"
        "    sys.exit(0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout == "imported True\ninterrupted after the import\n" and r.stderr == "", (r.stdout, r.stderr)
