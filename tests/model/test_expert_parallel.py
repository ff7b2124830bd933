"""The expert-parallel candidate on 2 ranks: gloo on the CPU here, NCCL on 2 GPUs (``gpu``).

Each mode runs the committed goldens' three prompts in one launch of 2 processes.  Measured on the CPU
(torch 2.13, gloo, one thread per rank and in the single-device run): every stage of both modes is
bit-identical to the single-device candidate; the bound below is that candidate's own float32 agreement
with the reference, tightened 10x.  A NaN planted in an expert rank 1 owns is named at its layer /
``expert_out``, is NaN exactly where ``topk_ids`` names that expert, and ``check_ep``'s notes name the
expert and its rank.  The torchrun path runs in this process as a world of one rank (light) and as 2
ranks under ``torch.distributed.run`` (slow); bfloat16 with router replay judges every cell (slow on
gloo, ``gpu`` on NCCL)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import moesnap
from moesnap.errors import UsageError
from moesnap.model.candidate import CandidateModel
from moesnap.model.expert_parallel import (ExpertParallelCandidate, expert_range, free_port, run_ep, run_ep_cases,
                                           token_range)
from moesnap.model.recorder import ArrayRecorder
from moesnap.model.synth import tiny_path
from moesnap.model.weights import GGUFModel
from moesnap.run.compare import resolve_golden
from moesnap.run.expert_parallel import check_ep
from moesnap.stages import INTEGER_STAGES

GOLDENS = os.path.join(os.path.dirname(__file__), "..", "..", "goldens")
ATOL = 1e-5           # test_candidate's float32 bound vs the reference is 1e-4
N = 2
ONE_TOKEN = [7]
needs_2_gpus = [pytest.mark.gpu,
                pytest.mark.skipif(torch.cuda.device_count() < N, reason=f"skipped: needs {N} CUDA devices")]


@pytest.fixture(scope="module")
def golden():
    return resolve_golden("tiny", GOLDENS)


@pytest.fixture(scope="module", params=["alltoall", "allreduce"])
def ep(request, golden):
    """(mode, the EP cases of every golden prompt, then of ONE_TOKEN) from one launch of 2 gloo ranks."""
    cases = run_ep_cases(tiny_path(), [g.tokens.tolist() for _, g in golden] + [ONE_TOKEN], N, mode=request.param)
    assert cases is not None and len(cases) == len(golden) + 1
    return request.param, cases


def _single(tokens, device="cpu", dtype=torch.float32):
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // N))   # as each rank runs
    try:
        rec = ArrayRecorder()
        CandidateModel(GGUFModel.open(tiny_path()), device=device, dtype=dtype).forward(tokens, rec)
        return rec.case()
    finally:
        torch.set_num_threads(threads)


def _worst(got, want) -> dict[str, float]:
    """Max |got - want| of every stage; integer stages must be equal."""
    out = {}
    mine = {**got.model, **got.layers}
    for s, b in {**want.model, **want.layers}.items():
        a = mine[s]
        assert a.shape == b.shape, s
        if s in INTEGER_STAGES:
            assert np.array_equal(a, b), s
        out[s] = float(np.abs(a.astype(np.float64) - b).max())
    return out


def test_ep_agrees_with_the_single_device_candidate(ep, golden):
    mode, cases = ep
    for (name, g), case in zip(golden, cases):
        worst = _worst(case, _single(g.tokens.tolist()))
        assert max(worst.values()) <= ATOL, (mode, name, worst)
        meta = case.attrs["expert_parallel"]
        assert meta["experts"] == [[0, 4], [4, 8]] and meta["mode"] == mode
        assert all(len(per) == g.n_layer and min(per) > 0 for per in meta["bytes_sent_per_layer"])
    # one token: rank 1 holds no token slice and dispatches nothing (empty splits)
    assert max(_worst(cases[-1], _single(ONE_TOKEN)).values()) <= ATOL


def test_ep_passes_against_the_committed_goldens(ep, golden):
    mode, cases = ep
    for (name, _), case in zip(golden, cases):
        report = moesnap.compare("tiny", case, store=GOLDENS, local=False)
        assert report.passed, (mode, name, report.summary())


def _rank1_expert(g, layer: int) -> int:
    """An expert rank 1 owns (4-7) that some token of golden case ``g`` routes to at ``layer``."""
    ids = g.layers["topk_ids"][layer]
    return int(ids[ids >= 4][0])


def test_a_nan_expert_on_rank_1_is_named_at_its_layer_and_expert(golden):
    name, g = golden[0]
    layer, expert = 1, _rank1_expert(g, 1)
    case = run_ep(tiny_path(), g.tokens.tolist(), N, injections=[f"nan:layer={layer},expert={expert}"])
    assert case is not None
    report = moesnap.compare("tiny", case, store=GOLDENS, local=False)
    fd = report.first_divergence
    assert fd is not None and (fd.layer, fd.stage, fd.verdict.name) == (layer, "expert_out", "NAN_CANDIDATE")
    ids = g.layers["topk_ids"][layer]
    bad = np.isnan(case.layers["expert_out"][layer]).any(axis=-1)     # [T, k]
    assert set(ids[bad].tolist()) == {expert} and bad.sum() == (ids == expert).sum()
    assert not np.isnan(case.layers["expert_out"][:layer]).any()


def test_check_ep_names_a_nan_expert_its_layer_and_its_rank(golden):
    # the run layer's check: every golden case on 2 ranks (allreduce), judged with local re-reference
    layer = 2
    expert = _rank1_expert(golden[0][1], layer)
    report = check_ep(tiny_path(), "tiny", store=GOLDENS, mode="allreduce", inject=[f"nan:layer={layer},expert={expert}"])
    assert report is not None and report.verdict == "fail"
    fd = report.first_divergence
    assert fd is not None and (fd.layer, fd.stage, fd.verdict.name) == (layer, "expert_out", "NAN_CANDIDATE")
    named = [n for n in report.notes if f"layer {layer} / expert_out: NaN/Inf" in n]
    assert named and all(n.endswith(f"routed to expert {expert} of rank 1") for n in named), report.notes
    assert any(n.startswith("expert parallel: 2 ranks (allreduce, gloo") for n in report.notes), report.notes


def test_refused_before_any_rank_starts():
    toks = [1, 2, 3]
    with pytest.raises(UsageError, match="n_ranks=3: the model's 8 experts"):
        run_ep(tiny_path(), toks, 3)
    with pytest.raises(UsageError, match="mode='ring'"):
        run_ep(tiny_path(), toks, N, mode="ring")
    with pytest.raises(UsageError, match="nccl"):
        run_ep(tiny_path(), toks, N, backend="nccl", device_type="cpu")
    with pytest.raises(UsageError, match="layer=9"):
        run_ep(tiny_path(), toks, N, injections=["nan:layer=9,expert=0"])
    with pytest.raises(UsageError, match="--inject 'route:layer=1,token=5': token=5 is out of range"):
        run_ep(tiny_path(), toks, N, injections=["route:layer=1,token=5"])
    with pytest.raises(moesnap.MoesnapError, match="outside the vocabulary"):
        run_ep(tiny_path(), [1, 10_000], N)
    with pytest.raises(UsageError, match="torch.distributed"):
        ExpertParallelCandidate(GGUFModel.open(tiny_path()))


def test_slices():
    assert [expert_range(8, r, 2) for r in range(2)] == [(0, 4), (4, 8)]
    assert [token_range(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [token_range(1, r, 3) for r in range(3)] == [(0, 1), (1, 1), (1, 1)]


def test_as_one_torchrun_rank_in_this_process(monkeypatch, golden):
    # RANK/WORLD_SIZE set: run_ep is this process's rank (env://), as under torchrun; one rank owns
    # every expert, and a planted fault that fires on no token is refused
    _, g = golden[2]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    case = run_ep(tiny_path(), g.tokens.tolist(), 1)
    assert case is not None and case.attrs["expert_parallel"]["experts"] == [[0, 8]]
    assert max(_worst(case, _single(g.tokens.tolist())).values()) <= ATOL
    unused = sorted(set(range(8)) - set(g.layers["topk_ids"][0].ravel().tolist()))
    assert unused, "the 8-token case leaves some expert of layer 0 unused"
    with pytest.raises(UsageError, match=f"--inject 'nan:layer=0,expert={unused[0]}': the planted fault cannot fire"):
        run_ep(tiny_path(), g.tokens.tolist(), 1, injections=[f"nan:layer=0,expert={unused[0]}"])
    with pytest.raises(UsageError, match="WORLD_SIZE=1"):
        run_ep(tiny_path(), g.tokens.tolist(), 2)


@pytest.mark.slow
def test_under_torchrun_rank_0_judges_and_rank_1_returns_none(tmp_path):
    script = tmp_path / "ep.py"
    script.write_text(
        "import os\n"
        "from moesnap.run.expert_parallel import check_ep\n"
        f"r = check_ep({str(tiny_path())!r}, 'tiny', store={GOLDENS!r})\n"
        "print('rank', os.environ['RANK'], None if r is None else r.verdict, flush=True)\n")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(N), str(script)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rank 0 pass" in out.stdout and "rank 1 None" in out.stdout, out.stdout


@pytest.mark.parametrize("backend, device", [
    pytest.param("gloo", "cpu", marks=pytest.mark.slow),
    pytest.param("nccl", "cuda", marks=needs_2_gpus),
])
@pytest.mark.parametrize("mode", ["alltoall", "allreduce"])
def test_bfloat16_check_with_router_replay_judges_every_cell(backend, device, mode):
    report = check_ep(tiny_path(), "tiny", store=GOLDENS, backend=backend, device=device, dtype="bfloat16", mode=mode)
    assert report is not None and report.passed, report.summary()
    cov = report.coverage()
    assert cov.judged == cov.held > 0 and report.replay is not None       # local re-reference judged every layer


@pytest.mark.parametrize("mode", [pytest.param(m, marks=needs_2_gpus) for m in ("alltoall", "allreduce")])
def test_nccl_float32_agrees_with_one_gpu_and_names_a_nan_expert(mode, golden):
    cases = run_ep_cases(tiny_path(), [g.tokens.tolist() for _, g in golden], N, "nccl", "cuda", mode=mode)
    assert cases is not None
    for (name, g), case in zip(golden, cases):
        worst = _worst(case, _single(g.tokens.tolist(), device="cuda"))
        assert max(worst.values()) <= 1e-4, (name, worst)
        assert moesnap.compare("tiny", case, store=GOLDENS).passed
        assert all(p is not None and p > 0 for p in case.attrs["expert_parallel"]["peak_bytes"])
    _, g = golden[0]
    expert = _rank1_expert(g, 2)
    case = run_ep(tiny_path(), g.tokens.tolist(), N, "nccl", "cuda", injections=[f"nan:layer=2,expert={expert}"],
                  mode=mode)
    assert case is not None
    fd = moesnap.compare("tiny", case, store=GOLDENS, local=False).first_divergence
    assert fd is not None and (fd.layer, fd.stage) == (2, "expert_out")
