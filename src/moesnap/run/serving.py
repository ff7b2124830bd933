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

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..case import Case
from ..errors import UsageError
from ..judge.policy import Policy
from ..judge.report import Report
from ..judge.routing import tie_gap
from ..judge.suite import Pair, PerLayer, judge_suite
from ..model.candidate import RouterReplay
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
    from ..model.candidate import CandidateModel
    from ..model.serve import GraphDecoder, Session, replay_batch

    dname = policy.dtype or "float32"
    if replay is None:
        replay = dname in ("bfloat16", "float16")
    router_replay = guides is not None
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
    status(f"serving {len(goldens)} case{'s' if len(goldens) != 1 else ''} on {device} in {dname}: prefill + "
           f"{decode} decode step{'s' if decode != 1 else ''} ({how})")
    cand = CandidateModel(model, device=device, dtype=policy.torch_dtype)
    if decode:
        cand.keep_weights()     # every step would dequantize the dense weights and the output matrix again
    faults = cand.faults(injections)
    per_case = list(guides) if guides is not None else [None] * len(goldens)

    def serve(group: list[int]) -> Iterator[Pair]:
        names = [goldens[i][0] for i in group]
        gold = [goldens[i][1] for i in group]
        session = Session(cand, capacity=max(int(g.tokens.shape[0]) for g in gold), n_seqs=len(group), paged=paged,
                          faults=faults, router_replay=[per_case[i] for i in group])
        toks = [g.tokens.tolist() for g in gold]
        if len(group) == 1:
            forwards = [session.prefill(toks[0][:prompts[group[0]]], chunk=chunk)]
            forwards = [[r] for r in forwards[0]]
        else:
            forwards = [session.prefill_batch([t[:prompts[i]] for t, i in zip(toks, group)])]
        for n_fwd, rows in enumerate(forwards):
            yield from _pairs([names[r.seq] if n_fwd == 0 else f"{names[r.seq]}/chunk{n_fwd}" for r in rows],
                              [gold[r.seq] for r in rows], [r.case for r in rows], None)
        decoder = GraphDecoder(session, graph=str(device).startswith("cuda")) if graph else session
        for n in range(decode):
            rows = decoder.decode([t[prompts[i] + n] for t, i in zip(toks, group)])
            yield from _pairs([f"{names[r.seq]}/step{n}" for r in rows], [gold[r.seq] for r in rows],
                              [r.case for r in rows], n)

    def _pairs(names: list[str], golden: list[Case], rows: list[Case], step: int | None) -> Iterator[Pair]:
        """The pairs of one serving forward's sequences; its stage-local replay is ONE forward too (the
        sequences of a batch packed together, so that a fault between them acts there as well)."""
        replays: list[Case | None] = [None] * len(rows)
        if replay:
            replays = [c for c, _ in replay_batch(cand, golden, [r.positions.tolist() for r in rows], step=step,
                                                  faults=faults, paged=paged)]
        for name, g, r, rep in zip(names, golden, rows, replays):
            yield Pair(name, g, r, None if rep is None else PerLayer(g.rows(r.positions), rep), step=step)

    def pairs() -> Iterator[Pair]:
        groups = [list(range(len(goldens)))] if batch else [[i] for i in range(len(goldens))]
        for group in groups:
            yield from serve(group)

    notes = [f"injected fault: {inj}" for inj in injections]
    notes.append(f"candidate: {device} {dname}, experts via {cand.expert_path}; served: {how}; the decode steps "
                 f"fed the golden's tokens (teacher-forced), each judged against the golden's row at its position")
    if graph and router_replay:
        notes.append("decode on static buffers: router replay decided on the device (the golden's routing of each "
                     "step in static buffers, refilled before every replay)")
    mode = "free-running, router replay" if router_replay else "free-running"
    report = judge_suite(pairs(), policy, golden=golden_ref, candidate=f"moesnap candidate ({device}, {dname})",
                         mode=mode, per_layer="replay" if replay else None, notes=notes,
                         golden_cases=tuple(n for n, _ in goldens), device=device)
    unfired = faults.unfired()
    if unfired:
        raise UsageError(f"{unfired[0].option}: the planted fault did not fire in this run, so this self-test "
                         f"would prove nothing; choose another layer, expert, step or token")
    return report
