"""Run a forward (reference or candidate) over one prompt and capture every stage."""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..case import Case, from_recorder
from ..store.case import save_case
from ..errors import UsageError
from ..model.recorder import ArrayRecorder
from ..util import LayerProgress, file_sha256, published_version_above, status, versions
from ..model.weights import ModelWeights
from ..stages import DTYPES as STAGE_DTYPES

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in STAGE_DTYPES}


def parse_dtype(name: str, *, allowed: Sequence[str] = tuple(DTYPES)) -> torch.dtype:
    if name not in allowed:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(allowed)}")
    return DTYPES[name]


def parse_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"unknown device {name!r}; choose cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but no CUDA device is available")
    return torch.device(name)


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


def run_case(model: ModelWeights, tokens: Sequence[int], *, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu", candidate: bool = False, prompt: str | None = None,
             show_progress: bool = True, engine: str = "moesnap") -> Case:
    """Run one forward over ``tokens`` and capture every stage it exposes.

    ``engine="moesnap"``: the reference (CPU) or, with ``candidate``, moesnap's device forward.
    ``"transformers"``: transformers' ``Qwen3MoeForCausalLM`` built from the same weights, on
    ``device`` in ``dtype`` (:mod:`moesnap.capture.hf`).  ``"llama.cpp"``: llama.cpp's own forward of
    the GGUF (CPU, float32 activations; :mod:`moesnap.capture.llama`).  Stages an engine does not
    expose are absent from the case.
    """
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    model.check_tokens(np.asarray(tokens))
    if engine == "moesnap":
        rec = ArrayRecorder(keep_dtype=(dtype == torch.float64))
        status(f"running {'the candidate on ' + str(device) if candidate else 'the reference'} in "
               f"{str(dtype).removeprefix('torch.')}: {len(tokens)} tokens x {model.config.n_layer} layers",
               enabled=show_progress)
        bar = LayerProgress("candidate" if candidate else "reference", enabled=show_progress).start(model.config.n_layer)
        try:
            if candidate:
                from ..model.candidate import CandidateModel

                CandidateModel(model, device=device, dtype=dtype).forward(tokens, rec, progress=bar)
            else:
                if torch.device(device).type != "cpu":
                    raise UsageError("the reference forward runs on the CPU; add --candidate to trace the device forward")
                from ..model.reference import run_reference

                run_reference(model, tokens, dtype=dtype, recorder=rec, progress=bar)
        finally:
            bar.close()
        case = from_recorder(rec)
        case.attrs["layer_timing"] = bar.timing()
        producer = "moesnap-candidate" if candidate else "moesnap-reference"
    else:
        if candidate:
            raise UsageError(f"--candidate traces moesnap's own device forward; --engine {engine} is a candidate already")
        status(f"running {engine}'s forward of {model.path.name} on {device} in {str(dtype).removeprefix('torch.')}: "
               f"{len(tokens)} tokens", enabled=show_progress)
        case = _engine_case(engine, model, tokens, dtype=dtype, device=device)
        producer = case.attrs["producer"]
    if model.path.is_file():    # the provenance's sha256: a bar the first time a large file is hashed
        file_sha256(model.path, progress=show_progress)
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


def trace(model: str | Path | ModelWeights, tokens: Sequence[int], *, dtype: str = "float32",
          device: str = "cpu", engine: str = "moesnap", candidate: bool = False,
          out: str | Path | None = None, force: bool = False, show_progress: bool = False) -> Case:
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
    """
    from ..model.load import open_model

    m = model if isinstance(model, ModelWeights) else open_model(model)
    if out is not None:
        check_output(out, force=force)
    case = run_case(m, tokens, dtype=parse_dtype(dtype), device=parse_device(device), candidate=candidate,
                    engine=engine, show_progress=show_progress)
    if out is not None:
        write_output(case, out, force=force)
    return case


def _engine_case(engine: str, model: ModelWeights, tokens: Sequence[int], *, dtype: torch.dtype,
                 device: torch.device | str) -> Case:
    if engine == "llama.cpp":
        if torch.device(device).type != "cpu" or dtype != torch.float32:
            raise UsageError("--engine llama.cpp runs llama-cpp-python's CPU build with float32 activations; "
                             "leave --device cpu and --dtype float32")
        from ..capture.llama import llama_case

        return llama_case(model.path, tokens)
    from ..capture.hf import model_from_gguf, transformers_case

    if dtype == torch.float64:
        raise UsageError("--engine transformers runs in float32, bfloat16 or float16")
    hf = model_from_gguf(model, device=device, dtype=dtype)
    try:
        return transformers_case(hf, tokens)
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
    return lines
