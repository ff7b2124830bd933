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

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..case import Case, from_recorder
from ..judge.policy import CHECK_DTYPES, Policy, Settings
from ..judge.report import Report
from ..judge.suite import Pair, PerLayer, judge_suite
from .serving import router_guide, run_serving_check
from ..errors import GoldenError, UsageError
from ..model.inject import Injection, check_injections
from ..model.recorder import ArrayRecorder
from ..judge.tolerances import Tolerances
from ..util import LayerProgress, file_sha256, status
from ..model.load import open_model
from ..model.weights import ModelWeights


def check_golden_matches_model(cases: Sequence[tuple[str, Case]], model: ModelWeights, *, where: str,
                               meta: dict | None = None, show_progress: bool = False) -> None:
    """Refuse goldens made from another model file, or whose tokens the model cannot run
    (``show_progress``: a bar while a large model file is hashed the first time)."""
    sha = None
    for source in [meta or {}] + [c.attrs for _, c in cases]:
        m = source.get("model") if isinstance(source, dict) else None
        if isinstance(m, dict) and m.get("sha256"):
            sha = m["sha256"]
            break
    if sha is not None:
        if model.path.is_file():     # the first sha256 of a large file takes a while; later runs read the cache
            file_sha256(model.path, progress=show_progress)
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


def _followed_attr(followed) -> list:
    return [[int(layer), int(t), [int(e) for e in ids]] for layer, t, ids in followed]


def _replay_case(cand, golden: Case, faults, progress=None) -> Case:
    """Stage-local replay: each layer run on the golden input of that layer, and each of its stages
    computed from the golden's value of the stage before it; model-level stages are not replayed."""
    rec = ArrayRecorder()
    n = golden.n_layer
    followed: list = []
    for i in range(n):
        x = golden.model["embed"] if i == 0 else golden.layers["layer_out"][i - 1]
        force = {stage: a[i] for stage, a in golden.layers.items() if i < a.shape[0]}
        followed += cand.forward_layer(i, torch.from_numpy(np.ascontiguousarray(x)), rec, force=force,
                                       faults=faults).followed
        if progress is not None:
            progress(i + 1, n)
    return Case(tokens=golden.tokens, model={}, layers=rec.stacked(),
                attrs={"replay": True, "router_followed": _followed_attr(followed)})


def run_check(model: ModelWeights, goldens: Sequence[tuple[str, Case]], *, device: torch.device | str = "cpu",
              policy: Policy | None = None, replay: bool | None = None, injections: Sequence[Injection] = (),
              golden_ref: str = "golden", show_progress: bool = True, router_replay: bool = True) -> Report:
    """Run moesnap's candidate on every golden case (and, with ``replay``, each layer on the golden's
    inputs) and judge it under ``policy`` (default: float32, the built-in tables)."""
    from ..model.candidate import CandidateModel

    policy = policy or Policy.default("float32")
    dname = policy.dtype or "float32"
    dtype = policy.torch_dtype
    if replay is None:   # low precision: free-running tolerances must admit drift; replay judges each stage
        replay = dtype in (torch.bfloat16, torch.float16)
    check_injections(injections, model, [len(golden.tokens) for _, golden in goldens])
    status(f"running the candidate on {device} in {dname}: {len(goldens)} case{'s' if len(goldens) != 1 else ''}"
           f" x {model.config.n_layer} layers" + (", then stage-local replay" if replay else ""), enabled=show_progress)
    cand = CandidateModel(model, device=device, dtype=dtype)
    faults = cand.faults(injections)
    mode = "free-running, router replay" if router_replay else "free-running"

    def pairs():
        for name, golden in goldens:
            guide = router_guide(golden, policy) if router_replay else None
            rec = ArrayRecorder()
            bar = LayerProgress(f"check {name}", enabled=show_progress).start(model.config.n_layer)
            out = cand.forward(golden.tokens, rec, progress=bar, router_replay=guide, faults=faults)
            bar.close()
            free = from_recorder(rec, {"dtype": dname, "router_followed": _followed_attr(out.followed)})
            per_layer = None
            if replay:
                bar = LayerProgress(f"replay {name}", enabled=show_progress).start(golden.n_layer)
                per_layer = PerLayer(golden, _replay_case(cand, golden, faults, progress=bar))
                bar.close()
            yield Pair(name, golden, free, per_layer)

    notes = [f"injected fault: {inj}" for inj in injections]
    notes.append(f"candidate: {device} {dname}, experts via {cand.expert_path}")
    report = judge_suite(pairs(), policy, golden=golden_ref, candidate=f"moesnap candidate ({device}, {dname})",
                         mode=mode, per_layer="replay" if replay else None, notes=notes,
                         hint=None if router_replay else "leave router replay on (drop --no-router-replay)", device=device)
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


def load_goldens(spec: str, store: str | None):
    """(resolved NAME@vNNNN, version metadata, [(case name, Case)]) from a golden store."""
    from ..store import open_store, parse_ref

    suite, version = parse_ref(spec)
    v = open_store(store).open_version(suite, version)
    return v.ref, v.meta, [(name, v.read_case(name)) for name in v.case_names()]


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
    from ..model.inject import parse_inject
    from .trace import parse_device

    # the candidate runs one of CHECK_DTYPES: a bad one is refused here, before the model is read
    settings = replace(settings or Settings(profile="default"), dtype=dtype, allowed=CHECK_DTYPES)
    policy = settings.resolve()
    if tols is not None:
        policy = replace(policy, tolerances=tols)
    tdevice = parse_device(device)
    status(f"opening {model}", enabled=show_progress)
    ggm = open_model(model)
    injections = [parse_inject(s, ggm.config) for s in inject]
    status(f"reading golden {suite} from {store or 'goldens/'}", enabled=show_progress)
    ref, meta, goldens = load_goldens(suite, store)
    check_golden_matches_model(goldens, ggm, where=ref, meta=meta, show_progress=show_progress)
    if decode is not None or paged or batch or chunk is not None or cuda_graph:
        if chunk is not None and chunk < 1:
            raise UsageError(f"--chunk {chunk}: must be >= 1 token")
        report = run_serving_check(ggm, goldens, device=tdevice, policy=policy, decode=decode or 0, replay=replay,
                                   injections=injections, golden_ref=ref, show_progress=show_progress,
                                   router_replay=router_replay, paged=paged, batch=batch, chunk=chunk,
                                   graph=cuda_graph)
    else:
        report = run_check(ggm, goldens, device=tdevice, policy=policy, replay=replay, injections=injections,
                           golden_ref=ref, show_progress=show_progress, router_replay=router_replay)
    if not report.passed and isinstance(meta.get("command"), str):
        # like ndarrays_regression: say how the golden was made, in case it is the golden that is stale
        from .goldens import command_text

        report = report.with_notes(f"{ref} was generated by: {command_text(meta['command'])}")
    return report
