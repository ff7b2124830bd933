"""The expert-parallel candidate serves decode steps (``check --gpus N --decode N``): 2 gloo ranks on the CPU
here, each with a KV cache of its own, the experts spread over them; rank 0 judges every forward as the
single-device serving check does.

Measured on the CPU (torch 2.13, gloo, one thread per rank and in the single-device run): every stage of
every served forward (prompt and decode steps) is bit-identical to the single-device candidate's serving
run in float32, in both dispatch modes.  Each test is one launch of 2 processes (~10 s on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moesnap
from moesnap.cli.main import main
from moesnap.errors import UsageError
from moesnap.judge.policy import Policy
from moesnap.model.candidate import CandidateModel
from moesnap.model.load import open_model
from moesnap.model.synth import tiny_path
from moesnap.run.check import load_goldens, router_guides
from moesnap.run.expert_parallel import check_ep
from moesnap.run.serving import plan_serving, serve_pairs

GOLDENS = str(Path(__file__).resolve().parents[2] / "goldens")
STEPS = 4
N = 2


def _single_device_served(**kw) -> list[tuple[str, object]]:
    """The single-device candidate's serving run of every golden case (float32, router replay as the check
    runs it), on the threads each rank has: each forward's (name, recorded case)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // N))
    try:
        model = open_model(tiny_path())
        _, _, goldens = load_goldens("tiny", GOLDENS)
        policy = Policy.default("float32")
        s = plan_serving(model, goldens, device="cpu", dtype="float32", decode=STEPS, replay=False, **kw)
        cand = CandidateModel(model)
        cand.keep_weights()
        return [(p.name, p.candidate) for p in serve_pairs(cand, goldens, s, cand.faults(),
                                                            router_guides(goldens, policy))]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode, kw", [("alltoall", {}),
                                      pytest.param("allreduce", {"paged": True}, marks=pytest.mark.slow)])
def test_ep_serving_passes_every_step_and_equals_the_single_device_run_bit_for_bit(mode, kw):
    served: list = []
    rep = check_ep(tiny_path(), "tiny", store=GOLDENS, n_ranks=N, mode=mode, decode=STEPS, served=served, **kw)
    assert rep is not None and rep.verdict == "pass", rep.summary()
    steps = [c for c in rep.cases if c.step is not None]
    assert len(steps) == 3 * STEPS and all(c.n_tokens == 1 and c.passed for c in steps)
    cov = rep.coverage()
    assert cov.complete and cov.judged == cov.held
    assert cov.held == moesnap.check(tiny_path(), "tiny", store=GOLDENS, show_progress=False).coverage().held
    assert any(n.startswith(f"expert parallel: 2 ranks ({mode}, gloo") and "12 decode steps" in n for n in rep.notes)
    single = _single_device_served(**kw)
    assert [n for n, _ in served] == [n for n, _ in single] == [c.case for c in rep.cases]
    for (name, ep), (_, one) in zip(served, single):
        assert ep.attrs["positions"] == one.attrs["positions"], name
        for stage, want in {**one.model, **one.layers}.items():
            got = {**ep.model, **ep.layers}[stage]
            assert got.dtype == want.dtype and np.array_equal(got, want), (mode, name, stage)


def test_bfloat16_ep_serving_of_a_batch_judges_every_step_with_stage_local_replay():
    rep = check_ep(tiny_path(), "tiny", store=GOLDENS, n_ranks=N, mode="allreduce", dtype="bfloat16",
                   decode=STEPS, batch=True, paged=True)
    assert rep is not None and rep.verdict == "pass", rep.summary()
    cov = rep.coverage()
    assert cov.complete and cov.judged == cov.held
    assert rep.replay is not None and sum(c.step is not None for c in rep.replay) == 3 * STEPS
    assert all(c.passed for c in rep.replay)


def test_a_nan_expert_of_the_last_rank_is_named_at_its_step_layer_stage_and_rank(tmp_path):
    # on the tiny model, case1's first token routed to expert 4 at layer 3 (rank 1 of 2 owns 4-7) is the
    # one of decode step 1: its prompt and step 0 are clean, step 1 names the expert there
    g = dict(load_goldens("tiny", GOLDENS)[2])["case1"]
    ids = g.layers["topk_ids"][3]
    P = len(g.tokens) - STEPS
    assert not (ids[:P + 1] == 4).any() and (ids[P + 1] == 4).any()
    js = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "moesnap", "check", tiny_path(), "--suite", "tiny", "--store", GOLDENS,
                        "--gpus", str(N), "--decode", str(STEPS), "--inject", "nan:layer=3,expert=4", "--quiet",
                        "--json", str(js)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    d = json.loads(js.read_text())
    assert d["verdict"] == "fail"
    steps = {s["case"]: s["passed"] for s in d["steps"]}
    assert steps["case1/step0"] and not steps["case1/step1"]
    first = next(x for x in d["results"] if x["case"] == "case1/step1" and x["verdict"] != "MATCH")
    assert (first["layer"], first["stage"], first["verdict"]) == (3, "expert_out", "NAN_CANDIDATE")
    assert all(x["verdict"] == "MATCH" for x in d["results"] if x["case"] in ("case1", "case1/step0"))
    assert any(n.startswith("case1/step1: layer 3 / expert_out: NaN/Inf in 1 (token, slot) pairs, all routed to "
                            "expert 4 of rank 1") for n in d["notes"]), d["notes"]
    assert d["candidate"].startswith("moesnap expert-parallel candidate (2 ranks, alltoall, gloo, cpu float32)")


@pytest.mark.parametrize("args, words", [
    (["--decode", "2", "--cuda-graph"], "--cuda-graph: not with --gpus"),
    (["--decode", "40"], "--decode 40: golden case case0 holds 19 tokens"),
    (["--decode", "2", "--inject", "block_table:seq=0,block=0", "--batch"], "it needs a paged KV cache (--paged)"),
    (["--decode", "2", "--chunk", "0"], "--chunk 0: must be >= 1 token"),
])
def test_what_no_rank_could_serve_is_one_line_exit_2_before_any_rank_starts(capsys, args, words):
    code = main(["-q", "check", str(tiny_path()), "--suite", "tiny", "--store", GOLDENS, "--gpus", str(N), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err, err


def test_refused_in_the_api_too():
    with pytest.raises(UsageError, match="n_ranks=3: the model's 8 experts do not split evenly"):
        check_ep(tiny_path(), "tiny", store=GOLDENS, n_ranks=3, decode=1)
    with pytest.raises(UsageError, match="backend='nccl' runs on CUDA devices only"):
        check_ep(tiny_path(), "tiny", store=GOLDENS, backend="nccl", decode=1)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < N, reason=f"skipped: needs {N} CUDA devices")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nccl_ep_serving_passes_every_step(dtype):
    rep = check_ep(tiny_path(), "tiny", store=GOLDENS, n_ranks=N, backend="nccl", device="cuda", dtype=dtype,
                   decode=STEPS, paged=True)
    assert rep is not None and rep.verdict == "pass", rep.summary()
    cov = rep.coverage()
    assert cov.complete and cov.judged == cov.held and sum(c.step is not None for c in rep.cases) == 3 * STEPS
    assert any("peak GPU memory" in n for n in rep.notes), rep.notes
