"""Fixtures of the judge's tests."""

from __future__ import annotations

import numpy as np
import pytest

from judge_helpers import TOKENS
from moesnap.case import Case
from moesnap.model.recorder import ArrayRecorder
from moesnap.model.reference import run_reference


@pytest.fixture(scope="module")
def golden(tiny_path):
    """The reference's case of the tiny model on :data:`judge_helpers.TOKENS`."""
    rec = ArrayRecorder()
    run_reference(tiny_path, TOKENS, recorder=rec)
    return Case(tokens=np.asarray(TOKENS, np.int32), model={k: v for k, v in rec.model.items() if k != "tokens"},
                layers=rec.stacked())
