"""What compare says when the candidate cannot be the golden's model: the path of the candidate and both
layer counts, and a dump recording another model file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import moesnap
from moesnap.errors import GoldenError
from moesnap.store import open_store
from moesnap.store.case import save_case

GOLDENS = str(Path(__file__).resolve().parents[2] / "goldens")


def test_a_candidate_with_more_layers_names_its_path_and_both_counts(tmp_path):
    g = open_store(GOLDENS).open_version("tiny").read_case("case0")
    deeper = replace(g, layers={s: np.concatenate([a, a[:2]]) for s, a in g.layers.items()}, attrs={})
    path = tmp_path / "deep.zarr"
    save_case(path, deeper)
    with pytest.raises(GoldenError, match=rf"{path}: case 'case0' holds 6 layers, the golden 4 \(tiny@v0001\)"):
        moesnap.compare("tiny", str(path), store=GOLDENS, show_progress=False)
