"""vLLM's port of SGLang's dumper (``vllm/utils/debug_utils/dumper.py``, vLLM's main branch, unmodified) on a
module tree named and called as vLLM's Qwen3-MoE (tests/capture/vllm_tree.py), imported with ``--format
vllm`` (the SGLang reader: same file names and files) and judged against the committed goldens.

A committed dump (tests/data/vllm/tp2_fault_layer2.tgz: TP = 2 with a 5 % error inside the fused MoE of
layer 2, filtered with ``DUMPER_FILTER`` to the two MoE outputs of layer 2 and the bookkeeping) runs
everywhere; fresh unfiltered dumps (float32, bfloat16, TP = 2, prefill + 2 decode passes after a warm-up,
``core``) need the dumper's file at ``$MOESNAP_VLLM_DUMPER`` (no vLLM wheel ships it) and pyzmq.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flat_dumps import CASE0, assert_refused, invoke
from moesnap.store.case import load_case

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data" / "vllm"
sys.path.insert(0, str(HERE))
from vllm_tree import dumper_path  # noqa: E402


def _import(dump: Path, out: Path) -> str:
    code, text, err = invoke(["import", "--format", "vllm", str(dump), "--like", str(CASE0), "--out", str(out)])
    assert code == 0, err
    return text


def _compare(out: Path, report: Path) -> tuple[int, str, dict]:
    code, text, err = invoke(["compare", str(CASE0), str(out), "--allow-missing", "--json", str(report)])
    assert code in (0, 1), err
    return code, text, json.loads(report.read_text())


def test_committed_tp2_dump_with_a_fault_inside_the_fused_moe(tmp_path):
    with tarfile.open(DATA / "tp2_fault_layer2.tgz") as t:
        t.extractall(tmp_path, filter="data")
    dump, out = tmp_path / "exp", tmp_path / "cand.zarr"
    meta = torch.load(next(dump.glob("step=0___rank=1___*mlp.output*")), weights_only=True)["meta"]
    assert meta["vllm_parallel_info"]["tp_size"] == 2 and "sglang_parallel_info" not in meta
    text = _import(dump, out)
    assert text.startswith("vllm dump ")
    case = load_case(out)
    assert case.attrs["producer"] == "vllm" and case.attrs["ranks"] == [0, 1]
    assert case.attrs["sharding"]["vllm_parallel_info"]["ep_size"] == 2
    (parted,) = case.attrs["parted"]                       # each rank's experts' output is a partial sum
    assert (parted["stage"], parted["layer"]) == ("moe_out", 2) and 0.04 < parted["rel_l2"] < 0.06
    golden = load_case(CASE0).layers["moe_out"][2]
    assert np.allclose(case.extra["parted/0"], golden, rtol=1e-5, atol=1e-5)          # summed over the ranks
    code, text, rep = _compare(out, tmp_path / "r.json")
    assert code == 1 and (rep["first_divergence"]["layer"], rep["first_divergence"]["stage"]) == (2, "moe_out")
    judged = [(r.get("source") is not None, r["verdict"]) for r in rep["results"] if (r["layer"], r["stage"]) == (2, "moe_out")]
    assert judged == [(True, "MATCH"), (False, "DIVERGE")], text
    assert "the error arises between non_intrusive__model.layers.2.mlp.experts.output and " \
           "non_intrusive__model.layers.2.mlp.output" in text


RUNS = {
    "float32": [],
    "bfloat16": ["--dtype", "bfloat16"],
    "tp2": ["--tp", "2", "--port", "29661"],
    "tp2_bf16": ["--tp", "2", "--port", "29663", "--dtype", "bfloat16"],
    "decode": ["--prompt", "17", "--decode", "2", "--warmup"],
    "core": ["--mode", "core"],
}


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    if dumper_path() is None:
        pytest.skip("vLLM's dumper.py is not at $MOESNAP_VLLM_DUMPER (vllm/utils/debug_utils/dumper.py of vLLM's "
                    "main branch; no vLLM wheel ships it): the committed dump above still runs")
    pytest.importorskip("zmq", reason="vLLM's dumper imports zmq (pip install pyzmq)")
    root = tmp_path_factory.mktemp("vllm")
    procs = {k: subprocess.Popen([sys.executable, str(HERE / "vllm_tree.py"), str(root / k), *args],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for k, args in RUNS.items()}
    for p in procs.values():
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-2000:]
    return {k: root / k / "exp" for k in RUNS}


@pytest.mark.parametrize("run", ["float32", "bfloat16", "tp2", "tp2_bf16"])
def test_a_fresh_unfiltered_dump_passes_with_every_stage_it_holds_judged(tmp_path, dumps, run):
    out = tmp_path / "cand.zarr"
    _import(dumps[run], out)
    case = load_case(out)
    assert "parted" not in case.attrs                       # partial sums that add up are no second value
    assert "non_intrusive__model.layers.N.output.0" in case.attrs["ignored_names"]
    if run.startswith("tp2"):
        assert case.attrs["ranks"] == [0, 1] and case.attrs["sharding"]["q"] == "t h[tp] d"
        assert "attn_out" not in case.attrs["sharding"]         # o_proj reduces inside: replicated
    code, text, rep = _compare(out, tmp_path / "r.json")
    assert code == 0 and rep["verdict"] == "pass", text
    assert rep["dtype"] == ("bfloat16" if "bf16" in run or run == "bfloat16" else "float32")
    cov = rep["coverage"]
    # 15 stages x 4 layers x 19 tokens (no topk module: no topk_ids, topk_weights; no expert_out), embed,
    # final_norm, and logits of the last token (logits_processor.output)
    assert cov["cells_held"] == cov["cells_judged"] == 15 * 4 * 19 + 2 * 19 + 1, text


def test_prefill_and_decode_passes_import_as_steps_after_a_warm_up(tmp_path, dumps):
    out = tmp_path / "cand.zarr"
    _import(dumps["decode"], out)
    case = load_case(out)
    assert case.tokens.size == 17 and case.attrs["forward_pass"] == 1
    assert [s.attrs["positions"] for s in case.steps] == [[17], [18]]
    code, text, rep = _compare(out, tmp_path / "r.json")
    assert code == 0 and rep["verdict"] == "pass", text
    assert "top-1 agreement 3 of 3 rows" in text, text


def test_a_core_dump_is_refused_with_the_hint(tmp_path, dumps):
    out = tmp_path / "o.zarr"
    assert_refused(["import", "--format", "vllm", str(dumps["core"]), "--like", str(CASE0), "--out", str(out)],
                   str(dumps["core"]), "bookkeeping", "DUMPER_NON_INTRUSIVE_MODE=all")
    assert not out.exists()
