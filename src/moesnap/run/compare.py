"""Compare another engine's dump with a golden: free-running, and stage by stage from the engine's own
inputs (local re-reference) where the golden's model file is at hand."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..capture.shards import unshard
from ..case import Case
from ..errors import GoldenError, MoesnapError, UsageError
from ..judge.attrs import held_tokens, recorded_family
from ..judge.policy import Policy, Settings
from ..judge.report import Report
from ..judge.suite import Pair, PerLayer, judge_suite
from ..judge.tolerances import Tolerances
from ..store.case import load_case
from ..util import LayerProgress, show_progress_switch

if TYPE_CHECKING:
    import torch


def resolve_golden(spec: str, store: str | None) -> list[tuple[str, Case]]:
    """A case group path, or NAME[@vNNNN] in a golden store: [(case name, Case)]."""
    return resolve_golden_meta(spec, store)[2]


def resolve_golden_meta(spec: str, store: str | None) -> tuple[str, dict, list[tuple[str, Case]]]:
    """(what the golden is: ``NAME@vNNNN`` resolved, or the case group path; the version's metadata, or
    the case's own attributes; [(case name, Case)])."""
    p = Path(spec)
    if p.exists() and "@" not in spec:
        case = load_case(p)
        return spec, dict(case.attrs), [(p.name, case)]
    if "@" not in spec and (os.sep in spec or "/" in spec or spec.endswith(".zarr")):
        raise GoldenError(f"{p}: no such case group (nor a golden NAME[@vNNNN])")
    from ..store import open_store, parse_ref

    suite, version = parse_ref(spec)
    st = open_store(store)
    v = st.open_version(suite, version)
    return v.ref, dict(v.meta), [(name, v.read_case(name)) for name in v.case_names()]


def provenance_model(meta: dict) -> Path | None:
    """The model file a golden was made from, where it can still be found with the recorded sha256:
    the recorded path, the bundled data directory, or the current directory."""
    from ..util import file_sha256

    m = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(m, dict) or not isinstance(m.get("sha256"), str) or not isinstance(m.get("file"), str):
        return None
    name = Path(m["file"]).name
    places = [Path(m["path"])] if isinstance(m.get("path"), str) else []
    places += [Path(__file__).resolve().parents[1] / "data" / name, Path.cwd() / name]
    for p in places:
        try:
            if p.is_dir() and m.get("format") == "hf-checkpoint":
                from ..model.checkpoint import CheckpointModel

                if CheckpointModel(p).fingerprint()["sha256"] == m["sha256"]:
                    return p
            elif p.is_file() and p.stat().st_size == m.get("size", p.stat().st_size) and file_sha256(p) == m["sha256"]:
                return p
        except (OSError, MoesnapError):
            continue
    return None


def _candidate_cases(path: str | Path | Case | Mapping[str, Case], golden: list[tuple[str, Case]]
                     ) -> tuple[list[tuple[str, Case, Case]], list[str], bool]:
    """The (golden case name, golden case, candidate case) pairs to judge, notes on what of the
    candidate matched no golden case, and whether the candidate is one case (a case group, sharded or
    not, or a case in memory) rather than a directory of them.  A golden case the candidate holds
    nothing for is left out of the pairs (the report names it: ``Report.cases_not_judged``); none at
    all is an error."""
    names = [n for n, _ in golden]
    if isinstance(path, Mapping):   # cases in memory, by golden case name (a producer's: the plugin, expert parallel)
        by_name = dict(golden)
        unknown = [n for n in path if n not in by_name]
        if unknown:
            raise GoldenError(f"candidate case {unknown[0]!r} is named like no case of the golden ({', '.join(names)})")
        return [(n, by_name[n], path[n]) for n in names if n in path], [], False
    path = unshard(path, load_case)   # DIR/sharding.json + DIR/rank<N>/: one case, reassembled (capture/shards.py)
    if isinstance(path, Case):   # a case in memory (the Python API): the golden case with its tokens
        for name, g in golden:
            if _fits(g, path):
                return [(name, g, path)], [], True
        if len(golden) == 1:
            return [(golden[0][0], golden[0][1], path)], [], True
        raise GoldenError(f"the candidate's tokens match none of the golden's cases ({', '.join(names)})")
    p = Path(path)
    if not p.exists():
        raise GoldenError(f"{p}: no such candidate group")
    if len(golden) == 1 and (p / "tokens").exists() or is_case_group(p):
        cand = load_case(p)
        for name, g in golden:
            if _fits(g, cand):
                return [(name, g, cand)], [], True
        if len(golden) == 1:
            return [(golden[0][0], golden[0][1], cand)], [], True  # compare_cases reports the token mismatch
        raise GoldenError(f"{p}: its tokens match none of the golden's cases ({', '.join(names)})")
    pairs = [(name, g, load_case(p / name)) for name, g in golden if (p / name).exists()]
    if not pairs:
        if not (p / "zarr.json").is_file():
            raise GoldenError(f"{p}: not a Zarr v3 group (no zarr.json), nor a directory of case groups "
                              f"named like the golden's ({', '.join(names)})")
        raise GoldenError(f"{p}: holds no case group named like the golden's ({', '.join(names)})")
    other = sorted(q.name for q in p.iterdir() if q.name not in names and (q / "tokens").exists())
    notes = [f"{p}: case group{'s' if len(other) != 1 else ''} {', '.join(other)} named like no case of the golden "
             f"({', '.join(names)}): not judged"] if other else []
    return pairs, notes, False


def _other_model(meta: dict, pairs: list[tuple[str, Case, Case]], where: str) -> list[str]:
    """A line saying the candidate records another model file than the golden (every stage then
    diverges, and that is why), else nothing."""
    def sha(attrs: object) -> tuple[str, str] | None:
        m = attrs.get("model") if isinstance(attrs, dict) else None
        if isinstance(m, dict) and isinstance(m.get("sha256"), str):
            return m["sha256"], str(m.get("file") or "?")
        return None

    mine = sha(meta)
    theirs = next((s for _, _, c in pairs if (s := sha(c.attrs)) is not None), None)
    if mine is None or theirs is None or mine[0] == theirs[0]:
        return []
    return [f"{where} records another model file than the golden: {theirs[1]} (sha256 {theirs[0][:12]}…) against "
            f"{mine[1]} (sha256 {mine[0][:12]}…); a forward of another model diverges everywhere"]


def _fits(g: Case, c: Case) -> bool:
    """The candidate's rows are the golden's tokens at their positions (the whole sequence, or a prompt
    whose decode steps follow)."""
    pos = c.positions
    return (pos.shape == c.tokens.shape and (pos.size == 0 or 0 <= int(pos.min()) and int(pos.max()) < g.tokens.size)
            and bool((g.tokens[pos] == c.tokens).all()))


def check_candidate_path(path: str | Path) -> None:
    """Refuse, before anything is read, a candidate path that is no case group, no directory of case
    groups and no per-rank dump (``sharding.json``)."""
    p = Path(path)
    if not p.exists():
        raise GoldenError(f"{p}: no such candidate group")
    if p.is_dir() and not (p / "zarr.json").is_file() and not (p / "sharding.json").is_file() \
            and not any((q / "zarr.json").is_file() for q in p.iterdir() if q.is_dir()):
        raise GoldenError(f"{p}: not a Zarr v3 group (no zarr.json), nor a directory of case groups")


def is_case_group(path: Path) -> bool:
    """``path`` is one case group (it holds ``tokens``), not a directory of them."""
    return (path / "tokens" / "zarr.json").exists()


def _pick_case(golden: list[tuple[str, Case]], case: str | None, spec: str) -> list[tuple[str, Case]]:
    """The golden's cases, or only ``case``."""
    if case is None:
        return golden
    found = [(n, c) for n, c in golden if n == case]
    if not found:
        raise UsageError(f"--case {case!r}: {spec} holds no such case (it holds: {', '.join(n for n, _ in golden)})")
    return found


def _case_hint(left: list[str]) -> str | None:
    """How to judge the golden cases a directory of case groups lacks."""
    if not left:
        return None
    return (f"to judge {'it' if len(left) == 1 else 'them'}, run the engine on {'its' if len(left) == 1 else 'their'} "
            f"tokens too and add a case group named like {'it' if len(left) == 1 else 'each'}")


def _check_judgeable(name: str, cand: Case, where: str) -> None:
    """A candidate holding no stage moesnap knows would be judged on nothing: refuse it, naming what it holds."""
    if cand.model or cand.layers:
        return
    other = ", ".join(cand.ignored[:8]) + (" …" if len(cand.ignored) > 8 else "") if cand.ignored else "nothing but tokens"
    raise GoldenError(f"{where}: case {name!r} holds no stage moesnap knows (it holds: {other}); stage names "
                      f"and aliases: moesnap.stages")


@show_progress_switch
def compare(golden: str, candidate: str | Path | Case | Mapping[str, Case], *, store: str | None = None,
            tols: Tolerances | None = None, profile: str | None = None,
            model: str | Path | None = None, local: bool = True, allow_missing: bool = False,
            dtype: str | None = None, show_progress: bool = True, case: str | None = None,
            settings: Settings | None = None, candidate_name: str | None = None,
            notes: tuple[str, ...] = (), device: str | None = None) -> Report:
    """Judge the dump at ``candidate`` (a case group, a group of case groups named like the golden's, a
    :class:`~moesnap.case.Case` in memory, or a mapping of golden case names to Cases) against
    ``golden`` (``NAME[@vNNNN]`` in ``store``, or a case group path).

    >>> import moesnap                                          # doctest: +SKIP
    >>> report = moesnap.compare("tiny", "my_engine.zarr", store="goldens", allow_missing=True)
    >>> report.passed, report.first_divergence
    (True, None)

    One case (a case group, a :class:`~moesnap.case.Case`) is judged against the golden case with its
    tokens, and the report names the golden's other cases as not judged (``Report.cases_not_judged``;
    the verdict is that case's).  A directory of case groups (or a mapping) stands for the whole
    golden: a golden case it lacks is named, and the verdict is then ``inconclusive`` at best, never a
    ``pass`` of the suite.  ``case`` judges that one golden case alone.  Arrays of the candidate that
    name no stage are listed (``Report.ignored``), not judged.

    ``model``: the golden's model file, for local re-reference (:mod:`moesnap.run.rereference`);
    without it, and with ``local``, the model file the golden's provenance records is used where it
    is found with the same sha256.  ``dtype``: the candidate's, for tolerances (default: each
    candidate case's ``dtype`` attribute, else float32).

    ``profile`` (:data:`~moesnap.judge.tolerances.PROFILES`; default: from the candidate's ``engine``
    attribute, ``ggml`` for llama.cpp): under ``ggml`` the local re-reference rounds every matmul input
    as ggml does (:mod:`moesnap.model.ggml`).  ``settings``: the whole tolerance request (profile,
    config file, overrides; :class:`~moesnap.judge.policy.Settings`), the command line's; ``tols``:
    tolerances as given (over the profile's tables).  ``candidate_name`` and ``notes``: what the report
    calls the candidate, and what it adds about it.

    ``device``: where the local re-reference computes (``cpu``, ``cuda``, ``cuda:N``; default: a CUDA
    device where torch sees one, else the host), in float32; it is judged layer by layer as it is made.
    """
    if model is not None and not local:
        raise UsageError("--model and --no-local contradict each other")
    if device is not None and not local:
        raise UsageError(f"--device {device} and --no-local contradict each other (the device runs the local "
                         f"re-reference)")
    where = reference_device(device)
    if settings is None:
        settings = Settings(dtype=dtype, profile=profile or "auto")
    else:
        settings = replace(settings, dtype=dtype if dtype is not None else settings.dtype,
                           profile=profile if profile is not None else settings.profile)
    ref, meta, gold = resolve_golden_meta(golden, store)
    gold = _pick_case(gold, case, golden)
    return judge_dump(ref, meta, gold, candidate, settings, tols=tols, model=model, local=local,
                      allow_missing=allow_missing, case=case,
                      candidate_name=candidate_name, notes=notes, device=where)


def reference_device(name: str | None) -> torch.device:
    """Where the local re-reference runs: ``name`` (cpu, cuda, cuda:N; a CUDA device only where torch sees
    one), or by default the CUDA device where there is one, else the host."""
    import torch

    from ..model.load import parse_device

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return parse_device(name)


def judge_dump(ref: str, meta: dict, gold: list[tuple[str, Case]],
               candidate: str | Path | Case | Mapping[str, Case], settings: Settings | Policy, *,
               tols: Tolerances | None = None, model: str | Path | None = None, local: bool = True,
               allow_missing: bool = False, case: str | None = None,
               candidate_name: str | None = None, notes: tuple[str, ...] = (),
               device: torch.device | None = None) -> Report:
    """:func:`compare` of a golden already read: ``ref`` (what it is), its metadata ``meta`` and its
    cases ``gold``; ``settings`` is resolved here (its profile may follow the candidate's engine), a
    :class:`~moesnap.judge.policy.Policy` is taken as it is.  ``device``: where the local re-reference
    runs (None: :func:`reference_device`'s default)."""
    from ..model.load import open_model
    from .check import check_golden_matches_model

    pairs, case_notes, single = _candidate_cases(candidate, gold)
    where = candidate_name or (str(candidate.attrs.get("producer") or candidate.attrs.get("engine") or "a case in memory")
                               if isinstance(candidate, Case) else "cases in memory" if isinstance(candidate, Mapping)
                               else str(candidate))
    for name, g, c in pairs:
        _check_judgeable(name, c, where)
        if c.n_layer > g.n_layer:
            raise GoldenError(f"{where}: case {name!r} holds {c.n_layer} layers, the golden {g.n_layer} ({ref}): "
                              f"judge it against goldens of the same model")
    policy = settings if isinstance(settings, Policy) else settings.resolve(
        engine=pairs[0][2].attrs.get("engine"), family=recorded_family(pairs[0][1], where=f"{ref} (golden)"))
    if tols is not None:
        policy = replace(policy, tolerances=tols)
    out_notes: list[str] = _other_model(meta, pairs, where) + list(notes) + list(case_notes)
    if case is not None:
        out_notes.append(f"judging golden case {case} alone (--case)")
    ggm = None
    if model is not None:
        ggm = open_model(model)
        check_golden_matches_model([(n, g) for n, g, _ in pairs], ggm, where=ref, meta=meta)
    elif local:
        found = provenance_model(meta)
        if found is not None:
            ggm = open_model(found)
            out_notes.append(f"local re-reference with {found} (the golden's model file, same sha256)")
    hint = None
    if ggm is not None:
        device = device or reference_device(None)
        if device.type != "cpu":     # (on the host it says nothing: the reference's own arithmetic)
            out_notes.append(f"local re-reference computed on {device} in float32")
    else:
        device = None
        hint = (f"moesnap compare {ref} {where} --model MODEL.gguf (the golden's model file: the "
                f"reference then judges every layer from the engine's own input)")
    judged = [name for name, _, _ in pairs]
    left = [name for name, _ in gold if name not in judged]
    # the judge's statistics on the re-reference's device where it is a CUDA one (moesnap.judge.device)
    return judge_suite(_pairs(pairs, ggm, policy, device), policy, golden=ref, candidate=where,
                       per_layer="local" if ggm is not None else None, allow_missing=allow_missing,
                       notes=out_notes, hint=hint, golden_cases=tuple(name for name, _ in gold),
                       ignored={n: c.ignored for n, _, c in pairs},
                       case_hint=None if single else _case_hint(left), single_case=single, device=device)


def _pairs(pairs: list[tuple[str, Case, Case]], ggm, policy: Policy, device: Any) -> Iterator[Pair]:
    """The judge's pairs, each with its local re-reference (``ggm``: the golden's model; on ``device``) made
    as it is judged, then its steps."""
    for name, g, c in pairs:
        merged = _sequence(c) if ggm is not None and c.steps else None
        if merged is not None:   # the prompt and its steps re-referenced as one sequence of the engine's own rows
            yield from _local_steps(name, g, c, merged, ggm, policy, device)
            continue
        yield from _local(name, g, c, ggm, policy, device)
        for n, step in enumerate(c.steps):   # decode steps (or later chunks), each at its own positions
            yield Pair(f"{name}/step{_number(step, n)}", g, step, step=_number(step, n),
                       notes=(f"{name}: its decode steps are judged free-running only (local re-reference needs "
                              f"the prompt and every step at consecutive positions with the same stages)",)
                       if ggm is not None and n == 0 else ())


def _number(step: Case, n: int) -> int:
    s = step.attrs.get("step")
    return s if isinstance(s, int) and not isinstance(s, bool) else n


def _sequence(c: Case) -> Case | None:
    """The prompt's rows and every step's as one case over positions 0..T-1 (the engine's own values,
    row by row), where they join up: consecutive positions, the stages every part holds whole.  A stage
    some part holds for some rows only (an engine's prefill keeps the last row's logits, say) is left
    out of it: the re-reference then goes without it, as for a dump that lacks it."""
    parts = [c, *c.steps]
    pos = np.concatenate([p.positions for p in parts])
    if not (pos == np.arange(pos.size)).all():
        return None
    partial = {stage for p in parts for (_, stage) in held_tokens(p, where="the candidate")}
    model = {s for s in c.model if s not in partial and all(s in p.model for p in parts)}
    layers = {s for s in c.layers if s not in partial and all(s in p.layers and p.layers[s].shape[0] ==
                                                              c.layers[s].shape[0] for p in parts)}
    return Case(tokens=np.concatenate([p.tokens for p in parts]).astype(np.int32),
                model={s: np.concatenate([p.model[s] for p in parts]) for s in model},
                layers={s: np.concatenate([p.layers[s] for p in parts], axis=1) for s in layers},
                attrs={k: v for k, v in c.attrs.items() if k not in ("positions", "router_followed", "held_tokens")})


def _reference(name: str, c: Case, ggm, policy: Policy, device: Any):
    """The local re-reference of ``c`` (:class:`~moesnap.run.rereference.LocalReference`), not yet started;
    its notes prefixed with the case's name."""
    from ..model.ggml import ActivationQuant, identity
    from .rereference import LocalReference

    aq = ActivationQuant(ggm.qtypes()) if policy.rounds_activations else identity
    return LocalReference(ggm, c, tie_tol=policy.tolerances.tie_tol(policy.dtype_of(c.attrs)),
                          progress=LayerProgress(f"local {name}"), aq=aq, device=device, label=f"{name}: ")


def _local_steps(name: str, g: Case, c: Case, merged: Case, ggm, policy: Policy, device: Any) -> Iterator[Pair]:
    """Local re-reference of a prompt and its decode steps: the reference recomputes every layer of every
    row from the engine's own input to it, attending the engine's own earlier rows (so a step's keys and
    values are those the engine's own earlier inputs give), then each forward is judged on its rows.  The
    prompt's rows are judged as the layers are made; its steps' once all are."""
    ref = _reference(name, merged, ggm, policy, device)
    note = (f"{name}: its {len(c.steps)} decode steps re-referenced with the prompt as one sequence of the engine's "
            f"own rows (each step's attention over the keys and values of the engine's own earlier inputs)",)
    if not ref.layers:
        yield Pair(name, g, c, notes=(f"{name}: local re-reference judged nothing: the dump holds no layer input "
                                      f"(embed, layer_out), so every layer is judged free-running only",))
        for n, step in enumerate(c.steps):
            yield Pair(f"{name}/step{_number(step, n)}", g, step, step=_number(step, n))
        return
    try:
        yield Pair(name, g, c, PerLayer(ref.start().rows(c.positions), c, ref.layers, ref.notes, ready=ref.ready),
                   notes=note)
        ref.ready(None)
    finally:
        ref.close()
    for n, step in enumerate(c.steps):
        yield Pair(f"{name}/step{_number(step, n)}", g, step, PerLayer(ref.case.rows(step.positions), step, ref.layers),
                   step=_number(step, n))


def _local(name: str, g: Case, c: Case, ggm, policy: Policy, device: Any) -> Iterator[Pair]:
    """One case's pair, with its local re-reference where the model is at hand, judged as it is made."""
    prefix = bool((c.positions == np.arange(c.tokens.size)).all())    # rows 0..T-1: their own causal prefix
    if ggm is None or c.n_layer > g.n_layer or not prefix:   # (the judge refuses the second)
        yield Pair(name, g, c)
        return
    ref = _reference(name, c, ggm, policy, device)
    if not ref.layers:
        yield Pair(name, g, c, notes=(f"{name}: local re-reference judged nothing: the dump holds no layer "
                                      f"input (embed, layer_out), so every layer is judged free-running only",))
        return
    try:
        yield Pair(name, g, c, PerLayer(ref.start().case, c, ref.layers, ref.notes, ready=ref.ready))
    finally:
        ref.close()
