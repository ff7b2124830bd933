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


def _cuda(session: nox.Session) -> None:
    out = session.run("python", "-c", "import torch; print(int(torch.cuda.is_available()))", silent=True)
    if str(out).strip() != "1":
        session.skip("skipped: no CUDA")


@nox.session(default=False, venv_backend="none")
def check_gpu(session: nox.Session) -> None:
    """The bundled goldens against the CUDA candidate, float32 and bfloat16, plus planted faults (current env)."""
    _cuda(session)
    session.run("python", "-m", "moesnap.sessions", "check_gpu", *session.posargs)


@nox.session(default=False, venv_backend="none")
def heavy(session: nox.Session) -> None:
    """Full-size qwen3-30b-a3b (48 layers): goldens on the CPU, check on CUDA in float32 and bfloat16 (current env)."""
    _cuda(session)
    session.run("python", "-m", "moesnap.sessions", "heavy", *session.posargs)
