"""The candidate serving on the bundled tiny model: a prompt then decode steps through a KV cache
(contiguous and paged), chunked prefill, a batch of ragged sequences, decode steps on static buffers
(the CUDA graph's code path; captured only on a GPU), and the planted serving faults.

The claim under all of it: every row a serving forward produces equals, within float noise, the row at
the same position of one causal forward over the whole sequence.  Measured on the CPU (torch 2.13,
float32), relative L2 error per stage over all rows and layers against the candidate's own causal
forward: prompt 20 + 12 decode steps 1.4e-6 (contiguous and paged alike; worst stage moe_out), chunked
prefill 7.8e-7, a batch of 3 ragged sequences 2.1e-6, the static-buffer decode 2.0e-6; against the
*reference* forward over prompt + continuation (the golden a decode check uses) 1.6e-6, with the same
experts everywhere.  The bound below, 2e-5, leaves ~10x.  Each planted serving fault first changes its
(decode step, layer, stage), in float32 and bfloat16 alike, and nothing before it.  On an H100 (torch
2.11) the CUDA-graph test passes in float32 and bfloat16 (replayed rows vs the same static step run
eagerly, float32 rows vs the causal rows, a stale token buffer named at its step's ``embed``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moesnap.errors import UsageError
from moesnap.judge.routing import tie_gap
from moesnap.model.candidate import CandidateModel, RouterReplay
from moesnap.model.faults import Faults
from moesnap.model.inject import BlockTable, GraphStale, KvShort, KvSlot, PadAttend, RopePos, SwapRows, parse_inject
from moesnap.model.inject_serving import ServePlan, check_serving
from moesnap.model.kvcache import KVCache
from moesnap.model.recorder import ArrayRecorder
from moesnap.model.reference import run_reference
from moesnap.model.serve import GraphDecoder, Rows, Session, replay_rows
from moesnap.model.synth import tiny_path
from moesnap.model.weights import GGUFModel
from moesnap.stages import FAMILY_STAGES

#: the stages of the family these tests run (Qwen3-MoE); the schema has other families' too
LAYER_STAGES = FAMILY_STAGES["qwen3moe"]

REL_L2 = 2e-5
P, N = 20, 12                      # prompt length, decode steps
PROMPTS = (20, 9, 17)              # a ragged batch
STEPS = 6                          # its decode steps


@pytest.fixture(scope="module")
def model() -> GGUFModel:
    return GGUFModel.open(tiny_path())


@pytest.fixture(scope="module")
def cand(model) -> CandidateModel:
    return CandidateModel(model)


@pytest.fixture(scope="module")
def seq(model) -> list[int]:
    return np.random.default_rng(3).integers(0, model.config.vocab_size, P + N).tolist()


@pytest.fixture(scope="module")
def batch_seqs(model) -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, model.config.vocab_size, p + STEPS).tolist() for p in PROMPTS]


def causal(cand: CandidateModel, tokens) -> dict[str, np.ndarray]:
    """Every stage of one causal forward over ``tokens`` (layer stages ``[L, T, ...]``)."""
    rec = ArrayRecorder()
    cand.forward(tokens, rec)
    return {**rec.model, **rec.stacked()}


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def worst_error(rows: list[Rows], golden: dict[str, np.ndarray] | list[dict[str, np.ndarray]]) -> float:
    """Max relative L2 of every stage of ``rows`` against the golden's rows at their positions (one golden
    per sequence for a batch); expert ids must be equal."""
    worst = 0.0
    for r in rows:
        g = golden[r.seq] if isinstance(golden, list) else golden
        np.testing.assert_array_equal(r.case.tokens, g["tokens"][r.positions])
        for stage, a in {**r.case.model, **r.case.layers}.items():
            want = g[stage][r.positions] if stage in r.case.model else g[stage][:, r.positions]
            assert a.shape == want.shape, stage
            if stage == "topk_ids":
                np.testing.assert_array_equal(a, want, err_msg=f"seq {r.seq} step {r.step}")
            else:
                worst = max(worst, rel_l2(a, want))
    return worst


def serve(cand: CandidateModel, tokens: list[int], *, paged: bool, chunk: int | None = None, **kw) -> list[Rows]:
    s = Session(cand, capacity=P + N, paged=paged, **kw)
    rows = s.prefill(tokens[:P], chunk=chunk)
    for t in tokens[P:]:
        rows += s.decode(t)
    return rows


# --------------------------------------------------------------------------- one sequence


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_weights_give_the_same_bits_and_are_dequantized_once(model, seq, dtype, monkeypatch):
    # keep_weights (a serving check's decode steps): each layer's dense weights and the output matrix's
    # chunks dequantized at their first use, the same tensors and products after, so the same bits
    plain, keeping = CandidateModel(model, dtype=dtype), CandidateModel(model, dtype=dtype)
    keeping.keep_weights()
    want = serve(plain, seq, paged=True)
    calls: list[str] = []
    dense = CandidateModel._dequantized_dense
    monkeypatch.setattr(CandidateModel, "_dequantized_dense",
                        lambda self, i, faults: calls.append(f"dense {i}") or dense(self, i, faults))
    got = serve(keeping, seq, paged=True)
    for a, b in zip(want, got):
        for stage, x in {**a.case.model, **a.case.layers}.items():
            y = b.case.model.get(stage, b.case.layers.get(stage))
            np.testing.assert_array_equal(x, y, err_msg=f"step {a.step} {stage}")
    assert sorted(calls) == [f"dense {i}" for i in range(model.config.n_layer)]      # once a layer, N + 1 forwards
    assert any(k[0] == "output" for k in keeping._kept)
    # another planted fault decodes the weights its own way: nothing kept for one serves the other
    faults = keeping.faults([parse_inject("scale:layer=1,stage=attn_out,factor=1.05", model.config)])
    s = Session(keeping, capacity=P + N, paged=True, faults=faults)
    s.prefill(seq[:P])
    assert calls.count("dense 1") == 2 and keeping._kept_faults is faults


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_experts_give_the_same_bits_within_their_budget(model, seq, dtype, monkeypatch):
    # keep_weights(expert_bytes=...): whole layers' experts dequantized once, the layers first used first,
    # while they fit; a decode step takes its experts from them: the same bits as dequantizing each time
    cfg = model.config
    layer_bytes = 3 * cfg.n_expert * cfg.expert_ff * cfg.hidden * torch.empty(0, dtype=dtype).element_size()
    plain, keeping = CandidateModel(model, dtype=dtype), CandidateModel(model, dtype=dtype)
    keeping.keep_weights(expert_bytes=2 * layer_bytes + 1)          # room for two layers' experts
    want = serve(plain, seq, paged=False)
    calls: list[int] = []
    whole = CandidateModel._experts_weights_all
    monkeypatch.setattr(CandidateModel, "_experts_weights_all",
                        lambda self, i, faults: calls.append(i) or whole(self, i, faults))
    got = serve(keeping, seq, paged=False)
    for a, b in zip(want, got):
        for stage, x in {**a.case.model, **a.case.layers}.items():
            y = b.case.model.get(stage, b.case.layers.get(stage))
            np.testing.assert_array_equal(x, y, err_msg=f"step {a.step} {stage}")
    assert calls == [0, 1], "layers 0 and 1 kept once each; the others do not fit and are dequantized per use"
    assert sorted(k[1] for k in keeping._kept if k[0] == "experts") == [0, 1]
    cpu = CandidateModel(model, dtype=dtype)
    cpu.keep_weights()
    assert cpu._expert_budget == 0, "on the CPU no experts are kept unless a budget is given"


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_prefill_then_decode_gives_the_rows_of_one_causal_forward(cand, seq, paged):
    rows = serve(cand, seq, paged=paged)
    assert worst_error(rows, causal(cand, seq)) <= REL_L2
    prompt, steps = rows[0], rows[1:]
    assert prompt.step is None and prompt.positions.tolist() == list(range(P))
    assert [r.step for r in steps] == list(range(N))
    for n, r in enumerate(steps):       # a decode step is a case of one row at its position
        assert r.positions.dtype == np.int32 and r.positions.tolist() == [P + n]
        assert r.case.tokens.tolist() == [seq[P + n]] and r.case.layers["layer_out"].shape[1] == 1
        assert r.case.attrs["positions"] == [P + n] and r.case.attrs["step"] == n
        assert r.logits.shape == (1, cand.cfg.vocab_size)


def test_paged_blocks_are_16_tokens_from_a_shared_pool(cand, seq):
    s = Session(cand, capacity=P + N, paged=True)
    s.prefill(seq[:P])
    assert s.cache.block_size == 16 and s.cache.lens == [P]
    assert len(s.cache.blocks[0]) == 2 and s.cache.blocks[0] != [0, 1]      # not the identity layout
    contiguous = Session(cand, capacity=P + N)
    assert contiguous.cache.block_size == P + N and contiguous.cache.blocks == [[0]]


def test_decode_from_the_reference_forward_over_prompt_and_continuation(model, cand, seq):
    """The golden of a decode check: one reference forward over prompt + continuation; its rows at
    positions >= |prompt| are what each decode step produces."""
    ref = ArrayRecorder()
    run_reference(model, seq, recorder=ref)
    rows = serve(cand, seq, paged=True)
    assert worst_error(rows[1:], {**ref.model, **ref.stacked()}) <= REL_L2


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_prefill_attends_the_chunks_before(cand, seq, chunk):
    rows = serve(cand, seq, paged=True, chunk=chunk)
    n_chunks = -(-P // chunk)
    assert [r.positions[0] for r in rows[:n_chunks]] == list(range(0, P, chunk))
    assert worst_error(rows, causal(cand, seq)) <= REL_L2


def test_greedy_decoding_continues_with_the_causal_argmax(cand, seq):
    s = Session(cand, capacity=P + 4)
    out = s.prefill(seq[:P])[-1]
    for _ in range(4):
        out = s.decode(out.next_token())[0]
    whole = causal(cand, s.tokens[0])
    np.testing.assert_array_equal(np.argmax(whole["logits"][P - 1:-1], -1), s.tokens[0][P:])


# --------------------------------------------------------------------------- a batch


def run_batch(cand, seqs, *, paged: bool = True, decoder: str = "session", faults: Faults | None = None
              ) -> list[list[Rows]]:
    """The prompts of ``seqs`` in one forward, then STEPS decode steps (by the session, or on static
    buffers run eagerly or in a CUDA graph): the Rows of each forward."""
    s = Session(cand, capacity=32, n_seqs=len(seqs), paged=paged, **({"faults": faults} if faults else {}))
    out = [s.prefill_batch([q[:p] for q, p in zip(seqs, PROMPTS)])]
    dec = s if decoder == "session" else GraphDecoder(s, graph=decoder == "graph")
    for n in range(STEPS):
        out.append(dec.decode([q[p + n] for q, p in zip(seqs, PROMPTS)]))
    return out


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_a_ragged_batch_gives_each_sequence_its_own_causal_rows(cand, batch_seqs, paged):
    forwards = run_batch(cand, batch_seqs, paged=paged)
    goldens = [causal(cand, q) for q in batch_seqs]
    assert worst_error([r for f in forwards for r in f], goldens) <= REL_L2
    assert [r.positions.tolist() for r in forwards[0]] == [list(range(p)) for p in PROMPTS]
    assert [r.positions.tolist() for r in forwards[-1]] == [[p + STEPS - 1] for p in PROMPTS]


def test_decode_on_static_buffers_gives_the_causal_rows(cand, batch_seqs):
    """The CUDA graph's code path run eagerly: static buffers, attention over every slot of the cache."""
    forwards = run_batch(cand, batch_seqs, decoder="static")
    goldens = [causal(cand, q) for q in batch_seqs]
    assert worst_error([r for f in forwards[1:] for r in f], goldens) <= REL_L2
    assert all(r.case.attrs["cuda_graph"] is False for r in forwards[1])


def test_static_buffers_share_the_weights_the_candidate_keeps(model, batch_seqs):
    """The static step holds the candidate's kept tensors (dense weights, the output matrix's chunks, whole
    layers' experts where kept), not copies of them: made again, gpt-oss-20b's output matrix alone (1.2 GB in
    bfloat16) was held twice.  Still the causal rows."""
    cand = CandidateModel(model, expert_values=4 * 64 * model.config.hidden)    # the output in chunks of 64 rows
    cand.keep_weights(expert_bytes=1 << 30)                                     # experts kept too, as on a GPU
    s = Session(cand, capacity=32, n_seqs=len(batch_seqs), paged=True)
    s.prefill_batch([q[:p] for q, p in zip(batch_seqs, PROMPTS)])
    dec = GraphDecoder(s, graph=False)
    kept, L = cand._kept, model.config.n_layer
    assert kept is not None and len(dec.model.out) == -(-model.config.vocab_size // 64)
    assert all(w is kept[("output", at)] for at, w in dec.model.out)
    assert all(dec.model.layers[i] is kept[("dense", i)] for i in range(L))
    assert all(dec.model.experts[i] is kept[("experts", i)] for i in range(L))
    steps = [dec.decode([q[p + n] for q, p in zip(batch_seqs, PROMPTS)]) for n in range(STEPS)]
    assert worst_error([r for f in steps for r in f], [causal(cand, q) for q in batch_seqs]) <= REL_L2


def test_recording_off_keeps_the_logits(cand, seq):
    on, off = serve(cand, seq, paged=False), serve(cand, seq, paged=False, record=False)
    assert not off[-1].case.layers and off[-1].case.tokens.tolist() == [seq[-1]]
    for a, b in zip(on, off):
        assert torch.equal(a.logits, b.logits)


# --------------------------------------------------------------------------- planted faults


def first_change(clean: list[list[Rows]], hit: list[list[Rows]], seq: int) -> tuple[int | None, int | None, str]:
    """(decode step, layer, stage) where sequence ``seq``'s rows first differ (None: the prompt; layer
    None: a whole-model stage), after checking that every sequence is unchanged before it."""
    for c_rows, h_rows in zip(clean, hit):
        c, h = c_rows[seq].case, h_rows[seq].case
        if not np.array_equal(c.model["embed"], h.model["embed"], equal_nan=True):
            where: tuple[int | None, str] = (None, "embed")
        else:
            where = next(((i, s) for i in range(len(c.layers["q"])) for s in LAYER_STAGES
                          if not np.array_equal(c.layers[s][i], h.layers[s][i], equal_nan=True)), (None, ""))
        if where[1]:
            layer, stage = where
            for other_c, other_h in zip(c_rows, h_rows):    # nothing earlier changed in any sequence
                for i, s in ((i, s) for i in range(layer or 0) for s in LAYER_STAGES):
                    np.testing.assert_array_equal(other_h.case.layers[s][i], other_c.case.layers[s][i])
            return h_rows[seq].step, layer, stage
        for other_c, other_h in zip(c_rows, h_rows):
            assert torch.equal(other_h.logits, other_c.logits), f"sequence {other_h.seq} changed before"
    raise AssertionError("the planted fault changed nothing")


@pytest.fixture(scope="module")
def clean_eager(model, batch_seqs):
    """dtype -> (the candidate, its clean batch run)."""
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        c = CandidateModel(model, dtype=dtype)
        runs[dtype] = c, run_batch(c, batch_seqs)
    return runs


@pytest.fixture(scope="module")
def clean_static(cand, batch_seqs):
    return run_batch(cand, batch_seqs, decoder="static")


# (spec, the sequence to look at, its first change: decode step, layer, stage)
FAULTS = [
    ("rope_pos:step=2", 0, (2, 0, "q_rope")),
    ("kv_slot:layer=1", 0, (0, 1, "attn")),
    ("kv_short:layer=2", 2, (0, 2, "attn")),
    ("block_table:seq=0,block=1", 0, (0, 0, "attn")),
    ("pad_attend", 1, (0, 0, "attn")),
    ("pad_attend:layer=3", 1, (0, 3, "attn")),
    ("swap_rows", 1, (0, 0, "attn")),
    ("swap_rows:layer=2", 0, (0, 2, "attn")),
    ("route:layer=1,token=22", 0, (2, 1, "topk_ids")),     # a prefill fault acts at its position
    ("scale:layer=3,stage=moe_out,factor=1.5", 0, (None, 3, "moe_out")),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("spec, seq, where", FAULTS, ids=[f[0] for f in FAULTS])
def test_each_planted_fault_shows_at_its_step_layer_and_stage(model, batch_seqs, clean_eager, spec, seq, where, dtype):
    inj = parse_inject(spec, model.config)
    check_serving([inj], ServePlan(PROMPTS, STEPS, paged=True))
    cand, clean = clean_eager[dtype]
    faults = cand.faults([inj])
    hit = run_batch(cand, batch_seqs, faults=faults)
    assert first_change(clean, hit, seq) == where
    assert (where[1], where[2]) == (inj.target_layer, inj.target_stage)
    assert faults.unfired() == []


@pytest.mark.parametrize("spec, seq, where", FAULTS[:8] + [("graph_stale:step=3", 0, (3, None, "embed"))],
                         ids=[f[0] for f in FAULTS[:8]] + ["graph_stale:step=3"])
def test_each_planted_fault_shows_on_static_buffers(model, cand, batch_seqs, clean_static, spec, seq, where):
    inj = parse_inject(spec, model.config)
    check_serving([inj], ServePlan(PROMPTS, STEPS, paged=True, graph=True))
    faults = cand.faults([inj])
    hit = run_batch(cand, batch_seqs, decoder="static", faults=faults)
    if inj.kind == "pad_attend":    # every slot of the cache is gathered: the longest sequence has padding too
        seq = 0
    assert first_change(clean_static, hit, seq) == where
    assert faults.unfired() == []


def test_stale_token_buffer_replays_the_previous_token(model, cand, batch_seqs, clean_static):
    faults = cand.faults([parse_inject("graph_stale:step=3", model.config)])
    hit = run_batch(cand, batch_seqs, decoder="static", faults=faults)
    step3 = [r.case.model["embed"] for r in hit[4]]
    step2 = [r.case.model["embed"] for r in clean_static[3]]
    for a, b in zip(step3, step2):
        np.testing.assert_array_equal(a, b)                  # the embedding of step 2's token
    assert [r.case.tokens.tolist() for r in hit[4]] == [r.case.tokens.tolist() for r in clean_static[4]]


@pytest.mark.parametrize("spec, plan, why", [
    ("rope_pos:step=3", ServePlan((20,), 0), "decode steps only"),
    ("rope_pos:step=3", ServePlan((20,), 3), "has 3 decode steps"),
    ("kv_slot:layer=1", ServePlan((20, 9), 0), "decode steps only"),
    ("block_table:seq=0,block=1", ServePlan((20, 9), 4), "paged KV cache"),
    ("block_table:seq=0,block=1", ServePlan((20,), 4, paged=True), "at least 2 sequences"),
    ("block_table:seq=2,block=0", ServePlan((20, 9), 4, paged=True), "seq=2 is out of range"),
    ("block_table:seq=1,block=1", ServePlan((20, 9), 4, paged=True), "never reaches block 1"),
    ("pad_attend", ServePlan((20, 20), 4), "different lengths"),
    ("pad_attend", ServePlan((20,), 4), "single sequence has no padding"),
    ("swap_rows", ServePlan((20,), 4), "at least 2 sequences"),
    ("graph_stale:step=2", ServePlan((20,), 4), "CUDA graph"),
    ("graph_stale:step=4", ServePlan((20,), 4, graph=True), "has 4 decode steps"),
    ("nan:layer=1,expert=0", ServePlan((20,), 4, graph=True), "CUDA graph"),
])
def test_a_fault_that_cannot_fire_is_refused_in_one_line(model, spec, plan, why):
    with pytest.raises(UsageError) as e:
        check_serving([parse_inject(spec, model.config)], plan)
    msg = str(e.value)
    assert msg.startswith(f"--inject {spec!r}: the planted fault cannot fire") and why in msg and "\n" not in msg


@pytest.mark.parametrize("spec, want", [
    ("rope_pos:step=2", RopePos(layer=0, step=2)),
    ("kv_slot:layer=1", KvSlot(layer=1)),
    ("kv_short:layer=3", KvShort(layer=3)),
    ("block_table:seq=1,block=0", BlockTable(layer=0, seq=1, block=0)),
    ("pad_attend", PadAttend(layer=0)),
    ("pad_attend:layer=2", PadAttend(layer=2, only=True)),
    ("swap_rows", SwapRows(layer=0)),
    ("graph_stale:step=1", GraphStale(layer=0, step=1)),
])
def test_serving_specs_parse_and_round_trip(model, spec, want):
    got = parse_inject(spec, model.config)
    assert got == want and got.spec == spec and parse_inject(got.spec, model.config) == got


@pytest.mark.parametrize("spec, message", [
    ("graph_stale:step=0", "step=0 must be an integer >= 1"),
    ("rope_pos:step=-1", "step=-1 must be an integer >= 0"),
    ("kv_slot:layer=4", "layer=4 is out of range"),
    ("kv_short", "expected KIND:KEY=VALUE"),
    ("block_table:seq=0", "missing block="),
    ("pad_attend:layer=1,step=2", "unknown key 'step'"),
])
def test_bad_serving_specs(model, spec, message):
    with pytest.raises(UsageError, match=message):
        parse_inject(spec, model.config)


def test_a_serving_fault_whose_step_never_came_is_unfired(model, cand, seq):
    faults = cand.faults([parse_inject("rope_pos:step=5", model.config)])
    s = Session(cand, capacity=P + N, faults=faults)
    s.prefill(seq[:P])
    for t in seq[P:P + 3]:
        s.decode(t)
    assert faults.unfired() == [RopePos(layer=0, step=5)]
    for t in seq[P + 3:P + 6]:
        s.decode(t)
    assert faults.unfired() == []


def test_static_buffers_refuse_what_needs_the_host(model, cand, seq):
    s = Session(cand, capacity=P + 2, faults=cand.faults([parse_inject("nan:layer=1,expert=0", model.config)]))
    s.prefill(seq[:P])
    with pytest.raises(UsageError, match="nan:layer=1,expert=0.*eagerly"):
        GraphDecoder(s, graph=False)
    with pytest.raises(UsageError, match="prefill every sequence"):
        GraphDecoder(Session(cand, capacity=8), graph=False)
    with pytest.raises(UsageError, match="needs a CUDA device"):
        GraphDecoder(s, graph=True)


# --------------------------------------------------------------------------- guidance and replay


def test_router_replay_follows_the_golden_in_a_decode_step(model, cand, seq):
    """A routing flip planted at position P+1 is undone by router replay at a wide tie width, and the
    decode step's Rows name the row (0) and the candidate's own choice."""
    golden = causal(cand, seq)
    guide = RouterReplay(golden["topk_ids"], golden["router_logits"], 1e9, tie_gap)
    faults = cand.faults([parse_inject(f"route:layer=2,token={P + 1}", model.config)])
    rows = serve(cand, seq, paged=True, router_replay=guide, faults=faults)
    step1 = rows[2]
    assert step1.step == 1 and [(f.layer, f.token) for f in step1.followed] == [(2, 0)]
    assert step1.case.attrs["router_followed"][0][:2] == [2, 0]
    assert all(not r.followed for r in rows if r is not step1)
    np.testing.assert_array_equal(step1.case.layers["topk_ids"][2], golden["topk_ids"][2][[P + 1]])
    assert faults.unfired() == [parse_inject(f"route:layer=2,token={P + 1}", model.config)]


def test_a_guided_decode_step_uploads_nothing_per_layer(model, seq, monkeypatch):
    """A decode step under router replay makes no index tensor from host lists at its layers: the golden's
    ids go to the device once per forward (every layer's at once), and the experts' ids, group offsets and
    rows come from the device tensors routing made (on a GPU each such upload is a copy the host waits on,
    ~10 a layer measured on an H100, 2026-12-08).  The same rows as before, bit for bit (the other tests)."""
    import moesnap.model.candidate as candidate_mod
    import moesnap.model.forward_io as forward_io

    cand = CandidateModel(model)
    cand.keep_weights()
    guide = RouterReplay(*(causal(cand, seq)[s] for s in ("topk_ids", "router_logits")), 1e9, tie_gap)
    s = Session(cand, capacity=P + N, router_replay=guide)
    s.prefill(seq[:P])
    made: list[str] = []
    for mod in (candidate_mod, forward_io):
        real_tensor, real_as = mod.torch.tensor, mod.torch.as_tensor

        def counted(real, name):
            def f(*a, **k):
                made.append(name)
                return real(*a, **k)
            return f

        monkeypatch.setattr(mod, "torch", type("T", (), {**{k: getattr(torch, k) for k in dir(torch)
                                                            if not k.startswith("__")},
                                                         "tensor": staticmethod(counted(real_tensor, "tensor")),
                                                         "as_tensor": staticmethod(counted(real_as, "as_tensor"))}))
    rows = s.decode(seq[P])
    assert rows[0].step == 0 and made.count("as_tensor") == 1 and "tensor" not in made, made


def test_stage_local_replay_of_a_decode_step(model, cand, seq):
    """Each layer of decode step n run on the golden's input row, over the golden's cached keys, each
    stage forced: every stage within one operation's float noise; a planted kv_short shows in its layer
    only."""
    golden_rec = ArrayRecorder()
    run_reference(model, seq, recorder=golden_rec)
    golden = golden_rec.case()
    p = P + 4
    case, followed = replay_rows(cand, golden, [p], step=4)
    assert followed == () and case.attrs["positions"] == [p]
    for stage, a in case.layers.items():
        want = golden.layers[stage][:, [p]]
        if stage == "topk_ids":
            np.testing.assert_array_equal(a, want)
        else:
            assert rel_l2(a, want) <= REL_L2, stage
    faults = cand.faults([parse_inject("kv_short:layer=2", model.config)])
    hit, _ = replay_rows(cand, golden, [p], step=4, faults=faults)
    differ = {(i, s) for s, a in hit.layers.items() for i in range(len(a)) if not np.array_equal(a[i], case.layers[s][i])}
    assert (2, "attn") in differ and {i for i, _ in differ} == {2}


def test_a_kv_cache_refuses_more_than_it_holds(cand, seq):
    s = Session(cand, capacity=P)
    s.prefill(seq[:P])
    with pytest.raises(UsageError, match=f"sequence 0 would hold {P + 1} tokens; the cache holds {P}"):
        s.decode(seq[P])
    two = Session(cand, capacity=P, n_seqs=2)
    two.prefill(seq[:3], seq=0)
    with pytest.raises(UsageError, match="sequence 1 has no prompt yet"):
        two.decode([1, 2])
    with pytest.raises(UsageError, match="2 tokens for a decode step of 1 sequence$"):
        s.decode([1, 2])
    with pytest.raises(UsageError, match="n_seqs=0"):
        KVCache(cand.cfg, n_seqs=0, capacity=4)


# --------------------------------------------------------------------------- CUDA graphs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_records_from_inside_the_graph(model, batch_seqs, dtype):
    """The decode step captured once and replayed: stages read from the graph's static buffers equal the
    same static step run eagerly on the GPU, and (float32) the causal rows."""
    cand = CandidateModel(model, device="cuda", dtype=dtype)
    graph = run_batch(cand, batch_seqs, decoder="graph")
    eager = run_batch(cand, batch_seqs, decoder="static")
    for g_rows, e_rows in zip(graph[1:], eager[1:]):
        for g, e in zip(g_rows, e_rows):
            assert g.case.attrs["cuda_graph"] is True
            for stage, a in {**g.case.model, **g.case.layers}.items():
                b = {**e.case.model, **e.case.layers}[stage]
                assert (np.array_equal(a, b) if stage == "topk_ids" else rel_l2(a, b) <= 1e-2), stage
    if dtype == torch.float32:
        goldens = [causal(CandidateModel(model), q) for q in batch_seqs]
        assert worst_error([r for f in graph[1:] for r in f], goldens) <= 1e-4
        faults = cand.faults([parse_inject("graph_stale:step=3", model.config)])
        hit = run_batch(cand, batch_seqs, decoder="graph", faults=faults)
        assert first_change(graph, hit, 0) == (3, None, "embed") and faults.unfired() == []



@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_weights_on_a_gpu_keep_experts_while_memory_lasts_with_the_same_bits(model, seq, dtype):
    """On a GPU, keep_weights() keeps whole layers' experts while a quarter of the memory stays free (the
    tiny model's all fit), and a served decode gives the bits of dequantizing at every step; the
    batched recorder's device-side copies give the same arrays too."""
    plain, keeping = CandidateModel(model, device="cuda", dtype=dtype), CandidateModel(model, device="cuda", dtype=dtype)
    keeping.keep_weights()
    assert keeping._expert_budget is None
    want, got = serve(plain, seq, paged=True), serve(keeping, seq, paged=True)
    assert sorted(k[1] for k in keeping._kept if k[0] == "experts") == list(range(model.config.n_layer))
    for a, b in zip(want, got):
        for stage, x in {**a.case.model, **a.case.layers}.items():
            y = b.case.model.get(stage, b.case.layers.get(stage))
            np.testing.assert_array_equal(x, y, err_msg=f"step {a.step} {stage}")
