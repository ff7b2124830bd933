"""The greedy draft (moesnap.model.draft): the candidate's proposal of a golden's continuation, with dense
weights and the output matrix dequantized once, last-row logits, and a cache seeded from a reference
forward.  It must propose what the plain candidate proposes, and do it with fewer dequantizations."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from moesnap.errors import UsageError
from moesnap.model import draft
from moesnap.model.candidate import CandidateModel
from moesnap.model.draft import Drafter, draft_device, kept_bytes, propose, stored_bytes
from moesnap.model.load import open_model
from moesnap.model.recorder import ArrayRecorder
from moesnap.model.reference import run_reference
from moesnap.model.serve import Session
from moesnap.model.synth import tiny_path
from moesnap.run import trace

PROMPT = [5, 17, 42, 99, 3, 250, 7, 8]
N = 6


@pytest.fixture(scope="module")
def model():
    return open_model(tiny_path())


def plain_greedy(model, prompt, n):
    """The candidate before the draft: a Session's prefill and decode steps, every weight dequantized each time."""
    s = Session(CandidateModel(model), capacity=len(prompt) + n, record=False)
    out = [s.prefill(prompt)[-1].next_token()]
    while len(out) < n:
        out.append(s.decode(out[-1])[0].next_token())
    return out


def reference_greedy(model, prompt, n):
    out: list[int] = []
    for _ in range(n):
        out.append(int(torch.argmax(run_reference(model, prompt + out)[-1]).item()))
    return out


def reference_stages(model, tokens):
    rec = ArrayRecorder()
    run_reference(model, tokens, recorder=rec)
    return rec.stacked()


@pytest.fixture
def weight_calls(monkeypatch):
    """How often each tensor's stored bytes were fetched to be dequantized (``CandidateModel._raw``), by name."""
    calls: Counter[str] = Counter()
    real = CandidateModel._raw

    def counting(self, name, *args, **kwargs):
        calls[name] += 1
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(CandidateModel, "_raw", counting)
    return calls


def test_the_draft_proposes_what_the_plain_candidate_and_the_reference_choose(model):
    got = propose(model, PROMPT, N)
    assert got == plain_greedy(model, PROMPT, N) == reference_greedy(model, PROMPT, N)
    assert propose(model, PROMPT, 0) == [] and len(propose(model, PROMPT[:1], 3)) == 3


def test_dense_weights_and_the_output_matrix_are_dequantized_once_per_proposal(model, weight_calls):
    L = model.config.n_layer
    plain_greedy(model, PROMPT, N)
    assert weight_calls["output"] == N and weight_calls["blk.0.attn_q"] == N    # every forward, every layer
    weight_calls.clear()
    d = Drafter(model)
    propose(d, PROMPT, N)
    assert weight_calls["output"] == 1 and weight_calls["output_norm"] == 1
    assert all(weight_calls[f"blk.{i}.{t}"] == 1 for i in range(L) for t in ("attn_q", "attn_output", "ffn_gate_inp"))
    # what it keeps is what kept_bytes() promises (the figure the device choice counts on)
    assert sum(d.kept.values()) == kept_bytes(model)
    assert d.kept["output"] == 4 * model.config.vocab_size * model.config.hidden + 4 * model.config.hidden


def test_the_draft_computes_the_last_rows_logits_only_and_they_are_the_candidates(model):
    from moesnap.model.kvcache import KVCache

    outs = []
    for cand in (Drafter(model), CandidateModel(model)):
        cache = KVCache(model.config, n_seqs=1, capacity=len(PROMPT))
        outs.append(cand.forward_batch(np.asarray(PROMPT), cache.batch([(0, len(PROMPT))]), cache).logits)
    mine, plain = outs
    assert mine.shape == (1, model.config.vocab_size) and plain.shape == (len(PROMPT), model.config.vocab_size)
    torch.testing.assert_close(mine[0], plain[-1], rtol=1e-6, atol=1e-6)


def test_a_cache_seeded_from_the_references_rows_runs_no_prefill_and_proposes_the_same(model, monkeypatch):
    whole = PROMPT + reference_greedy(model, PROMPT, 2)
    stages = reference_stages(model, whole)          # a reference forward over the prompt and 2 more tokens
    rows: list[int] = []
    real = Drafter.forward_batch

    def spy(self, tokens, batch, *args, **kwargs):
        rows.append(batch.n_rows)
        return real(self, tokens, batch, *args, **kwargs)

    monkeypatch.setattr(Drafter, "forward_batch", spy)
    # continue after prompt + 1 token: the seed holds rows for it (and one more, unused)
    seeded = propose(model, whole[:-1], 4, seed={"k_rope": stages["k_rope"], "v": stages["v"]})
    assert rows == [1, 1, 1, 1]                        # the last token alone, then a step per token
    rows.clear()
    assert seeded == propose(model, whole[:-1], 4) and rows[0] == len(whole) - 1


def test_a_seed_of_the_wrong_shape_is_refused_not_fallen_back_from(model):
    stages = reference_stages(model, PROMPT[:3])
    with pytest.raises(ValueError, match=r"seed k_rope/v of shape \[4, 3, 2, 32\]/\[4, 3, 2, 32\]: expected "
                                         r"\[4, >= 7, 2, 32\]"):
        propose(model, PROMPT, 2, seed={"k_rope": stages["k_rope"], "v": stages["v"]})


def test_a_corrected_proposal_starts_from_the_references_rows(model, monkeypatch):
    """continued_reference: after the reference corrects the proposal, the rest is proposed from the
    reference's own k_rope/v (no prefill), and the golden is the reference's greedy continuation."""
    real = trace.greedy_draft
    seeds = []

    def bad_first(m, tokens, n, **kw):
        seeds.append(kw.get("seed") is not None)
        out = real(m, tokens, n, **kw)
        if len(seeds) == 1:
            out[1] = (out[1] + 1) % m.config.vocab_size
        return out

    rows: list[int] = []
    real_forward = Drafter.forward_batch

    def spy(self, tokens, batch, *args, **kwargs):
        rows.append(batch.n_rows)
        return real_forward(self, tokens, batch, *args, **kwargs)

    monkeypatch.setattr(trace, "greedy_draft", bad_first)
    monkeypatch.setattr(Drafter, "forward_batch", spy)
    case = trace.continued_reference(model, PROMPT, decode=N)
    assert case.attrs["continuation"] == reference_greedy(model, PROMPT, N)
    assert case.attrs["reference_forwards"] == 2 and seeds == [False, True]
    # the first proposal: a prefill and N-1 steps; the second (after position 1 was corrected): one-row
    # steps only, the reference's rows in its cache
    assert rows == [len(PROMPT)] + [1] * (N - 1) + [1] * (N - 2)


def test_stored_bytes_are_the_files_tensor_bytes(model):
    from moesnap.model.tensors import GLOBAL_TENSORS, LAYER_TENSORS

    names = list(GLOBAL_TENSORS) + [f"blk.{i}.{t}" for i in range(model.config.n_layer) for t in LAYER_TENSORS]
    assert stored_bytes(model) == sum(model.raw(n)[1].nbytes for n in names)


def test_the_draft_device_is_the_variables_else_a_cuda_device_it_fits_on_else_the_cpu(model, monkeypatch):
    monkeypatch.delenv(draft.DEVICE_VARIABLE, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert draft_device(model) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert draft_device(model) == torch.device("cpu")        # a small model: starting CUDA costs more
    monkeypatch.setattr(draft, "CUDA_FROM_BYTES", stored_bytes(model))
    need = stored_bytes(model) + kept_bytes(model) + 4 * 2 * 3 * 8 * 256 * 64
    free = [0]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free[0], 10 * free[0]))
    free[0] = int(need / draft.CUDA_SHARE) + 1
    assert draft_device(model) == torch.device("cuda")
    free[0] = need                                     # fits, but not within the share a proposal may take
    assert draft_device(model) == torch.device("cpu")
    monkeypatch.setenv(draft.DEVICE_VARIABLE, "cpu")
    assert draft_device(model) == torch.device("cpu")
    monkeypatch.setenv(draft.DEVICE_VARIABLE, "cuda:1")
    assert draft_device(model) == torch.device("cuda:1")


@pytest.mark.parametrize("value, message", [
    ("gpu", "MOESNAP_DRAFT_DEVICE='gpu': expected cpu, cuda or cuda:N"),
    ("cuda:x", "MOESNAP_DRAFT_DEVICE='cuda:x': expected cpu, cuda or cuda:N"),
    ("cuda", "MOESNAP_DRAFT_DEVICE='cuda': no CUDA device is available"),
])
def test_a_bad_draft_device_is_refused_in_one_line_not_fallen_back_from(model, monkeypatch, value, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(draft.DEVICE_VARIABLE, value)
    with pytest.raises(UsageError) as err:
        trace.greedy_draft(model, PROMPT, 2)
    assert str(err.value) == message


def test_on_the_cpu_the_file_pages_a_layer_read_are_released_after_it(model, monkeypatch):
    """Resident memory stays the kept copies plus a layer's working set, as the reference's does."""
    released: Counter[str] = Counter()
    monkeypatch.setattr(type(model), "release_tensor", lambda self, name: released.update([name]))
    propose(model, PROMPT, 3)                                  # a prefill and 2 steps: 3 forwards
    L = model.config.n_layer
    assert all(released[f"blk.{i}.ffn_down_exps"] == 3 and released[f"blk.{i}.attn_q"] == 3 for i in range(L))
    assert released["output"] == 1


def test_goldens_generate_refuses_a_misnamed_draft_device_in_one_line_writing_nothing(monkeypatch, tmp_path, capsys):
    from moesnap.cli.main import main

    monkeypatch.setenv(draft.DEVICE_VARIABLE, "tpu")
    store = tmp_path / "store"
    assert main(["-q", "goldens", "generate", str(tiny_path()), "--suite", "d", "--store", str(store),
                 "--tokens", "1,2", "--decode", "2"]) == 2
    err = capsys.readouterr().err
    assert err == "moesnap: error: MOESNAP_DRAFT_DEVICE='tpu': expected cpu, cuda or cuda:N\n"
    assert not store.exists()


def test_a_proposal_runs_its_matmuls_in_float32_even_where_tf32_is_allowed(model, monkeypatch):
    seen = []
    real = Drafter.forward_batch

    def spy(self, *args, **kwargs):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Drafter, "forward_batch", spy)
    before = torch.backends.cuda.matmul.allow_tf32      # a flag of torch's (no attribute to monkeypatch)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        propose(model, PROMPT, 2)
        assert seen == [False, False] and torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_a_cuda_proposal_out_of_memory_is_made_again_on_the_cpu(model, monkeypatch):
    devices = []
    real = draft.propose

    def short_of_memory(m, tokens, n, *, device="cpu", seed=None):
        devices.append(str(device))
        if str(device) == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(m, tokens, n, device=device, seed=seed)

    monkeypatch.setattr(draft, "draft_device", lambda m: torch.device("cuda"))
    monkeypatch.setattr(draft, "propose", short_of_memory)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert trace.greedy_draft(model, PROMPT, 3) == reference_greedy(model, PROMPT, 3)
    assert devices == ["cuda", "cpu"]


@pytest.mark.gpu
def test_on_cuda_the_draft_proposes_what_it_proposes_on_the_cpu_and_keeps_its_copies_there(model):
    d = Drafter(model, device="cuda")
    whole = PROMPT + reference_greedy(model, PROMPT, 2)
    stages = reference_stages(model, whole)
    assert propose(d, PROMPT, N) == propose(model, PROMPT, N) == reference_greedy(model, PROMPT, N)
    assert all(t.device.type == "cuda" for w in d._layers.values() for t in vars(w).values() if t is not None)
    assert sum(d.kept.values()) == kept_bytes(model)
    seeded = propose(model, whole[:-1], 3, device="cuda", seed={"k_rope": stages["k_rope"], "v": stages["v"]})
    assert seeded == propose(model, whole[:-1], 3)
