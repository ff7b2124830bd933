"""Router replay decided on the device, in the decode step on static buffers (the CUDA graph's code path,
run eagerly on the CPU): the same decision, the same values and the same ``followed`` notes as the
eager rule (:class:`~moesnap.model.candidate.RouterReplay`, decided on the host).

The guides are built so that both branches of the rule are taken at known rows: from the candidate's
own float32 causal forward, with the golden's k-th expert swapped for its (k+1)-th (put in the first
slot, so that following reorders the slots by weight) at some (layer, position) of the decode steps
(the candidate's own choice then differs at a near tie: it follows), and at others the same swap with
that expert's golden logit raised far past the tie width (a wide flip: it keeps its own choice).  The
decode steps on static buffers do not run the eager step's kernels (attention over every slot of the
cache, experts gathered per pair), so against :meth:`Session.decode` they agree within float noise,
with the same experts and the same notes; against the same static step with the host's rule they
agree bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moesnap.judge.routing import tie_gap
from moesnap.model.candidate import CandidateModel, Followed, RouterReplay
from moesnap.model.recorder import ArrayRecorder, NullRecorder, Recorder
from moesnap.model.serve import GraphDecoder, Rows, Session
from moesnap.model.static_replay import tie_gaps
from moesnap.model.synth import tiny_path
from moesnap.model.weights import GGUFModel

PROMPTS = (20, 9, 17)      # a ragged batch
STEPS = 6
TIE_TOL = 0.5              # logit units; the near swaps' gaps are <= 0, the wide ones' > 5
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def model() -> GGUFModel:
    return GGUFModel.open(tiny_path())


@pytest.fixture(scope="module")
def seqs(model) -> list[list[int]]:
    rng = np.random.default_rng(11)
    return [rng.integers(0, model.config.vocab_size, p + STEPS).tolist() for p in PROMPTS]


def planted_guide(golden: dict[str, np.ndarray], prompt: int, seq: int) -> tuple[RouterReplay, set, set]:
    """A guide over ``golden``'s routing with swaps planted in the decode rows: (the guide, the
    (layer, position) where the candidate must follow it, those where it must keep its own choice)."""
    ids, logits = golden["topk_ids"].copy(), golden["router_logits"].astype(np.float64)
    L, T, k = ids.shape
    near, wide = set(), set()
    for i in range(L):
        for p in range(prompt, T):
            kind = (i + p + seq) % 3
            if kind == 0:
                continue
            order = np.argsort(-logits[i, p], kind="stable")
            assert set(order[:k]) == set(ids[i, p]), "the golden's ids are its logits' top-k"
            out, into = order[k - 1], order[k]
            ids[i, p] = [into] + [e for e in ids[i, p] if e != out]      # in the first slot: the rule reorders
            if kind == 2:
                logits[i, p, into] += 10.0
                wide.add((i, p))
            else:
                near.add((i, p))
    return RouterReplay(ids, logits, np.full(L, TIE_TOL), tie_gap), near, wide


@pytest.fixture(scope="module")
def guides(model, seqs):
    f32 = CandidateModel(model)
    out = []
    for s, (q, p) in enumerate(zip(seqs, PROMPTS)):
        rec = ArrayRecorder()
        f32.forward(q, rec)
        out.append(planted_guide({**rec.model, **rec.stacked()}, p, s))
    return out


class HostRule(GraphDecoder):
    """The same static step with router replay decided on the host by the eager rule; the notes of
    each step in :attr:`notes`."""

    def __init__(self, session: Session) -> None:
        super().__init__(session, graph=False)
        self.replay = None                         # the device rule off
        self.notes: list[tuple[Followed, ...]] = []

    def _forward(self) -> torch.Tensor:
        rec: Recorder = self.record if self.record is not None else NullRecorder()
        out = self.model.forward_batch(self.tok, self.static, self.cache, rec,
                                       router_replay=self.session._guide(self.static), faults=self.faults)
        self.notes.append(out.followed)
        return out.logits


def serve(cand: CandidateModel, seqs, guides, decoder: str) -> tuple[list[list[Rows]], GraphDecoder | Session]:
    s = Session(cand, capacity=32, n_seqs=len(seqs), paged=True, router_replay=[g[0] for g in guides])
    s.prefill_batch([q[:p] for q, p in zip(seqs, PROMPTS)])
    dec: GraphDecoder | Session = {"session": lambda: s, "static": lambda: GraphDecoder(s, graph=False),
                                   "host": lambda: HostRule(s)}[decoder]()
    return [dec.decode([q[p + n] for q, p in zip(seqs, PROMPTS)]) for n in range(STEPS)], dec


def notes(steps: list[list[Rows]]) -> list[tuple[int, int, int, tuple[int, ...]]]:
    """(step, seq, layer, own ids) of every followed row."""
    return [(r.step, r.seq, f.layer, tuple(f.own)) for rows in steps for r in rows for f in r.followed]


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_device_rule_follows_where_the_host_rule_does_bit_for_bit(model, seqs, guides, dtype):
    cand = CandidateModel(model, dtype=dtype)
    device, _ = serve(cand, seqs, guides, "static")
    host, dec = serve(cand, seqs, guides, "host")
    assert isinstance(dec, HostRule)
    for d_rows, h_rows, h_notes in zip(device, host, dec.notes):
        assert sum(len(r.followed) for r in d_rows) == len(h_notes)
        for d, h in zip(d_rows, h_rows):     # a decode step's row b is sequence b; each Rows counts from 0
            assert list(d.followed) == [Followed(f.layer, 0, f.own) for f in h_notes if f.token == d.seq]
            assert d.case.attrs["router_followed"] == [[f.layer, 0, f.own] for f in h_notes if f.token == d.seq]
            for stage, a in {**d.case.model, **d.case.layers}.items():
                np.testing.assert_array_equal(a, {**h.case.model, **h.case.layers}[stage], err_msg=stage)
            assert torch.equal(d.logits, h.logits)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_device_rule_follows_where_session_decode_does(model, seqs, guides, dtype):
    cand = CandidateModel(model, dtype=dtype)
    static, _ = serve(cand, seqs, guides, "static")
    eager, _ = serve(cand, seqs, guides, "session")
    assert notes(static) == notes(eager)
    followed = {(f.layer, r.positions[0]) for rows in static for r in rows if r.seq == 0 for f in r.followed}
    _, near, wide = guides[0]
    assert near <= followed and not wide & followed      # both branches of the rule taken, each where planted
    bound = 2e-5 if dtype == torch.float32 else 2e-2
    for s_rows, e_rows in zip(static, eager):
        for s, e in zip(s_rows, e_rows):
            assert s.case.attrs["router_followed"] == e.case.attrs["router_followed"]
            np.testing.assert_array_equal(s.case.layers["topk_ids"], e.case.layers["topk_ids"])
            for stage, a in s.case.layers.items():
                assert rel_l2(a, e.case.layers[stage]) <= bound, (s.step, s.seq, stage)


def test_a_session_without_a_guide_for_every_sequence_follows_nothing(model, seqs, guides):
    cand = CandidateModel(model)
    s = Session(cand, capacity=32, n_seqs=3, paged=True, router_replay=[guides[0][0], None, guides[2][0]])
    s.prefill_batch([q[:p] for q, p in zip(seqs, PROMPTS)])
    dec = GraphDecoder(s, graph=False)
    assert dec.replay is None
    rows = dec.decode([q[p] for q, p in zip(seqs, PROMPTS)])
    assert all(r.followed == () and r.case.attrs["router_followed"] == [] for r in rows)


def test_tie_gaps_is_the_judges_tie_gap():
    rng = np.random.default_rng(2)
    E, k = 12, 3
    rows = rng.normal(size=(64, E))
    rows[1, :] = 0.5                                  # every logit tied
    rows[2, 4] = np.nan
    rows[3, 0] = np.inf
    rows[4, 5] = -np.inf
    rows[5, :4] = rows[5, 4]                          # a tie across the k-th place
    chosen = np.stack([rng.choice(E, k, replace=False) for _ in rows])
    chosen[6] = np.argsort(-rows[6])[:k]              # a top-k: gap <= 0
    got = tie_gaps(torch.from_numpy(rows), torch.from_numpy(chosen)).numpy()
    want = np.array([tie_gap(r, c) for r, c in zip(rows, chosen)])
    np.testing.assert_array_equal(got, want)
    assert got[6] <= 0 and np.isnan(got[2:5]).all()
    every = tie_gaps(torch.from_numpy(rows[:2, :3]), torch.tensor([[0, 1, 2], [2, 1, 0]]))
    assert every.tolist() == [tie_gap(rows[0, :3], [0, 1, 2]), tie_gap(rows[1, :3], [2, 1, 0])] == [0.0, 0.0]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_cuda_graph_replays_router_replay_decided_on_the_device(model, seqs, guides, dtype):
    """Captured once, replayed every step with the guide buffers refilled: the same notes and experts as the
    same static step run eagerly on the GPU, stages within float noise, and the planted rows followed."""
    cand = CandidateModel(model, device="cuda", dtype=dtype)
    s = Session(cand, capacity=32, n_seqs=len(seqs), paged=True, router_replay=[g[0] for g in guides])
    s.prefill_batch([q[:p] for q, p in zip(seqs, PROMPTS)])
    dec = GraphDecoder(s, graph=True)
    graph = [dec.decode([q[p + n] for q, p in zip(seqs, PROMPTS)]) for n in range(STEPS)]
    eager, _ = serve(cand, seqs, guides, "static")
    assert notes(graph) == notes(eager) and notes(graph)
    _, near, wide = guides[0]
    followed = {(f.layer, r.positions[0]) for rows in graph for r in rows if r.seq == 0 for f in r.followed}
    assert near <= followed and not wide & followed
    for g_rows, e_rows in zip(graph, eager):
        for g, e in zip(g_rows, e_rows):
            assert g.case.attrs["cuda_graph"] is True
            np.testing.assert_array_equal(g.case.layers["topk_ids"], e.case.layers["topk_ids"])
            for stage, a in g.case.layers.items():
                assert rel_l2(a, e.case.layers[stage]) <= 1e-2, stage
