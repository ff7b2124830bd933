"""Shared test configuration: hypothesis profiles and the GPU marker."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# tests/run's helpers (test_goldens.run_cli, tree_digest, ...) are imported by tests in other folders:
# on the path whatever the order or subset of collection
sys.path.insert(0, str(Path(__file__).resolve().parent / "run"))

settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "nightly",
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
#: the light suite (profile ci) runs each ``props`` / ``fuzz`` property at this many examples: ``nox -s props``
#: runs the same properties at the nightly profile's 10,000 (a property with @settings of its own keeps them)
settings.register_profile("ci-props", parent=settings.get_profile("ci"), max_examples=25)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
settings.load_profile(PROFILE)


def pytest_collection_modifyitems(config, items):
    import torch
    from hypothesis.errors import InvalidArgument

    if PROFILE == "ci":
        light = settings(settings.get_profile("ci-props"))
        for item in items:
            fn = getattr(item, "function", None)
            if ("props" in item.keywords or "fuzz" in item.keywords) and hasattr(fn, "hypothesis"):
                try:
                    light(fn)
                except InvalidArgument:   # its own @settings, or a parametrized test's function seen before
                    pass
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="skipped: no CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_path():
    from importlib.resources import files

    return files("moesnap") / "data" / "tiny.gguf"
