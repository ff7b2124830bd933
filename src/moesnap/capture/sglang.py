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
is left goes through the golden family's table of module paths, then :data:`moesnap.stages.ALIASES`
(moesnap's own stage names work too; :mod:`moesnap.capture.sglang_names`: Qwen2-MoE's, DeepSeek's,
Mixtral's, gpt-oss's paths, names holding several stages side by side such as ``self_attn.qkv_proj.output``,
Mixtral's q/k order); the layer is ``layer_id`` (or the ``<N>`` of the name: the two must agree).  Two
names are mapped here: the residual output of ``input_layernorm`` (layer ``N``) and of the final ``norm``
is the ``layer_out`` of the layer before.
SGLang's bookkeeping fields (``input_ids``, ``positions``, ``seq_lens``, ``req_pool_indices``,
``rids``) are no stages: ``input_ids`` and ``positions`` match each pass to the golden's tokens.  SGLang's
source-patch names (``SOURCE_PATCH``) are stages too, and so are the module inputs that are one
(``model.layers.N.inputs.1`` / ``layer_input``: the residual a layer starts from, the previous layer's
``layer_out`` or ``embed``; ``model.norm.inputs.0``: the last ``layer_out``).  Every other name (an
unfiltered ``DUMPER_NON_INTRUSIVE_MODE=all`` dump holds ~36 patterns) is listed in ``ignored_names``,
never refused; a dump of bookkeeping alone (the default ``core`` mode) is refused with the hint to dump
with ``DUMPER_NON_INTRUSIVE_MODE=all``.  Two names of one stage that differ (a fault between
``mlp.experts.output`` and ``mlp.output``) are both kept: the case's stage holds the later in the forward
(what the engine carried on), array ``parted/<i>`` the earlier, and ``attrs["parted"][i]`` both names and
where they part; the judge judges both (:mod:`moesnap.judge.compare`).

Passes are matched by the ``input_ids`` and ``positions`` they ran: the pass that ran the golden's prompt
(or a prefix of it) from position 0 is the case, the decode passes after it (one token each, at the next
position, the golden's next token) its ``steps``; a warm-up or another request is left out
(``passes_left_out``).  ``forward_pass`` imports that one pass alone.  Tensor-parallel ranks are
reassembled from the dumper's ``meta.sglang_parallel_info`` (vLLM's port of the dumper, whose files are the
same format: ``meta.vllm_parallel_info``; ``--format vllm``) through :mod:`moesnap.capture.shards` (heads
column-parallel, ``o_proj`` and the experts partial sums where the ranks differ); without that meta a
rank above 0 must hold rank 0's values.

A ``.pt`` file is a pickle and may be hostile: it is read with ``torch.load(weights_only=True)``,
which rebuilds tensors and plain containers only and refuses anything else, so no code in a dump runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..case import PARTED, Case
from ..errors import GoldenError, UsageError
from ..stages import DUMPER_SPLITS, DumperAlias
from ._flat import Collector, Like, Parted
from ._ptload import load_file, load_tensor
from .sglang_names import names_of, split, stage_of, to_file_order

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


def list_files(path: str | Path) -> list[DumpFile]:
    """Every dumper file in directory ``path`` (every ``*.pt`` file; others are left alone), by dump index."""
    d = Path(path)
    if not d.is_dir():
        raise GoldenError(f"{d}: no such directory" if not d.exists() else f"{d}: not a directory")
    files = [parse_name(p) for p in sorted(d.iterdir()) if p.name.endswith(".pt") and not p.name.startswith(".")]
    if not files:
        raise GoldenError(f"{d}: holds no .pt file (SGLang's dumper writes into DIR/<exp_name>/: give that directory)")
    return sorted(files, key=lambda f: (f.rank, f.dump_index, f.path.name))


def by_pass(files: list[DumpFile]) -> dict[int | None, list[DumpFile]]:
    """The files of each forward pass, the passes in order of number (None first)."""
    out: dict[int | None, list[DumpFile]] = {}
    for f in files:
        out.setdefault(f.forward_pass, []).append(f)
    return dict(sorted(out.items(), key=lambda kv: -1 if kv[0] is None else kv[0]))


def _first(files: list[DumpFile]) -> DumpFile:
    return min(files, key=lambda f: (f.dump_index, f.rank, f.path.name))


def _bare(name: str) -> str:
    return name.removeprefix("non_intrusive__")


# --------------------------------------------------------------------------- names


def _place(f: DumpFile, like: Like, classic: bool,
           names: dict[str, DumperAlias]) -> tuple[str, list[tuple[str, int | None]]]:
    """(kind, [(stage, layer)]) of a file: kind ``stage``, ``split`` (several stages side by side:
    :data:`~moesnap.stages.DUMPER_SPLITS`), ``bookkeeping`` or ``ignored`` (a name that is no stage: a
    module's other inputs and outputs).  ``classic``: the dump's layers pass the residual beside the
    hidden state (``input_layernorm.output.1``), so a layer's ``inputs.1`` is not its input residual;
    ``names``: the family's table (:func:`~moesnap.capture.sglang_names.names_of`)."""
    name = _bare(f.name)
    if name in BOOKKEEPING or name == "tokens":
        return "bookkeeping", []
    m = _LAYER_NAME.fullmatch(name)
    from_name = int(m[1]) if m else None
    rest = m[2] if m else name.removeprefix("model.")
    layer = _int(f.tags["layer_id"], "layer_id", f.path) if f.tags.get("layer_id", "None") != "None" else None
    if layer is not None and from_name is not None and layer != from_name:
        raise GoldenError(f"{f.path}: layer_id={layer}, but the name says layer {from_name}")
    layer = from_name if layer is None else layer
    if rest in DUMPER_SPLITS:
        return "split", [(s, layer) for s in DUMPER_SPLITS[rest]]
    if rest == "norm.output.1":          # the final norm's (normed, residual): the last layer's layer_out
        if layer is not None:
            raise GoldenError(f"{f.path}: the final norm's residual, but the file gives layer {layer}")
        return "stage", [("layer_out", like.n_layer - 1)]
    if rest == "input_layernorm.output.1":   # layer N's input residual: layer N-1's layer_out
        if not layer:
            raise GoldenError(f"{f.path}: an input_layernorm residual at layer {layer}, which has no layer before it")
        return "stage", [("layer_out", layer - 1)]
    if (rest == "inputs.1" and m and not classic) or rest == "layer_input":   # the residual a layer starts from
        if layer is None:
            raise GoldenError(f"{f.path}: a layer's input, but the file gives no layer")
        return "stage", [("embed", None) if layer == 0 else ("layer_out", layer - 1)]
    if rest == "norm.inputs.0" and not m and not classic:    # the final norm's input: the last layer's layer_out
        return "stage", [("layer_out", like.n_layer - 1)]
    stage = stage_of(rest, names, like, layer)
    if stage is None or stage == "tokens" or (m and rest in ("inputs.1", "output")):
        return "ignored", []
    return "stage", [(stage, layer)]


def _rest(name: str) -> str:
    """A dumper name without ``non_intrusive__`` and ``model.layers.<N>.``."""
    m = _LAYER_NAME.fullmatch(_bare(name))
    return m[2] if m else _bare(name).removeprefix("model.")


def _ignored_name(name: str) -> str:
    """A name with its layer number as N (one entry for every layer's)."""
    return re.sub(r"layers\.\d+\.", "layers.N.", name)


# --------------------------------------------------------------------------- passes


@dataclass(frozen=True)
class Pass:
    """One forward pass: its number, its files, and the token ids and positions it ran (rank 0's, when dumped)."""

    number: int | None
    files: list[DumpFile]
    input_ids: np.ndarray | None
    positions: np.ndarray | None

    @property
    def first(self) -> DumpFile:
        return _first(self.files)

    def describe(self) -> str:
        return f"{'none' if self.number is None else self.number}: {self.first.path.name}"


def _bookkeeping(files: list[DumpFile], field: str) -> np.ndarray | None:
    for f in files:
        if f.rank == 0 and _bare(f.name) == field:
            return load_tensor(f.path)[0].reshape(-1)
    return None


def read_passes(path: str | Path) -> list[Pass]:
    return [Pass(n, fs, _bookkeeping(fs, "input_ids"), _bookkeeping(fs, "positions"))
            for n, fs in by_pass(list_files(path)).items()]


def _shown(passes: list[Pass]) -> str:
    return "; ".join(p.describe() for p in passes[:4]) + (" …" if len(passes) > 4 else "")


def plan(path: str | Path, tokens: np.ndarray, forward_pass: int | None = None) -> tuple[Pass, list[tuple[Pass, int]], list[Pass]]:
    """(the prefill pass of the golden's prompt, [(decode pass, its position)], the passes left out) of the
    dump in ``path``, for golden tokens ``tokens``.  Passes are matched by the token ids and positions
    they ran (a warm-up request or another prompt is left out, never taken for the user's), so every
    pass of the user's request is imported at once; ``forward_pass`` imports that one pass alone."""
    d = Path(path)
    passes = read_passes(d)
    if forward_pass is not None:
        chosen = [p for p in passes if p.number == forward_pass]
        if not chosen:
            raise UsageError(f"{d}: holds no forward pass {forward_pass} (it holds: "
                             f"{', '.join(str(p.number) for p in passes)})")
        return chosen[0], [], [p for p in passes if p.number != forward_pass]
    if len(passes) == 1:
        return passes[0], [], []
    lacking = [p for p in passes if p.input_ids is None]
    if lacking:
        p = lacking[0]
        raise UsageError(f"{p.first.path}: forward pass {p.number} dumped no input_ids, and the dump holds "
                         f"{len(passes)} passes ({_shown(passes)}): which request each ran cannot be told; dump "
                         f"input_ids with every pass, or choose the prefill pass of the golden's prompt with --pass N")
    T = tokens.size

    def prefill(p: Pass) -> bool:
        assert p.input_ids is not None   # every pass has them (refused above otherwise)
        n = p.input_ids.size
        pos = p.positions if p.positions is not None else np.arange(n)
        return 0 < n <= T and pos.size == n and bool((pos == np.arange(n)).all()) and \
            bool((p.input_ids == tokens[:n]).all())

    starts = [i for i, p in enumerate(passes) if prefill(p)]
    if not starts:
        raise GoldenError(f"{d}: none of its {len(passes)} forward passes ran the golden's prompt from position 0 "
                          f"({_shown(passes)}): another prompt, or a cached prefix (run SGLang with "
                          f"--disable-radix-cache)?")
    if len(starts) > 1:
        both = [passes[i] for i in starts]
        raise UsageError(f"{d}: holds {len(both)} forward passes that ran the golden's prompt ({_shown(both)}); "
                         f"choose the prefill pass of the golden's prompt with --pass N")
    first = passes[starts[0]]
    steps: list[tuple[Pass, int]] = []
    assert first.input_ids is not None
    at = first.input_ids.size
    for p in passes[starts[0] + 1:]:
        ids = p.input_ids
        assert ids is not None
        pos = p.positions
        if pos is None:
            f = p.first
            raise GoldenError(f"{f.path}: pass {p.number} dumped input_ids but no positions: which row of the "
                              f"request it decodes cannot be told")
        if ids.size != 1 or pos.size != 1 or int(pos[0]) != at or at >= T or int(ids[0]) != int(tokens[at]):
            break                       # another request, or a step past the golden's tokens
        steps.append((p, at))
        at += 1
    used = {id(first), *(id(p) for p, _ in steps)}
    return first, steps, [p for p in passes if id(p) not in used]


def dumped_tokens(path: str | Path, forward_pass: int | None = None) -> np.ndarray | None:
    """The token ids of the request the dump ran: its first pass from position 0 and the decode passes
    after it (rank 0's ``input_ids``), or None where the dump holds none."""
    passes = read_passes(path)
    if forward_pass is not None:
        passes = [p for p in passes if p.number == forward_pass]
    first = next((p for p in passes if p.input_ids is not None and
                  (p.positions is None or (p.positions.size and int(p.positions[0]) == 0))), None)
    if first is None or first.input_ids is None:
        return None
    out = list(first.input_ids)
    for p in passes[passes.index(first) + 1:]:
        if p.input_ids is None or p.positions is None or p.positions.size != 1 or int(p.positions[0]) != len(out):
            break
        out.append(p.input_ids[0])
    return np.asarray(out, dtype=np.int64)


# --------------------------------------------------------------------------- tensor parallel


#: the stages SGLang shards over tensor-parallel ranks: attention heads (column-parallel qkv_proj)
HEAD_STAGES: tuple[str, ...] = ("q", "k", "v", "q_norm", "k_norm", "q_rope", "k_rope", "attn")
#: the stages a rank holds a partial sum of (row-parallel o_proj; the experts of its EP rank) where the
#: ranks' values differ; identical on every rank, they were reduced before the dump
PARTIAL_STAGES: tuple[str, ...] = ("attn_out", "moe_out", "shared_expert_out", "dense_ffn_out")


#: the meta key of each dumper's parallel info (SGLang's, vLLM's port), and its key of the experts' EP size
PARALLEL_META: dict[str, str] = {"sglang_parallel_info": "moe_ep_size", "vllm_parallel_info": "ep_size"}


def parallel_info(files: list[DumpFile]) -> tuple[int, dict, str]:
    """(the world size, rank 0's parallel info, its meta key: ``sglang_parallel_info`` or vLLM's
    ``vllm_parallel_info``) from the dumper's meta; (ranks, {}, "") without it."""
    ranks = sorted({f.rank for f in files})
    for f in files:
        if f.rank == 0 and _bare(f.name) not in BOOKKEEPING:
            meta = load_file(f.path)[2]
            for key in PARALLEL_META:
                if isinstance(meta.get(key), dict):
                    return int(meta.get("world_size", len(ranks))), meta[key], key
            break
    return len(ranks), {}, ""


def _like_rank(like: Like, tp: int, where: str) -> Like:
    """What one of ``tp`` tensor-parallel ranks holds of each stage: its heads."""
    shapes = dict(like.shapes)
    for s in HEAD_STAGES:
        if s not in shapes:
            continue
        heads = shapes[s][0] if s != "attn" else None
        size = shapes[s][0]
        if (heads if heads is not None else size) % tp:
            raise GoldenError(f"{where}: tp_size={tp}, but {s} has {size} {'heads' if heads else 'values a token'}: "
                              f"SGLang's layout for heads that do not split evenly (replicated kv heads) "
                              f"cannot be placed")
        shapes[s] = (size // tp, *shapes[s][1:])
    return replace(like, shapes=shapes)


# --------------------------------------------------------------------------- one pass


def _check_prompt(f: DumpFile, values: np.ndarray, like: Like, start: int) -> None:
    v = values.reshape(-1)
    pos = _bare(f.name) == "positions"
    want = np.arange(start, start + like.n_tokens) if pos else like.tokens
    if v.shape != want.shape or not np.array_equal(v, want):
        what = "positions" if pos else "tokens"
        shown = v.tolist()[:8]
        raise GoldenError(f"{f.path}: the pass ran {what} {shown}{' …' if v.size > 8 else ''} ({v.size}), the golden's "
                          f"case {want.tolist()[:8]}{' …' if want.size > 8 else ''} ({want.size}): another prompt, a "
                          f"decode pass (--pass) or a cached prefix (run SGLang with --disable-radix-cache)?")


_NARROW = ("bfloat16", "float16", "float32", "float64")
#: one unit in the last place of each dtype, relative: the most a reduction's rounding moves a sum
_ROUNDING = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10, "float32": 2.0 ** -23, "float64": 2.0 ** -52}


@dataclass
class _Read:
    """One rank's collected tensors of one pass."""

    col: Collector
    dtypes: set[str]
    checked: bool
    ignored: set[str]


def _read_rank(files: list[DumpFile], like: Like, start: int, classic: bool, names: dict[str, DumperAlias]) -> _Read:
    col = Collector(like, keep_both=True)
    r = _Read(col, set(), False, set())
    for f in files:
        kind, places = _place(f, like, classic, names)
        if kind == "ignored":
            r.ignored.add(_ignored_name(f.name))
            continue
        if kind == "bookkeeping":
            if f.rank == 0 and _bare(f.name) in ("input_ids", "positions", "tokens"):
                _check_prompt(f, load_tensor(f.path)[0], like, start)
                r.checked = True
            continue
        values, dtype = load_tensor(f.path)
        r.dtypes.add(dtype)
        pieces = [(s, lay, values) for s, lay in places] if kind == "stage" else \
            split(f.path, _rest(f.name), values, places[0][1], like)
        for stage, layer, v in pieces:
            col.add(stage, layer, to_file_order(stage, v, like), str(f.path))
    return r


def _replicas(d: Path, reads: dict[int, _Read]) -> None:
    """Ranks above 0 of a dump without parallel info must hold rank 0's values."""
    col = reads[0].col
    for rank, r in reads.items():
        if rank == 0:
            continue
        for (stage, layer), (v, src) in r.col.values.items():
            got = col.get(stage, layer)
            if got is None or got[0].shape != v.shape or not np.array_equal(got[0], v, equal_nan=v.dtype.kind == "f"):
                other = f"rank 0 ({got[1]})" if got is not None else "rank 0, which holds none"
                name = parse_name(Path(src)).name
                raise GoldenError(f"{src}: rank {rank} holds another {name} than {other}: a tensor-parallel shard or "
                                  f"partial sum, and the files carry no meta.sglang_parallel_info (or vLLM's vllm_parallel_info) to place it by; "
                                  f"resharding without it is not supported yet: dump with --tp 1")


def _reassembled(d: Path, cases: dict[int, Case], tp: int, info: dict, key: str) -> Case:
    from .shards import parse_sharding, reassemble

    spec: dict[str, str] = {s: "t h[tp] d" for s in HEAD_STAGES if s != "attn"}
    spec["attn"] = "t (h[tp] d)"
    for s in PARTIAL_STAGES:
        got = [c.layers.get(s) for c in cases.values()]
        arrays = [a for a in got if a is not None]
        if len(arrays) < len(got):
            continue
        same = all(a.shape == arrays[0].shape and np.array_equal(a, arrays[0], equal_nan=True) for a in arrays[1:])
        if not same:
            spec[s] = "t h[tp:partial]"
    spec = {s: v for s, v in spec.items() if any(s in c.layers for c in cases.values())}
    sharding = parse_sharding(spec, f"{d} (tp_size={tp})")
    case = reassemble([cases[r] for r in range(tp)], sharding, where=f"{d} (tp_size={tp}, from {key})")
    case.attrs["sharding"] = {"ranks": tp, **spec, key: info}
    return case


def _same_names(reads: dict[int, _Read]) -> None:
    """Every rank of a tensor-parallel pass dumped the same stages at the same layers; else the first
    (stage, layer) one rank has and another lacks is refused, naming the file that has it."""
    def order(key: tuple[str, int | None]) -> tuple[int, str]:
        return (-1 if key[1] is None else key[1], key[0])

    held0 = set(reads[0].col.values)
    for r, x in reads.items():
        held = set(x.col.values)
        if held == held0:
            continue
        lacks = sorted(held0 - held, key=order)
        key, has, other = (lacks[0], 0, r) if lacks else (sorted(held - held0, key=order)[0], r, 0)
        src = reads[has].col.values[key][1]
        what = key[0] + ("" if key[1] is None else f" of layer {key[1]}")
        raise GoldenError(f"{src}: rank {has} dumped {parse_name(Path(src)).name} ({what}), rank {other} did not: "
                          f"the ranks' dumps do not match (a rank's dump cut short, or filtered otherwise?)")


def _parted_ranks(d: Path, reads: dict[int, _Read], case: Case, tp: int, info: dict, meta_key: str,
                  rtol: float) -> list[Parted]:
    """The stages two names gave other values for on some rank, each side reassembled over the ranks as
    the case is: every rank's earlier value (its kept one where its two names agree) against the case's.
    A partial sum whose other name is the reduced sum (vLLM: ``mlp.experts.output`` on each rank,
    ``mlp.output`` all-reduced inside the block) parts on every rank; summed over the ranks, it is left
    out where it agrees with the reduced sum to ``rtol`` (the rounding of the engine's dtype)."""
    firsts: dict[tuple[str, int | None], Parted] = {}
    for x in reads.values():
        for prt in x.col.parted:
            firsts.setdefault((prt.stage, prt.layer), prt)
    if not firsts:
        return []
    sharded = [key for key in firsts if key[0] in HEAD_STAGES + PARTIAL_STAGES]
    other: Case | None = None
    if sharded:                 # heads and partial sums: reassembled as the case's are
        others: dict[int, Case] = {}
        for r, x in reads.items():
            col = Collector(x.col.like)
            mine = {(prt.stage, prt.layer): prt for prt in x.col.parted}
            for key in sharded:
                got = mine.get(key)
                held = (got.first_rows, got.first) if got is not None else x.col.values.get(key)
                if held is not None:
                    col.values[key] = held
            others[r] = col.case()
        other = _reassembled(d, others, tp, info, meta_key)
    out = []
    for (stage, layer), prt in firsts.items():
        n = prt.second_rows.shape[0]              # the rows the dump holds: every token's, or the last one's
        a = other.stage(stage, layer) if other is not None and (stage, layer) in sharded else prt.first_rows
        b = case.stage(stage, layer)
        if a is None or b is None:
            continue
        if (stage, layer) in sharded and a.shape == b.shape and \
                bool(np.all(np.abs(a - b) <= rtol * np.abs(b.astype(np.float64)))):
            continue                             # the ranks' partial sums add up to the reduced one
        out.append(replace(prt, first_rows=np.asarray(a[a.shape[0] - n:]), second_rows=np.asarray(b[b.shape[0] - n:])))
    return out


def _pass_case(d: Path, p: Pass, like: Like, start: int, classic: bool,
               names: dict[str, DumperAlias]) -> tuple[Case, set[str], list[Parted], set[str]]:
    """The case one pass holds over ``like``'s rows (those at positions ``start``...), its ignored names, the
    stages two of its names gave other values for, and its dtypes."""
    world, info, key = parallel_info(p.files)
    ranks = sorted({f.rank for f in p.files})
    if ranks != list(range(len(ranks))):
        missing = next(r for r in range(max(ranks) + 1) if r not in ranks)
        raise GoldenError(f"{_first(p.files).path}: pass {p.number} holds ranks {ranks}: rank {missing} is missing")
    if info and world != len(ranks):
        raise GoldenError(f"{_first(p.files).path}: meta says world_size={world}, the pass holds files of "
                          f"{len(ranks)} rank{'s' if len(ranks) != 1 else ''} ({ranks})")
    tp = int(info.get("tp_size", 1)) if info else 1
    if info and tp not in (1, len(ranks)):
        raise GoldenError(f"{_first(p.files).path}: {key} says tp_size={tp} over {len(ranks)} ranks: "
                          f"only tensor parallelism over every rank (no pipeline or data parallel) can be placed")
    ep = PARALLEL_META.get(key, "")
    if info and int(info.get(ep, 1)) not in (1, tp):
        raise GoldenError(f"{_first(p.files).path}: {key} says {ep}={info[ep]} "
                          f"with tp_size={tp}: only experts over every rank can be placed")
    rank_like = _like_rank(like, tp, str(_first(p.files).path)) if tp > 1 else like
    reads = {r: _read_rank([f for f in p.files if f.rank == r], rank_like, start, classic, names) for r in ranks}
    r0 = reads[0]
    if tp > 1:
        _same_names(reads)
        case = _reassembled(d, {r: x.col.case() for r, x in reads.items()}, tp, info, key)
        dtypes = set().union(*(x.dtypes for x in reads.values()))
        parted = _parted_ranks(d, reads, case, tp, info, key, _ROUNDING[next((t for t in _NARROW if t in dtypes),
                                                                              "float64")])
    else:
        if len(ranks) > 1:
            _replicas(d, reads)
        case = r0.col.case()
        parted = list(r0.col.parted)
    ignored = set().union(*(x.ignored for x in reads.values()))
    dtypes = set().union(*(x.dtypes for x in reads.values()))
    one_row = bool(r0.col.values) and all(v.shape[0] == 1 for v, _ in r0.col.values.values())
    flags = {"checked"} if r0.checked else set()
    return case, ignored, parted, dtypes | flags | ({"one_row"} if one_row else set())


def _with_parted(case: Case, parted: list[Parted]) -> Case:
    """``case`` holding the earlier value of each stage two names gave other values for: array
    ``parted/<i>`` (its rows: every token's, or the last token's), described by ``attrs["parted"][i]``."""
    if not parted:
        return case
    entries: list[dict[str, Any]] = []
    extra: dict[str, np.ndarray] = {}
    for i, x in enumerate(parted):
        path = f"{PARTED}/{i}"
        extra[path] = np.asarray(x.first_rows)
        entries.append({"stage": x.stage, "layer": x.layer, "array": path, "kept": parse_name(Path(x.second)).name,
                        "other": parse_name(Path(x.first)).name, "kept_file": x.second, "other_file": x.first,
                        **x.where()})
    return replace(case, attrs={**case.attrs, "parted": entries}, extra={**case.extra, **extra})


def sglang_case(path: str | Path, like: Like, *, forward_pass: int | None = None,
                attrs: dict[str, Any] | None = None) -> Case:
    """The case the SGLang dump in ``path`` holds (module docstring), shaped like ``like``'s golden: the
    prefill pass of the golden's prompt and the decode passes after it (``steps``), or the one pass
    ``forward_pass``.  Every problem is a :class:`~moesnap.errors.MoesnapError` naming the file."""
    d = Path(path)
    first, steps, left = plan(d, like.tokens, forward_pass)
    classic = any(_bare(f.name).endswith("input_layernorm.output.1") for f in first.files)
    fmt = (attrs or {}).get("imported", {})
    engine = "vllm" if parallel_info(first.files)[2] == "vllm_parallel_info" or \
        (isinstance(fmt, dict) and fmt.get("format") == "vllm") else "sglang"
    names = names_of(like.family, engine)
    n = like.n_tokens if first.input_ids is None else int(first.input_ids.size)
    prompt_like = like if n == like.n_tokens else replace(like, tokens=like.tokens[:n])
    case, ignored, parted, dtypes = _pass_case(d, first, prompt_like, 0, classic, names)
    checked, one_row = "checked" in dtypes, "one_row" in dtypes
    dtypes -= {"checked", "one_row"}
    step_cases = []
    for number, (p, at) in enumerate(steps):
        step_like = replace(like, tokens=like.tokens[at:at + 1])
        sc, ign, prt, dts = _pass_case(d, p, step_like, at, classic, names)
        if not (sc.model or sc.layers):
            raise GoldenError(f"{p.first.path}: decode pass {p.number} holds no stage moesnap knows")
        ignored |= ign
        dtypes |= dts - {"checked", "one_row"}
        sc.attrs.update({"positions": [at], "step": number, "forward_pass": p.number})
        step_cases.append(_with_parted(sc, prt))
    if not (case.model or case.layers):
        held = sorted({_bare(f.name) for f in first.files})
        if all(x in BOOKKEEPING for x in held):
            raise GoldenError(f"{d}: holds no stage moesnap knows, only SGLang's bookkeeping fields "
                              f"({', '.join(held)}): what the dumper's default DUMPER_NON_INTRUSIVE_MODE=core "
                              f"writes; dump again with DUMPER_NON_INTRUSIVE_MODE=all")
        shown = sorted(ignored)[:6]
        raise GoldenError(f"{d}: holds no stage moesnap knows (it holds {', '.join(shown)}"
                          f"{' …' if len(ignored) > 6 else ''}); stage names and aliases: moesnap.stages.ALIASES")
    if prompt_like.n_tokens > 1 and not checked and one_row:
        raise GoldenError(f"{d}: every tensor of the pass holds one token: a decode pass? moesnap judges the "
                          f"prefill pass of the golden's prompt (--pass N; dump input_ids too, to check it)")
    a: dict[str, Any] = {"producer": engine, "source": str(d), "forward_pass": first.number,
         "ranks": sorted({f.rank for f in first.files})}
    narrow = next((x for x in _NARROW if x in dtypes), None)     # the engine's precision: its narrowest float
    if narrow is not None:
        a["dtype"] = narrow
        for sc in step_cases:
            sc.attrs["dtype"] = narrow
    if n < like.n_tokens:          # a prompt the golden's continuation follows: its rows 0..n-1
        a["positions"] = list(range(n))
    if ignored:
        a["ignored_names"] = sorted(ignored)
    if left:
        a["passes_left_out"] = [p.describe() for p in left]
    a.update({k: v for k, v in case.attrs.items() if k not in a})
    a.update(attrs or {})
    return _with_parted(replace(case, attrs=a, steps=tuple(step_cases), ignored=tuple(sorted(ignored))), parted)
