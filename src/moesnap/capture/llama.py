"""llama.cpp as a candidate engine: its own forward of a GGUF, every stage its graph names.

llama.cpp (through llama-cpp-python's low-level API) loads the GGUF itself and
runs its own graph of the family (qwen3moe, openai-moe, qwen2moe, llama, olmoe, deepseek2); a
``cb_eval`` callback copies every named, contiguous F32/I32 graph tensor
(``ggml_backend_tensor_get``) with its op (``ggml_op_name``) -- a ctypes
mirror of ``struct ggml_tensor`` from the vendored ``ggml.h`` of the pinned
llama-cpp-python (0.3.36) gives its type, shape, strides and name.  Tensors
that are not contiguous F32/I32 are not copied (nothing is read through a
stride we do not understand).  A high-level ``llama_cpp.Llama`` pass with
``logits_all=True`` gives the logits of every token.

The tokens go in one batch with ``n_batch == n_ubatch >= len(tokens)`` so
every graph tensor covers all tokens (a batch larger than ``n_batch`` aborts
the process), with an F32 KV cache and flash attention off.  Because a
llama.cpp abort kills the interpreter, :func:`llama_forward` runs the work in
a child process (``python -m moesnap.capture.llama``) and reads its ``.npz``.
With ``decode=N`` the low-level pass goes on after the prompt with N calls of
``llama_decode``, one token each at the next position (llama.cpp's own KV cache
holds the earlier ones); the callback captures each call's graph apart, and each
step is a one-row case at its position in the returned case's ``steps``.

The graph's names and the moesnap stages they map onto, per family, are in
:mod:`moesnap.capture.llama_names`; a stage a graph does not name (the o-projection output of
qwen3moe's, DeepSeek's keys and values, which its latent attention never forms) is left out.  A
model llama.cpp cannot run (:func:`~moesnap.capture.llama_names.unsupported`) is refused in one line.

ggml quantizes activations inside quantized matmuls (to Q8_0 or Q8_K, the
weight type's ``vec_dot_type``): a correct llama.cpp differs from a float32
reference by that rounding.  Cases captured here carry ``engine="llama.cpp"``,
which selects the ``ggml`` tolerance profile (:mod:`moesnap.judge.tolerances`).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..case import Case, from_recorder
from ..errors import UsageError
from ..model.config import ModelConfig
from ..model.recorder import ArrayRecorder
from ..stages import stages_of_model
from .llama_names import Node, map_stages, stacked, unsupported
from ..util import versions

# --- ctypes mirror of struct ggml_tensor (ggml/include/ggml.h, llama-cpp-python 0.3.36) ---
GGML_MAX_DIMS = 4
GGML_MAX_OP_PARAMS = 64
GGML_MAX_SRC = 10
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0
GGML_TYPE_I32 = 26


class ggml_tensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class LlamaCrash(RuntimeError):
    """The llama.cpp child process died or failed."""


def _contiguous(t: ggml_tensor) -> bool:
    """Whether the tensor's elements lie one after another (ggml's ``ggml_is_contiguous``): each
    dimension of more than one element steps by the product of the ones before.  A dimension of one
    element may carry any stride (a view's row stride), so it is skipped, never compared with."""
    expected = 4
    for i in range(GGML_MAX_DIMS):
        if t.ne[i] > 1 and t.nb[i] != expected:
            return False
        expected *= t.ne[i]
    return True


def _libggml_base():
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (lib_dir / name).exists():
            lib = ctypes.CDLL(str(lib_dir / name))
            break
    else:
        raise LlamaCrash(f"libggml-base not found in {lib_dir}")
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_op_name.restype = ctypes.c_char_p
    return lib


LOG: list[str] = []
_LOG_CALLBACK = None  # llama.cpp keeps the pointer for the life of the process


def _capture_log():
    """Send llama.cpp's log into :data:`LOG` (printed to stderr only when something fails)."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _log(level, text, user_data):  # noqa: ARG001
        LOG.append(text.decode(errors="replace"))

    global _LOG_CALLBACK
    _LOG_CALLBACK = _log
    llama_cpp.llama_log_set(_log, ctypes.c_void_p())


def _highlevel_logits(path: str, tokens: list[int], n_threads: int) -> np.ndarray:
    import llama_cpp

    n = max(len(tokens), 8)
    llm = llama_cpp.Llama(
        model_path=path, logits_all=True, n_ctx=max(n, 64), n_batch=n, n_ubatch=n,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False,
        n_threads=n_threads, n_threads_batch=n_threads, verbose=False,
    )
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return logits


#: one decode step of :func:`_lowlevel`: the token it was fed, its logits ``[1, V]`` and its captured tensors
Step = tuple[int, np.ndarray, list[Node]]


def _lowlevel(path: str, tokens: list[int], n_threads: int, *, decode: int = 0,
              continuation: list[int] | None = None,
              forget: tuple[int, int] | None = None) -> tuple[np.ndarray, list[Node], list[Step]]:
    """Logits [T, V] and every captured (name, op, array) in graph order of the prompt's forward; then
    ``decode`` steps, one ``llama_decode`` of one token each at the next position (llama.cpp's KV
    cache holds the earlier ones), fed ``continuation[n]`` or else the argmax of the previous logits.
    ``forget=(n, p)``: a planted fault, position ``p`` removed from the KV cache before step ``n``."""
    import llama_cpp as L

    ggml = _libggml_base()
    sink: list[list[Node]] = [[]]   # the forward under way's captures
    errors: list[str] = []

    def callback(t_ptr, ask, user_data):  # noqa: ARG001
        try:
            t = ggml_tensor.from_address(t_ptr)
            name = t.name.decode(errors="replace")
            wanted = t.type in (GGML_TYPE_F32, GGML_TYPE_I32) and _contiguous(t) and name and " " not in name
            if ask:
                return bool(wanted)
            if wanted:
                shape = tuple(int(t.ne[i]) for i in reversed(range(GGML_MAX_DIMS)))  # numpy order
                arr = np.empty(shape, dtype=np.float32 if t.type == GGML_TYPE_F32 else np.int32)
                ggml.ggml_backend_tensor_get(t_ptr, arr.ctypes.data, 0, arr.nbytes)
                sink[0].append((name, ggml.ggml_op_name(t.op).decode(), arr))
            return True
        except Exception as e:  # never let an exception cross into C
            errors.append(repr(e))
            return True

    cb = L.ggml_backend_sched_eval_callback(callback)
    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    model = L.llama_model_load_from_file(path.encode(), mparams)
    if not model:
        raise LlamaCrash(f"llama.cpp could not load {path}")
    T = len(tokens)
    n = max(T, 8)
    cparams = L.llama_context_default_params()
    cparams.n_ctx = max(n + decode, 64)
    cparams.n_batch = n
    cparams.n_ubatch = n
    cparams.n_threads = n_threads
    cparams.n_threads_batch = n_threads
    cparams.type_k = L.GGML_TYPE_F32
    cparams.type_v = L.GGML_TYPE_F32
    cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cparams.cb_eval = cb
    cparams.cb_eval_user_data = None
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        raise LlamaCrash("llama_init_from_model failed")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(T, 0, 1)
    steps: list[Step] = []

    def run(rows: list[int], start: int) -> tuple[np.ndarray, list[Node]]:
        sink[0] = []   # warm-up graphs (if any) and earlier forwards are not this one's
        for i, tok in enumerate(rows):
            batch.token[i] = tok
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        batch.n_tokens = len(rows)
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise LlamaCrash(f"llama_decode returned {rc} (positions {start}..{start + len(rows) - 1})")
        logits = np.stack([np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy()
                           for i in range(len(rows))])
        return logits.astype(np.float32), sink[0]

    try:
        logits, captured = run(tokens, 0)
        last = logits
        for step in range(decode):
            if forget is not None and forget[0] == step:
                if not L.llama_memory_seq_rm(L.llama_get_memory(ctx), 0, forget[1], forget[1] + 1):
                    raise LlamaCrash(f"llama_memory_seq_rm could not remove position {forget[1]}")
            tok = continuation[step] if continuation is not None else int(np.argmax(last[-1]))
            last, step_captured = run([tok], T + step)
            steps.append((tok, last, step_captured))
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
    if errors:
        raise LlamaCrash(f"eval callback failed: {errors[:3]}")
    return logits, captured, steps


def forward_in_process(path: str, tokens: list[int], *, stages: bool = True,
                       n_threads: int | None = None, derive_attn_out: bool = False, decode: int = 0,
                       continuation: list[int] | None = None,
                       forget: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Run both passes in this process (a llama.cpp abort kills the interpreter).

    Layer stages are stacked over the layers that have them, with ``_layers.<stage>`` (their indices)
    where that is not every layer (:func:`~moesnap.capture.llama_names.stacked`).  With ``decode``, the
    low-level pass goes on with that many decode steps; step ``n``'s arrays are keyed ``step<n>.<stage>``
    (``tokens`` [1], ``logits`` [1, V] and its stages, one row each)."""
    n_threads = n_threads or min(os.cpu_count() or 1, 4)
    _capture_log()
    res: dict[str, np.ndarray] = {"logits": _highlevel_logits(path, tokens, n_threads)}
    if stages:
        ll_logits, captured, steps = _lowlevel(path, tokens, n_threads, decode=decode, continuation=continuation,
                                               forget=forget)
        res["logits_lowlevel"] = ll_logits
        cfg = _config(path)
        for prefix, rows, nodes in [("", len(tokens), captured)] + [(f"step{n}.", 1, c) for n, (_, _, c) in
                                                                     enumerate(steps)]:
            model, layers = map_stages(nodes, rows, cfg, derive_attn_out=derive_attn_out)
            model.pop("logits", None)
            res.update({prefix + k: v for k, v in {**model, **stacked(layers, cfg.n_layer)}.items()})
        for n, (tok, logits, _) in enumerate(steps):
            res[f"step{n}.tokens"] = np.asarray([tok], dtype=np.int64)
            res[f"step{n}.logits"] = logits
        names: dict[str, list] = {}
        for name, op, arr in captured:
            names.setdefault(name, []).append([op, *arr.shape])
        res["_names"] = np.array(json.dumps(names))
    elif decode:
        raise ValueError("decode steps are captured by the low-level pass: stages=True")
    return res


def _config(path: str | Path) -> ModelConfig:
    """moesnap's config of the GGUF at ``path`` (its metadata only)."""
    from ..gguf.reader import open_gguf

    return ModelConfig.from_gguf(open_gguf(path))


def has_weight_suffix(path: str | Path) -> bool:
    """Whether every tensor is named like a converted checkpoint (``blk.0.attn_q.weight``, a bias
    ``blk.0.attn_q.bias``)."""
    from gguf import GGUFReader

    return all(t.name.endswith((".weight", ".bias")) for t in GGUFReader(str(path)).tensors)


def copy_with_weight_suffix(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` to ``dst`` byte-for-byte in data, adding ``.weight`` to tensor names that lack it.

    llama.cpp looks tensors up as ``<name>.weight`` (biases as ``<name>.bias``); a file whose tensors are
    named ``blk.0.attn_q`` does not load.  Metadata is copied key by key with
    its GGUF value type; tensor bytes (quantized blocks included) unchanged.
    """
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(str(dst), arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == GGUFValueType.ARRAY and len(f.types) > 1 else None
        w.add_key_value(key, f.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        name = t.name if t.name.endswith((".weight", ".bias")) else t.name + ".weight"
        w.add_tensor(name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(dst)


def llama_forward(path: str | Path, tokens, *, stages: bool = True, timeout: float = 300,
                  n_threads: int | None = None, derive_attn_out: bool = False, decode: int = 0,
                  continuation: Sequence[int] | None = None,
                  forget: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """llama.cpp's logits ``[T, V]`` and (``stages=True``) moesnap-named stages, computed in a child process.

    Keys: ``logits`` (high-level API), ``logits_lowlevel`` (the cb_eval pass),
    the stages of :data:`STAGE_MAP` stacked ``[L, T, ...]``, ``final_norm``,
    and ``_names`` (JSON: every captured tensor name -> its numpy shapes).  With ``decode`` (and
    ``continuation``: the tokens fed, else greedy), each decode step's ``step<n>.<stage>`` (its
    ``tokens``, ``logits`` and stages, one row each; :func:`forward_in_process`).  ``forget=(n, p)``:
    a planted decode fault (:func:`llama_case`).
    """
    tokens = [int(t) for t in tokens]
    with tempfile.TemporaryDirectory(prefix="llama_dump_") as d:
        out = Path(d) / "dump.npz"
        cmd = [sys.executable, "-m", "moesnap.capture.llama", str(path), "--out", str(out),
               "--tokens", ",".join(map(str, tokens))]
        if not stages:
            cmd.append("--no-stages")
        if derive_attn_out:
            cmd.append("--derive-attn-out")
        if n_threads:
            cmd += ["--threads", str(n_threads)]
        if decode:
            cmd += ["--decode", str(int(decode))]
        if continuation is not None:
            cmd += ["--continuation", ",".join(str(int(t)) for t in continuation)]
        if forget is not None:
            cmd += ["--forget", f"{int(forget[0])},{int(forget[1])}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
            raise LlamaCrash(f"llama.cpp child exited {proc.returncode}: " + " | ".join(errors[:5])
                             + f"\n--- stderr tail ---\n{proc.stderr[-3000:]}")
        with np.load(out) as z:
            return {k: z[k] for k in z.files}


def _case(res: dict[str, np.ndarray], ids: list[int], meta: dict[str, Any]) -> Case:
    """One forward's case from its arrays (``embed``, ``final_norm``, ``logits`` ``[T, ...]``; the
    layer stages ``[L', T, ...]`` over the layers ``_layers.<stage>`` names, else every layer)."""
    rec = ArrayRecorder()
    for stage, arr in res.items():
        if stage.startswith("_"):
            continue
        if stage in ("embed", "final_norm", "logits"):
            rec.save(stage, None, torch.from_numpy(np.ascontiguousarray(arr)))
        else:
            for row, layer in enumerate(res.get(f"_layers.{stage}", range(arr.shape[0]))):
                rec.save(stage, int(layer), torch.from_numpy(np.ascontiguousarray(arr[row])))
    rec.save("tokens", None, torch.as_tensor(np.asarray(ids, dtype=np.int64)))
    return from_recorder(rec, meta)


def llama_case(path: str | Path, tokens: Sequence[int], *, decode: int = 0,
               continuation: Sequence[int] | None = None, n_threads: int | None = None,
               timeout: float = 600, attrs: dict[str, Any] | None = None,
               forget: tuple[int, int] | None = None) -> Case:
    """Run ``tokens`` through llama.cpp on the GGUF at ``path`` and capture every stage its graph names;
    with ``decode=N``, then N decode steps, one ``llama_decode`` of one token each through llama.cpp's
    own KV cache (F32), each captured by the same ``cb_eval`` callback.

    The steps are fed ``continuation`` (teacher-forced: step ``n`` gets ``continuation[n]``;
    ``decode=0`` with a continuation decodes all of it), else llama.cpp's own greedy choice (the
    argmax of the previous forward's last logits).  A file whose tensors lack llama.cpp's ``.weight``
    suffix (moesnap's synthetic files) is copied once, byte for byte in its data, with the names
    llama.cpp expects.  Returns the prompt's :class:`~moesnap.case.Case` (float32 values, ``topk_ids``
    int32) whose ``attrs`` say ``engine="llama.cpp"``, ``dtype="float32"`` (its activations; weights
    stay as stored) and the versions (with steps: ``positions`` 0..T-1, ``prompt_tokens``, ``decode``,
    the fed ``continuation`` and ``continuation_source``, ``"given"`` or ``"greedy"``), updated with ``attrs``; its ``steps`` hold one case of one row per decode step
    (``attrs`` ``positions=[len(tokens) + n]``, ``step=n``, ``engine``, ``dtype``).  Raises
    :class:`UsageError` when llama-cpp-python is not installed or ``decode``/``continuation`` is out of
    range or the model is one llama.cpp cannot run (:func:`~moesnap.capture.llama_names.unsupported`),
    :class:`LlamaCrash` when llama.cpp fails.

    ``forget=(n, p)`` plants a decode fault inside llama.cpp, to show a judge finds one: before decode
    step ``n``, position ``p`` is removed from llama.cpp's KV cache (``llama_memory_seq_rm``), so step
    ``n`` and later ones attend over one cached position too few (the case's ``attrs`` say so).
    """
    from ._decode import decode_plan

    try:
        import llama_cpp
    except ImportError:
        raise UsageError("llama-cpp-python is not installed (pip install 'moesnap[llama]'; it builds "
                         "from source, ~5 min)") from None
    ids = [int(t) for t in tokens]
    if not ids:
        raise UsageError("llama.cpp capture: empty token list")
    n_steps, fed = decode_plan(decode, continuation, engine="llama.cpp")
    if forget is not None and not (0 <= int(forget[0]) < n_steps and 0 <= int(forget[1]) < len(ids) + int(forget[0]) - 1):
        raise UsageError(f"llama.cpp capture: forget={forget!r} must name a decode step (0..{n_steps - 1}) and a "
                         f"position cached before it, not its last one")
    cfg = _config(path)
    why = unsupported(cfg)
    if why is not None:
        raise UsageError(f"{path}: {why}")
    with tempfile.TemporaryDirectory(prefix="moesnap-llama-") as d:
        model_path = Path(path)
        if not has_weight_suffix(model_path):
            model_path = copy_with_weight_suffix(model_path, Path(d) / model_path.name)
        res = llama_forward(model_path, ids, stages=True, timeout=timeout, n_threads=n_threads, decode=n_steps,
                            continuation=fed, forget=forget)
    common: dict[str, Any] = {"producer": "llama.cpp", "engine": "llama.cpp", "dtype": "float32", "device": "cpu"}
    prompt = {k: v for k, v in res.items() if not k.startswith(("_names", "step")) and k != "logits_lowlevel"}
    steps = []
    for n in range(n_steps):
        own = {k.split(".", 1)[1]: v for k, v in res.items() if k.startswith(f"step{n}.")}
        tok = [int(t) for t in own.pop("tokens")]
        steps.append(_case(own, tok, {**common, "positions": [len(ids) + n], "step": n, "token_ids": tok}))
    meta: dict[str, Any] = {
        **common,
        "llama_cpp_version": llama_cpp.__version__,
        "versions": {**versions(), "llama_cpp_python": llama_cpp.__version__},
        "token_ids": ids,
        "not_captured": [s for s in stages_of_model(cfg.arch, cfg.to_dict(), cfg.n_layer) if s not in prompt],
    }
    if n_steps:   # the prompt's rows are positions 0..T-1 of a sequence the steps go on (a prefix of the golden's)
        meta.update({"positions": list(range(len(ids))), "prompt_tokens": len(ids), "decode": n_steps,
                     "continuation_source": "greedy" if fed is None else "given",
                     "continuation": [int(s.tokens[0]) for s in steps], "kv_cache": "llama.cpp (F32)"})
    if forget is not None:
        meta["planted"] = f"position {int(forget[1])} removed from the KV cache before decode step {int(forget[0])}"
    meta.update(attrs or {})
    return replace(_case(prompt, ids, meta), steps=tuple(steps))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", required=True, help="comma-separated token ids")
    ap.add_argument("--out", required=True, help=".npz to write")
    ap.add_argument("--no-stages", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--print-names", action="store_true")
    ap.add_argument("--derive-attn-out", action="store_true")
    ap.add_argument("--decode", type=int, default=0, help="decode steps after the prompt")
    ap.add_argument("--continuation", default=None, help="comma-separated token ids the steps are fed (else greedy)")
    ap.add_argument("--forget", default=None, help="STEP,POS: a planted fault, POS removed from the KV cache before STEP")
    a = ap.parse_args(argv)
    tokens = [int(t) for t in a.tokens.split(",") if t]
    continuation = None if a.continuation is None else [int(t) for t in a.continuation.split(",") if t]
    try:
        res = forward_in_process(a.model, tokens, stages=not a.no_stages, n_threads=a.threads,
                                 derive_attn_out=a.derive_attn_out, decode=a.decode, continuation=continuation,
                                 forget=None if a.forget is None else (int(a.forget.split(",")[0]),
                                                                       int(a.forget.split(",")[1])))
    except BaseException:
        sys.stderr.write("".join(LOG[-40:]))
        raise
    if a.print_names and "_names" in res:
        for name, shapes in json.loads(str(res["_names"])).items():
            print(name, shapes)
    np.savez(a.out, **res)  # type: ignore[arg-type]  # mypy matches **res against allow_pickle: bool; no key is so named
    return 0


if __name__ == "__main__":
    sys.exit(main())
