"""``moesnap goldens list|show``: the suites of a store and one version's provenance, tensor types,
cases and stages (reading every array to verify its checksum)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..stages import DEFAULT_FAMILY, FAMILY_STAGES, stages_of_layer
from ..store import GoldenStore, GoldenVersion
from ..util import mib, plural, printable, progress, spans
from .goldens import SNAPSHOT_KIND, command_text, is_snapshot, timing_summary


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
        return printable(f"pytest snapshot of {meta.get('test', '?')}, {plural(len(meta.get('cases') or []), 'check')}, "
                         f"{meta.get('created', '?')}")
    model = meta.get("model") or {}
    return printable(f"{model.get('file', '?')} ({str(model.get('sha256', '?'))[:12]}), {meta.get('dtype', '?')}, "
            f"{plural(len(meta.get('cases') or []), 'case')}, {meta.get('created', '?')}")


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
             f"  regenerate: {command_text(str(m.get('command', '?')))}"]
    for name in v.case_names():
        info = v.case_info(name)
        if verify:
            v.read_arrays(name, verify=True)
        arrays = info.get("arrays") or {}
        lines.append(f"  {name}: " + "  ".join(
            f"{p.removeprefix('arrays/')} {a.get('dtype')} {list(a.get('shape') or [])}" for p, a in arrays.items()))
    if verify:
        lines.append(f"  checksums: {plural(len(m.get('checksums') or {}), 'array')}, all verified")
    return [printable(line) for line in lines]


def show_lines(v: GoldenVersion, *, verify: bool = True) -> list[str]:
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
        f"  model:    {model.get('file')}  {_size(model.get('size'))}  sha256 {model.get('sha256')}",
        "  config:   " + ", ".join(f"{k}={cfg[k]}" for k in sorted(cfg) if not isinstance(cfg[k], (dict, list))),
        "  quants:   " + ", ".join(f"{q}×{n}" for q, n in sorted(counts.items())),
        f"  dtype:    {m.get('dtype')}   created {m.get('created')}",
        "  versions: " + ", ".join(f"{k} {vers[k]}" for k in ("moesnap", "torch", "numpy", "gguf", "zarr", "python")
                                    if k in vers),
        f"  platform: {m.get('platform') or vers.get('platform')}",
    ]
    if m.get("command"):
        lines.append(f"  command:  {command_text(str(m['command']))}")
    lines += tensor_type_lines(qtypes, suite=v.ref, model=_model_file(model))
    names = v.case_names()
    for name in progress(names, desc=f"{v.ref}: verify", enabled=verify):
        info = v.case_info(name)
        ids = info.get("token_ids") or []
        prompt = info.get("prompt")
        shown = json.dumps(prompt, ensure_ascii=False) if prompt is not None else "(token ids)"
        head = ", ".join(map(str, ids[:12])) + (", …" if len(ids) > 12 else "")
        made_by = (m.get("tokenizers") or {}).get(name)
        lines.append(f"  case {name}: {plural(len(ids), 'token')}  prompt {shown}  ids [{head}]"
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
            n_layer = max(int((arrays[p].get("shape") or [0])[0]) for p in layer)
            held = _layers_holding(cfg, n_layer)
            lines.append(f"    layers ({n_layer}): " + "  ".join(
                f"{p[7:]} {_shape(arrays[p], skip=1)}{_which_layers(held.get(p[7:]), n_layer)}" for p in layer))
    lines.append(f"  checksums: {plural(len(m.get('checksums') or {}), 'array')}" + (", all verified" if verify else " (not verified)"))
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
        parts = name.split(".", 2)     # blk.3.attn_q, blk.3.attn_q.bias
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


def _layers_holding(cfg: Mapping[str, Any], n_layer: int) -> dict[str, list[int]]:
    """Each layer stage and the layers of the recorded model that have it (:func:`moesnap.stages.stages_of_layer`:
    a DeepSeek dense layer has no router, a MoE layer no ``dense_ffn_out``); empty for a config that names
    no family moesnap knows (every stored row then counts as a layer's)."""
    family = cfg.get("arch", DEFAULT_FAMILY)
    if not isinstance(family, str) or family not in FAMILY_STAGES:
        return {}
    out: dict[str, list[int]] = {}
    try:
        for layer in range(n_layer):
            for stage in stages_of_layer(family, cfg, layer):
                out.setdefault(stage, []).append(layer)
    except (TypeError, ValueError):      # a recorded n_dense_layers that is no number: say nothing of it
        return {}
    return out


def _which_layers(layers: list[int] | None, n_layer: int) -> str:
    """`` (layers 1-2)`` for a stage some layers lack: its array's rows of the others are filler, no
    layer's values; nothing for a stage every layer has."""
    if layers is None or len(layers) == n_layer:
        return ""
    return f" ({'layer' if len(layers) == 1 else 'layers'} {spans(layers)})"


def _size(n: Any) -> str:
    """A recorded file size in MiB (every size moesnap prints is in MiB), ``?`` when none is recorded."""
    return mib(n) if isinstance(n, int) and not isinstance(n, bool) else "?"


def _shape(info: Mapping[str, Any], skip: int = 0) -> str:
    shape = list(info.get("shape") or [])[skip:]
    dt = str(info.get("dtype", ""))
    return "[" + ",".join(map(str, shape)) + "]" + ("" if dt == "float32" else f" {dt}")

