"""Golden versions: generate, list, show, diff and prune (the logic behind ``moesnap goldens``).

Storing is :mod:`moesnap.store`'s business and judging is the classifier's
(:func:`moesnap.judge.compare.compare_cases`); this module only strings them together.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import GoldenError, UsageError
from ..judge.classify import Verdict
from ..store import GoldenStore, GoldenVersion, PruneResult, validate_suite
from ..stages import GOLDEN_DTYPES
from ..util import printable, progress, write_text_atomic

#: dtypes a golden may be generated in (the reference forward's arithmetic)


# ---------------------------------------------------------------- generate


def generate(model_path: str | Path, suite: str, *, store: GoldenStore, inputs: Sequence[tuple[str, str]],
             dtype: str = "float32", show_progress: bool = True, command: str | None = None,
             tokenizer: str = "auto") -> GoldenVersion:
    """Run the reference forward over each input and publish the cases as one new version.

    ``inputs`` are ``("tokens", "1,2,3")`` or ``("prompt", text)`` pairs; case
    ``i`` is named ``case{i}``.  A prompt goes through the tokenizer ``tokenizer``
    picks (:func:`moesnap.run.prompts.prompt_tokenizer`), recorded as the case's
    ``tokenizer`` attribute.  Every input is validated before anything is
    written; the version becomes visible only once every case is stored.
    """
    from .prompts import check_choice, encode_prompt, prompt_tokenizer
    from .trace import DTYPES, model_provenance, parse_tokens, run_case
    from ..util import versions
    from ..model.load import open_model

    validate_suite(suite)
    if dtype not in GOLDEN_DTYPES:
        raise UsageError(f"unknown golden dtype {dtype!r}; choose one of {', '.join(GOLDEN_DTYPES)}")
    if not inputs:
        raise UsageError("give at least one --tokens or --prompt")
    check_choice(tokenizer)
    model = open_model(model_path)
    tok = None
    cases: list[tuple[str, list[int], str | None, dict[str, Any] | None]] = []
    for i, (kind, value) in enumerate(inputs):
        if kind == "tokens":
            ids, prompt, made_by = parse_tokens(value), None, None
        elif kind == "prompt":
            tok = tok or prompt_tokenizer(model, tokenizer)
            enc = encode_prompt(tok, value, model=model)
            ids, prompt, made_by = enc.ids, value, enc.tokenizer
        else:
            raise UsageError(f"input kind {kind!r}: expected 'tokens' or 'prompt'")
        model.check_tokens(np.asarray(ids))
        cases.append((f"case{i}", ids, prompt, made_by))
    meta: dict[str, Any] = {
        "suite": suite,
        "model": model_provenance(model),
        "dtype": dtype,
        "versions": versions(),
        "platform": platform.platform(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }
    made = {name: made_by for name, _, _, made_by in cases if made_by is not None}
    if made:
        meta["tokenizers"] = made
    with store.begin(suite) as writer:
        for name, ids, prompt, made_by in progress(cases, desc=f"{suite}: cases", enabled=show_progress):
            case = run_case(model, ids, dtype=DTYPES[dtype], prompt=prompt, show_progress=show_progress)
            if made_by is not None:
                case.attrs["tokenizer"] = made_by
            writer.add_case(name, case)
        return writer.commit(meta)


# ---------------------------------------------------------------- list / show


@dataclass(frozen=True)
class SuiteInfo:
    suite: str
    versions: tuple[str, ...]
    newest: GoldenVersion


def list_suites(store: GoldenStore) -> list[SuiteInfo]:
    out = []
    for s in store.suites():
        vs = store.versions(s)
        if vs:
            out.append(SuiteInfo(s, tuple(vs), store.open_version(s, vs[-1])))
    return out


def describe(meta: Mapping[str, Any]) -> str:
    """One line: model file, dtype, case count, creation time."""
    model = meta.get("model") or {}
    return printable(f"{model.get('file', '?')} ({str(model.get('sha256', '?'))[:12]}), {meta.get('dtype', '?')}, "
            f"{len(meta.get('cases') or [])} case(s), {meta.get('created', '?')}")


def describe_tokenizer(made_by: Any) -> str:
    """A recorded tokenizer in a few words: ``bytes``, ``gguf-bpe qwen2``, ``tokenizer.json 1a2b3c4d5e6f``."""
    if not isinstance(made_by, Mapping):
        return printable(str(made_by))
    kind = made_by.get("kind", "?")
    detail = made_by.get("pre") if kind == "gguf-bpe" else str(made_by.get("sha256", ""))[:12] or None
    return printable(f"{kind} {detail}" if detail else str(kind))


def show_lines(v: GoldenVersion, *, verify: bool = True, show_progress: bool = True) -> list[str]:
    """Provenance summary, cases (prompt, tokens) and stages with shapes; reads every array when ``verify``."""
    m = v.meta
    model = m.get("model") or {}
    cfg = model.get("config") or {}
    vers = m.get("versions") or {}
    qtypes = model.get("quant_types") or {}
    counts: dict[str, int] = {}
    for q in qtypes.values():
        counts[q] = counts.get(q, 0) + 1
    lines = [
        f"{v.ref}  ({v.where})",
        f"  model:    {model.get('file')}  {model.get('size')} bytes  sha256 {model.get('sha256')}",
        "  config:   " + ", ".join(f"{k}={cfg[k]}" for k in sorted(cfg) if not isinstance(cfg[k], (dict, list))),
        "  quants:   " + ", ".join(f"{q}×{n}" for q, n in sorted(counts.items())),
        f"  dtype:    {m.get('dtype')}   created {m.get('created')}",
        "  versions: " + ", ".join(f"{k} {vers[k]}" for k in ("moesnap", "torch", "numpy", "gguf", "zarr", "python")
                                    if k in vers),
        f"  platform: {m.get('platform') or vers.get('platform')}",
    ]
    if m.get("command"):
        lines.append(f"  command:  {m['command']}")
    names = v.case_names()
    for name in progress(names, desc=f"{v.ref}: verify", enabled=verify and show_progress):
        info = v.case_info(name)
        ids = info.get("token_ids") or []
        prompt = info.get("prompt")
        shown = json.dumps(prompt, ensure_ascii=False) if prompt is not None else "(token ids)"
        head = ", ".join(map(str, ids[:12])) + (", …" if len(ids) > 12 else "")
        made_by = (m.get("tokenizers") or {}).get(name)
        lines.append(f"  case {name}: {len(ids)} tokens  prompt {shown}  ids [{head}]"
                     + (f"  tokenizer {describe_tokenizer(made_by)}" if made_by else ""))
        if verify:
            v.read_case(name, verify=True)
        arrays = info.get("arrays") or {}
        layer = [p for p in arrays if p.startswith("layers/")]
        model_level = [p for p in arrays if not p.startswith("layers/")]
        lines.append("    " + "  ".join(f"{p} {_shape(arrays[p])}" for p in model_level))
        if layer:
            n_layer = arrays[layer[0]]["shape"][0] if arrays[layer[0]]["shape"] else 0
            lines.append(f"    layers ({n_layer}): " + "  ".join(f"{p[7:]} {_shape(arrays[p], skip=1)}" for p in layer))
    lines.append(f"  checksums: {len(m.get('checksums') or {})} arrays" + (", all verified" if verify else " (not verified)"))
    return [printable(line) for line in lines]   # provenance is input: no control characters to the terminal


def _shape(info: Mapping[str, Any], skip: int = 0) -> str:
    shape = list(info.get("shape") or [])[skip:]
    dt = str(info.get("dtype", ""))
    return "[" + ",".join(map(str, shape)) + "]" + ("" if dt == "float32" else f" {dt}")


# ---------------------------------------------------------------- diff


@dataclass(frozen=True)
class StageChange:
    case: str
    layer: int | None
    stage: str
    identical: bool
    verdict: Verdict
    metrics: dict | None
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    def to_dict(self) -> dict:
        return {"case": self.case, "layer": self.layer, "stage": self.stage, "identical": self.identical,
                "verdict": self.verdict.name, "metrics": self.metrics, "detail": self.detail}


@dataclass
class DiffReport:
    a: str
    b: str
    provenance: list[tuple[str, Any, Any]] = field(default_factory=list)
    stages: list[StageChange] = field(default_factory=list)
    case_notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> list[StageChange]:
        return [s for s in self.stages if not s.identical]

    @property
    def any_changed(self) -> bool:
        return bool(self.changed or self.case_notes)

    def to_dict(self) -> dict:
        return {
            "a": self.a, "b": self.b,
            "verdict": "changed" if self.any_changed else "identical",
            "n_stages": len(self.stages),
            "n_changed": len(self.changed),
            "n_beyond_tolerance": sum(1 for s in self.changed if not s.passed),
            "provenance": [{"key": k, "a": x, "b": y} for k, x, y in self.provenance],
            "case_notes": list(self.case_notes),
            "results": [s.to_dict() for s in self.stages],
        }


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, Mapping):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def _bitwise_equal(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def diff(va: GoldenVersion, vb: GoldenVersion, *, tols=None, show_progress: bool = True) -> DiffReport:
    """Which stages of ``vb`` differ from ``va`` (the golden side), and by how much (the classifier)."""
    from ..judge.compare import compare_cases
    from ..judge.tolerances import Tolerances

    tols = tols or Tolerances.defaults()
    rep = DiffReport(va.ref, vb.ref)
    skip = ("checksums", "cases", "created", "command")
    fa = _flatten({k: v for k, v in va.meta.items() if k not in skip})
    fb = _flatten({k: v for k, v in vb.meta.items() if k not in skip})
    for k in sorted(set(fa) | set(fb)):
        if fa.get(k) != fb.get(k):
            rep.provenance.append((k, fa.get(k), fb.get(k)))
    dtypes = {str(va.meta.get("dtype") or "float32"), str(vb.meta.get("dtype") or "float32")}
    dtype = "float32" if "float32" in dtypes or len(dtypes) > 1 else dtypes.pop()
    names_a, names_b = va.case_names(), vb.case_names()
    for name in sorted(set(names_a) - set(names_b)):
        rep.case_notes.append(f"case {name}: only in {va.ref}")
    for name in sorted(set(names_b) - set(names_a)):
        rep.case_notes.append(f"case {name}: only in {vb.ref}")
    common = [n for n in names_a if n in names_b]
    for name in progress(common, desc="diff", enabled=show_progress):
        ca, cb = va.read_case(name), vb.read_case(name)
        if ca.tokens.shape != cb.tokens.shape or not np.array_equal(ca.tokens, cb.tokens):
            rep.case_notes.append(f"case {name}: other tokens in {vb.ref} ({len(ca.tokens)} vs {len(cb.tokens)}); "
                                  f"stages not compared")
            continue
        report = compare_cases(ca, cb, tols, dtype=dtype, name=name)
        for r in report.results:
            same = _bitwise_equal(ca.stage(r.stage, r.layer), cb.stage(r.stage, r.layer))
            rep.stages.append(StageChange(name, r.layer, r.stage, same, r.verdict,
                                          r.result.metrics.to_dict() if r.result.metrics else None,
                                          r.result.detail))
    return rep


def diff_lines(rep: DiffReport) -> list[str]:
    lines = [f"{rep.a} -> {rep.b}"]
    for k, x, y in rep.provenance:
        lines.append(f"  provenance {k}: {_short(x)} -> {_short(y)}")
    lines.extend(f"  {n}" for n in rep.case_notes)
    by_case: dict[str, list[StageChange]] = {}
    for s in rep.stages:
        by_case.setdefault(s.case, []).append(s)
    for case, stages in by_case.items():
        changed = [s for s in stages if not s.identical]
        if not changed:
            lines.append(f"  case {case}: all {len(stages)} stages identical")
            continue
        lines.append(f"  case {case}: {len(changed)} of {len(stages)} stages changed")
        for s in changed:
            where = "model" if s.layer is None else f"layer {s.layer}"
            m = s.metrics or {}
            lines.append(f"    {where:>9} {s.stage:<14} {s.verdict.name:<14} max_abs {_num(m.get('max_abs'))}  "
                         f"rel_l2 {_num(m.get('rel_l2'))}  cosine {_num(m.get('cosine'))}"
                         + (f"  ({s.detail})" if s.detail else ""))
    n, beyond = len(rep.changed), sum(1 for s in rep.changed if not s.passed)
    if rep.any_changed:
        lines.append(f"changed: {n} stage(s), {beyond} beyond tolerance" +
                     (f", {len(rep.case_notes)} case difference(s)" if rep.case_notes else ""))
    else:
        lines.append(f"identical: all {len(rep.stages)} stages bit for bit")
    return [printable(line) for line in lines]


def _short(x: Any) -> str:
    text = json.dumps(x, ensure_ascii=False) if not isinstance(x, str) else x
    return text if len(text) <= 80 else text[:77] + "..."


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.3g}"


# ---------------------------------------------------------------- prune


def prune(store: GoldenStore, suite: str, keep: int, *, stale_after: float | None = None) -> PruneResult:
    from ..store import DEFAULT_STALE_AFTER

    return store.prune(suite, keep, stale_after=DEFAULT_STALE_AFTER if stale_after is None else stale_after)


def write_json(obj: dict, path: str | Path) -> None:
    p = Path(path)
    if not p.parent.is_dir():
        raise UsageError(f"{p.parent}: output directory does not exist")
    try:
        text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    except ValueError as e:
        raise GoldenError(f"{p}: cannot write the report ({e})") from None
    write_text_atomic(p, text)


def generate_suite(model: str | Path, suite: str, cases: Sequence[Sequence[int] | str], *,
                   store: str | Path | GoldenStore | None = None, dtype: str = "float32",
                   show_progress: bool = False, tokenizer: str = "auto") -> str:
    """Publish a new version of golden ``suite`` from ``model``: one case per entry of ``cases`` (a
    list of token ids, or a prompt string tokenized with the model's own tokenizer; ``tokenizer``
    ``"auto"``, ``"model"`` or ``"bytes"`` as ``--tokenizer`` picks).  ``store``: a
    directory, ``s3://bucket/prefix``, an open store, or None for ``goldens/``.  Returns
    ``"suite@vNNNN"``, the reference to check against.

    >>> import moesnap, tempfile                                             # doctest: +SKIP
    >>> moesnap.generate("model.gguf", "smoke", [[1, 2, 3], "Hello"], store=tempfile.mkdtemp())
    'smoke@v0001'
    """
    from ..store import open_store

    st = store if isinstance(store, GoldenStore) else open_store(None if store is None else str(store))
    inputs: list[tuple[str, str]] = []
    for c in cases:
        if isinstance(c, str):
            inputs.append(("prompt", c))
        else:
            ids = [int(t) for t in c]
            if not ids:
                raise UsageError("an empty list of token ids")
            inputs.append(("tokens", ",".join(map(str, ids))))
    v = generate(model, suite, store=st, inputs=inputs, dtype=dtype, show_progress=show_progress,
                 tokenizer=tokenizer)
    return f"{suite}@{v.version}"
