"""The candidate serving: a prompt, then decode steps through a KV cache, as an engine runs them.

A :class:`Session` holds a :class:`~moesnap.model.kvcache.KVCache` (contiguous or paged, blocks of 16)
for one or more sequences and runs serving forwards on it (:meth:`CandidateModel.forward_batch
<moesnap.model.candidate.CandidateModel.forward_batch>`):

* :meth:`Session.prefill` -- one sequence's prompt, whole or in chunks that attend the cache;
* :meth:`Session.prefill_batch` -- several sequences' prompts of different lengths in one forward
  (packed rows; attention pads each sequence's queries and keys with masks: :mod:`~moesnap.model.kvcache`),
  or with :meth:`Session.prefill_batch_chunks` in forwards of one chunk of each;
* :meth:`Session.decode` -- one decode step: one token per sequence, each at its own absolute position.

Each forward records every stage as the prefill of :meth:`~moesnap.model.candidate.CandidateModel.forward`
does, and returns one :class:`Rows` per sequence: its rows' stages as a :class:`~moesnap.case.Case` (a
decode step is a one-row case), their positions (``int32``), the decode step number, the logits and
where the golden's experts were followed.  In exact arithmetic each row equals the row at the same
position of one causal forward over the whole sequence, so the golden of a prompt plus its
continuation is one reference forward over both, and a decode step is judged against its row.

:class:`GraphDecoder` runs the decode step on static buffers and, on CUDA, captures it once in a
``torch.cuda.CUDAGraph`` and replays it; the stages are copied into static device buffers by copies
that are part of the capture (:class:`StaticRecorder`) and read out after each replay, so recording
and graph-mode numerics coexist.  Elsewhere the same static step runs eagerly (``graph=False``).
Router replay there is decided on the device (:class:`~moesnap.model.static_replay.StaticReplay`: the
golden's routing of each step in static buffers; which rows followed it is read back after the replay).

:func:`replay_rows` is stage-local replay for serving rows: each layer fed the golden's input rows,
its cache holding the golden's ``k_rope``/``v`` of the positions before, every stage forced to the
golden's, so each recorded stage holds one operation's error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..case import Case
from ..errors import UsageError
from .candidate import CandidateModel, Followed, RouterReplay, _Call, _Dense
from .candidate_mla import Latent
from .faults import NO_FAULTS, Faults
from .inject import NanExpert, RouteFlip
from .kvcache import BLOCK_SIZE, Batch, KVCache
from .recorder import ArrayRecorder, NullRecorder, Recorder
from .static_replay import StaticReplay


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class Rows:
    """One sequence's rows of one serving forward."""

    seq: int
    step: int | None              # decode step (0: the first token after the prompt); None: a prompt or chunk
    positions: np.ndarray         # [T] int32, the rows' absolute positions
    case: Case                    # the rows' stages (tokens only when recording is off); attrs: positions, seq, step
    logits: torch.Tensor          # [T, V] on the device, in the compute dtype
    followed: tuple[Followed, ...]  # ``token``: the row of this case

    def next_token(self) -> int:
        """The greedy choice after the last row."""
        return int(torch.argmax(self.logits[-1]).item())


def _split(rec: ArrayRecorder | None, batch: Batch, tokens: np.ndarray, logits: torch.Tensor,
           followed: Sequence[Followed], attrs: Mapping[str, Any]) -> list[Rows]:
    """The packed rows of ``batch`` as one :class:`Rows` per sequence."""
    out = []
    pos = batch.pos.cpu().numpy().astype(np.int32)
    stacked = {} if rec is None else rec.stacked()
    for b, seq in enumerate(batch.seqs):
        r = batch.rows_of(b)
        sl = slice(r.start, r.stop)
        model = {} if rec is None else {s: a[sl] for s, a in rec.model.items() if s != "tokens"}
        layers = {s: a[:, sl] for s, a in stacked.items()}
        positions = pos[sl]
        own = tuple(Followed(f.layer, f.token - r.start, f.own) for f in followed if f.token in r)
        case = Case(tokens=tokens[sl].astype(np.int32), model=model, layers=layers,
                    attrs={**attrs, "positions": positions.tolist(), "seq": seq, "step": batch.step,
                           "router_followed": [[f.layer, f.token, list(f.own)] for f in own]})
        out.append(Rows(seq, batch.step, positions, case, logits[sl], own))
    return out


class Session:
    """Serving forwards of ``cand`` over a KV cache of ``n_seqs`` sequences of at most ``capacity`` tokens.

    ``paged``: a paged cache with blocks of ``block_size`` (else contiguous).  ``faults``: the planted
    faults of the run (:meth:`CandidateModel.faults`; serving faults act in decode steps).
    ``router_replay``: one guide per sequence over the golden's whole sequence (prompt and
    continuation; each forward follows it at its rows' positions), or None.  ``record``: keep every
    stage (else only the logits).
    """

    def __init__(self, cand: CandidateModel, *, capacity: int, n_seqs: int = 1, paged: bool = False,
                 block_size: int = BLOCK_SIZE, faults: Faults = NO_FAULTS,
                 router_replay: RouterReplay | Sequence[RouterReplay | None] | None = None,
                 record: bool = True) -> None:
        self.cand, self.faults, self.record = cand, faults, record
        self.cache = KVCache(cand.cfg, n_seqs=n_seqs, capacity=capacity, paged=paged, block_size=block_size,
                             device=cand.device, dtype=cand.dtype)
        guides = [router_replay] * n_seqs if router_replay is None or isinstance(router_replay, RouterReplay) \
            else list(router_replay)
        if len(guides) != n_seqs:
            raise UsageError(f"{_count(len(guides), 'router replay')} for {_count(n_seqs, 'sequence')}")
        self.guides: list[RouterReplay | None] = guides
        #: decode steps run so far (the next one's number)
        self.steps = 0
        #: every token fed to each sequence so far
        self.tokens: list[list[int]] = [[] for _ in range(n_seqs)]

    @property
    def n_seqs(self) -> int:
        return self.cache.n_seqs

    def _guide(self, batch: Batch) -> RouterReplay | None:
        """Router replay over the packed rows of ``batch``: each sequence's guide at its rows' positions."""
        parts = [self.guides[s] for s in batch.seqs]
        if any(g is None for g in parts):
            return None
        pos = batch.pos.cpu().numpy()
        rows = [g.rows(pos[batch.rows_of(b).start:batch.rows_of(b).stop]) for b, g in enumerate(parts) if g]
        first = rows[0]
        return RouterReplay(np.concatenate([r.ids for r in rows], axis=1),
                            np.concatenate([r.logits for r in rows], axis=1), first.tie_tol, first.gap)

    def run(self, rows: Sequence[tuple[int, Sequence[int]]], *, step: int | None = None) -> list[Rows]:
        """One serving forward: for each ``(seq, tokens)`` of ``rows``, ``tokens`` appended to sequence
        ``seq`` (one token after a cached prefix: a decode step, numbered ``step``)."""
        ids = [np.asarray(t, dtype=np.int64).reshape(-1) for _, t in rows]
        flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        self.cand.model.check_tokens(flat)
        batch = self.cache.batch([(s, len(t)) for (s, _), t in zip(rows, ids)], step=step)
        rec: Recorder = ArrayRecorder(batched=True) if self.record else NullRecorder()
        logits, followed = self.cand.forward_batch(flat, batch, self.cache, rec, router_replay=self._guide(batch),
                                                   faults=self.faults)
        for (s, _), t in zip(rows, ids):
            self.tokens[s] += t.tolist()
        return _split(rec if isinstance(rec, ArrayRecorder) else None, batch, flat, logits, followed,
                      {"dtype": str(self.cand.dtype).removeprefix("torch.")})

    def prefill(self, tokens: Sequence[int], *, seq: int = 0, chunk: int | None = None) -> list[Rows]:
        """Sequence ``seq``'s prompt in one forward, or in forwards of ``chunk`` tokens each, every chunk
        attending the ones before it through the cache: one :class:`Rows` per forward."""
        ids = list(tokens)
        if not ids:
            raise UsageError("an empty prompt: nothing to prefill")
        if chunk is not None and chunk < 1:
            raise UsageError(f"chunk={chunk} must be >= 1 token")
        size = chunk or len(ids)
        return [r for s in range(0, len(ids), size) for r in self.run([(seq, ids[s:s + size])])]

    def prefill_batch(self, prompts: Sequence[Sequence[int]]) -> list[Rows]:
        """Sequences ``0..len(prompts)-1``'s prompts (any lengths) in one forward: one :class:`Rows` each."""
        if any(len(p) == 0 for p in prompts):
            raise UsageError("an empty prompt in the batch: nothing to prefill")
        return self.run([(s, list(p)) for s, p in enumerate(prompts)])

    def prefill_batch_chunks(self, prompts: Sequence[Sequence[int]], chunk: int) -> list[list[Rows]]:
        """Sequences ``0..len(prompts)-1``'s prompts in forwards of up to ``chunk`` tokens of each sequence
        (chunked prefill of a batch: forward ``n`` holds chunk ``n`` of every prompt that still has one,
        each attending its own earlier chunks through the cache): one list of :class:`Rows` per forward."""
        if chunk < 1:
            raise UsageError(f"chunk={chunk} must be >= 1 token")
        if any(len(p) == 0 for p in prompts):
            raise UsageError("an empty prompt in the batch: nothing to prefill")
        longest = max(len(p) for p in prompts)
        return [self.run([(s, list(p[lo:lo + chunk])) for s, p in enumerate(prompts) if len(p) > lo])
                for lo in range(0, longest, chunk)]

    def decode(self, tokens: int | Sequence[int]) -> list[Rows]:
        """One decode step: the next token of each sequence (``tokens[s]`` for sequence ``s``; an int for
        a single sequence), each at its own position.  One :class:`Rows` (of one row) per sequence."""
        toks = [int(tokens)] if isinstance(tokens, (int, np.integer)) else [int(t) for t in tokens]
        if len(toks) != self.n_seqs:
            raise UsageError(f"{_count(len(toks), 'token')} for a decode step of {_count(self.n_seqs, 'sequence')}")
        empty = [s for s in range(self.n_seqs) if self.cache.lens[s] == 0]
        if empty:
            raise UsageError(f"sequence {empty[0]} has no prompt yet: prefill it before decoding")
        out = self.run([(s, [t]) for s, t in enumerate(toks)], step=self.steps)
        self.steps += 1
        return out


# --------------------------------------------------------------------------- static buffers, CUDA graphs


class StaticRecorder:
    """Copies each saved stage into a static buffer of its own (made at the stage's first save, in the
    warm-up before a capture): a graph captured with it records from inside the graph, and
    :meth:`read` hands the buffers' values after a replay to an ordinary recorder.  The token ids are
    the host's (:meth:`GraphDecoder.decode` records the tokens it was asked to run)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, int | None], torch.Tensor] = {}

    def save(self, stage: str, layer: int | None, x: torch.Tensor) -> None:
        if stage == "tokens":
            return
        buf = self.buffers.get((stage, layer))
        if buf is None:
            buf = self.buffers[(stage, layer)] = torch.empty_like(x, memory_format=torch.contiguous_format)
        buf.copy_(x)

    def read(self, rec: Recorder) -> None:
        """Hand a copy of every buffer to ``rec`` (a copy: the next replay overwrites the buffers)."""
        for (stage, layer), buf in self.buffers.items():
            rec.save(stage, layer, buf.clone())


class _Resident(CandidateModel):
    """The candidate with every weight dequantized on the device once (planted ``qtype`` faults baked
    in) and experts gathered per (token, slot) pair: a forward with no host synchronisation and no
    dequantization, which a CUDA graph can capture.  Holds every expert of every layer dequantized
    (a 30B-A3B model in bfloat16: ~58 GB).  What the candidate keeps already (:meth:`keep_weights`: the
    dense weights, the output matrix's chunks, on a GPU whole layers' experts) is shared, not made again:
    the same tensors, so the same bits, held once (gpt-oss-20b's output matrix alone is 1.2 GB in bfloat16)."""

    def __init__(self, cand: CandidateModel, faults: Faults) -> None:
        super().__init__(cand.model, device=cand.device, dtype=cand.dtype, expert_path=cand.expert_path,
                         expert_values=cand.expert_values)
        self._bytes = cand._bytes                     # share what the candidate uploaded
        self.layers = [cand._dense(i, faults) for i in range(self.cfg.n_layer)]
        self.experts = [None if self.cfg.dense(i) else cand._kept_experts(i, faults) or self._experts_weights_all(i, faults)
                        for i in range(self.cfg.n_layer)]
        every = list(range(self.cfg.n_expert))
        self.expert_biases = [None if self.cfg.dense(i) else self._experts_biases(i, every, faults)
                              for i in range(self.cfg.n_layer)]
        self.embedding = self._weight("token_embd", NO_FAULTS)                     # [V, H]
        self.out_norm = self._weight("output_norm", NO_FAULTS)                     # [H]
        #: the output matrix's rows in the candidate's chunks (its own where it keeps them), held here
        #: whatever the candidate drops later: a captured graph reads these very tensors
        self.out = list(cand._output_chunks())                                     # [(first row, [n, H])]

    def _dense(self, i: int, faults: Faults) -> _Dense | Latent:
        return self.layers[i]

    def _experts(self, i: int, x: torch.Tensor, ids: torch.Tensor, c: _Call) -> torch.Tensor:
        T, k = ids.shape
        flat = ids.reshape(-1)                                                    # [T*k]
        experts = self.experts[i]
        assert experts is not None, f"layer {i} is dense: it has no experts"
        gate, up, down = experts                                                  # [E, F, H] x2, [E, H, F]
        xr = x[:, None, :].expand(T, k, x.shape[1]).reshape(T * k, x.shape[1], 1)  # [T*k, H, 1]
        g, u = torch.bmm(gate.index_select(0, flat), xr), torch.bmm(up.index_select(0, flat), xr)  # [T*k, F, 1]
        bias = self.expert_biases[i]                                              # [E, F] x2, [E, H]
        if bias is None:
            d = torch.bmm(down.index_select(0, flat), self._act(g, u))            # [T*k, H, 1]
        else:   # biases and activation in float32, as the candidate's grouped path
            g = g.to(self.opmath) + bias[0].index_select(0, flat)[..., None]
            u = u.to(self.opmath) + bias[1].index_select(0, flat)[..., None]
            d = torch.bmm(down.index_select(0, flat), self._act(g, u).to(self.dtype))
            d = (d.to(self.opmath) + bias[2].index_select(0, flat)[..., None]).to(self.dtype)
        return d.view(T, k, self.cfg.hidden)

    def _embed(self, tok: torch.Tensor) -> torch.Tensor:
        return self.embedding.index_select(0, tok)

    def _head(self, x: torch.Tensor, rec: Recorder) -> torch.Tensor:
        x = self._norm(x, self.out_norm)
        rec.save("final_norm", None, x)
        logits = torch.empty(x.shape[0], self.cfg.vocab_size, dtype=self.dtype, device=self.device)
        for s, wchunk in self.out:                                                 # the candidate's products
            logits[:, s:s + wchunk.shape[0]] = x @ wchunk.T
        rec.save("logits", None, logits)
        return logits


class GraphDecoder:
    """The decode steps of ``session`` on static buffers: token, positions, cache slots, block table and
    lengths live in fixed device tensors that each step refreshes, the forward reads only those, and the
    stages land in a :class:`StaticRecorder`'s buffers.  ``graph`` (default: on CUDA) captures the step
    once in a ``torch.cuda.CUDAGraph`` (after an eager warm-up that makes every buffer) and replays it;
    without it the same static step runs eagerly.  Attention covers every slot of the cache, the
    padding masked.  Every sequence of the session must have its prompt cached; no ``nan``/``route``
    faults (their decisions need the host).  The session's router replay (a guide for every sequence)
    is decided on the device (:class:`~moesnap.model.static_replay.StaticReplay`), each step's guide rows
    filled before it runs, so the rows follow the golden's experts where :meth:`Session.decode` would,
    with the same values and the same :attr:`Rows.followed`.  ``record=False`` captures no copies.
    """

    def __init__(self, session: Session, *, graph: bool | None = None, record: bool = True) -> None:
        cand, cache = session.cand, session.cache
        self.graph = cand.device.type == "cuda" if graph is None else graph
        if self.graph and cand.device.type != "cuda":
            raise UsageError(f"a CUDA graph needs a CUDA device; the candidate runs on {cand.device}")
        bad = [j for j in session.faults.injections if isinstance(j, (NanExpert, RouteFlip))]
        if bad:
            raise UsageError(f"{bad[0].option}: not planted in a decode step on static buffers; run it eagerly")
        if min(cache.lens) == 0:
            raise UsageError("prefill every sequence of the session before its decode steps")
        self.session, self.cache, self.faults = session, cache, session.faults
        self.model = _Resident(cand, session.faults)
        self.record = StaticRecorder() if record else None
        guides = [g for g in session.guides if g is not None]
        #: router replay on the device: only where every sequence has a guide (as Session.decode)
        self.replay = StaticReplay(guides, n_layer=cand.cfg.n_layer, n_expert=cand.cfg.n_expert,
                                   k=cand.cfg.n_expert_used, device=cand.device) \
            if guides and len(guides) == cache.n_seqs else None
        B, dev, nb = cache.n_seqs, cand.device, cache.max_blocks
        self.n_keys = nb * cache.block_size
        self.model._rope_at(torch.zeros(1, dtype=torch.long), self.n_keys + 2)   # the whole table, before capture
        with torch.inference_mode():
            zeros = torch.zeros(B, dtype=torch.long, device=dev)
            self.tok, self.pos, self.rope_pos, self.slot, self.lens = (zeros.clone() for _ in range(5))
            self.write_table = torch.zeros(B, nb, dtype=torch.long, device=dev)
            self.table = torch.zeros(B, nb, dtype=torch.long, device=dev)
            rows = torch.arange(B, device=dev)
        self.static = Batch(seqs=tuple(range(B)), counts=(1,) * B, lens=(self.n_keys,) * B, step=None, decode=True,
                            block_size=cache.block_size, n_keys=self.n_keys, max_pos=self.n_keys + 1, pos=self.pos,
                            rope_pos=self.rope_pos, row_seq=rows, write_slot=self.slot, write_table=self.write_table,
                            table=self.table, seq_lens=self.lens, q_index=rows[:, None], q_pos=self.pos[:, None],
                            out_index=rows, causal=False)
        self._cuda_graph: Any = None
        self._logits: torch.Tensor | None = None
        self._last: list[int] | None = None

    def _forward(self) -> torch.Tensor:
        rec: Recorder = self.record if self.record is not None else NullRecorder()
        return self.model.forward_batch(self.tok, self.static, self.cache, rec, router_replay=self.replay,
                                        faults=self.faults).logits

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward()                                   # warm-up: allocates every buffer
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._logits = self._forward()
        self._cuda_graph = g

    @torch.inference_mode()
    def decode(self, tokens: int | Sequence[int]) -> list[Rows]:
        """One decode step of every sequence (as :meth:`Session.decode`), on the static buffers."""
        s = self.session
        toks = [int(tokens)] if isinstance(tokens, (int, np.integer)) else [int(t) for t in tokens]
        if len(toks) != s.n_seqs:
            raise UsageError(f"{_count(len(toks), 'token')} for a decode step of {_count(s.n_seqs, 'sequence')}")
        s.cand.model.check_tokens(np.asarray(toks, dtype=np.int64))
        step = s.steps
        host = self.faults.step(self.cache.batch([(q, 1) for q in range(s.n_seqs)], step=step, n_keys=self.n_keys))
        for buf, val in ((self.pos, host.pos), (self.rope_pos, host.rope_pos), (self.slot, host.write_slot),
                         (self.write_table, host.write_table), (self.table, host.table), (self.lens, host.seq_lens)):
            buf.copy_(val)
        if self._last is None or self.faults.refresh(step, self._last, toks):
            self.tok.copy_(torch.tensor(toks, dtype=torch.long))
        if self.replay is not None:
            self.replay.fill(host.pos.tolist())
        if not self.graph:
            logits = self._forward()
        else:
            if self._cuda_graph is None:
                self._capture()
            self._cuda_graph.replay()
            assert self._logits is not None
            logits = self._logits
        self._last = toks
        s.steps += 1
        for q, t in enumerate(toks):
            s.tokens[q].append(t)
        rec = None
        if self.record is not None:
            rec = ArrayRecorder()
            self.record.read(rec)
        followed: list[Followed] = [] if self.replay is None else [Followed(*f) for f in self.replay.read()]
        return _split(rec, host, np.asarray(toks, dtype=np.int64), logits.clone(), followed,
                      {"dtype": str(s.cand.dtype).removeprefix("torch."), "cuda_graph": self.graph})


# --------------------------------------------------------------------------- stage-local replay


def _uploaded(device: torch.device, prefix: list[tuple[np.ndarray, np.ndarray]], inputs: list[np.ndarray],
              forces: list[dict[str, np.ndarray]]
              ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor], list[dict[str, Any]]]:
    """The golden's values a stage-local replay feeds its forward (each layer's cached prefix, input rows and
    forced stages), on ``device`` in one copy per dtype: copied stage by stage, each copy would wait for the
    device.  Integer stages (``topk_ids``, read on the host) stay as they are; values keep their dtype."""
    floats: list[np.ndarray] = [a for kv in prefix for a in kv] + list(inputs) + \
        [a for f in forces for a in f.values() if a.dtype.kind == "f"]
    by_dtype: dict[np.dtype, list[int]] = {}
    for j, a in enumerate(floats):
        by_dtype.setdefault(a.dtype, []).append(j)
    out: list[torch.Tensor | None] = [None] * len(floats)
    for dt, js in by_dtype.items():
        flat = np.concatenate([floats[j].reshape(-1) for j in js]) if js else np.zeros(0, dt)
        dev = torch.from_numpy(flat).to(device)
        at = 0
        for j in js:
            out[j] = dev[at:at + floats[j].size].view(floats[j].shape)
            at += floats[j].size
    it = iter(out)
    pre = [(next(it), next(it)) for _ in prefix]
    ins = [next(it) for _ in inputs]
    frc = [{s: next(it) if a.dtype.kind == "f" else a for s, a in f.items()} for f in forces]
    return pre, ins, frc  # type: ignore[return-value]


def replay_rows(cand: CandidateModel, golden: Case, positions: Sequence[int], *, step: int | None = None,
                faults: Faults = NO_FAULTS, paged: bool = False) -> tuple[Case, tuple[Followed, ...]]:
    """Stage-local replay of a serving forward over the golden's rows at ``positions`` (consecutive: a
    decode step is ``[p]``, a chunk its range): each layer fed the golden's input rows there, its cache
    holding the golden's ``k_rope``/``v`` rows of the positions before, each stage forced to the golden's
    value before the next operation uses it.  ``step``: the decode step these rows are (serving faults
    act there).  Returns the recorded case of those rows (attrs ``replay``, ``positions``) and where
    the golden's experts were followed."""
    pos = [int(p) for p in positions]
    if not pos or pos != list(range(pos[0], pos[0] + len(pos))):
        raise UsageError(f"positions {pos} are not one consecutive run")
    need = [s for s in ("k_rope", "v", "layer_out") if s not in golden.layers] + \
        (["embed"] if "embed" not in golden.model else [])
    if need:
        raise UsageError(f"stage-local replay of serving rows needs the golden's {', '.join(need)}")
    if pos[-1] >= len(golden.tokens):
        raise UsageError(f"position {pos[-1]} is beyond the golden's {len(golden.tokens)} tokens")
    p0, n, L = pos[0], len(pos), golden.n_layer
    cache = KVCache(cand.cfg, n_seqs=1, capacity=p0 + n, paged=paged, device=cand.device, dtype=cand.dtype)
    rows = np.asarray(pos)
    prefix = [(golden.layers["k_rope"][i][:p0], golden.layers["v"][i][:p0]) for i in range(L if p0 else 0)]
    inputs = [golden.model["embed"][rows] if i == 0 else golden.layers["layer_out"][i - 1][rows] for i in range(L)]
    forces = [{s: a[i][rows] for s, a in golden.layers.items() if i < a.shape[0]} for i in range(L)]
    prefix, inputs, forces = _uploaded(cand.device, prefix, inputs, forces)
    cache.load_layers(0, dict(enumerate(prefix)))
    batch = cache.batch([(0, n)], step=step)
    batch = faults.step(batch)
    rec, followed = ArrayRecorder(batched=True), list[Followed]()
    for i in range(L):
        out = cand.forward_layer(i, inputs[i], rec, force=forces[i], faults=faults, batch=batch, cache=cache)
        followed += out.followed
    case = Case(tokens=golden.tokens[rows].astype(np.int32), model={}, layers=rec.stacked(),
                attrs={"replay": True, "positions": pos, "step": step,
                       "router_followed": [[f.layer, f.token, list(f.own)] for f in followed]})
    return case, tuple(followed)


def replay_batch(cand: CandidateModel, goldens: Sequence[Case], positions: Sequence[Sequence[int]], *,
                 step: int | None = None, faults: Faults = NO_FAULTS,
                 paged: bool = False) -> list[tuple[Case, tuple[Followed, ...]]]:
    """:func:`replay_rows` of one batched forward: sequence ``b`` is ``goldens[b]``'s rows at ``positions[b]``,
    all of them packed into ONE forward over a cache that holds each sequence's golden prefix, so that a
    fault acting between the sequences of a batch (``pad_attend``, ``swap_rows``) acts in the replay too and
    is named where it is introduced.  Returns each sequence's recorded case and followed routes, in order."""
    if len(goldens) != len(positions) or not goldens:
        raise UsageError(f"{len(goldens)} goldens for {len(positions)} runs of positions")
    if len(goldens) == 1:
        return [replay_rows(cand, goldens[0], positions[0], step=step, faults=faults, paged=paged)]
    runs = [[int(p) for p in pos] for pos in positions]
    for g, pos in zip(goldens, runs):
        if not pos or pos != list(range(pos[0], pos[0] + len(pos))):
            raise UsageError(f"positions {pos} are not one consecutive run")
        need = [s for s in ("k_rope", "v", "layer_out") if s not in g.layers] + (["embed"] if "embed" not in g.model
                                                                                 else [])
        if need:
            raise UsageError(f"stage-local replay of serving rows needs the golden's {', '.join(need)}")
        if pos[-1] >= len(g.tokens):
            raise UsageError(f"position {pos[-1]} is beyond the golden's {len(g.tokens)} tokens")
    L = min(g.n_layer for g in goldens)
    cache = KVCache(cand.cfg, n_seqs=len(goldens), capacity=max(pos[-1] + 1 for pos in runs), paged=paged,
                    device=cand.device, dtype=cand.dtype)
    for b, (g, pos) in enumerate(zip(goldens, runs)):
        prefix = [(g.layers["k_rope"][i][:pos[0]], g.layers["v"][i][:pos[0]]) for i in range(L if pos[0] else 0)]
        cache.load_layers(b, dict(enumerate(_uploaded(cand.device, prefix, [], [])[0])))
    batch = faults.step(cache.batch([(b, len(pos)) for b, pos in enumerate(runs)], step=step))
    stages = [s for s in goldens[0].layers if all(s in g.layers for g in goldens)]
    rec, followed = ArrayRecorder(batched=True), list[Followed]()
    packed_in = [np.concatenate([g.model["embed"][pos] if i == 0 else g.layers["layer_out"][i - 1][pos]
                                 for g, pos in zip(goldens, runs)]) for i in range(L)]     # [T, H] packed
    packed_force = [{s: np.concatenate([g.layers[s][i][pos] for g, pos in zip(goldens, runs)])
                     for s in stages if all(i < g.layers[s].shape[0] for g in goldens)} for i in range(L)]
    _, inputs, forces = _uploaded(cand.device, [], packed_in, packed_force)
    for i in range(L):
        out = cand.forward_layer(i, inputs[i], rec, force=forces[i], faults=faults, batch=batch, cache=cache)
        followed += out.followed
    packed = rec.stacked()                                                                # [L, T, ...]
    bounds = np.cumsum([0, *(len(pos) for pos in runs)])
    result = []
    for b, (g, pos) in enumerate(zip(goldens, runs)):
        lo, hi = int(bounds[b]), int(bounds[b + 1])
        mine = tuple(Followed(f.layer, f.token - lo, f.own) for f in followed if lo <= f.token < hi)
        case = Case(tokens=g.tokens[np.asarray(pos)].astype(np.int32), model={},
                    layers={s: a[:, lo:hi] for s, a in packed.items()},
                    attrs={"replay": True, "positions": pos, "step": step,
                           "router_followed": [[f.layer, f.token, list(f.own)] for f in mine]})
        result.append((case, mine))
    return result
