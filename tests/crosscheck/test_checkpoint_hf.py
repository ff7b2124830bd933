"""HF checkpoints written by transformers' ``save_pretrained`` as the golden source: the golden from the
checkpoint equals the golden from the GGUF of the same weights, single-file and sharded, and
transformers as a candidate engine runs from the checkpoint too."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers", reason="transformers not installed (pip install 'moesnap[transformers]')")

import torch  # noqa: E402

from moesnap.capture.hf import model_from_gguf  # noqa: E402
from moesnap.model.synth import tiny_path  # noqa: E402
from moesnap.model.weights import GGUFModel  # noqa: E402
from moesnap.store.case import load_case  # noqa: E402

from .foreign_run import cli  # noqa: E402

pytestmark = pytest.mark.crosscheck
TOKENS = "1,7,19,33,47,61,88,120,200,250"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfck")
    hf = model_from_gguf(GGUFModel.open(tiny_path()), dtype=torch.float32)
    hf.save_pretrained(root / "single")
    hf.save_pretrained(root / "sharded", max_shard_size="200KB")
    return root


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_checkpoint_golden_equals_gguf_golden(checkpoints, tmp_path, figures, layout):
    ck = checkpoints / layout
    assert (ck / "model.safetensors.index.json").exists() == (layout == "sharded")
    for src, out in ((ck, "ck.zarr"), (tiny_path(), "gguf.zarr")):
        rc, text = cli("-q", "trace", str(src), "--tokens", TOKENS, "--out", str(tmp_path / out))
        assert rc == 0, text
    a, b = load_case(tmp_path / "ck.zarr"), load_case(tmp_path / "gguf.zarr")
    worst = 0.0
    for s in b.layers:
        d = float(np.abs(a.layers[s].astype(np.float64) - b.layers[s]).max())
        worst = max(worst, d / max(1e-30, float(np.abs(b.layers[s]).max())))
    figures(f"save_pretrained-{layout}", "ckpt-vs-gguf", "max rel |Δ| any stage", worst)
    assert worst <= 1e-6


def test_transformers_engine_from_a_checkpoint_is_judged_against_its_golden(checkpoints, tmp_path):
    ck, store = checkpoints / "sharded", tmp_path / "store"
    rc, text = cli("-q", "goldens", "generate", str(ck), "--suite", "ck", "--store", str(store), "--tokens", TOKENS)
    assert rc == 0, text
    rc, text = cli("-q", "trace", str(ck), "--tokens", TOKENS, "--engine", "transformers",
                   "--out", str(tmp_path / "hf.zarr"))
    assert rc == 0, text
    rc, text = cli("-q", "compare", "ck", str(tmp_path / "hf.zarr"), "--store", str(store), "--allow-missing")
    assert rc == 0 and "verdict: pass" in text, text[-2000:]
