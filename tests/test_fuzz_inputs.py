"""Fuzzing the loaders with hypothesis (issue 6, item 3).

Mutated bytes of the bundled tiny GGUF (bit flips, overwritten bytes, header
counts, lengths and dimensions set to huge values, truncation, splices) and of
a golden's ``zarr.json`` files (bytes, and JSON-aware edits such as a shape of
2^40) must give either a working model / case or a
:class:`~moesnap.errors.MoesnapError`: never another exception, never a hang
(each example runs under ``SIGALRM``), never a large allocation (numpy's
allocations are traced with ``tracemalloc`` and the peak of each example is
bounded; a MemoryError is not a MoesnapError and fails the test too).

Example counts follow the hypothesis profile: ``default`` and the light suite
(``ci``: conftest.py's ``ci-props`` count) keep this module well under a
minute; ``nox -s props`` (profile ``nightly``, ``-m "props or fuzz"``) runs each
at 10,000.  Inputs that once broke a loader are kept as
``@example``s or plain tests below.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moesnap.store.case import load_case
from moesnap.cli.main import main
from moesnap.errors import MoesnapError
from moesnap.model.recorder import ArrayRecorder
from moesnap.model.reference import run_reference
from moesnap.model.synth import tiny_path
from moesnap.model.weights import GGUFModel

pytestmark = pytest.mark.fuzz

REPO_GOLDENS = Path(__file__).resolve().parent.parent / "goldens"
TINY = tiny_path().read_bytes()

#: examples per test: the loaded profile's (100 by default, 10,000 nightly), in the light suite (profile ci)
#: conftest.py's ci-props count
N = (settings.get_profile("ci-props") if os.environ.get("HYPOTHESIS_PROFILE") == "ci" else settings()).max_examples
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SECONDS = 20               # one example that takes longer than this is a hang
PEAK_BYTES = 256 << 20     # numpy may allocate at most this much for one example (the tiny model needs ~2 MB)


class Hang(BaseException):
    """Raised by SIGALRM inside an example (a BaseException: no ``except Exception`` swallows it)."""


@contextlib.contextmanager
def bounded(seconds: int = SECONDS, peak: int = PEAK_BYTES):
    """Fail the example if it runs longer than ``seconds`` or numpy's traced peak exceeds ``peak``."""
    def on_alarm(signum, frame):
        raise Hang(f"no answer after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    tracemalloc.start()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert top <= peak, f"allocated {top / 2**20:.0f} MiB"
    assert time.perf_counter() - t0 < seconds


# ---------------------------------------------------------------- the GGUF header's numbers


def header_fields(data: bytes) -> list[tuple[int, int, str]]:
    """(offset, width, what) of every count, length, dimension, type and offset in a GGUF header."""
    out = [(8, 8, "tensor count"), (16, 8, "metadata count")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24
    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(what: str) -> None:
        nonlocal pos
        out.append((pos, 8, f"length of {what}"))
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n

    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", data, pos)
        key = data[pos + 8:pos + 8 + n].decode()
        string("key")
        out.append((pos, 4, "value type"))
        (t,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if t in scalar:
            out.append((pos, scalar[t], f"value of {key}"))
        if t == 8:
            string("string value")
        elif t == 9:
            out.append((pos, 4, "array type"))
            (it,) = struct.unpack_from("<I", data, pos)
            out.append((pos + 4, 8, "array length"))
            (n,) = struct.unpack_from("<Q", data, pos + 4)
            pos += 12
            for _ in range(n):
                if it == 8:
                    (m,) = struct.unpack_from("<Q", data, pos)
                    pos += 8 + m
                else:
                    pos += scalar[it]
        else:
            pos += scalar[t]
    for _ in range(n_tensors):
        string("tensor name")
        out.append((pos, 4, "dimension count"))
        (nd,) = struct.unpack_from("<I", data, pos)
        pos += 4
        for _ in range(nd):
            out.append((pos, 8, "dimension"))
            pos += 8
        out.append((pos, 4, "tensor type"))
        out.append((pos + 4, 8, "tensor offset"))
        pos += 12
    return out


FIELDS = header_fields(TINY)
HEADER_END = max(o + w for o, w, _ in FIELDS)
HUGE = [2**60, 2**63 - 1, 2**64 - 1, 2**40, 2**32 - 1, 2**32, 2**31, len(TINY), len(TINY) + 1, 0, 1]


@st.composite
def mutations(draw):
    """A list of edits to the GGUF bytes, mostly in the header (where the parser lives)."""
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["field", "field", "flip", "byte", "truncate", "splice", "data"]))
        if kind == "field":
            off, width, _ = draw(st.sampled_from(FIELDS))
            value = draw(st.one_of(st.sampled_from(HUGE), st.integers(0, 2 ** (8 * width) - 1)))
            ops.append(("field", off, width, value % 2 ** (8 * width)))
        elif kind == "flip":
            ops.append(("flip", draw(st.integers(0, HEADER_END - 1)), draw(st.integers(0, 7))))
        elif kind == "byte":
            ops.append(("byte", draw(st.integers(0, HEADER_END - 1)), draw(st.integers(0, 255))))
        elif kind == "truncate":
            ops.append(("truncate", draw(st.integers(0, len(TINY) - 1))))
        elif kind == "splice":
            ops.append(("splice", draw(st.integers(0, len(TINY) - 1)), draw(st.integers(0, len(TINY) - 1)),
                        draw(st.integers(1, 256))))
        else:   # weights: the model opens, the forward sees garbage numbers
            ops.append(("byte", draw(st.integers(HEADER_END, len(TINY) - 1)), draw(st.integers(0, 255))))
    return ops


def mutate(ops) -> bytes:
    d = bytearray(TINY)
    for op in ops:
        if op[0] == "field":
            _, off, width, value = op
            if off + width <= len(d):
                d[off:off + width] = value.to_bytes(width, "little")
        elif op[0] == "flip":
            if op[1] < len(d):
                d[op[1]] ^= 1 << op[2]
        elif op[0] == "byte":
            if op[1] < len(d):
                d[op[1]] = op[2]
        elif op[0] == "truncate":
            del d[op[1]:]
        else:
            _, dst, src, n = op
            d[dst:dst + n] = TINY[src:src + n]
    return bytes(d)


def open_and_run(path: Path) -> str:
    """Open the model and run a two-token reference forward; 'ok' or the MoesnapError's class."""
    try:
        model = GGUFModel.open(path)
        run_reference(model, [1, 2], dtype=torch.float32, recorder=ArrayRecorder())
    except MoesnapError as e:
        return type(e).__name__
    return "ok"


def test_header_walker_finds_every_field():
    kinds = {w for _, _, w in FIELDS}
    assert {"tensor count", "metadata count", "array length", "dimension", "tensor offset"} <= kinds
    assert len([f for f in FIELDS if f[2] == "tensor type"]) == 51


@settings(max_examples=N, **FUZZ)
@given(ops=mutations())
@example(ops=[("field", 8, 8, 2**60)])                                           # 2^60 tensors
@example(ops=[("field", 16, 8, 2**64 - 1)])                                      # 2^64-1 metadata keys
@example(ops=[("field", next(o for o, _, w in FIELDS if w == "array length"), 8, 2**60)])
@example(ops=[("field", next(o for o, _, w in FIELDS if w == "dimension"), 8, 2**40)])
@example(ops=[("field", next(o for o, _, w in FIELDS if w == "tensor offset"), 8, 2**64 - 1)])
@example(ops=[("field", next(o for o, _, w in FIELDS if w == "length of string value"), 8, 2**63 - 1)])
@example(ops=[("field", next(o for o, _, w in FIELDS if w == "value of qwen3moe.block_count"), 4, 2**32 - 1)])  # hung
@example(ops=[("field", next(o for o, _, w in FIELDS if w == "value of qwen3moe.expert_count"), 4, 2**32 - 1)])
@example(ops=[("field", next(o for o, _, w in FIELDS if w == "value of qwen3moe.context_length"), 4, 2**32 - 1)])
@example(ops=[("truncate", 10)])
@example(ops=[("truncate", HEADER_END)])
def test_fuzz_gguf_bytes(ops, tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(mutate(ops))
    with bounded():
        open_and_run(p)


def test_gguf_mutations_reach_every_outcome(tmp_path):
    """The mutations are not all refused at the magic: some open and run, some fail deep in the header."""
    rng = np.random.default_rng(0)
    outcomes = set()
    for i in range(40):
        off, width, _ = FIELDS[int(rng.integers(len(FIELDS)))]
        ops = [("field", off, width, int(rng.integers(0, 2**31)))] if i % 2 else [("byte", int(rng.integers(HEADER_END, len(TINY))), 7)]
        p = tmp_path / f"m{i}.gguf"
        p.write_bytes(mutate(ops))
        with bounded():
            outcomes.add(open_and_run(p))
    assert "ok" in outcomes and "ModelFileError" in outcomes, outcomes


def test_gguf_dimension_cannot_make_numpy_allocate_gigabytes(tmp_path):
    """In a child process limited to 3 GiB of address space: every dimension of every tensor
    set to 2^20, 2^32 and 2^40 in turn is refused (or harmless), never a MemoryError."""
    dims = [o for o, _, w in FIELDS if w == "dimension"]
    files = []
    for i, off in enumerate(dims[::3]):
        for value in (2**20, 2**32, 2**40):
            p = tmp_path / f"d{i}_{value}.gguf"
            p.write_bytes(mutate([("field", off, 8, value)]))
            files.append(str(p))
    code = (
        "import resource, sys, torch\n"
        "from moesnap.model.weights import GGUFModel\n"
        "from moesnap.errors import MoesnapError\n"
        "from moesnap.model.reference import run_reference\n"
        "from moesnap.model.recorder import ArrayRecorder\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
        "for f in sys.argv[1:]:\n"
        "    try:\n"
        "        run_reference(GGUFModel.open(f), [1, 2], dtype=torch.float32, recorder=ArrayRecorder())\n"
        "    except MoesnapError:\n"
        "        pass\n"
        "print('done', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *files], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("done"), r.stderr[-2000:]
    assert int(r.stdout.split()[1]) < 1 << 20, r.stdout     # peak RSS under 1 GiB (KiB units)


# ---------------------------------------------------------------- golden zarr.json files


@pytest.fixture(scope="module")
def golden_case(tmp_path_factory):
    """A pristine copy of one committed golden case group, and its zarr.json files."""
    base = tmp_path_factory.mktemp("fuzz_case")
    src = base / "case0"
    shutil.copytree(REPO_GOLDENS / "tiny" / "v0001" / "case0", src)
    files = sorted(str(p.relative_to(src)) for p in src.rglob("zarr.json"))
    return src, files


def _json_mutation():
    """JSON-aware edits of a zarr.json: shapes, chunk shapes, types, fill values, codecs, attributes."""
    huge = st.sampled_from([2**40, 2**31, 2**24, 10**6, -1, 0, 1])
    return st.one_of(
        st.tuples(st.just("shape"), st.integers(0, 3), huge),
        st.tuples(st.just("chunk"), st.integers(0, 3), huge),
        st.tuples(st.just("data_type"), st.sampled_from(["float64", "int8", "complex128", "bool", "bogus", "string", 7])),
        st.tuples(st.just("fill_value"), st.sampled_from(["NaN", "x", None, 1e400, [1, 2], 2**70])),
        st.tuples(st.just("codecs"), st.sampled_from([[], [{"name": "gzip"}], [{"name": "bytes", "configuration": {"endian": "big"}}],
                                                      "bytes", [{"name": "transpose", "configuration": {"order": [1, 0]}}]])),
        st.tuples(st.just("node_type"), st.sampled_from(["array", "group", "x", None])),
        st.tuples(st.just("attr"), st.sampled_from(["checksums", "token_ids", "schema"]),
                  st.sampled_from([None, "x", [], {}, {"tokens": "0"}, 2**70, [1.5]])),
        st.tuples(st.just("drop"), st.sampled_from(["shape", "data_type", "chunk_grid", "codecs", "zarr_format", "attributes"])),
    )


def apply_json(raw: bytes, mut) -> bytes:
    d = json.loads(raw)
    kind = mut[0]
    if kind == "shape" and isinstance(d.get("shape"), list) and d["shape"]:
        d["shape"][mut[1] % len(d["shape"])] = mut[2]
    elif kind == "chunk" and "chunk_grid" in d:
        cs = d["chunk_grid"]["configuration"]["chunk_shape"]
        cs[mut[1] % len(cs)] = mut[2]
    elif kind in ("data_type", "fill_value", "codecs", "node_type"):
        d[kind] = mut[1]
    elif kind == "attr":
        d.setdefault("attributes", {})[mut[1]] = mut[2]
    elif kind == "drop":
        d.pop(mut[1], None)
    return json.dumps(d).encode()


@st.composite
def zarr_json_edit(draw, files):
    target = draw(st.sampled_from(files))
    if draw(st.booleans()):
        return target, "json", draw(_json_mutation())
    return target, "bytes", draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4)), \
        draw(st.one_of(st.none(), st.integers(0, 10**6)))


def _edit(path: Path, edit) -> None:
    raw = path.read_bytes()
    if edit[1] == "json":
        path.write_bytes(apply_json(raw, edit[2]))
        return
    b = bytearray(raw)
    for at, byte in edit[2]:
        b[at % len(b)] = byte
    if edit[3] is not None:
        del b[edit[3] % (len(b) + 1):]
    path.write_bytes(bytes(b))


@pytest.fixture(scope="module")
def case_copy(golden_case, tmp_path_factory):
    """A second copy of the case group, each example's edit undone after it (load_case only reads)."""
    src, files = golden_case
    work = tmp_path_factory.mktemp("case") / "case0"
    shutil.copytree(src, work)
    return work, files


@settings(max_examples=N, **FUZZ)
@given(data=st.data())
def test_fuzz_case_zarr_json(case_copy, data):
    """moesnap.store.case.load_case (what compare reads) on a case group with one mutated zarr.json."""
    work, files = case_copy
    edit = data.draw(zarr_json_edit(files), label="edit")
    target = work / edit[0]
    raw = target.read_bytes()
    _edit(target, edit)
    try:
        with bounded():
            try:
                load_case(work)
            except MoesnapError as e:
                assert str(e) and "\n" not in str(e)
    finally:
        target.write_bytes(raw)


@pytest.mark.parametrize("array, shape, chunks, message", [
    # found by hand: logits claiming [2^22, 272] made compare allocate and fill 4.25 GiB (40 s);
    # [2^40, 272] was a MemoryError (exit 3)
    ("logits", [2**40, 272], None, r"case0/logits: declares shape .* far more than the group stores"),
    ("logits", [2**22, 272], None, r"case0/logits: declares shape .* far more than the group stores"),
    ("logits", [2**31, 2**31], None, r"case0/logits: declares shape"),
    # found by test_fuzz_case_zarr_json (nightly): tokens claiming 2^22 ids in 220,753 chunks of 19 were
    # read chunk by chunk for minutes (and zarr's nchunks_initialized enumerates every declared key)
    ("tokens", [2**22], None, r"case0/tokens: declares shape \[4194304\] in 220753 chunks but stores 1"),
    ("tokens", [19], [2**31], r"case0/tokens: declares chunks of \[2147483648\]"),
])
def test_regression_case_declaring_huge_shapes_or_chunks_is_refused_fast(golden_case, tmp_path, array, shape, chunks,
                                                                         message):
    src, _ = golden_case
    work = tmp_path / "case0"
    shutil.copytree(src, work)

    def edit(d):
        d["shape"] = shape
        if chunks is not None:
            d["chunk_grid"]["configuration"]["chunk_shape"] = chunks

    f = work / array / "zarr.json"
    d = json.loads(f.read_text())
    edit(d)
    f.write_text(json.dumps(d))
    with bounded(seconds=10, peak=64 << 20):
        with pytest.raises(MoesnapError, match=message):
            load_case(work)


# ---------------------------------------------------------------- the store, through the CLI


@pytest.fixture(scope="module")
def store_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_store") / "goldens"
    shutil.copytree(REPO_GOLDENS, root)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.json"))
    return root, files


@settings(max_examples=max(10, N // 2), **FUZZ)
@given(data=st.data())
def test_fuzz_store_json_through_goldens_show(store_copy, data):
    """`moesnap goldens show` on the committed goldens with one of their JSON files' bytes mutated
    (version, marker, case and array metadata): exit 0 or a one-line exit 2, never 3."""
    root, files = store_copy
    target = root / data.draw(st.sampled_from(files), label="file")
    raw = target.read_bytes()
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4), label="n")):
        b[data.draw(st.integers(0, len(b) - 1), label="at")] = data.draw(st.integers(0, 255), label="byte")
    if data.draw(st.booleans(), label="truncate"):
        del b[data.draw(st.integers(0, len(b)), label="len"):]
    target.write_bytes(bytes(b))
    out, err = io.StringIO(), io.StringIO()
    try:
        with bounded(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["-q", "goldens", "show", "tiny", "--store", str(root)])
    finally:
        target.write_bytes(raw)
    assert code in (0, 2), err.getvalue()
    if code == 2:
        assert err.getvalue().count("\n") == 1, err.getvalue()
