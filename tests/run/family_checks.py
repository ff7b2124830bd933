"""Helpers of the family check tests (test_check_deepseek.py, test_check_gpt_oss.py, test_check_llama_like.py):
a preset's goldens, a check against them, and what a report must show."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import moesnap
from moesnap.model.synth import make_model, preset
from moesnap.stages import LAYER_STAGES


def make_suite(root: Path, name: str, prompts: Sequence[Sequence[int]], decode: int) -> tuple[Path, Path]:
    """The preset ``name`` written under ``root`` and its goldens there: suite ``p`` (the ``prompts``) and
    suite ``d`` (the same with ``decode`` steps); (model path, store)."""
    path = make_model(root / f"{name}.gguf", preset(name))
    store = root / "store"
    moesnap.generate(path, "p", prompts, store=store)
    moesnap.generate(path, "d", prompts, store=store, decode=decode)
    return path, store


def check(suite: tuple[Path, Path], name: str, dtype: str, **kw: Any) -> Any:
    """``moesnap.check`` of the suite's model against its golden ``name`` in ``dtype``."""
    path, store = suite
    return moesnap.check(path, name, store=store, dtype=dtype, show_progress=False, **kw)


def assert_all_judged_pass(report: Any) -> None:
    """A pass with every cell judged; a low precision ran stage-local replay too."""
    cov = report.coverage()
    assert cov.held > 0 and cov.judged == cov.held, report.summary()
    assert report.verdict == "pass", report.summary()
    if report.dtype in ("bfloat16", "float16"):
        assert report.replay, "a low precision runs stage-local replay by default"


def introduced(report: Any) -> tuple[int, str] | None:
    """The first (layer, stage), in computation order, that fails in stage-local replay (None: none fails)."""
    bad = sorted((r.layer, LAYER_STAGES.index(r.stage), r.stage) for c in report.replay or () for r in c.results
                 if not r.verdict.passed and r.layer is not None)
    return (bad[0][0], bad[0][2]) if bad else None
