"""SGLang's tensor dumps as a moesnap case.

SGLang's dumper (``python/sglang/srt/debug_utils/dumper.py``) writes one ``.pt`` file per tensor into
one directory, its tags in the file name as ``key=value`` pairs joined by ``___``::

    forward_pass_id=1___rank=0___name=moe_out___dump_index=7___layer_id=3.pt            (2025)
    step=0___rank=0___dump_index=9___name=non_intrusive__model.layers.3.mlp.output___recompute_status=disabled___layer_id=3.pt

``name`` is what ``dumper.dump(name, ...)`` was given, or the module path of the non-intrusive hooks
(``non_intrusive__`` + ``model.layers.<N>.mlp.output``; ``output.<i>`` for the i-th tensor a module
returns); the forward pass is ``forward_pass_id`` (older releases) or ``step`` (newer); ``rank`` the
process.  A file holds the tensor (older releases) or ``{"value": tensor, "meta": {...}}``.

How each name becomes a stage: ``non_intrusive__`` and ``model.layers.<N>.`` are taken off, and what
is left goes through :data:`moesnap.stages.ALIASES` (moesnap's own stage names work too); the layer is
``layer_id`` (or the ``<N>`` of the name: the two must agree).  Three names are mapped here: the
residual output of ``input_layernorm`` (layer ``N``) and of the final ``norm`` is the ``layer_out`` of
the layer before, and ``self_attn.qkv_proj.output`` holds ``q``, ``k`` and ``v`` side by side.
SGLang's bookkeeping fields (``input_ids``, ``positions``, ``seq_lens``, ``req_pool_indices``,
``rids``) are no stages: ``input_ids`` and ``positions`` are checked against the golden's prompt (a
pass that ran other tokens, or started after a cached prefix, is refused), the others are left out.
Any other name is refused, naming the file: a stage moesnap cannot place is not guessed.

One forward pass is imported: the only one, or the one chosen (``forward_pass``).  Files of rank 0 are
imported; a rank above 0 must hold the same values (a replicated tensor), otherwise it is refused:
resharding a tensor-parallel dump is not supported yet.

A ``.pt`` file is a pickle and may be hostile: it is read with ``torch.load(weights_only=True)``,
which rebuilds tensors and plain containers only and refuses anything else, so no code in a dump runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..case import Case
from ..errors import GoldenError, UsageError
from ..stages import canonical
from ._flat import Collector, Like

#: tag keys that number the forward pass, by dumper release
PASS_KEYS: tuple[str, ...] = ("forward_pass_id", "step", "curr_step")
#: SGLang's bookkeeping fields (the dumper's "core" fields): no stage of the forward
BOOKKEEPING: frozenset[str] = frozenset({"input_ids", "positions", "seq_lens", "req_pool_indices", "rids"})

_LAYER_NAME = re.compile(r"(?:model\.)?layers\.(\d+)\.(.+)")
_INT = re.compile(r"-?\d+")


@dataclass(frozen=True)
class DumpFile:
    """One ``.pt`` file and the tags of its name."""

    path: Path
    tags: dict[str, str]

    @property
    def name(self) -> str:
        return self.tags["name"]

    @property
    def forward_pass(self) -> int | None:
        key = next((k for k in PASS_KEYS if k in self.tags), None)
        return None if key is None else _int(self.tags[key], key, self.path)

    @property
    def rank(self) -> int:
        return _int(self.tags.get("rank", "0"), "rank", self.path)

    @property
    def dump_index(self) -> int:
        v = self.tags.get("dump_index", "0")
        return int(v) if _INT.fullmatch(v) else 0


def _int(value: str, key: str, path: Path) -> int:
    if not _INT.fullmatch(value):
        raise GoldenError(f"{path}: {key}={value!r} in the file name is not an integer")
    return int(value)


def parse_name(path: Path) -> DumpFile:
    """The tags of a dumper file name; a name that is not ``key=value`` pairs joined by ``___`` is refused."""
    tags: dict[str, str] = {}
    for part in path.name[: -len(".pt")].split("___"):
        key, sep, value = part.partition("=")
        if not sep or not key or key in tags:
            raise GoldenError(f"{path}: not an SGLang dumper file name (expected key=value pairs joined by '___', "
                              f"as sglang/srt/debug_utils/dumper.py writes them)")
        tags[key] = value
    if not tags.get("name"):
        raise GoldenError(f"{path}: the file name gives no name=...")
    return DumpFile(path, tags)


def scan(path: str | Path, forward_pass: int | None = None) -> list[DumpFile]:
    """The dumper files of one forward pass in directory ``path`` (every ``*.pt`` file; others are
    left alone), ordered by rank and dump index."""
    d = Path(path)
    if not d.is_dir():
        raise GoldenError(f"{d}: no such directory" if not d.exists() else f"{d}: not a directory")
    files = [parse_name(p) for p in sorted(d.iterdir()) if p.name.endswith(".pt") and not p.name.startswith(".")]
    if not files:
        raise GoldenError(f"{d}: holds no .pt file (SGLang's dumper writes into DIR/<exp_name>/: give that directory)")
    passes: dict[int | None, DumpFile] = {}
    for f in files:
        passes.setdefault(f.forward_pass, f)
    chosen: int | None
    if forward_pass is not None:
        if forward_pass not in passes:
            raise UsageError(f"{d}: holds no forward pass {forward_pass} (it holds: "
                             f"{', '.join(str(p) for p in passes)})")
        chosen = forward_pass
    elif len(passes) > 1:
        shown = "; ".join(f"{'none' if p is None else p}: {f.path.name}" for p, f in list(passes.items())[:4])
        raise UsageError(f"{d}: holds {len(passes)} forward passes ({shown}{' …' if len(passes) > 4 else ''}); "
                         f"choose the prefill pass of the golden's prompt with --pass N")
    else:
        chosen = next(iter(passes))
    return sorted((f for f in files if f.forward_pass == chosen), key=lambda f: (f.rank, f.dump_index, f.path.name))


_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _reason(e: Exception) -> str:
    """The line of torch.load's error that says what it refused (it wraps it in advice to drop weights_only)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(_BOILERPLATE)]
    return (lines[0] if lines else f"{type(e).__name__}: {str(e).strip()}")[:200]


def load_tensor(path: Path) -> tuple[np.ndarray, str]:
    """(the tensor a dumper file holds as numpy, its torch dtype name), read without running any code
    the file may hold; bfloat16 and float16 become float32 (exactly)."""
    import torch

    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise GoldenError(f"{path}: refused: not plain tensor data (torch.load with weights_only=True: "
                          f"{_reason(e)}); moesnap never runs code from a dump") from None
    if isinstance(obj, dict) and "value" in obj:
        obj = obj["value"]
    if not isinstance(obj, torch.Tensor):
        raise GoldenError(f"{path}: holds {type(obj).__name__}, not a tensor")
    dtype = str(obj.dtype).removeprefix("torch.")
    try:
        t = obj.detach()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.numpy(), dtype
    except Exception as e:
        raise GoldenError(f"{path}: a {dtype} tensor moesnap cannot read ({type(e).__name__})") from None


def _place(f: DumpFile, like: Like) -> tuple[str, list[tuple[str, int | None]]]:
    """(kind, [(stage, layer)]) of a file: kind ``stage``, ``qkv`` (q, k, v fused), or ``bookkeeping``."""
    name = f.name.removeprefix("non_intrusive__")
    if name in BOOKKEEPING or name == "tokens":
        return "bookkeeping", []
    m = _LAYER_NAME.fullmatch(name)
    from_name = int(m[1]) if m else None
    rest = m[2] if m else name.removeprefix("model.")
    layer = _int(f.tags["layer_id"], "layer_id", f.path) if f.tags.get("layer_id", "None") != "None" else None
    if layer is not None and from_name is not None and layer != from_name:
        raise GoldenError(f"{f.path}: layer_id={layer}, but the name says layer {from_name}")
    layer = from_name if layer is None else layer
    if rest == "self_attn.qkv_proj.output":
        return "qkv", [(s, layer) for s in ("q", "k", "v")]
    if rest == "norm.output.1":          # the final norm's (normed, residual): the last layer's layer_out
        if layer is not None:
            raise GoldenError(f"{f.path}: the final norm's residual, but the file gives layer {layer}")
        return "stage", [("layer_out", like.n_layer - 1)]
    if rest == "input_layernorm.output.1":   # layer N's input residual: layer N-1's layer_out
        if not layer:
            raise GoldenError(f"{f.path}: an input_layernorm residual at layer {layer}, which has no layer before it")
        return "stage", [("layer_out", layer - 1)]
    stage = canonical(rest)
    if stage is None or stage == "tokens":
        raise GoldenError(f"{f.path}: {f.name!r} names no stage moesnap knows (names and aliases: "
                          f"moesnap.stages.ALIASES); dump only those, e.g. with the dumper's filter")
    return "stage", [(stage, layer)]


def _check_prompt(f: DumpFile, values: np.ndarray, like: Like) -> None:
    v = values.reshape(-1)
    want = like.tokens if f.name.removeprefix("non_intrusive__") != "positions" else np.arange(like.n_tokens)
    if v.shape != want.shape or not np.array_equal(v, want):
        what = "positions" if f.name.endswith("positions") else "tokens"
        shown = v.tolist()[:8]
        raise GoldenError(f"{f.path}: the pass ran {what} {shown}{' …' if v.size > 8 else ''} ({v.size}), the golden's "
                          f"case {want.tolist()[:8]}{' …' if want.size > 8 else ''} ({want.size}): another prompt, a "
                          f"decode pass (--pass) or a cached prefix (run SGLang with --disable-radix-cache)?")


_NARROW = ("bfloat16", "float16", "float32", "float64")


def dumped_tokens(path: str | Path, forward_pass: int | None = None) -> np.ndarray | None:
    """The token ids the pass ran (its rank-0 ``input_ids``), or None where the dump holds none."""
    for f in scan(path, forward_pass):
        if f.rank == 0 and f.name.removeprefix("non_intrusive__") == "input_ids":
            return load_tensor(f.path)[0].reshape(-1)
    return None


def _split_qkv(f: DumpFile, values: np.ndarray, places: list, like: Like) -> list:
    """``self_attn.qkv_proj.output`` [T, (Hq + 2 Hkv) D] as q, k and v."""
    sizes = [like.row_size(s) for s, _ in places]
    total = sum(sizes)
    n = like.n_tokens if values.size == like.n_tokens * total else 1 if values.size == total else 0
    if not n:
        raise GoldenError(f"{f.path}: {values.size} values of q, k and v side by side, which are "
                          f"{' + '.join(map(str, sizes))} = {total} values a token, {like.n_tokens} tokens")
    parts = np.split(values.reshape(n, total), np.cumsum(sizes)[:-1], axis=1)
    return [(s, lay, p) for (s, lay), p in zip(places, parts)]


def sglang_case(path: str | Path, like: Like, *, forward_pass: int | None = None,
                attrs: dict[str, Any] | None = None) -> Case:
    """The case one forward pass of the SGLang dump in ``path`` holds (module docstring), shaped like
    ``like``'s golden.  Every problem is a :class:`~moesnap.errors.MoesnapError` naming the file."""
    files = scan(path, forward_pass)
    col = Collector(like)
    dtypes: set[str] = set()
    checked_prompt = False
    later: list[tuple[DumpFile, str, int | None, np.ndarray]] = []
    for f in files:
        kind, places = _place(f, like)
        if kind == "bookkeeping":
            if f.rank == 0 and f.name.removeprefix("non_intrusive__") in ("input_ids", "positions", "tokens"):
                _check_prompt(f, load_tensor(f.path)[0], like)
                checked_prompt = True
            continue
        values, dtype = load_tensor(f.path)
        dtypes.add(dtype)
        pieces = [(s, lay, values) for s, lay in places] if kind == "stage" else _split_qkv(f, values, places, like)
        for stage, layer, v in pieces:
            if f.rank == 0:
                col.add(stage, layer, v, str(f.path))
            else:
                later.append((f, stage, layer, v))
    for f, stage, layer, v in later:
        got = col.get(stage, layer)
        rows = col.rows(stage, v, str(f.path))
        if got is None or got[0].shape != rows.shape or not np.array_equal(got[0], rows, equal_nan=rows.dtype.kind == "f"):
            other = f"rank 0 ({got[1]})" if got is not None else "rank 0, which holds none"
            raise GoldenError(f"{f.path}: rank {f.rank} holds another {f.name} than {other}: a tensor-parallel "
                              f"shard or partial sum? moesnap imports replicated tensors only (resharding a "
                              f"tensor-parallel dump is not supported yet): dump with --tp 1")
    if not col.values:
        raise GoldenError(f"{path}: holds no stage moesnap knows (only SGLang's bookkeeping fields)")
    T = like.n_tokens
    if T > 1 and not checked_prompt and all(v.shape[0] == 1 for v, _ in col.values.values()):
        raise GoldenError(f"{path}: every tensor of the pass holds one token: a decode pass? moesnap judges the "
                          f"prefill pass of the golden's prompt (--pass N; dump input_ids too, to check it)")
    a = {"producer": "sglang", "source": str(Path(path)), "forward_pass": files[0].forward_pass,
         "ranks": sorted({f.rank for f in files})}
    narrow = next((d for d in _NARROW if d in dtypes), None)     # the engine's precision: its narrowest float
    if narrow is not None:
        a["dtype"] = narrow
    a.update(attrs or {})
    return col.case(a)
