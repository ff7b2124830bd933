"""nox sessions for moesnap. `nox -s light` is what CI runs."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["light"]
nox.options.reuse_existing_virtualenvs = True

# CPU environments take the CPU build of torch that lies on local disk; a bare
# `torch` would pull a multi-GB CUDA build.
CPU = ["-c", "constraints-cpu.txt"]
QUICK = "not slow and not heavy and not gpu and not crosscheck"


def _install(session: nox.Session, extras: str = "test") -> None:
    session.install(*CPU, "-e", f".[{extras}]")


@nox.session
def light(session: nox.Session) -> None:
    """CPU unit, integration and property tests on the bundled tiny model (what CI runs)."""
    _install(session)
    session.run("pytest", "-m", QUICK, "-q", *session.posargs, env={"HYPOTHESIS_PROFILE": "ci", "MOESNAP_NO_PROGRESS": "1"})


@nox.session(default=False)
def crosscheck(session: nox.Session) -> None:
    """The reference against HF transformers and llama.cpp (llama-cpp-python builds from source, ~5 min)."""
    _install(session)
    session.install(*CPU, "-r", "requirements-crosscheck.txt", env={"CMAKE_ARGS": "-DGGML_NATIVE=OFF"})
    session.run("pytest", "-m", "crosscheck", "-q", "-s", "tests/crosscheck", *session.posargs,
                env={"MOESNAP_NO_PROGRESS": "1"})


@nox.session(default=False)
def props(session: nox.Session) -> None:
    """The hypothesis property suites at the nightly profile (>= 10,000 examples each)."""
    _install(session)
    session.run("pytest", "-q", "-k", "prop or fuzz", *session.posargs,
                env={"HYPOTHESIS_PROFILE": "nightly", "MOESNAP_NO_PROGRESS": "1"})
