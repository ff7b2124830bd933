"""moesnap: find where a GPU forward pass of a Mixture-of-Experts LLM goes wrong.

The Python API (the command line is a thin layer over the same functions)::

    import moesnap

    # goldens: the reference forward of a model, every stage of every layer, versioned in a store
    ref = moesnap.generate("model.gguf", "mysuite", [[1, 2, 3], "Hello"], store="goldens")
    # ... past the prompt: each case followed by the reference's greedy continuation of 8 tokens
    # (or continuation=[[5, 6], " world"], one per case): the golden of 8 decode steps, served by
    # moesnap.check(..., decode=8) (a prefill, then 8 steps through a KV cache)
    ref = moesnap.generate("model.gguf", "served", [[1, 2, 3], "Hello"], store="goldens", decode=8)

    # moesnap's own candidate forward (CUDA or CPU) judged against them
    report = moesnap.check("model.gguf", "mysuite", store="goldens", device="cuda", dtype="bfloat16")
    assert report.passed, report.summary()

    # another engine: record its stages, then judge them
    rec = moesnap.Recorder()
    rec.save("tokens", None, ids); rec.save("moe_out", 0, tensor)      # ... every stage you have
    report = moesnap.compare("mysuite", rec.case(), store="goldens", allow_missing=True)

    case = moesnap.trace("model.gguf", [1, 2, 3])                       # one forward, every stage

Everything is imported on first use, so ``import moesnap`` stays cheap.  Errors are
:class:`moesnap.MoesnapError` subclasses with one-line messages naming the file and the problem.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .case import Case
    from .errors import MoesnapError
    from .judge.report import Report
    from .judge.tolerances import Tolerances
    from .model.recorder import ArrayRecorder as Recorder
    from .run.check import check
    from .run.compare import compare
    from .run.goldens import generate_suite as generate
    from .run.trace import trace

__all__ = ["__version__", "check", "compare", "trace", "generate", "Recorder", "Report", "Case", "Tolerances",
           "MoesnapError"]

_LAZY = {
    "check": ("run.check", "check"),
    "compare": ("run.compare", "compare"),
    "trace": ("run.trace", "trace"),
    "generate": ("run.goldens", "generate_suite"),
    "Recorder": ("model.recorder", "ArrayRecorder"),
    "Report": ("judge.report", "Report"),
    "Case": ("case", "Case"),
    "Tolerances": ("judge.tolerances", "Tolerances"),
    "MoesnapError": ("errors", "MoesnapError"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'moesnap' has no attribute {name!r}")
    from importlib import import_module

    module, attr = _LAZY[name]
    value = getattr(import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
