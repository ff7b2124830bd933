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
from ..judge.compare import Margin
from ..store import GoldenStore, GoldenVersion, PruneResult, validate_suite
from ..stages import GOLDEN_DTYPES
from ..util import printable, progress, status, write_text_atomic

#: the provenance ``kind`` of a pytest snapshot suite (the ``moesnap_snapshot`` fixture's named arrays)
SNAPSHOT_KIND = "moesnap_snapshot"


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
    timing: dict[str, Any] = {}
    with store.begin(suite) as writer:
        for name, ids, prompt, made_by in progress(cases, desc=f"{suite}: cases", enabled=show_progress):
            case = run_case(model, ids, dtype=DTYPES[dtype], prompt=prompt, show_progress=show_progress)
            if made_by is not None:
                case.attrs["tokenizer"] = made_by
            timing[name] = case.attrs.get("layer_timing") or []
            status(f"{name}: {timing_summary(timing[name])}", enabled=show_progress)
            writer.add_case(name, case)
        meta["layer_timing"] = timing
        return writer.commit(meta)


def timing_summary(entries: Sequence[Mapping[str, Any]]) -> str:
    """One line from a forward's per-layer clock (:meth:`moesnap.util.LayerProgress.timing`): time per
    layer, the slowest layer, peak memory and whether resident memory grew from the first layer to the last."""
    rows = [e for e in entries if isinstance(e, Mapping) and isinstance(e.get("seconds"), (int, float))]
    if not rows:
        return "no per-layer timing recorded"
    total = sum(float(e["seconds"]) for e in rows)
    slow = max(rows, key=lambda e: float(e["seconds"]))
    text = (f"{len(rows)} layer{'s' if len(rows) != 1 else ''} in {total:.3g} s, {total / len(rows):.3g} s/layer "
            f"(slowest: layer {slow.get('layer')}, {float(slow['seconds']):.3g} s)")
    peak = rows[-1].get("peak_rss_gib")
    if isinstance(peak, (int, float)):
        text += f"; peak memory {peak:.2f} GiB"
    first, last = rows[0].get("rss_gib"), rows[-1].get("rss_gib")
    if isinstance(first, (int, float)) and isinstance(last, (int, float)):
        text += f", resident {first:.2f} GiB after layer {rows[0].get('layer')}, {last:.2f} GiB after layer {rows[-1].get('layer')}"
    return text


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
    """One line: model file, dtype, case count, creation time (for a pytest snapshot: its test)."""
    if meta.get("kind") == SNAPSHOT_KIND:
        return printable(f"pytest snapshot of {meta.get('test', '?')}, {len(meta.get('cases') or [])} check(s), "
                         f"{meta.get('created', '?')}")
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


def _snapshot_lines(v: GoldenVersion, *, verify: bool) -> list[str]:
    """``goldens show`` of a pytest snapshot suite: its test, and each check's named arrays."""
    m = v.meta
    lines = [f"{v.ref}  ({v.where})", f"  pytest snapshot of {m.get('test', '?')}   created {m.get('created')}",
             f"  regenerate: {m.get('command', '?')}"]
    for name in v.case_names():
        info = v.case_info(name)
        if verify:
            v.read_arrays(name, verify=True)
        arrays = info.get("arrays") or {}
        lines.append(f"  {name}: " + "  ".join(
            f"{p.removeprefix('arrays/')} {a.get('dtype')} {list(a.get('shape') or [])}" for p, a in arrays.items()))
    if verify:
        lines.append(f"  checksums: {len(m.get('checksums') or {})} arrays, all verified")
    return [printable(line) for line in lines]


def show_lines(v: GoldenVersion, *, verify: bool = True, show_progress: bool = True) -> list[str]:
    """Provenance summary, cases (prompt, tokens) and stages with shapes; reads every array when ``verify``."""
    if is_snapshot(v):
        return _snapshot_lines(v, verify=verify)
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
    lines += tensor_type_lines(qtypes, suite=v.ref, model=_model_file(model))
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
        clock = (m.get("layer_timing") or {}).get(name) if isinstance(m.get("layer_timing"), Mapping) else None
        if isinstance(clock, list) and clock:
            lines.append(f"    generated: {timing_summary(clock)}")
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


def tensor_type_lines(qtypes: Mapping[str, Any], *, suite: str = "NAME", model: str = "MODEL") -> list[str]:
    """Each tensor's type, layer by layer (what ``--inject qtype:layer=L,tensor=NAME,as=TYPE`` can target):
    the whole-model tensors, the layer tensors of one type in every layer, then a row per run of layers
    that agree, and a ``--inject`` example that would fire (a tensor read as another type than its own,
    Q6_K read as Q4_K where there is one: the seed engine's real bug)."""
    whole: dict[str, str] = {}
    layers: dict[int, dict[str, str]] = {}
    for name, q in qtypes.items():
        name = name.removesuffix(".weight")
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
            layers.setdefault(int(parts[1]), {})[parts[2]] = str(q)
        else:
            whole[name] = str(q)
    if not whole and not layers:
        return []
    out = ["  tensors:  " + ", ".join(f"{n} {q}" for n, q in whole.items())] if whole else []
    if not layers:
        return out
    names = list(dict.fromkeys(n for lay in sorted(layers) for n in layers[lay]))
    fixed = [n for n in names if len({layers[lay].get(n) for lay in layers}) == 1]
    varying = [n for n in names if n not in fixed]
    by_type: dict[str, list[str]] = {}
    for n in fixed:
        by_type.setdefault(layers[min(layers)][n], []).append(n)
    for i, (q, ns) in enumerate(by_type.items()):
        out.append(("  layers:   " if i == 0 else " " * 12) + f"{q} in every layer: {', '.join(ns)}")
    if varying:
        width = {n: max(len(n), *(len(layers[lay].get(n, "-")) for lay in layers)) for n in varying}
        out.append(("  layers:   " if not by_type else " " * 12) + "layer  " + "  ".join(f"{n:<{width[n]}}" for n in varying))
        order = sorted(layers)
        i = 0
        while i < len(order):
            j = i
            row = [layers[order[i]].get(n, "-") for n in varying]
            while j + 1 < len(order) and [layers[order[j + 1]].get(n, "-") for n in varying] == row:
                j += 1
            span = str(order[i]) if i == j else f"{order[i]}-{order[j]}"
            out.append(" " * 12 + f"{span:<6} " + "  ".join(f"{q:<{width[n]}}" for n, q in zip(varying, row)).rstrip())
            i = j + 1
    target = _inject_example(layers)
    if target is not None:
        layer, tensor, own, other = target
        out.append(f"  inject:   e.g. moesnap check {model} --suite {suite} --inject "
                   f"qtype:layer={layer},tensor={tensor},as={other.lower()}  ({own} read as {other})")
    return out


def _model_file(meta: Mapping[str, Any]) -> str:
    """Where a golden's model file is for a command line: the bundled copy when it is one (same name and
    size; relative to the current directory where it lies below it), else its recorded name."""
    name = str(meta.get("file") or "MODEL")
    bundled = Path(__file__).resolve().parents[1] / "data" / Path(name).name
    try:
        if bundled.is_file() and bundled.stat().st_size == meta.get("size"):
            return str(bundled.relative_to(Path.cwd().resolve()) if bundled.is_relative_to(Path.cwd().resolve())
                       else bundled)
    except OSError:
        pass
    return name


def _inject_example(layers: Mapping[int, Mapping[str, str]]) -> tuple[int, str, str, str] | None:
    """(layer, tensor, its type, another type) for a ``--inject qtype`` that would fire: a Q6_K tensor read
    as Q4_K where there is one, else a quantized expert tensor read as Q4_K (Q8_0 if it is Q4_K)."""
    for want in ("Q6_K", None):
        for lay in sorted(layers):
            for tensor in ("ffn_down_exps", "ffn_up_exps", "ffn_gate_exps"):
                q = layers[lay].get(tensor)
                if q is None or q.upper() in ("F32", "F16", "BF16") or want is not None and q.upper() != want:
                    continue
                return lay, tensor, q, "Q8_0" if q.upper() == "Q4_K" else "Q4_K"
    return None


def _shape(info: Mapping[str, Any], skip: int = 0) -> str:
    shape = list(info.get("shape") or [])[skip:]
    dt = str(info.get("dtype", ""))
    return "[" + ",".join(map(str, shape)) + "]" + ("" if dt == "float32" else f" {dt}")


# ---------------------------------------------------------------- diff


@dataclass(frozen=True)
class StageChange:
    """One stage of one case in two versions: ``identical`` bit for bit; ``same_values`` the same shape
    and values (NaN where NaN), perhaps stored in another dtype; ``changed`` when the values differ."""

    case: str
    layer: int | None
    stage: str
    identical: bool
    verdict: Verdict
    metrics: dict | None
    detail: str = ""
    same_values: bool = False
    #: the rule closest to failing, or the one that failed (``moesnap.judge.compare.Margin``)
    worst: Margin | None = None
    dtypes: tuple[str, str] = ("", "")
    #: each side's shape; None on the side that does not hold the array
    shapes: tuple[tuple[int, ...] | None, tuple[int, ...] | None] = ((), ())

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    @property
    def changed(self) -> bool:
        return not (self.identical or self.same_values)

    @property
    def added(self) -> bool:
        """Only the newer version holds it."""
        return self.shapes[0] is None and self.shapes[1] is not None

    @property
    def removed(self) -> bool:
        """Only the older version holds it."""
        return self.shapes[1] is None and self.shapes[0] is not None

    @property
    def beyond(self) -> bool:
        """Held by both versions, changed beyond its tolerance."""
        return self.changed and not self.passed and not (self.added or self.removed)

    def to_dict(self) -> dict:
        return {"case": self.case, "layer": self.layer, "stage": self.stage, "identical": self.identical,
                "changed": self.changed, "dtypes": list(self.dtypes),
                "shapes": [None if s is None else list(s) for s in self.shapes],
                "added": self.added, "removed": self.removed,
                "verdict": self.verdict.name, "metrics": self.metrics, "detail": self.detail,
                "worst": None if self.worst is None else self.worst.to_dict()}


@dataclass
class DiffReport:
    """Two versions compared.  ``kind`` ``forward``: a forward's cases, stage by stage;
    ``moesnap_snapshot``: a pytest snapshot suite, each check's named arrays (a :class:`StageChange`
    each, its ``case`` the check, its ``stage`` the array's name, ``layer`` None)."""

    a: str
    b: str
    provenance: list[tuple[str, Any, Any]] = field(default_factory=list)
    stages: list[StageChange] = field(default_factory=list)
    case_notes: list[str] = field(default_factory=list)
    kind: str = "forward"

    @property
    def changed(self) -> list[StageChange]:
        """The stages whose values changed (a stage stored in another dtype with the same values has not)."""
        return [s for s in self.stages if s.changed]

    @property
    def any_changed(self) -> bool:
        return bool(self.changed or self.case_notes)

    def to_dict(self) -> dict:
        return {
            "a": self.a, "b": self.b, "kind": self.kind,
            "verdict": "changed" if self.any_changed else "identical",
            "n_stages": len(self.stages),
            "n_changed": len(self.changed),
            "n_dtype_only": sum(1 for s in self.stages if s.same_values and not s.identical),
            "n_beyond_tolerance": sum(1 for s in self.stages if s.beyond),
            "n_added": sum(1 for s in self.stages if s.added),
            "n_removed": sum(1 for s in self.stages if s.removed),
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


def _same_values(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """The same shape and values, whatever the dtypes (NaN where NaN)."""
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "biu" and b.dtype.kind in "biu":
        return bool(np.array_equal(a, b))
    return bool(np.array_equal(a.astype(np.float64), b.astype(np.float64), equal_nan=True))


def _shape_of(a: np.ndarray | None) -> tuple[int, ...] | None:
    return None if a is None else tuple(int(n) for n in a.shape)


def _provenance(va: GoldenVersion, vb: GoldenVersion) -> list[tuple[str, Any, Any]]:
    """Every provenance key whose value differs (not checksums, cases, creation time, command)."""
    skip = ("checksums", "cases", "created", "command", "layer_timing")   # how long it took is not what it holds
    fa = _flatten({k: v for k, v in va.meta.items() if k not in skip})
    fb = _flatten({k: v for k, v in vb.meta.items() if k not in skip})
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def is_snapshot(v: GoldenVersion) -> bool:
    """A pytest snapshot suite (the ``moesnap_snapshot`` fixture's named arrays), not a forward's cases."""
    return v.meta.get("kind") == SNAPSHOT_KIND


def _named_arrays(v: GoldenVersion) -> bool:
    """A snapshot suite's version, or one whose every case group holds named arrays (``add_arrays``)."""
    from ..store.arrays import LAYOUT

    cases = v.meta.get("cases") or []
    return is_snapshot(v) or bool(cases) and all(c.get("layout") == LAYOUT for c in cases)


def diff(va: GoldenVersion, vb: GoldenVersion, *, tols=None, show_progress: bool = True) -> DiffReport:
    """Which stages of ``vb`` differ from ``va`` (the golden side), and by how much (the classifier);
    for two versions of a pytest snapshot suite, which arrays of each check (:func:`diff_snapshots`)."""
    from ..judge.compare import compare_cases
    from ..judge.tolerances import Tolerances

    if _named_arrays(va) != _named_arrays(vb):
        snap, other = (va, vb) if _named_arrays(va) else (vb, va)
        raise UsageError(f"{snap.ref} is a pytest snapshot suite (named arrays) and {other.ref} a golden of a "
                         f"forward's cases: goldens diff compares two versions of one kind")
    tols = tols or Tolerances.defaults()
    if _named_arrays(va):
        return diff_snapshots(va, vb, tols=tols, show_progress=show_progress)
    rep = DiffReport(va.ref, vb.ref)
    rep.provenance = _provenance(va, vb)
    dtypes = {str(va.meta.get("dtype") or "float32"), str(vb.meta.get("dtype") or "float32")}
    dtype = "float32" if "float32" in dtypes or len(dtypes) > 1 else dtypes.pop()
    common = _common_cases(rep, va, vb, "case")
    for name in progress(common, desc="diff", enabled=show_progress):
        ca, cb = va.read_case(name), vb.read_case(name)
        if ca.tokens.shape != cb.tokens.shape or not np.array_equal(ca.tokens, cb.tokens):
            rep.case_notes.append(f"case {name}: other tokens in {vb.ref} ({len(ca.tokens)} vs {len(cb.tokens)}); "
                                  f"stages not compared")
            continue
        report = compare_cases(ca, cb, tols, dtype=dtype, name=name)
        for r in report.results:
            a, b = ca.stage(r.stage, r.layer), cb.stage(r.stage, r.layer)
            same = _bitwise_equal(a, b)
            stored = (str(a.dtype) if a is not None else "-", str(b.dtype) if b is not None else "-")
            rep.stages.append(StageChange(name, r.layer, r.stage, same, r.verdict,
                                          r.result.metrics.to_dict() if r.result.metrics else None,
                                          r.result.detail, same or _same_values(a, b), r.worst, stored,
                                          (_shape_of(a), _shape_of(b))))
    return rep


def _common_cases(rep: DiffReport, va: GoldenVersion, vb: GoldenVersion, word: str) -> list[str]:
    """The case (``word``: case or check) names both versions hold, in ``va``'s order; a note in ``rep`` for
    each that only one holds."""
    names_a, names_b = va.case_names(), vb.case_names()
    for name in sorted(set(names_a) - set(names_b)):
        rep.case_notes.append(f"{word} {name}: only in {va.ref}")
    for name in sorted(set(names_b) - set(names_a)):
        rep.case_notes.append(f"{word} {name}: only in {vb.ref}")
    return [n for n in names_a if n in names_b]


def _array_tolerance(tols, name: str, a: np.ndarray | None, b: np.ndarray | None):
    """The default tolerance of a snapshot array, as the fixture picks it: an array named like a
    moesnap stage (``logits``, ``layers/moe_out``) takes that stage's, any other its dtype's
    ``default``; the dtype's table when both sides are stored in that dtype, else float32's (the
    dtype a check declared is not recorded in the version's provenance)."""
    from ..judge.tolerances import DEFAULT
    from ..stages import DTYPES, canonical

    kinds = {str(x.dtype) for x in (a, b) if x is not None}
    dtype = next(iter(kinds)) if len(kinds) == 1 and next(iter(kinds)) in DTYPES else "float32"
    stage = canonical(name.rsplit("/", 1)[-1])
    return tols.for_stage(stage, dtype) if stage is not None else tols.stages[dtype][DEFAULT]


def diff_snapshots(va: GoldenVersion, vb: GoldenVersion, *, tols=None, show_progress: bool = True) -> DiffReport:
    """Two versions of a pytest snapshot suite: for each check both hold, every array of either
    (sorted by name): added, removed, bit for bit identical, the same values in another dtype, or
    changed, judged by the classifier at the default tolerances (no token axis, as the fixture
    judges).  Checks only one version holds are ``case_notes``."""
    from ..judge.classify import classify
    from ..judge.compare import StageResult, margins
    from ..judge.tolerances import Tolerances
    from ..store.arrays import strip_prefix

    tols = tols or Tolerances.defaults()
    rep = DiffReport(va.ref, vb.ref, kind=SNAPSHOT_KIND)
    rep.provenance = _provenance(va, vb)
    common = _common_cases(rep, va, vb, "check")
    for name in progress(common, desc="diff", enabled=show_progress):
        ga, gb = strip_prefix(va.read_arrays(name)), strip_prefix(vb.read_arrays(name))
        for array in sorted(set(ga) | set(gb)):
            a, b = ga.get(array), gb.get(array)
            tol = _array_tolerance(tols, array, a, b)
            res = classify(a, b, tol, token_axis=None)
            exact = a is not None and b is not None and a.dtype.kind in "biu" and b.dtype.kind in "biu"
            worst = StageResult(name, None, array, res, margins(res, tol, exact=exact)).worst
            same = _bitwise_equal(a, b)
            stored = (str(a.dtype) if a is not None else "-", str(b.dtype) if b is not None else "-")
            rep.stages.append(StageChange(name, None, array, same, res.verdict,
                                          res.metrics.to_dict() if res.metrics else None, res.detail,
                                          same or _same_values(a, b), worst, stored, (_shape_of(a), _shape_of(b))))
    return rep


def _provenance_lines(rep: DiffReport, *, details: bool) -> list[str]:
    if details or (len(rep.provenance) <= 2 and all(len(_short(x) + _short(y)) <= 40 for _, x, y in rep.provenance)):
        return [f"  provenance {k}: {_short(x)} -> {_short(y)}" for k, x, y in rep.provenance]
    if not rep.provenance:
        return []
    keys = [k for k, _, _ in rep.provenance]
    return [f"  provenance: {len(keys)} keys differ: {', '.join(keys[:6])}" + (", …" if len(keys) > 6 else "")
            + " (values: --details)"]


def _head_and_groups(rep: DiffReport, details: bool) -> tuple[list[str], dict[str, list[StageChange]]]:
    """A diff's first lines (the versions, the provenance that changed, the case notes) and its stage
    changes grouped by case (or check)."""
    lines = [f"{rep.a} -> {rep.b}", *_provenance_lines(rep, details=details)]
    lines.extend(f"  {n}" for n in rep.case_notes)
    groups: dict[str, list[StageChange]] = {}
    for s in rep.stages:
        groups.setdefault(s.case, []).append(s)
    return lines, groups


def diff_lines(rep: DiffReport, *, details: bool = False) -> list[str]:
    """A compact summary: provenance that changed, one line per case (how many stages changed, whether
    any beyond tolerance, the first such or the largest change), a total.  ``details``: every
    provenance key and one line per changed stage.  A snapshot suite: :func:`snapshot_diff_lines`."""
    if rep.kind == SNAPSHOT_KIND:
        return snapshot_diff_lines(rep, details=details)
    lines, by_case = _head_and_groups(rep, details)
    for case, stages in by_case.items():
        changed = [s for s in stages if s.changed]
        dtype_only = sum(1 for s in stages if s.same_values and not s.identical)
        other = f"; {dtype_only} other in dtype only" if dtype_only else ""
        if not changed:
            lines.append(f"  case {case}: all {len(stages)} stages unchanged{other}")
            continue
        beyond = [s for s in changed if not s.passed]
        if beyond:
            head = f"{len(beyond)} beyond tolerance, the first: {_stage_text(beyond[0], why=True)}"
        else:
            big = max(changed, key=lambda s: s.worst.ratio if s.worst is not None else 0.0)
            where = ("" if big.layer is None else f"layer {big.layer} ") + big.stage
            head = (f"none beyond tolerance (closest: {where}, {_num(big.worst.ratio)} of it)" if big.worst is not None
                    else "none beyond tolerance")
        lines.append(f"  case {case}: {len(changed)} of {len(stages)} stages changed, {head}{other}")
        if details:
            for s in changed + [s for s in stages if s.same_values and not s.identical]:
                lines.append("    " + _stage_text(s, why=not s.passed, metrics=True))
    n, beyond_n = len(rep.changed), sum(1 for s in rep.changed if not s.passed)
    if rep.any_changed:
        lines.append(f"changed: {n} stage(s), {beyond_n} beyond tolerance" +
                     (f", {len(rep.case_notes)} case difference(s)" if rep.case_notes else "")
                     + ("" if details or not rep.changed else " (each stage: --details)"))
    else:
        same = sum(1 for s in rep.stages if s.identical)
        lines.append(f"identical: all {len(rep.stages)} stages bit for bit" if same == len(rep.stages) else
                     f"unchanged: all {len(rep.stages)} stages hold the same values ({same} bit for bit)")
    return [printable(line) for line in lines]


#: changed arrays a check's summary names (the rest: --details)
SUMMARY_ARRAYS = 4


def snapshot_diff_lines(rep: DiffReport, *, details: bool = False) -> list[str]:
    """A pytest snapshot suite's diff: provenance that changed, then per check the arrays added and
    removed and each changed array (beyond tolerance first, up to :data:`SUMMARY_ARRAYS`) with its
    dtype, shape, largest abs and relative difference and whether beyond tolerance; a total.
    ``details``: every provenance key and one line per array of each check, unchanged ones too."""
    lines, by_check = _head_and_groups(rep, details)
    for check, arrays in by_check.items():
        added = [s for s in arrays if s.added]
        removed = [s for s in arrays if s.removed]
        changed = [s for s in arrays if s.changed and not (s.added or s.removed)]
        dtype_only = [s for s in arrays if s.same_values and not s.identical]
        beyond = [s for s in changed if s.beyond]
        parts = []
        if changed:
            parts.append(f"{len(changed)} of {len(arrays)} arrays changed, "
                         + (f"{len(beyond)} beyond tolerance" if beyond else "none beyond tolerance"))
        for what, group in (("added", added), ("removed", removed)):
            if group:
                parts.append(f"{what}: " + ", ".join(_array_text(s) for s in group[:6])
                             + (f", … {len(group) - 6} more" if len(group) > 6 else ""))
        if dtype_only:
            parts.append(f"{len(dtype_only)} in another dtype only")
        if not (changed or added or removed):
            parts.insert(0, f"all {len(arrays)} arrays unchanged")
        lines.append(f"  check {check}: " + "; ".join(parts))
        if details:
            width = max(len(s.stage) for s in arrays)
            lines.extend(f"    {s.stage:<{width}}  {_array_detail(s)}" for s in arrays)
            continue
        shown = sorted(changed, key=lambda s: (not s.beyond, -(s.worst.ratio if s.worst is not None else 0.0)))
        lines.extend(f"    {_array_text(s)}: {_array_change(s)}" for s in shown[:SUMMARY_ARRAYS])
        if len(shown) > SUMMARY_ARRAYS:
            lines.append(f"    … {len(shown) - SUMMARY_ARRAYS} more changed (each array: --details)")
    both = [s for s in rep.stages if not (s.added or s.removed)]
    changed_n = sum(1 for s in both if s.changed)
    beyond_n = sum(1 for s in both if s.beyond)
    added_n = sum(1 for s in rep.stages if s.added)
    removed_n = sum(1 for s in rep.stages if s.removed)
    if rep.any_changed:
        lines.append(f"changed: {changed_n} array(s), {beyond_n} beyond tolerance"
                     + (f", {added_n} added" if added_n else "") + (f", {removed_n} removed" if removed_n else "")
                     + (f", {len(rep.case_notes)} check difference(s)" if rep.case_notes else "")
                     + ("" if details or not changed_n else " (each array: --details)"))
    else:
        same = sum(1 for s in rep.stages if s.identical)
        lines.append(f"identical: all {len(rep.stages)} arrays bit for bit" if same == len(rep.stages) else
                     f"unchanged: all {len(rep.stages)} arrays hold the same values ({same} bit for bit)")
    return [printable(line) for line in lines]


def _dims(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else "[" + ", ".join(map(str, shape)) + "]"


def _array_text(s: StageChange) -> str:
    """``hidden float32 [3, 4]``; what changed between the sides, ``->``: ``ids int32 -> int64 [5]``."""
    (da, db), (sa, sb) = s.dtypes, s.shapes
    if s.added:
        return f"{s.stage} {db} {_dims(sb)}"
    if s.removed:
        return f"{s.stage} {da} {_dims(sa)}"
    dtype = da if da == db else f"{da} -> {db}"
    shape = _dims(sa) if sa == sb else f"{_dims(sa)} -> {_dims(sb)}"
    return f"{s.stage} {dtype} {shape}"


def _array_change(s: StageChange) -> str:
    """How much a changed array moved: ``max_abs 0.5, max_rel 0.1, beyond tolerance (what failed)``."""
    m = s.metrics or {}
    size = ""
    if m and s.verdict != Verdict.SHAPE_MISMATCH:
        finite = " (finite elements)" if any(m.get(k) for k in ("nan_golden", "nan_candidate", "inf_golden",
                                                                  "inf_candidate")) else ""
        size = f"max_abs {_num(m.get('max_abs'))}, max_rel {_num(m.get('max_rel'))}{finite}, "
    w = s.worst
    if s.beyond:
        return f"{size}beyond tolerance ({w.text if w is not None else s.verdict.name})"
    return size + "within tolerance" + (f" ({_num(w.ratio)} of it)" if w is not None else "")


def _array_detail(s: StageChange) -> str:
    """One array of a check under ``--details``: its state, dtype and shape, and for a changed one
    the verdict, metrics and the rule that failed or came closest."""
    head = _array_text(s).removeprefix(s.stage + " ")
    state = ("added" if s.added else "removed" if s.removed else "identical" if s.identical
             else "dtype only" if s.same_values else "changed")
    text = f"{state:<10}  {head}"
    if state != "changed":
        return text
    text += f"  {s.verdict.name}"
    m = s.metrics or {}
    if m:
        text += (f"  max_abs {_num(m.get('max_abs'))}  max_rel {_num(m.get('max_rel'))}  "
                 f"mean_abs {_num(m.get('mean_abs'))}  rel_l2 {_num(m.get('rel_l2'))}  cosine {_num(m.get('cosine'))}")
        if m.get("n_outside"):
            text += f"  {m['n_outside']} of {m.get('n')} outside"
        if m.get("worst_index") is not None:
            text += f"  worst at {tuple(m['worst_index'])}"
    w = s.worst
    if w is not None:
        text += f"  ({w.text})" if s.beyond else f"  ({_num(w.ratio)} of tolerance, {w.rule})"
    return text


def _stage_text(s: StageChange, *, why: bool, metrics: bool = False) -> str:
    """``layer 2 moe_out DIVERGE (frac_outside …)``; with ``metrics`` the size of the change."""
    where = "" if s.layer is None else f"layer {s.layer} "
    if s.same_values and not s.identical:
        return f"{where}{s.stage}: same values, dtype {s.dtypes[0]} -> {s.dtypes[1]}"
    text = f"{where}{s.stage} {s.verdict.name}"
    w = s.worst
    if metrics:
        m = s.metrics or {}
        text = (f"{where:>9}{s.stage:<14} {s.verdict.name:<14} max_abs {_num(m.get('max_abs'))}  "
                f"rel_l2 {_num(m.get('rel_l2'))}  cosine {_num(m.get('cosine'))}")
        if w is not None and s.passed:
            text += f"  {_num(w.ratio)} of tolerance"
    if w is not None and (why or not s.passed):
        text += f" ({w.text})" if not s.passed else ("" if metrics else f" ({_num(w.ratio)} of tolerance, {w.rule})")
    return text


def _short(x: Any, width: int = 80) -> str:
    text = json.dumps(x, ensure_ascii=False) if not isinstance(x, str) else x
    return text if len(text) <= width else text[:width - 3] + "..."


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
