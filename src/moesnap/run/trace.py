"""Run a forward (reference or candidate) over one prompt and capture every stage."""

from __future__ import annotations

import datetime as _dt
import inspect
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..case import Case, from_recorder
from ..store.case import save_case
from ..errors import UsageError
from ..model.recorder import ArrayRecorder
from ..util import LayerProgress, file_sha256, hash_ahead, plural, published_version_above, show_progress_switch, status, versions
from ..model.load import parse_device
from ..model.weights import ModelWeights
from ..model.config import FAMILIES
from ..stages import DTYPES as STAGE_DTYPES

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in STAGE_DTYPES}


def parse_dtype(name: str, *, allowed: Sequence[str] = tuple(DTYPES)) -> torch.dtype:
    if name not in allowed:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(allowed)}")
    return DTYPES[name]


def parse_tokens(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise UsageError(f"--tokens {text!r}: expected comma-separated integers like 1,2,3") from None
    if not ids:
        raise UsageError("--tokens: empty token list")
    return ids


def model_provenance(model: ModelWeights) -> dict:
    return {**model.fingerprint(), "config": model.config.to_dict(), "quant_types": model.qtypes()}


#: engines ``trace --engine`` runs: moesnap's own forwards, and other engines as candidates
ENGINES: tuple[str, ...] = ("moesnap", "transformers", "llama.cpp")
#: the families (gguf-py's architecture names) each foreign engine is driven for
ENGINE_FAMILIES: dict[str, tuple[str, ...]] = {"transformers": tuple(FAMILIES), "llama.cpp": tuple(FAMILIES)}


def run_case(model: ModelWeights, tokens: Sequence[int], *, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu", candidate: bool = False, prompt: str | None = None,
             engine: str = "moesnap", decode: int = 0,
             continuation: Sequence[int] | None = None,
             layer_sink: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> Case:
    """Run one forward over ``tokens`` and capture every stage it exposes.

    ``engine="moesnap"``: the reference (CPU) or, with ``candidate``, moesnap's device forward.
    ``"transformers"``: transformers' ``Qwen3MoeForCausalLM`` built from the same weights, on
    ``device`` in ``dtype`` (:mod:`moesnap.capture.hf`).  ``"llama.cpp"``: llama.cpp's own forward of
    the GGUF (CPU, float32 activations; :mod:`moesnap.capture.llama`).  Stages an engine does not
    expose are absent from the case.

    ``decode`` (N decode steps after the prompt ``tokens``; ``continuation``, their tokens, implies
    N = its length): the reference over prompt + continuation, one case (:func:`continued_reference`:
    the reference's own greedy continuation where none is given); moesnap's candidate, or another
    engine, serving the prompt and then N single-token steps through its KV cache, the steps in
    ``Case.steps`` (:func:`serve_candidate`).  Each such case carries ``prompt_tokens``,
    ``continuation`` and ``decode``.

    ``layer_sink(layer, {stage: value})`` (the reference forward of a prompt alone): each layer's
    stages handed on as the layer ends (to a store writing them while the next layer runs,
    :meth:`~moesnap.store.VersionWriter.begin_case`); the case returned then has no ``layers``.
    """
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    families = ENGINE_FAMILIES.get(engine)
    if families is not None and model.config.arch not in families:
        raise UsageError(f"{model.path}: --engine {engine} runs {' and '.join(map(repr, families))} models only, not "
                         f"{model.config.arch!r} ones; trace the reference (--engine moesnap)")
    model.check_tokens(np.asarray(tokens))
    hash_ahead(model.hashed_files())     # the provenance's sha256 (_with_provenance), beside the forward
    if layer_sink is not None and (engine != "moesnap" or candidate or decode or continuation is not None):
        raise UsageError("layer_sink: the reference forward of a prompt alone hands its layers on as they end")
    if decode or continuation is not None:
        return _run_decode(model, tokens, dtype=dtype, device=device, candidate=candidate, prompt=prompt, engine=engine, decode=decode, continuation=continuation)
    if engine == "moesnap":
        rec = ArrayRecorder(keep_dtype=(dtype == torch.float64))
        status(f"running {'the candidate on ' + str(device) if candidate else 'the reference'} in "
               f"{str(dtype).removeprefix('torch.')}: {plural(len(tokens), 'token')} x {plural(model.config.n_layer, 'layer')}")
        bar = LayerProgress("candidate" if candidate else "reference").start(model.config.n_layer)
        progress: Callable[[int, int], None] = bar
        if layer_sink is not None:
            def progress(done: int, total: int) -> None:
                bar(done, total)
                layer_sink(done - 1, rec.pop_layer(done - 1))
        try:
            if candidate:
                from ..model.candidate import CandidateModel

                CandidateModel(model, device=device, dtype=dtype).forward(tokens, rec, progress=progress)
            else:
                if torch.device(device).type != "cpu":
                    raise UsageError("the reference forward runs on the CPU; add --candidate to trace the device forward")
                from ..model.reference import run_reference

                run_reference(model, tokens, dtype=dtype, recorder=rec, progress=progress)
        finally:
            bar.close()
        case = from_recorder(rec)
        case.attrs["layer_timing"] = bar.timing()
        producer = "moesnap-candidate" if candidate else "moesnap-reference"
    else:
        if candidate:
            raise UsageError(f"--candidate traces moesnap's own device forward; --engine {engine} is a candidate already")
        status(f"running {engine}'s forward of {model.path.name} on {device} in {str(dtype).removeprefix('torch.')}: "
               f"{len(tokens)} tokens")
        case = _engine_case(engine, model, tokens, dtype=dtype, device=device)
        producer = case.attrs["producer"]
    return _with_provenance(case, model, producer=producer, dtype=dtype, device=device, prompt=prompt,
                            tokens=tokens)


def _with_provenance(case: Case, model: ModelWeights, *, producer: str, dtype: torch.dtype,
                     device: torch.device | str, prompt: str | None, tokens: Sequence[int]) -> Case:
    """``case`` with what made it: producer, dtype, device, prompt, token ids (its own rows'), model, versions."""
    if model.path.is_file():    # the provenance's sha256: a bar the first time a large file is hashed
        file_sha256(model.path, progress=True)
    case.attrs.update({
        "producer": producer,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "prompt": prompt,
        "token_ids": [int(t) for t in tokens],
        "model": model_provenance(model),
        "versions": {**case.attrs.get("versions", {}), **versions()},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    return case


# ---------------------------------------------------------------- beyond one prefill: --decode N


def _decoded(case: Case, prompt: Sequence[int], continuation: Sequence[int], source: str) -> Case:
    """``case`` marked as a prompt of ``len(prompt)`` tokens followed by ``continuation`` (``source``:
    ``greedy``, the producer's own argmax choices, or ``given``)."""
    case.attrs.update({"prompt_tokens": len(prompt), "continuation": [int(t) for t in continuation],
                       "decode": len(continuation), "continuation_source": source})
    return case


def greedy_draft(model: ModelWeights, tokens: Sequence[int], n: int, *,
                 seed: Mapping[str, np.ndarray] | None = None) -> list[int]:
    """``n`` tokens after ``tokens``, each the argmax of the one before: moesnap's candidate in float32
    through a KV cache (one prefill, then a step per token, nothing recorded; dense weights and the
    output matrix dequantized once: :mod:`moesnap.model.draft`, on :func:`~moesnap.model.draft.draft_device`;
    on the CPU again if a CUDA device runs out of memory), or, for a model the candidate cannot run, the
    reference over the growing sequence.  ``seed``: a
    forward's ``k_rope``/``v`` over ``tokens`` (:func:`~moesnap.model.draft.propose`; no prefill).  A
    proposal only: :func:`continued_reference` keeps what the reference's own logits choose."""
    from ..errors import MoesnapError
    from ..model.draft import draft_device, propose

    ids = [int(t) for t in tokens]
    if n <= 0:
        return []
    device = draft_device(model)           # a bad MOESNAP_DRAFT_DEVICE is refused, not fallen back from
    try:
        try:
            return propose(model, ids, n, device=device, seed=seed)
        except torch.cuda.OutOfMemoryError:
            if device.type != "cuda":
                raise
            torch.cuda.empty_cache()        # the device was busier than its free memory said: the CPU proposes
            return propose(model, ids, n, device="cpu", seed=seed)
    except MoesnapError:     # a tensor type the candidate does not decode: the reference, token by token
        from ..model.reference import run_reference

        out: list[int] = []
        while len(out) < n:
            out.append(int(torch.argmax(run_reference(model, ids + out)[-1]).item()))
        return out
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()        # the proposal's weights leave the device before the reference runs


def continued_reference(model: ModelWeights, prompt: Sequence[int], *, decode: int,
                        continuation: Sequence[int] | None = None, dtype: torch.dtype = torch.float32,
                        prompt_text: str | None = None) -> Case:
    """The golden of ``decode`` decode steps after ``prompt``: ONE reference forward over the prompt and
    its continuation (its rows at positions >= len(prompt) are what each decode step must produce),
    with attributes ``prompt_tokens``, ``continuation``, ``decode`` and ``continuation_source``.

    ``continuation``: the tokens after the prompt (``decode`` of them), else the reference's own greedy
    continuation: each token the argmax of the reference's logits at the position before it, in the
    very forward that is stored (so the golden's own logits choose its next token at every step).
    It is found by proposing (:func:`greedy_draft`, the candidate through a KV cache: cheap beside the
    reference's forward) and verifying: the reference runs over prompt + proposal; where its argmax
    first differs, its own choice is kept, the rest proposed again and the reference run again.  The
    usual cost is one reference forward over ``len(prompt) + decode`` tokens plus the proposal; at worst
    (every proposal wrong) ``decode + 1`` forwards.  The attribute ``reference_forwards`` says how many ran.
    """
    ids = [int(t) for t in prompt]
    if continuation is not None:
        given = [int(t) for t in continuation]
        model.check_tokens(np.asarray(given))
        case = run_case(model, ids + given, dtype=dtype, prompt=prompt_text)
        case.attrs["reference_forwards"] = 1
        return _decoded(case, ids, given, "given")
    from ..model.draft import draft_device

    status(f"proposing a greedy continuation of {decode} token{'' if decode == 1 else 's'} (the candidate on "
           f"{draft_device(model) if decode > 0 else 'cpu'}, KV cache); the reference's forward verifies it",
           enabled=decode > 0)
    draft = greedy_draft(model, ids, decode)
    P = len(ids)
    for forwards in range(1, decode + 3):
        case = run_case(model, ids + draft, dtype=dtype, prompt=prompt_text)
        chosen = np.argmax(np.asarray(case.model["logits"])[P - 1:P - 1 + decode], axis=-1).astype(int).tolist()
        wrong = next((j for j, (a, b) in enumerate(zip(chosen, draft)) if a != b), None)
        if wrong is None:
            case.attrs["reference_forwards"] = forwards
            return _decoded(case, ids, draft, "greedy")
        status(f"the reference chooses {chosen[wrong]} at decode step {wrong} (proposed: {draft[wrong]}); "
               f"proposing the rest again")
        kept = draft[:wrong] + [chosen[wrong]]
        # the reference's own k_rope/v rows of prompt + kept[:-1] seed the proposal's cache: no prefill
        draft = kept + greedy_draft(model, ids + kept, decode - len(kept), seed=case.layers)
    raise RuntimeError(f"the reference's greedy continuation of {decode} tokens did not settle in {decode + 2} "
                       f"forwards")


def serve_candidate(model: ModelWeights, prompt: Sequence[int], *, decode: int,
                    continuation: Sequence[int] | None = None, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> Case:
    """moesnap's candidate serving ``prompt`` as an engine does: one prefill forward (the returned
    case's own rows, positions 0..P-1), then ``decode`` steps through its KV cache
    (:class:`~moesnap.model.serve.Session`), each a one-row case at its position in ``Case.steps``
    (on disk ``steps/<n>/``).  The steps are fed ``continuation`` (teacher-forced), else the
    candidate's own greedy choices (the argmax of its logits at the row before)."""
    from ..model.candidate import CandidateModel
    from ..model.serve import Session
    from ..util import progress

    ids = [int(t) for t in prompt]
    given = None if continuation is None else [int(t) for t in continuation]
    if given is not None:
        model.check_tokens(np.asarray(given))
    status(f"serving with the candidate on {device} in {str(dtype).removeprefix('torch.')}: a prefill of "
           f"{len(ids)} tokens, then {decode} decode step{'' if decode == 1 else 's'} through a KV cache, fed "
           + ("the given continuation" if given is not None else "its own greedy choices"))
    cand = CandidateModel(model, device=device, dtype=dtype)
    if decode:
        cand.keep_weights()
    session = Session(cand, capacity=len(ids) + decode)
    last = session.prefill(ids)[-1]
    prefill = last.case
    fed: list[int] = []
    steps: list[Case] = []
    for n in progress(range(decode), desc="decode steps"):
        token = given[n] if given is not None else last.next_token()
        last = session.decode(token)[0]
        steps.append(last.case)
        fed.append(token)
    case = replace(prefill, steps=tuple(steps))
    return _decoded(case, ids, fed, "given" if given is not None else "greedy")


@show_progress_switch
def trace(model: str | Path | ModelWeights, tokens: Sequence[int], *, dtype: str = "float32",
          device: str = "cpu", engine: str = "moesnap", candidate: bool = False,
          out: str | Path | None = None, force: bool = False, show_progress: bool = False, decode: int = 0,
          continuation: Sequence[int] | None = None) -> Case:
    """Run one forward of ``model`` (a GGUF file, an HF checkpoint directory, or an open model) over
    ``tokens`` and return every stage it exposes as a :class:`~moesnap.case.Case`; with ``out``, also
    write it there as a case group (replacing one only with ``force``).

    ``engine``: ``"moesnap"`` (the reference on the CPU, or moesnap's candidate with ``candidate=True``),
    ``"transformers"`` or ``"llama.cpp"`` (:data:`ENGINES`).

    >>> import moesnap
    >>> from moesnap.model.synth import tiny_path
    >>> case = moesnap.trace(tiny_path(), [1, 2, 3])
    >>> case.layers["moe_out"].shape        # [layers, tokens, hidden]
    (4, 3, 64)

    ``decode=N``: N decode steps after the prompt ``tokens``, fed ``continuation`` (token ids, N of
    them; N may be left out) or else greedy: the reference over prompt + continuation as one case
    (the reference's own greedy continuation), or the engine serving them (a prefill, then N steps
    through its KV cache, in ``case.steps``); attributes ``prompt_tokens``, ``continuation``, ``decode``.

    >>> served = moesnap.trace(tiny_path(), [1, 2, 3], candidate=True, decode=2)
    >>> [s.positions.tolist() for s in served.steps], served.attrs["prompt_tokens"]
    ([[3], [4]], 3)
    """
    from ..model.load import open_model

    m = model if isinstance(model, ModelWeights) else open_model(model)
    if out is not None:
        check_output(out, force=force)
    case = run_case(m, tokens, dtype=parse_dtype(dtype), device=parse_device(device), candidate=candidate,
                    engine=engine, decode=decode, continuation=continuation)
    if out is not None:
        write_output(case, out, force=force)
    return case


def _run_decode(model: ModelWeights, tokens: Sequence[int], *, dtype: torch.dtype, device: torch.device | str,
                candidate: bool, prompt: str | None, engine: str, decode: int,
                continuation: Sequence[int] | None) -> Case:
    """:func:`run_case` beyond one prefill: prompt ``tokens``, then ``decode`` steps."""
    from .prompts import check_continuation_length, check_decode, continuation_value

    given = None if continuation is None else continuation_value(continuation)
    if isinstance(given, str):
        raise UsageError(f"continuation={given!r}: expected token ids (text goes through the command line's "
                         f"--continuation TEXT, or a tokenizer, first)")
    if given is not None:
        check_continuation_length(given, None if not decode else check_decode(decode))
        model.check_tokens(np.asarray(given))
    n = len(given) if given is not None else check_decode(decode)
    if engine == "moesnap" and not candidate:
        if torch.device(device).type != "cpu":
            raise UsageError("the reference forward runs on the CPU; add --candidate to trace the device forward")
        return continued_reference(model, tokens, decode=n, continuation=given, dtype=dtype, prompt_text=prompt)
    if engine == "moesnap":
        case = serve_candidate(model, tokens, decode=n, continuation=given, dtype=dtype, device=device)
        return _with_provenance(case, model, producer="moesnap-candidate", dtype=dtype, device=device,
                                prompt=prompt, tokens=tokens)
    if candidate:
        raise UsageError(f"--candidate traces moesnap's own device forward; --engine {engine} is a candidate already")
    status(f"running {engine} on {device} in {str(dtype).removeprefix('torch.')}: a prefill of {len(tokens)} "
           f"tokens, then {n} decode step{'' if n == 1 else 's'} through its KV cache")
    case = _engine_case(engine, model, tokens, dtype=dtype, device=device, decode=n, continuation=given)
    case = _with_provenance(case, model, producer=case.attrs["producer"], dtype=dtype, device=device, prompt=prompt,
                            tokens=tokens)
    fed = [int(t) for s in case.steps for t in np.asarray(s.tokens).reshape(-1)]
    return _decoded(case, tokens, fed, "given" if given is not None else "greedy")


def _decode_keywords(fn: Callable[..., Case], engine: str, decode: int,
                     continuation: Sequence[int] | None) -> dict[str, Any]:
    """What ``fn`` (an engine's capture function) is passed for ``decode`` steps after the prompt; a
    capture function that does not take them yet is refused in one line."""
    if not decode and continuation is None:
        return {}
    params = inspect.signature(fn).parameters
    if "decode" not in params:
        raise UsageError(f"--decode with --engine {engine} is not available yet")
    if continuation is not None and "continuation" not in params:
        raise UsageError(f"--continuation with --engine {engine} is not available yet")
    return {"decode": decode, **({"continuation": list(continuation)} if continuation is not None else {})}


def _engine_case(engine: str, model: ModelWeights, tokens: Sequence[int], *, dtype: torch.dtype,
                 device: torch.device | str, decode: int = 0, continuation: Sequence[int] | None = None) -> Case:
    if engine == "llama.cpp":
        if torch.device(device).type != "cpu" or dtype != torch.float32:
            raise UsageError("--engine llama.cpp runs llama-cpp-python's CPU build with float32 activations; "
                             "leave --device cpu and --dtype float32")
        from ..capture.llama import llama_case

        return llama_case(model.path, tokens, **_decode_keywords(llama_case, engine, decode, continuation))
    from ..capture.hf import model_from_gguf, transformers_case

    if dtype == torch.float64:
        raise UsageError("--engine transformers runs in float32, bfloat16 or float16")
    keywords = _decode_keywords(transformers_case, engine, decode, continuation)   # before the model is built
    hf = model_from_gguf(model, device=device, dtype=dtype)
    try:
        return transformers_case(hf, tokens, **keywords)
    finally:
        del hf
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def check_output(out: str | Path, *, force: bool = False) -> Path:
    """Refuse an output path for a case group before the forward runs: a missing parent, a
    place inside a published golden version, or one that exists (``force`` replaces only
    a case group, never another directory, a file, a golden version or store)."""
    if not str(out):
        raise UsageError("--out: empty path")
    out = Path(out)
    exists = out.exists() or out.is_symlink()
    if exists and not force:
        raise UsageError(f"{out}: exists (use --force to overwrite)")
    if not out.parent.exists():
        raise UsageError(f"{out.parent}: output directory does not exist")
    inside = published_version_above(out)
    if inside is not None:
        raise UsageError(f"{out}: inside the published golden version {inside}; refusing to write there")
    if exists:
        if out.is_symlink() or not out.is_dir():
            raise UsageError(f"{out}: exists and is not a directory")
        if not ((out / "zarr.json").is_file() and (out / "tokens" / "zarr.json").is_file()):
            raise UsageError(f"{out}: exists and is not a case group; --force only replaces a case group")
    return out


def write_output(case: Case, out: str | Path, *, force: bool = False) -> None:
    """Write the case group at ``out``; replace an existing one only with ``force`` (atomically)."""
    out = check_output(out, force=force)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        save_case(tmp, case)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def summary(case: Case) -> list[str]:
    """Per-layer lines: hidden-state RMS, experts used, and the closest router tie."""
    lines = [f"tokens: {len(case.tokens)}  layers: {case.n_layer}  "
             f"logits: {list(case.model['logits'].shape)}  producer: {case.attrs.get('producer')}"]
    lines.append("layer | layer_out rms | experts used | min top-k margin (router logit)")
    lo, ids, rl = case.layers.get("layer_out"), case.layers.get("topk_ids"), case.layers.get("router_logits")
    for i in range(case.n_layer):
        rms = float(np.sqrt(np.mean(np.square(lo[i].astype(np.float64))))) if lo is not None else float("nan")
        used = len(np.unique(ids[i])) if ids is not None else 0
        k = ids.shape[-1] if ids is not None else 0
        margin = float("nan")
        if rl is not None and k < rl.shape[-1]:
            srt = np.sort(rl[i].astype(np.float64), axis=-1)[:, ::-1]
            margin = float(np.min(srt[:, k - 1] - srt[:, k]))
        lines.append(f"L{i:02d}   | {rms:13.5g} | {used:12d} | {margin:.3g}")
    logits = case.model["logits"]
    lines.append(f"logits: finite={bool(np.isfinite(logits).all())}  argmax(last)={int(np.argmax(logits[-1]))}")
    after, P = case.attrs.get("continuation"), case.attrs.get("prompt_tokens")
    if isinstance(after, list) and isinstance(P, int):
        head = ", ".join(map(str, after[:12])) + (", …" if len(after) > 12 else "")
        fed = str(case.attrs.get("continuation_source", "?"))
        where = (f"steps/0..{len(case.steps) - 1}: one decode step each, positions {P}..{P + len(case.steps) - 1}"
                 if case.steps else f"rows {P}..{P + len(after) - 1} of this one forward")
        lines.append(f"decode: a {P}-token prompt, then {len(after)} step{'' if len(after) == 1 else 's'} on "
                     f"[{head}] ({fed}); {where}")
    return lines
