"""The check: run the candidate forward on each golden case's tokens and judge every stage.

By default the candidate runs with **router replay**: where it picks other
experts than the golden at a near tie it continues with the golden's experts
(:class:`moesnap.model.candidate.RouterReplay`), so every token stays judged in every
later layer however early a bfloat16 router flips.  ``router_replay=False``
runs it entirely free; a flip then excuses its token from there on and the
report may be ``inconclusive``.

A planted fault that changed nothing (a NaN expert no token routed to, a
routing flip within the near-tie width) is refused: a self-test that cannot
fire proves nothing.

``replay`` (the default for bfloat16 and float16): each layer of the candidate is also run on the *golden* input
of that layer (the golden ``embed`` for layer 0, the golden ``layer_out`` of
the layer before otherwise).  A stage that diverges in replay is an error the
layer **introduces**; one that diverges only when running free is an error it
**inherits** from the layers before.
"""

from __future__ import annotations

import contextvars
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..case import Case, from_recorder
from ..judge.attrs import recorded_family
from ..judge.policy import CHECK_DTYPES, Policy, Settings
from ..judge.report import Report
from ..judge.suite import Pair, PerLayer, judge_suite
from .rereference import layer_allotment
from .serving import router_guide, run_serving_check
from ..errors import GoldenError, UsageError
from ..model.inject import Injection, check_injections
from ..model.faults import Faults
from ..model.forward_io import Followed
from ..model.recorder import ArrayRecorder, LayerRecorder
from ..model.replay import followed_attr, replay_attrs, replay_case, replay_into
from ..judge.tolerances import Tolerances
from ..util import LayerProgress, file_sha256, show_progress_switch, status
from ..model.candidate import CandidateModel, RouterReplay
from ..model.load import open_model
from ..model.weights import ModelWeights


def check_golden_matches_model(cases: Sequence[tuple[str, Case]], model: ModelWeights, *, where: str,
                               meta: dict | None = None) -> None:
    """Refuse goldens made from another model file, or whose tokens the model cannot run (a bar while a
    large model file is hashed the first time)."""
    for name, c in cases:   # the family first: a golden of one family never judges a model of another
        arch = recorded_family(c, where=f"{where}/{name}")
        if arch is not None and arch != model.config.arch:
            raise GoldenError(f"{where}/{name}: golden is of a {arch!r} model, {model.path.name} is a "
                              f"{model.config.arch!r} one")
    sha = None
    for source in [meta or {}] + [c.attrs for _, c in cases]:
        m = source.get("model") if isinstance(source, dict) else None
        if isinstance(m, dict) and m.get("sha256"):
            sha = m["sha256"]
            break
    if sha is not None:
        if model.path.is_file():     # the first sha256 of a large file takes a while; later runs read the cache
            file_sha256(model.path, progress=True)
        mine = model.fingerprint()["sha256"]
        if sha != mine:
            raise GoldenError(f"{where}: golden was made from another model file "
                              f"(sha256 {sha[:12]}…, {model.path.name} is {mine[:12]}…)")
    for name, c in cases:
        ids = c.attrs.get("token_ids")
        if ids is not None and (not isinstance(ids, list)
                                or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
            raise GoldenError(f"{where}/{name}: attribute 'token_ids' is not a list of integers")
        if ids is not None and ids != c.tokens.tolist():
            raise GoldenError(f"{where}/{name}: tokens array differs from the recorded token ids")
        bad = c.tokens[(c.tokens < 0) | (c.tokens >= model.config.vocab_size)]
        if bad.size:
            raise GoldenError(f"{where}/{name}: token id {int(bad[0])} is outside the vocabulary of {model.path.name}")
        if c.n_layer and c.n_layer != model.config.n_layer:
            raise GoldenError(f"{where}/{name}: golden has {c.n_layer} layers, {model.path.name} has {model.config.n_layer}")


def run_check(model: ModelWeights, goldens: Sequence[tuple[str, Case]], *, device: torch.device | str = "cpu",
              policy: Policy | None = None, replay: bool | None = None, injections: Sequence[Injection] = (),
              golden_ref: str = "golden", guides: Sequence[RouterReplay | None] | None = None) -> Report:
    """Run moesnap's candidate on every golden case (and, with ``replay``, each layer on the golden's
    inputs) and judge it under ``policy`` (default: float32, the built-in tables); ``guides``: router
    replay, one per case (:func:`router_guides`), or None to let the candidate route freely.

    Pipelined (:func:`pipelined`: by default on a GPU): each case's forwards run on a thread of their own, into arrays
    allotted from the config, and the judge reads each layer as it is made (the free-running case's
    judge overlaps the rest of its forward and the replay's); the same report as the forwards made
    whole first, to the bit, the same error where one of them raises."""
    policy = policy or Policy.default("float32")
    dname = policy.dtype or "float32"
    if replay is None:   # low precision: free-running tolerances must admit drift; replay judges each stage
        replay = dname in ("bfloat16", "float16")
    check_injections(injections, model, [len(golden.tokens) for _, golden in goldens])
    cand = CandidateModel(model, device=device, dtype=policy.torch_dtype)
    status(f"running the candidate on {device} in {dname}: {len(goldens)} case{'s' if len(goldens) != 1 else ''}"
           f" x {model.config.n_layer} layers" + (", then stage-local replay" if replay else ""))
    faults = cand.faults(injections)
    router_replay = guides is not None
    mode = "free-running, router replay" if router_replay else "free-running"
    makers: list[_Making] = []
    piped = pipelined(device)

    def pairs():
        for (name, golden), guide in zip(goldens, guides or [None] * len(goldens)):
            if piped:
                m = _Making(cand, name, golden, guide, faults, dname, replay)
                makers.append(m)
                m.start()
                per = None if m.replay is None else PerLayer(golden, m.replay.made, ready=m.replay.ready)
                yield Pair(name, golden, m.free.made, per, ready=m.free.ready)
                m.join()        # the judge read it to the end (or a caller took every pair first): done, or ends now
                continue
            rec = ArrayRecorder()
            bar = LayerProgress(f"check {name}").start(golden.n_layer)
            out = cand.forward(golden.tokens, rec, progress=bar, router_replay=guide, faults=faults)
            attrs = {"dtype": dname, "router_followed": followed_attr(out.followed)}
            bar.close()
            free = from_recorder(rec, attrs)
            per_layer = None
            if replay:
                bar = LayerProgress(f"replay {name}").start(golden.n_layer)
                per_layer = PerLayer(golden, replay_case(cand, golden, faults, progress=bar))
                bar.close()
            yield Pair(name, golden, free, per_layer)

    notes = [f"injected fault: {inj}" for inj in injections]
    notes.append(f"candidate: {device} {dname}, experts via {cand.expert_path}")
    try:
        report = judge_suite(pairs(), policy, golden=golden_ref, candidate=f"moesnap candidate ({device}, {dname})",
                             mode=mode, per_layer="replay" if replay else None, notes=notes,
                             hint=None if router_replay else "leave router replay on (drop --no-router-replay)",
                             device=device)
    except Exception as e:
        # the sequential path makes a case's forwards before judging it: an error of theirs comes first
        for m in makers:
            m.join()
        first = next((m.error for m in makers if m.error is not None), None)
        if first is None or first is e:
            raise
        raise first from None
    finally:
        for m in makers:    # an interrupt, an error: stop after the layer in progress, no thread left behind
            m.stop()
    unfired = faults.unfired()
    if unfired:
        why = ("no token of any case routes to that expert there" if unfired[0].kind == "nan" else
               "the flip falls within the near-tie width, so router replay takes the golden's experts back")
        raise UsageError(f"{unfired[0].option}: the planted fault cannot fire ({why}), so this self-test "
                         f"would prove nothing; choose another expert or token")
    if router_replay and any("followed" in n for c in report.cases for n in c.routing_notes):
        report = report.with_notes("router replay: where the candidate picked other experts at a near tie it "
                                   "continued with the golden's (routing notes), so every token was judged in "
                                   "every layer")
    return report


#: the environment variable that turns the pipeline of :func:`run_check` on (``1``), off (``0``, the default until
#: the pipeline's GPU figure is measured), or leaves it to the device (``auto``: on for a GPU candidate)
PIPELINE_ENV = "MOESNAP_PIPELINE"


def pipelined(device: torch.device | str | None = None) -> bool:
    """Whether a check judges each layer of its candidate while the forward computes the next (``1``), or
    makes each case's forwards whole first (``0``, the default: the pipeline has not run on a GPU yet, where
    it is meant to pay); with ``auto`` where the candidate runs on ``device`` other than the CPU: on the CPU
    the forward's threads and the judge's share the cores (measured on 2 cores: 25 % slower pipelined).  The
    same report either way.  ``MOESNAP_PIPELINE`` decides."""
    env = os.environ.get(PIPELINE_ENV, "").strip()
    if env not in ("", "auto", "0", "1"):
        raise UsageError(f"{PIPELINE_ENV}={env!r}: expected 1 (judge each layer while the forward computes the next), "
                         f"0 (each case's forwards whole before judging; the default) or auto (1 on a GPU, 0 on the CPU)")
    if env == "auto":
        return device is not None and torch.device(device).type != "cpu"
    return env == "1"


class _Stopped(Exception):
    """The check stopped before this case's forwards were done (an error of the judge's, an interrupt)."""


class _Making:
    """One golden case's forwards on a thread of their own: the candidate running free (router replay with
    a ``guide``) into :attr:`free`, then, with ``replay``, its stage-local replay into :attr:`replay`, each
    a :class:`~moesnap.model.recorder.LayerRecorder` whose layers the judge reads as they are made.  One
    device: the replay starts after the free forward, and the judge of the free case overlaps it.
    :attr:`error`: what a forward raised (the judge meets it too, at the first layer it waits for)."""

    def __init__(self, cand: CandidateModel, name: str, golden: Case, guide: RouterReplay | None, faults: Faults,
                 dname: str, replay: bool) -> None:
        cfg = cand.cfg
        T = int(golden.tokens.shape[0])
        layers = layer_allotment(cfg, T)
        whole = {"embed": ((T, cfg.hidden), np.float32), "final_norm": ((T, cfg.hidden), np.float32),
                 "logits": ((T, cand.model.n_rows("output")), np.float32)}
        batched = cand.device.type != "cpu"     # one copy to the host per layer, on the forward's thread
        self.free = LayerRecorder(golden.tokens, layers=layers, model=whole,
                                  attrs={"dtype": dname, "router_followed": []}, batched=batched)
        self.replay = LayerRecorder(golden.tokens, layers=layers, model={}, attrs=replay_attrs(()),
                                    batched=batched) if replay else None
        self.cand, self.golden, self.guide, self.faults = cand, golden, guide, faults
        # made here: whether a bar is drawn is this thread's context's (-q)
        self._bars = (LayerProgress(f"check {name}"), LayerProgress(f"replay {name}"))
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                        name=f"moesnap-check {name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        """Wait for the forwards to end."""
        if self._thread.ident is not None:
            self._thread.join()

    def stop(self) -> None:
        """Stop after the layer in progress, and wait for the thread."""
        self._stop.set()
        self.join()

    def _layer_done(self, rec: LayerRecorder) -> Callable[[int, tuple[Followed, ...]], None]:
        def done(i: int, followed: tuple[Followed, ...]) -> None:
            if self._stop.is_set():
                raise _Stopped(f"stopped at layer {i}")
            rec.made.attrs["router_followed"].extend(followed_attr(followed))
            rec.layer_done(i)
        return done

    def _run(self) -> None:
        n = self.golden.n_layer
        try:
            bar = self._bars[0].start(n)
            self.cand.forward(self.golden.tokens, self.free, progress=bar, router_replay=self.guide,
                              faults=self.faults, on_layer=self._layer_done(self.free))
            bar.close()
            self.free.finish()
            if self.replay is not None:
                if self._stop.is_set():
                    raise _Stopped("stopped before the replay")
                bar = self._bars[1].start(n)
                replay_into(self.cand, self.golden, self.faults, self.replay, progress=bar,
                            on_layer=self._layer_done(self.replay))
                bar.close()
                self.replay.finish()
        except BaseException as e:     # handed to the judge's thread by ready()
            self.error = e
            self.free.fail(e)
            if self.replay is not None:
                self.replay.fail(e)
        finally:
            for b in self._bars:
                b.close()


def load_goldens(spec: str, store: str | None):
    """(resolved NAME@vNNNN, version metadata, [(case name, Case)]) from a golden store."""
    from ..store import open_store, parse_ref

    suite, version = parse_ref(spec)
    v = open_store(store).open_version(suite, version)
    return v.ref, v.meta, [(name, v.read_case(name)) for name in v.case_names()]


@dataclass(frozen=True)
class Opened:
    """What every kind of check reads once, before it runs anything: the judging ``policy``, the model,
    the device, the planted faults, and the golden (``ref``, its metadata, its cases), each refused in
    one line where it is wrong."""
    policy: Policy
    model: ModelWeights
    device: torch.device
    injections: tuple[Injection, ...]
    ref: str
    meta: dict
    goldens: tuple[tuple[str, Case], ...]
    #: router replay, one per golden case (None: the candidate routes freely)
    guides: tuple[RouterReplay | None, ...] | None


def router_guides(goldens: Sequence[tuple[str, Case]], policy: Policy) -> tuple[RouterReplay | None, ...]:
    """Router replay for every golden case (:func:`moesnap.run.serving.router_guide`): the one place the
    guides of a check are made, whichever candidate then runs."""
    return tuple(router_guide(golden, policy) for _, golden in goldens)


def open_check(model: str | Path, suite: str, *, store: str | None, device: str, dtype: str,
               inject: Sequence[str], settings: Settings | None, tols: Tolerances | None,
               router_replay: bool = True) -> Opened:
    """The policy (``settings``, else the built-in tables; ``tols`` over them), then the model, the
    device and the faults, then the golden ``suite`` in ``store``, checked against the model, and
    its router replay guides (with ``router_replay``)."""
    from ..model.inject import parse_inject
    from ..model.load import parse_device

    # the candidate runs one of CHECK_DTYPES: a bad one is refused here, before the model is read
    asked = replace(settings or Settings(profile="default"), dtype=dtype, allowed=CHECK_DTYPES)
    where = parse_device(device)
    status(f"opening {model}")
    ggm = open_model(model)
    policy = asked.resolve(family=ggm.config.arch)      # the family's own calibrated numbers, where it has them
    if tols is not None:
        policy = replace(policy, tolerances=tols)
    injections = tuple(parse_inject(s, ggm.config) for s in inject)
    status(f"reading golden {suite} from {store or 'goldens/'}")
    ref, meta, goldens = load_goldens(suite, store)
    check_golden_matches_model(goldens, ggm, where=ref, meta=meta)
    return Opened(policy, ggm, where, injections, ref, meta, tuple(goldens),
                  router_guides(goldens, policy) if router_replay else None)


@show_progress_switch
def check(model: str | Path, suite: str, *, store: str | None = None, device: str = "cpu",
          dtype: str = "float32", replay: bool | None = None, inject: Sequence[str] = (),
          tols: Tolerances | None = None, router_replay: bool = True, show_progress: bool = True,
          settings: Settings | None = None, decode: int | None = None, paged: bool = False, batch: bool = False,
          chunk: int | None = None, cuda_graph: bool = False) -> Report:
    """Run moesnap's candidate forward of ``model`` on every case of golden ``suite`` (``NAME[@vNNNN]``
    in ``store``) and judge it (:func:`run_check`); ``inject`` holds ``--inject`` specs.

    Tolerances: ``settings`` (:class:`~moesnap.judge.policy.Settings`: profile, config file,
    overrides; the command line's), else ``tols`` as given, else the built-in tables.

    Beyond one prefill (:mod:`moesnap.run.serving`): ``decode`` steps after each case's prompt through a
    KV cache (``paged``: blocks of 16), every case one sequence of a ragged ``batch``, the prompt in
    ``chunk``-token forwards, the decode steps on a CUDA graph's static buffers (``cuda_graph``)."""
    if chunk is not None and chunk < 1:
        raise UsageError(f"--chunk {chunk}: must be >= 1 token")
    pipelined()     # a bad MOESNAP_PIPELINE refused before the model is read
    o = open_check(model, suite, store=store, device=device, dtype=dtype, inject=inject, settings=settings, tols=tols,
                   router_replay=router_replay)
    if decode is not None or paged or batch or chunk is not None or cuda_graph:
        report = run_serving_check(o.model, o.goldens, device=o.device, policy=o.policy, decode=decode or 0,
                                   replay=replay, injections=o.injections, golden_ref=o.ref, guides=o.guides,
                                   paged=paged, batch=batch, chunk=chunk, graph=cuda_graph)
    else:
        report = run_check(o.model, o.goldens, device=o.device, policy=o.policy, replay=replay,
                           injections=o.injections, golden_ref=o.ref, guides=o.guides)
    return with_golden_command(report, o)


def with_golden_command(report: Report, o: Opened) -> Report:
    """A failing ``report`` says how its golden was made (as ``ndarrays_regression`` does), in case it
    is the golden that is stale."""
    if report.passed or not isinstance(o.meta.get("command"), str):
        return report
    from .goldens import command_text

    return report.with_notes(f"{o.ref} was generated by: {command_text(o.meta['command'])}")
