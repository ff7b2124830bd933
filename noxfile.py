"""nox sessions for moesnap. `nox -s light` is what CI runs."""

from __future__ import annotations

import nox

nox.options.sessions = ["light"]
nox.options.reuse_existing_virtualenvs = True

# CPU environments take the CPU build of torch that lies on local disk; a bare
# `torch` would pull a multi-GB CUDA build.
CPU = ["-c", "constraints-cpu.txt"]
QUICK = "not slow and not gpu and not crosscheck"


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


# Modules the type checker holds to account: every module of the package (a new one joins as it lands).
TYPED = [f"src/moesnap/{m}" for m in (
    "__init__.py", "__main__.py", "case.py", "errors.py", "stages.py", "util.py",
    "gguf/__init__.py", "gguf/reader.py", "gguf/tokenizer.py", "gguf/hf_tokenizer.py", "gguf/pretokenizers.py",
    "gguf/quants_torch.py",
    "model/__init__.py", "model/config.py", "model/tensors.py", "model/recorder.py", "model/weights.py",
    "model/inject.py", "model/synth.py", "model/synth_families.py", "model/ggml.py", "model/candidate.py", "model/reference.py",
    "model/checkpoint.py", "model/load.py", "_version.py",
    "store/__init__.py", "store/base.py", "store/case.py", "store/memory.py", "store/zarr.py", "store/local.py",
    "store/s3.py", "store/open.py", "store/stream.py",
    "judge/__init__.py", "judge/tolerances.py", "judge/classify.py", "judge/routing.py", "judge/compare.py", "judge/report.py",
    "judge/verdict.py", "judge/ratios.py", "judge/chunked.py", "judge/pool.py", "judge/margins.py", "judge/attrs.py",
    "judge/experts.py", "judge/device.py", "judge/torch_stats.py", "judge/torch_rows.py",
    "judge/policy.py", "judge/suite.py", "judge/html.py", "judge/distribution.py", "run/serving.py",
    "model/faults.py", "model/kvcache.py", "model/serve.py", "model/kernels.py", "model/draft.py",
    "model/replay.py", "model/static_replay.py", "model/forward_io.py", "model/families.py", "model/candidate_mla.py",
    "model/candidate_moe.py",
    "model/inject_serving.py",
    "run/__init__.py", "run/trace.py", "run/goldens.py", "run/check.py", "run/compare.py", "run/calibrate.py",
    "run/rereference.py", "run/rereference_device.py", "run/importing.py", "run/prompts.py", "run/goldens_show.py", "run/goldens_diff.py",
    "run/goldens_diff_text.py",
    "capture/__init__.py", "capture/_flat.py", "capture/_decode.py", "capture/hf.py", "capture/llama.py", "capture/sglang.py",
    "capture/sglang_names.py",
    "capture/aprt.py", "capture/_ptload.py",
    "model/expert_parallel.py", "capture/shards.py", "run/expert_parallel.py",
    "cli/__init__.py", "cli/main.py", "cli/goldens.py", "cli/check.py", "cli/compare.py", "cli/calibrate.py",
    "cli/_options.py", "cli/importing.py",
    "testing/__init__.py", "testing/store.py", "testing/strategies.py", "store/arrays.py", "pytest_plugin.py",
    "capture/hf_gpt_oss.py", "capture/hf_build.py", "capture/hf_families.py", "capture/llama_names.py",
    "model/checkpoint_gpt_oss.py", "judge/family_tolerances.py",
)]
# The public modules, held to --strict.
STRICT = [f"src/moesnap/{m}" for m in ("case.py", "errors.py", "stages.py", "store/base.py", "store/open.py", "store/arrays.py",
                                       "judge/tolerances.py", "judge/compare.py")]


@nox.session(default=False)
def lint(session: nox.Session) -> None:
    """ruff (pyflakes, pycodestyle errors, bugbear) over everything; mypy over the typed modules, --strict on the public ones."""
    # pytest for its types: pytest.fail is NoReturn (the plugin narrows on it); the rest is --ignore-missing-imports
    session.install("ruff==0.17.6", "mypy==2.4.1", "pytest>=8")  # pinned: a new release must not turn CI red unseen
    session.run("ruff", "check", "src", "tests", "benchmarks", "tools", "noxfile.py", *session.posargs)
    session.run("mypy", "--ignore-missing-imports", "--follow-imports=silent", *TYPED)
    session.run("mypy", "--strict", "--ignore-missing-imports", "--follow-imports=silent", *STRICT)


@nox.session(default=False)
def props(session: nox.Session) -> None:
    """The hypothesis property suites at the nightly profile (>= 10,000 examples each)."""
    _install(session)
    session.run("pytest", "-q", "-m", "props or fuzz", *session.posargs,
                env={"HYPOTHESIS_PROFILE": "nightly", "MOESNAP_NO_PROGRESS": "1"})


def _cuda(session: nox.Session) -> None:
    out = session.run("python", "-c", "import torch; print(int(torch.cuda.is_available()))", silent=True)
    if str(out).strip() != "1":
        session.skip("skipped: no CUDA")


@nox.session(default=False, venv_backend="none")
def check_gpu(session: nox.Session) -> None:
    """The bundled goldens against the CUDA candidate, float32 and bfloat16, plus planted faults (current env)."""
    _cuda(session)
    session.run("python", "tools/gpu_sessions.py", "check_gpu", *session.posargs)


@nox.session(default=False, venv_backend="none")
def check_multi_gpu(session: nox.Session) -> None:
    """The expert-parallel candidate on every GPU of the host (NCCL), full-width goldens (current env)."""
    out = session.run("python", "-c", "import torch; print(torch.cuda.device_count())", silent=True)
    if int(str(out).strip() or 0) < 2:
        session.skip("skipped: needs 2 CUDA devices")
    session.run("python", "tools/gpu_sessions.py", "multi_gpu", "--layers", "8", *session.posargs)


@nox.session(default=False, venv_backend="none")
def heavy(session: nox.Session) -> None:
    """Full-size qwen3-30b-a3b (48 layers): goldens on the CPU, check on CUDA in float32 and bfloat16 (current env)."""
    _cuda(session)
    session.run("python", "tools/gpu_sessions.py", "heavy", *session.posargs)


# The committed goldens of the bundled tiny model (goldens/tiny): two prompts and a token-id case.
TINY_GOLDENS = ["--prompt", "The quick brown fox", "--prompt", "def main():\n    return 0",
                "--tokens", "1,2,3,259,260,271,42,7"]


@nox.session(default=False)
def goldens(session: nox.Session) -> None:
    """Regenerate the committed tiny goldens as a new version, diff it against the previous one, keep the last two."""
    from pathlib import Path

    _install(session)
    suite = Path("goldens/tiny")
    previous = max((p.name for p in suite.glob("v*") if (p / "published.json").is_file()), default=None)
    out = session.run("moesnap", "-q", "goldens", "generate", "src/moesnap/data/tiny.gguf", "--suite", "tiny",
                      "--store", "goldens", *TINY_GOLDENS, *session.posargs, silent=True)
    new = out.strip().splitlines()[-1]
    session.log(f"generated {new}")
    if previous is not None:   # exit 1 means "some stages changed": reported, not a failure
        session.run("moesnap", "-q", "goldens", "diff", f"tiny@{previous}", new, "--store", "goldens",
                    success_codes=[0, 1])
    session.run("moesnap", "-q", "goldens", "prune", "tiny", "--keep", "2", "--store", "goldens")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Every benchmarks/bench_*.py; each prints its figures as ratios to a baseline measured in the same run."""
    from pathlib import Path

    _install(session)
    for script in sorted(Path("benchmarks").glob("bench_*.py")):
        session.run("python", str(script), *session.posargs, env={"MOESNAP_NO_PROGRESS": "1"})
