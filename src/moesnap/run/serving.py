"""The check beyond one prefill: moesnap's candidate serves each golden case as an engine would — its
prompt (whole or in chunks), then ``decode`` steps through a KV cache (contiguous or paged, one
sequence or all cases as a ragged batch, the steps eager or on a CUDA graph's static buffers) — and
every forward is judged against the golden's rows at its positions.

The golden of a sequence is one reference forward over prompt and continuation: in exact arithmetic a
decode step computes the row at its position of that forward.  The steps are teacher-forced on the
golden's tokens, so each is judged at the golden's sequence; the candidate's own next-token choice is
judged through its logits (:mod:`moesnap.judge.distribution`).  The prompt is the golden case's
recorded ``prompt_tokens`` (``goldens generate --decode N``), else its first ``T - decode`` tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..case import Case
from ..errors import UsageError
from ..judge.policy import Policy
from ..judge.report import Report
from ..judge.routing import tie_gap
from ..judge.suite import Pair, PerLayer, judge_suite
from ..model.candidate import CandidateModel, RouterReplay
from ..model.faults import Faults
from ..model.inject import Injection, check_injections
from ..model.inject_serving import ServePlan, check_serving
from ..model.weights import ModelWeights
from ..util import status


def router_guide(golden: Case, policy: Policy):
    """Router replay for a candidate run on ``golden``'s tokens: its expert ids and the scores its family's
    selection ranks by (:data:`~moesnap.stages.ROUTING_SCORES`: the router logits, DeepSeek's ``router_select``), and
    the near-tie width free-running at each layer (None where the golden holds no routing)."""
    from ..judge.attrs import recorded_family
    from ..model.candidate import RouterReplay
    from ..stages import DEFAULT_FAMILY, ROUTING_SCORES

    # the scores the family's selection ranks by (DeepSeek: router_select), where near ties are measured
    scores = ROUTING_SCORES[recorded_family(golden, where="golden") or DEFAULT_FAMILY]
    ids, logits = golden.layers.get("topk_ids"), golden.layers.get(scores)
    if ids is None or logits is None:
        return None
    dname = policy.dtype or "float32"
    return RouterReplay(ids, logits, np.array([policy.tolerances.tie_tol_at(dname, i) for i in range(len(ids))]),
                        tie_gap)


def prompt_length(name: str, golden: Case, decode: int) -> int:
    """How many of ``golden``'s tokens are its prompt, for a run of ``decode`` steps after it."""
    T = int(golden.tokens.shape[0])
    recorded = golden.attrs.get("prompt_tokens")
    P = int(recorded) if isinstance(recorded, int) and not isinstance(recorded, bool) else T - decode
    if decode < 0:
        raise UsageError(f"--decode {decode}: must be >= 0")
    if P < 1 or P + decode > T:
        have = T - P if isinstance(recorded, int) else T - 1
        raise UsageError(f"--decode {decode}: golden case {name} holds {T} tokens"
                         + (f" ({recorded} of them its prompt)" if isinstance(recorded, int) else "")
                         + f", room for {max(0, have)} decode steps; generate the golden with --decode {decode} "
                           f"(or a longer --continuation)")
    return P


@dataclass(frozen=True)
class Serving:
    """A serving run, checked against the goldens and the planted faults before anything runs
    (:func:`plan_serving`): each case's prompt length, the decode steps after it, and how it is served."""

    prompts: tuple[int, ...]
    decode: int
    replay: bool
    paged: bool = False
    batch: bool = False
    chunk: int | None = None
    graph: bool = False
    #: how it is served, in words (for the status line and the report's notes)
    how: str = ""


def plan_serving(model: ModelWeights, goldens: Sequence[tuple[str, Case]], *, device: torch.device | str,
                 dtype: str, decode: int, replay: bool | None = None, injections: Sequence[Injection] = (),
                 paged: bool = False, batch: bool = False, chunk: int | None = None,
                 graph: bool = False) -> Serving:
    """The run :func:`run_serving_check` makes of these options (``replay`` None: on for bfloat16/float16),
    refusing in one line a golden too short for ``decode`` steps or a planted fault that cannot fire in it."""
    if replay is None:
        replay = dtype in ("bfloat16", "float16")
    prompts = [prompt_length(name, g, decode) for name, g in goldens]
    plan = ServePlan(tuple(prompts) if batch else (prompts[0],) if len(prompts) == 1 else tuple(prompts), decode,
                     paged=paged, graph=graph)
    if batch or len(goldens) == 1:
        check_serving(injections, plan)
    else:   # one sequence at a time: each must let a fault fire in its own run (a batch fault needs --batch)
        check_serving(injections, ServePlan(tuple(prompts[:1]), decode, paged=paged, graph=graph))
    check_injections([i for i in injections if i.kind in ("nan", "qtype", "scale", "route", "mxfp4_scale", "sink_off",
                                                          "window")], model,
                     [len(g.tokens) for _, g in goldens])
    how = ", ".join(x for x in ("paged KV cache" if paged else "contiguous KV cache",
                                "one ragged batch" if batch and len(goldens) > 1 else "",
                                f"prefill in chunks of {chunk}" if chunk else "",
                                "decode on static buffers" + (" (CUDA graph)" if str(device).startswith("cuda")
                                                              else " (eager: no CUDA here)") if graph else "") if x)
    return Serving(tuple(prompts), decode, replay, paged=paged, batch=batch, chunk=chunk, graph=graph, how=how)


def serve_pairs(cand: CandidateModel, goldens: Sequence[tuple[str, Case]], s: Serving, faults: Faults,
                guides: Sequence[RouterReplay | None] | None, *, record: bool = True) -> Iterator[Pair]:
    """Serve every golden case with ``cand`` as ``s`` plans it and yield each forward's pairs, in order:
    the prompt (or its chunks), then each decode step (of every sequence at once with ``s.batch``), each
    with its stage-local replay where ``s.replay``.  Made lazily: a consumer judges one forward while the
    next has not run.  ``record=False``: the forwards keep only their logits (the ranks of an
    expert-parallel run other than the one that judges)."""
    from ..model.serve import GraphDecoder, Session, replay_batch

    per_case = list(guides) if guides is not None else [None] * len(goldens)
    prompts, decode = s.prompts, s.decode

    def serve(group: list[int]) -> Iterator[Pair]:
        names = [goldens[i][0] for i in group]
        gold = [goldens[i][1] for i in group]
        session = Session(cand, capacity=max(int(g.tokens.shape[0]) for g in gold), n_seqs=len(group), paged=s.paged,
                          faults=faults, router_replay=[per_case[i] for i in group], record=record)
        toks = [g.tokens.tolist() for g in gold]
        if len(group) == 1:
            forwards = [session.prefill(toks[0][:prompts[group[0]]], chunk=s.chunk)]
            forwards = [[r] for r in forwards[0]]
        elif s.chunk:
            forwards = session.prefill_batch_chunks([t[:prompts[i]] for t, i in zip(toks, group)], s.chunk)
        else:
            forwards = [session.prefill_batch([t[:prompts[i]] for t, i in zip(toks, group)])]
        for n_fwd, rows in enumerate(forwards):
            yield from _pairs([names[r.seq] if n_fwd == 0 else f"{names[r.seq]}/chunk{n_fwd}" for r in rows],
                              [gold[r.seq] for r in rows], [r.case for r in rows], None)
        decoder = GraphDecoder(session, graph=str(cand.device).startswith("cuda")) if s.graph else session
        for n in range(decode):
            rows = decoder.decode([t[prompts[i] + n] for t, i in zip(toks, group)])
            yield from _pairs([f"{names[r.seq]}/step{n}" for r in rows], [gold[r.seq] for r in rows],
                              [r.case for r in rows], n)

    def _pairs(names: list[str], golden: list[Case], rows: list[Case], step: int | None) -> Iterator[Pair]:
        """The pairs of one serving forward's sequences; its stage-local replay is ONE forward too (the
        sequences of a batch packed together, so that a fault between them acts there as well)."""
        replays: list[Case | None] = [None] * len(rows)
        if s.replay:
            replays = [c for c, _ in replay_batch(cand, golden, [r.positions.tolist() for r in rows], step=step,
                                                  faults=faults, paged=s.paged)]
        for name, g, r, rep in zip(names, golden, rows, replays):
            yield Pair(name, g, r, None if rep is None else PerLayer(g.rows(r.positions), rep), step=step)

    groups = [list(range(len(goldens)))] if s.batch else [[i] for i in range(len(goldens))]
    for group in groups:
        yield from serve(group)


def unfired_error(unfired: Sequence[Injection]) -> UsageError | None:
    """The refusal of a serving run where a planted fault did not fire (None where every one did)."""
    if not unfired:
        return None
    return UsageError(f"{unfired[0].option}: the planted fault did not fire in this run, so this self-test "
                      f"would prove nothing; choose another layer, expert, step or token")


def judge_serving(pairs: Iterable[Pair], s: Serving, policy: Policy, *, goldens: Sequence[tuple[str, Case]],
                  injections: Sequence[Injection], unfired: Callable[[], Sequence[Injection]], candidate: str,
                  served_by: str, device: torch.device | str, router_replay: bool,
                  golden_ref: str = "golden") -> Report:
    """Judge a serving run's ``pairs`` (:func:`serve_pairs`): the one judging of every serving check,
    whichever candidate served them.  ``unfired``: the planted faults that fired nowhere, asked once every
    pair is judged (one is refused); ``candidate``: its name in the report; ``served_by``: the note saying
    what ran it."""
    notes = [f"injected fault: {inj}" for inj in injections]
    notes.append(f"candidate: {served_by}; served: {s.how}; the decode steps fed the golden's tokens "
                 f"(teacher-forced), each judged against the golden's row at its position")
    if s.graph and router_replay:
        notes.append("decode on static buffers: router replay decided on the device (the golden's routing of each "
                     "step in static buffers, refilled before every replay)")
    mode = "free-running, router replay" if router_replay else "free-running"
    report = judge_suite(pairs, policy, golden=golden_ref, candidate=candidate, mode=mode,
                         per_layer="replay" if s.replay else None, notes=notes,
                         golden_cases=tuple(n for n, _ in goldens), device=device)
    error = unfired_error(unfired())
    if error is not None:
        raise error
    return report


def run_serving_check(model: ModelWeights, goldens: Sequence[tuple[str, Case]], *, device: torch.device | str,
                      policy: Policy, decode: int, replay: bool | None = None, injections: Sequence[Injection] = (),
                      golden_ref: str = "golden", guides: Sequence[RouterReplay | None] | None = None,
                      paged: bool = False, batch: bool = False, chunk: int | None = None,
                      graph: bool = False) -> Report:
    """Serve every golden case with moesnap's candidate (prefill, then ``decode`` steps) and judge each
    forward's rows at their positions.  ``paged``: a paged KV cache (blocks of 16); ``batch``: every
    case one sequence of a ragged batch (one forward per prefill and per step); ``chunk``: the prompt in
    forwards of that many tokens; ``graph``: the decode steps on static buffers (a CUDA graph on CUDA,
    eager elsewhere; router replay decided on the device there).  ``replay`` (default: on for
    bfloat16/float16): each forward's rows also run stage by stage from the golden's values.  ``guides``:
    router replay, one per case, or None to let the candidate route freely."""
    dname = policy.dtype or "float32"
    s = plan_serving(model, goldens, device=device, dtype=dname, decode=decode, replay=replay, injections=injections,
                     paged=paged, batch=batch, chunk=chunk, graph=graph)
    status(f"serving {len(goldens)} case{'s' if len(goldens) != 1 else ''} on {device} in {dname}: prefill + "
           f"{decode} decode step{'s' if decode != 1 else ''} ({s.how})")
    cand = CandidateModel(model, device=device, dtype=policy.torch_dtype)
    if decode:
        cand.keep_weights()     # every step would dequantize the dense weights and the output matrix again
    faults = cand.faults(injections)
    return judge_serving(serve_pairs(cand, goldens, s, faults, guides), s, policy, goldens=goldens,
                         injections=injections, unfired=faults.unfired,
                         candidate=f"moesnap candidate ({device}, {dname})",
                         served_by=f"{device} {dname}, experts via {cand.expert_path}", device=device,
                         router_replay=guides is not None, golden_ref=golden_ref)
