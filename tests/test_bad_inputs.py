"""The catalogue of hostile and broken inputs, command by command (issue 6).

Every row runs one command in-process against one bad input and asserts what
the user sees and what stays put:

* exit code 2, nothing on stdout, exactly one short line on stderr starting
  ``moesnap: error:``, no traceback, naming the offending file, key, array or
  argument (the row's needles);
* not one byte changes under the test's directory: the golden store (a copy of
  the committed ``goldens/``, never the repository's own), the model files,
  and nothing new appears (no half-written output, no temporary file).

Rows that damage the store work on a private copy; the others share one copy
per module and still hash it before and after.  New commands and new inputs
get a row here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from ggufgen import absurd_header, write_gguf
from moesnap.cli.main import main
from test_goldens import tree_digest

REPO_GOLDENS = Path(__file__).resolve().parent.parent / "goldens"
V = "tiny/v0001"          # the committed version every store row starts from


# ---------------------------------------------------------------- the bad things


def _copy_of_tiny(tmp: Path, tiny: Path, name: str, edit: Callable[[bytearray], bytes | bytearray]) -> Path:
    p = tmp / name
    p.write_bytes(bytes(edit(bytearray(tiny.read_bytes()))))
    return p


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _flip_weight(d: bytearray) -> bytearray:
    d[-100] ^= 0xFF                      # a weight byte far from the header: a valid model, another sha256
    return d


#: bad model files: name -> (make(tmp, tiny) -> path, needle of the message)
BAD_MODELS: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "missing": (lambda t, m: t / "missing.gguf", "no such file"),
    "empty": (lambda t, m: _write(t / "empty.gguf", b""), "empty file"),
    "directory": (lambda t, m: _mkdir(t / "dir.gguf"), "is a directory"),
    "non-GGUF text": (lambda t, m: _write(t / "text.gguf", b"hello\n" * 50), "not a GGUF file (bad magic)"),
    "magic then junk": (lambda t, m: _write(t / "junk.gguf", b"GGUF\x03\0\0\0" + bytes(range(256)) * 4),
                        "more than the file holds"),
    "unknown GGUF version": (lambda t, m: _copy_of_tiny(t, m, "v7.gguf", lambda d: d[:4] + b"\x07\0\0\0" + d[8:]),
                             "unsupported GGUF version 7"),
    "truncated header": (lambda t, m: _copy_of_tiny(t, m, "cut300.gguf", lambda d: d[:300]),
                         "more than the file holds"),
    "truncated data": (lambda t, m: _copy_of_tiny(t, m, "cut.gguf", lambda d: d[: len(d) // 2]),
                       "more than the file holds"),
    "other architecture": (lambda t, m: write_gguf(t / "phimoe.gguf", arch="phimoe"), "architecture is 'phimoe'"),
    "missing key": (lambda t, m: write_gguf(t / "nokey.gguf", drop_keys=("qwen3moe.rope.freq_base",)),
                    "missing metadata key 'qwen3moe.rope.freq_base'"),
    "block_count an array of 100k": (lambda t, m: _array_key(t / "arr.gguf"), "'qwen3moe.block_count' = [0, 0, 0, 0, 0, 0, ...] must be a positive integer"),
    "bad key value": (lambda t, m: write_gguf(t / "badval.gguf", override_keys={"qwen3moe.block_count": ("4", "str")}),
                      "'qwen3moe.block_count' = '4' must be a positive integer"),
    "block_count 2^32-1": (lambda t, m: write_gguf(t / "layers.gguf", override_keys={"qwen3moe.block_count": (2**32 - 1, "u32")}),
                           "'qwen3moe.block_count' = 4294967295, but the file holds tensors of 2 layers"),
    "wrong tensor shape": (lambda t, m: write_gguf(t / "shape.gguf", bad_shape="blk.1.ffn_down_exps"),
                           "tensor 'blk.1.ffn_down_exps' has shape"),
    "2^60 tensors": (lambda t, m: absurd_header(t / "t60.gguf", n_tensors=2**60),
                     "header claims 1152921504606846976 tensors"),
    "2^60 metadata keys": (lambda t, m: absurd_header(t / "k60.gguf", n_kv=2**60),
                           "1152921504606846976 metadata keys"),
    "array of 2^60 items": (lambda t, m: absurd_header(t / "a60.gguf", n_kv=1, array_len=2**60),
                            "metadata key 'general.junk' claims 1152921504606846976 array items"),
    "dimension 2^40": (lambda t, m: absurd_header(t / "d40.gguf", n_tensors=1, dim=2**40),
                       "tensor 'token_embd' claims"),
}

def _nested_vocabulary(path: Path) -> Path:
    """A model whose tokenizer.ggml.tokens is an array of arrays (GGUF allows it)."""
    import gguf

    class Writer(gguf.GGUFWriter):
        def add_token_list(self, tokens):
            self.add_array("tokenizer.ggml.tokens", [[1, 2], [3]] * 135)

    real, gguf.GGUFWriter = gguf.GGUFWriter, Writer
    try:
        return write_gguf(path)
    finally:
        gguf.GGUFWriter = real


def _array_key(path: Path) -> Path:
    """qwen3moe.block_count holds an array of 100,000 zeros (the error must stay one short line)."""
    import gguf

    class Writer(gguf.GGUFWriter):
        def add_uint32(self, key, val):
            if key.endswith(".block_count"):
                return self.add_array(key, [0] * 100_000)
            return super().add_uint32(key, val)

    real, gguf.GGUFWriter = gguf.GGUFWriter, Writer
    try:
        return write_gguf(path)
    finally:
        gguf.GGUFWriter = real


def _bpe_model(path: Path, **kw) -> Path:
    """A model whose vocabulary is a small byte-level BPE (tests/vocabgen.py), ``kw`` spoiling it."""
    from vocabgen import model_with_vocab, small_bpe

    tokens, merges = small_bpe()
    return model_with_vocab(path, kw.pop("tokens", tokens), kw.pop("merges", merges), **kw)


def _checkpoint(tmp: Path, tokenizer_json: bytes | None) -> Path:
    """A checkpoint directory (tests/ckptgen.py) with ``tokenizer_json`` as its tokenizer.json (None: none)."""
    from ckptgen import write_checkpoint
    from moesnap.model.weights import GGUFModel

    ckpt = write_checkpoint(tmp / "ckpt", GGUFModel.open(write_gguf(tmp / "ckpt.gguf")))
    if tokenizer_json is not None:
        (ckpt / "tokenizer.json").write_bytes(tokenizer_json)
    return ckpt


#: models whose tokenizer metadata --prompt refuses: placeholder -> make(tmp)
BAD_VOCABS: dict[str, Callable[[Path], Path]] = {
    "vocab_unknown_pre": lambda t: _bpe_model(t / "nope-pre.gguf", pre="nope"),
    "vocab_bad_merge": lambda t: _bpe_model(t / "bad-merge.gguf", merges=["Ġ t", "Ġtqq"]),
    "vocab_int_merges": lambda t: _bpe_model(t / "int-merges.gguf", merges=None, raw_merges=[1, 2, 3]),
    "vocab_no_merges": lambda t: _bpe_model(t / "no-merges.gguf", merges=None),
    "vocab_twice": lambda t: _bpe_model(t / "twice.gguf", tokens=["a", "b", "a"], merges=[]),
    "vocab_t5": lambda t: _bpe_model(t / "t5.gguf", model="t5"),
    "ckpt_bad_tokenizer": lambda t: _checkpoint(t, b'{"model": {"type": "BPE", "vocab": '),
    "ckpt_no_tokenizer": lambda t: _checkpoint(t, None),
}


#: every command that opens a model, with the rest of its arguments
MODEL_COMMANDS = {
    "trace": ["trace", "{model}", "--tokens", "1,2,3", "--out", "{tmp}/out.zarr"],
    "generate": ["goldens", "generate", "{model}", "--suite", "new", "--store", "{store}", "--tokens", "1,2,3"],
    "check": ["check", "{model}", "--suite", "tiny", "--store", "{store}", "--json", "{tmp}/r.json"],
    "calibrate": ["calibrate", "{model}", "--tokens", "1,2,3", "--dtypes", "float32", "--json", "{tmp}/c.json"],
}


# ---------------------------------------------------------------- store damage (on a private copy)


def _json_edit(path: Path, edit: Callable[[dict], None]) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def flip_chunk_bit(store: Path) -> None:
    chunk = store / V / "case1/layers/moe_out/c/3/0/0"
    data = bytearray(chunk.read_bytes())
    data[17] ^= 0x04
    chunk.write_bytes(bytes(data))


def delete_array(store: Path) -> None:
    shutil.rmtree(store / V / "case2/logits")


def absurd_shape(store: Path) -> None:
    """case0/logits declares 2^40 rows (numpy refuses the 1 PiB at once)."""
    _json_edit(store / V / "case0/logits/zarr.json", lambda d: d.update(shape=[2**40, 272]))


def other_token_ids(store: Path) -> None:
    """The case's recorded token ids differ from its tokens array (its attributes are not checksummed)."""
    _json_edit(store / V / "case0/zarr.json", lambda d: d["attributes"].update(token_ids=[1, 2, 3]))


def token_ids_not_a_list(store: Path) -> None:
    _json_edit(store / V / "case0/zarr.json", lambda d: d["attributes"].update(token_ids="abc"))


def _republish(store: Path, edit: Callable[[dict], None]) -> None:
    """A hostile publisher: edit the version's provenance and re-seal published.json over it."""
    _json_edit(store / V / "zarr.json", edit)
    marker = store / V / "published.json"
    m = json.loads(marker.read_text())
    m["meta_sha256"] = hashlib.sha256((store / V / "zarr.json").read_bytes()).hexdigest()
    marker.write_text(json.dumps(m))


def case_name_dotdot(store: Path) -> None:
    _republish(store, lambda d: d["attributes"]["cases"][0].update(name="../case1"))


def case_name_absolute(store: Path) -> None:
    _republish(store, lambda d: d["attributes"]["cases"][0].update(name="/etc"))


def edited_version_meta(store: Path) -> None:
    _json_edit(store / V / "zarr.json", lambda d: d["attributes"].update(dtype="float64"))


def unpublished(store: Path) -> None:
    (store / V / "published.json").unlink()


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    argv: tuple[str, ...]
    needles: tuple[str, ...]
    damage: Callable[[Path], None] | None = None          # applied to a private copy of the store
    candidate: Callable[[Path], None] | None = None       # applied to {bad_cand}, a copy of golden case0
    dump: Callable[[Path, Path], None] | None = None      # writes {dump}, a flat dump directory, from golden case0


def row(*argv: str, needles: str | tuple[str, ...], damage=None, candidate=None, dump=None) -> Row:
    return Row(tuple(argv), (needles,) if isinstance(needles, str) else tuple(needles), damage, candidate, dump)


def _replace_array(case: Path, path: str, make) -> None:
    """Another engine's dump: array ``path`` of the case group at ``case`` rewritten as make(old values)."""
    import zarr

    g = zarr.open_group(str(case), mode="r+")
    old = g[path][...]
    del g[path]
    g.create_array(path, data=make(old))
    g.attrs.put({k: v for k, v in g.attrs.asdict().items() if k != "checksums"})   # engines write none


def _aprt(d: Path, case0: Path, edit: Callable[[str, bytes], bytes] = lambda name, b: b) -> None:
    """An aprender trace of golden case0 (moe_ffn_out of every layer); ``edit(relative path, bytes)`` spoils one."""
    import struct

    from moesnap.store.case import load_case

    moe = load_case(case0).layers["moe_out"]
    for layer in range(moe.shape[0]):
        (d / f"layer-{layer}").mkdir(parents=True)
        data = moe[layer].astype("<f4").tobytes()
        name = f"layer-{layer}/moe_ffn_out.bin"
        (d / name).write_bytes(edit(name, b"APRT" + struct.pack("<II", layer, moe[layer].size) + data))


def _aprt_plus(d: Path, case0: Path, name: str, layer: int) -> None:
    """The trace of :func:`_aprt` and one more file ``name``: 64 zeros at ``layer`` (one token's row)."""
    _aprt(d, case0)
    (d / name).parent.mkdir(exist_ok=True)
    (d / name).write_bytes(b"APRT" + layer.to_bytes(4, "little") + (64).to_bytes(4, "little") + bytes(256))


def _sglang(d: Path, case0: Path, *, steps=(0,), ranks=(0,), extra: Callable[[Path], None] | None = None) -> None:
    """SGLang dumper files of golden case0 (input_ids and moe_out of every layer) for these steps and ranks;
    rank r > 0 holds moe_out halved (a tensor-parallel partial sum)."""
    import torch

    from moesnap.store.case import load_case

    g = load_case(case0)
    d.mkdir()
    for step in steps:
        for rank in ranks:
            torch.save({"value": torch.from_numpy(g.tokens.astype("i8"))},
                       d / f"step={step}___rank={rank}___dump_index=0___name=input_ids.pt")
            for layer in range(g.n_layer):
                torch.save({"value": torch.from_numpy(g.layers["moe_out"][layer] / (1 + rank))},
                           d / f"step={step}___rank={rank}___dump_index={layer + 1}___name=moe_out___layer_id={layer}.pt")
    if extra is not None:
        extra(d)


class _Payload:
    """Unpickled with pickle, it would create {tmp}/pwned (the row then fails: a file appeared)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _hostile(d: Path) -> None:
    import torch

    torch.save({"value": _Payload(d.parent / "pwned")}, d / "step=0___rank=0___dump_index=9___name=moe_out___layer_id=0.pt")


SHOW, DIFF, CHECK = ("goldens", "show"), ("goldens", "diff"), ("check", "{model}", "--suite")
S = ("--store", "{store}")

ROWS: dict[str, Row] = {}

# every model-opening command against every bad model file: the message names the file and the problem
for _cmd, _argv in MODEL_COMMANDS.items():
    for _bad, (_make, _needle) in BAD_MODELS.items():
        ROWS[f"{_cmd}: model {_bad}"] = row(*_argv, needles=("{model}", _needle))

ROWS.update({
    # ------------------------------------------------ model make
    "model make: unknown preset": row("model", "make", "{tmp}/m.gguf", "--preset", "nope", needles="unknown preset 'nope'"),
    "model make: 0 layers": row("model", "make", "{tmp}/m.gguf", "--preset", "tiny", "--layers", "0", needles="layers=0"),
    "model make: layers not an int": row("model", "make", "{tmp}/m.gguf", "--preset", "tiny", "--layers", "x",
                                         needles=("--layers", "'x'")),
    "model make: 10^12 layers (more than the disk)": row(
        "model", "make", "{tmp}/m.gguf", "--preset", "tiny", "--layers", str(10**12), needles=("1000000000000 layers need", "free")),
    "model make: negative seed": row("model", "make", "{tmp}/m.gguf", "--preset", "tiny", "--seed", "-1", needles="seed=-1"),
    "model make: output exists": row("model", "make", "{tiny_copy}", "--preset", "tiny", needles=("{tiny_copy}", "exists", "--force")),
    "model make: output is a directory": row("model", "make", "{tmp}", "--preset", "tiny", "--force",
                                             needles=("{tmp}", "is a directory")),
    "model make: missing parent": row("model", "make", "{tmp}/no/m.gguf", "--preset", "tiny", needles=("{tmp}/no", "does not exist")),
    "model make: inside a published golden (--force)": row(
        "model", "make", "{store}/" + V + "/zarr.json", "--preset", "tiny", "--force", needles="inside the published golden version"),

    # ------------------------------------------------ trace
    "trace: negative token": row("trace", "{model}", "--tokens", "1,-5", "--out", "{tmp}/o.zarr", needles="token id -5 is outside the vocabulary"),
    "trace: token = vocab size": row("trace", "{model}", "--tokens", "272", "--out", "{tmp}/o.zarr", needles="token id 272"),
    "trace: token 10^20": row("trace", "{model}", "--tokens", str(10**20), "--out", "{tmp}/o.zarr", needles=f"token id {10**20}"),
    "trace: empty token list": row("trace", "{model}", "--tokens", "", "--out", "{tmp}/o.zarr", needles="--tokens: empty token list"),
    "trace: only commas": row("trace", "{model}", "--tokens", ",,", "--out", "{tmp}/o.zarr", needles="empty token list"),
    "trace: token not an integer": row("trace", "{model}", "--tokens", "1,x", "--out", "{tmp}/o.zarr", needles=("--tokens '1,x'", "integers")),
    "trace: more tokens than the context": row("trace", "{model}", "--tokens", ",".join(["5"] * 4097), "--out", "{tmp}/o.zarr",
                                               needles=("4097 tokens", "context of 4096")),
    "trace: empty prompt": row("trace", "{model}", "--prompt", "", "--out", "{tmp}/o.zarr", needles="--prompt: empty"),
    "trace: non-UTF-8 prompt": row("trace", "{model}", "--prompt", "ab\udcff", "--out", "{tmp}/o.zarr", needles="--prompt: not UTF-8"),
    "trace: --prompt with a vocabulary of arrays": row("trace", "{nested_vocab}", "--prompt", "hi", "--out", "{tmp}/o.zarr",
                                                      needles=("{nested_vocab}", "'tokenizer.ggml.tokens' is not an array of strings")),
    "trace: --prompt with an unknown pre-tokenizer": row(
        "trace", "{vocab_unknown_pre}", "--prompt", "hi", "--out", "{tmp}/o.zarr",
        needles=("{vocab_unknown_pre}", "pre-tokenizer tokenizer.ggml.pre = 'nope' is not one moesnap knows")),
    "trace: --prompt with a merge that is not two tokens": row(
        "trace", "{vocab_bad_merge}", "--prompt", "hi", "--out", "{tmp}/o.zarr",
        needles=("{vocab_bad_merge}", "'tokenizer.ggml.merges'[1] = 'Ġtqq' is not two tokens")),
    "trace: --prompt with merges of integers": row(
        "trace", "{vocab_int_merges}", "--prompt", "hi", "--out", "{tmp}/o.zarr",
        needles=("{vocab_int_merges}", "'tokenizer.ggml.merges' is not an array of strings")),
    "trace: --prompt with a BPE vocabulary without merges": row(
        "trace", "{vocab_no_merges}", "--prompt", "hi", "--out", "{tmp}/o.zarr",
        needles=("{vocab_no_merges}", "BPE vocabulary without 'tokenizer.ggml.merges'")),
    "trace: --prompt with a token twice in the vocabulary": row(
        "trace", "{vocab_twice}", "--prompt", "hi", "--out", "{tmp}/o.zarr",
        needles=("{vocab_twice}", "holds 'a' twice (ids 0 and 2)")),
    "trace: --prompt with an unknown tokenizer model": row(
        "trace", "{vocab_t5}", "--prompt", "hi", "--out", "{tmp}/o.zarr",
        needles=("{vocab_t5}", "tokenizer.ggml.model = 't5' is not supported")),
    "trace: --tokenizer model on the synthetic byte vocabulary": row(
        "trace", "{model}", "--prompt", "hi", "--tokenizer", "model", "--out", "{tmp}/o.zarr",
        needles=("{model}", "'llama' (SentencePiece) is not supported", "--tokenizer bytes")),
    "trace: --prompt with a checkpoint whose tokenizer.json does not parse": row(
        "trace", "{ckpt_bad_tokenizer}", "--prompt", "hi", "--out", "{tmp}/o.zarr",
        needles=("{ckpt_bad_tokenizer}/tokenizer.json: not a tokenizer.json HF tokenizers can read",)),
    "trace: --prompt with a checkpoint without tokenizer.json": row(
        "trace", "{ckpt_no_tokenizer}", "--prompt", "hi", "--out", "{tmp}/o.zarr",
        needles=("{ckpt_no_tokenizer}: no tokenizer.json to encode --prompt with",)),
    "generate: --prompt with a checkpoint whose tokenizer.json does not parse": row(
        "goldens", "generate", "{ckpt_bad_tokenizer}", "--suite", "new", *S, "--prompt", "hi",
        needles=("{ckpt_bad_tokenizer}/tokenizer.json", "not a tokenizer.json")),
    "trace: unknown --tokenizer": row("trace", "{model}", "--prompt", "hi", "--tokenizer", "spm", "--out", "{tmp}/o.zarr",
                                      needles="--tokenizer 'spm': choose one of auto, model, bytes"),
    "trace: tokens and prompt": row("trace", "{model}", "--tokens", "1", "--prompt", "x", "--out", "{tmp}/o.zarr", needles="exactly one"),
    "trace: unknown dtype": row("trace", "{model}", "--tokens", "1", "--dtype", "float8", "--out", "{tmp}/o.zarr", needles="unknown dtype 'float8'"),
    "trace: unknown device": row("trace", "{model}", "--tokens", "1", "--device", "tpu", "--out", "{tmp}/o.zarr", needles="unknown device 'tpu'"),
    "trace: output exists": row("trace", "{model}", "--tokens", "1", "--out", "{tmp}/plain", needles=("{tmp}/plain", "exists (use --force")),
    "trace: --force over a plain directory": row("trace", "{model}", "--tokens", "1", "--out", "{tmp}/plain", "--force",
                                                 needles=("{tmp}/plain", "not a case group")),
    "trace: --force over a golden suite": row("trace", "{model}", "--tokens", "1", "--out", "{store}/tiny", "--force",
                                              needles=("{store}/tiny", "not a case group")),
    "trace: --force over a file": row("trace", "{model}", "--tokens", "1", "--out", "{tiny_copy}", "--force",
                                      needles=("{tiny_copy}", "not a directory")),
    "trace: output inside a published golden": row("trace", "{model}", "--tokens", "1", "--out", "{store}/" + V + "/case9",
                                                   needles="inside the published golden version"),
    "trace: missing output parent": row("trace", "{model}", "--tokens", "1", "--out", "{tmp}/no/o.zarr",
                                        needles=("{tmp}/no", "does not exist")),

    # ------------------------------------------------ goldens generate
    "generate: suite ../x": row("goldens", "generate", "{model}", "--suite", "../x", *S, "--tokens", "1", needles="contains '..'"),
    "generate: suite ..": row("goldens", "generate", "{model}", "--suite", "..", *S, "--tokens", "1", needles="contains '..'"),
    "generate: absolute suite": row("goldens", "generate", "{model}", "--suite", "/tmp/x", *S, "--tokens", "1", needles="absolute path"),
    "generate: suite with /": row("goldens", "generate", "{model}", "--suite", "a/b", *S, "--tokens", "1", needles="path separator"),
    "generate: suite with ESC": row("goldens", "generate", "{model}", "--suite", "a\x1b[2Jb", *S, "--tokens", "1",
                                    needles="control characters"),
    "generate: suite with newline": row("goldens", "generate", "{model}", "--suite", "a\nb", *S, "--tokens", "1",
                                        needles="control characters"),
    "generate: empty suite": row("goldens", "generate", "{model}", "--suite", "", *S, "--tokens", "1", needles="is empty"),
    "generate: --prompt with an unknown pre-tokenizer": row(
        "goldens", "generate", "{vocab_unknown_pre}", "--suite", "new", *S, "--tokens", "1", "--prompt", "hi",
        needles=("{vocab_unknown_pre}", "'nope' is not one moesnap knows")),
    "generate: unknown --tokenizer": row("goldens", "generate", "{model}", "--suite", "new", *S, "--prompt", "hi",
                                         "--tokenizer", "spm", needles="--tokenizer 'spm'"),
    "generate: no inputs": row("goldens", "generate", "{model}", "--suite", "tiny", *S, needles="at least one --tokens or --prompt"),
    "generate: unknown dtype": row("goldens", "generate", "{model}", "--suite", "tiny", *S, "--tokens", "1", "--dtype", "bfloat16",
                                   needles="unknown golden dtype 'bfloat16'"),
    "generate: token out of vocab (second input)": row("goldens", "generate", "{model}", "--suite", "tiny", *S, "--tokens", "1",
                                                       "--tokens", "1,99999", needles="token id 99999"),
    "generate: store is a file": row("goldens", "generate", "{model}", "--suite", "tiny", "--store", "{tiny_copy}", "--tokens", "1",
                                     needles=("{tiny_copy}", "store path is a file")),
    "generate: store inside a published golden": row("goldens", "generate", "{model}", "--suite", "x", "--store", "{store}/" + V,
                                                     "--tokens", "1", needles="inside the published golden version"),
    "generate: store under a file": row("goldens", "generate", "{model}", "--suite", "tiny", "--store", "{tiny_copy}/sub",
                                        "--tokens", "1", needles="{tiny_copy}/sub"),

    # ------------------------------------------------ goldens list
    "list: store is a file": row("goldens", "list", "--store", "{tiny_copy}", needles=("{tiny_copy}", "store path is a file")),
    "list: no such store": row("goldens", "list", "--store", "{tmp}/nowhere", needles=("{tmp}/nowhere", "no such golden store")),
    "list: empty store path": row("goldens", "list", "--store", "", needles="store root is empty"),
    "list: store with NUL": row("goldens", "list", "--store", "a\x00b", needles="control characters"),
    "list: unsupported URL": row("goldens", "list", "--store", "http://example.invalid/x", needles="only local directories and s3://"),
    "list: s3 without bucket": row("goldens", "list", "--store", "s3://", needles="no bucket"),

    # ------------------------------------------------ goldens show
    "show: unknown suite": row(*SHOW, "nosuch", *S, needles="unknown suite 'nosuch'"),
    "show: unknown version": row(*SHOW, "tiny@v0009", *S, needles="unknown version 'v0009' (published: v0001)"),
    "show: malformed version": row(*SHOW, "tiny@9", *S, needles="version '9'"),
    "show: suite ..": row(*SHOW, "..@v0001", *S, needles="contains '..'"),
    "show: absolute suite": row(*SHOW, "/etc/passwd", *S, needles="absolute path"),
    "show: bit flip in a chunk": row(*SHOW, "tiny", *S, needles="case1/layers/moe_out: checksum mismatch", damage=flip_chunk_bit),
    "show: deleted array": row(*SHOW, "tiny", *S, needles="case2/logits: array is missing", damage=delete_array),
    "show: array shape 2^40": row(*SHOW, "tiny", *S, needles="case0/logits", damage=absurd_shape),
    "show: case name ../case1": row(*SHOW, "tiny", *S, needles="case name '../case1'", damage=case_name_dotdot),
    "show: case name /etc": row(*SHOW, "tiny", *S, needles="case name '/etc'", damage=case_name_absolute),
    "show: provenance edited after publishing": row(*SHOW, "tiny", *S, needles=("zarr.json", "changed after publishing"),
                                                    damage=edited_version_meta),
    "show: marker deleted": row(*SHOW, "tiny", *S, needles="unknown suite 'tiny'", damage=unpublished),
    "show: store is a file": row(*SHOW, "tiny", "--store", "{tiny_copy}", needles="store path is a file"),

    # ------------------------------------------------ goldens diff
    "diff: unknown version": row(*DIFF, "tiny@v0001", "tiny@v0002", *S, needles="unknown version 'v0002'"),
    "diff: bit flip": row(*DIFF, "tiny@v0001", "tiny", *S, needles="checksum mismatch", damage=flip_chunk_bit),
    "diff: deleted array": row(*DIFF, "tiny@v0001", "tiny", *S, needles="case2/logits: array is missing", damage=delete_array),
    "diff: --json to a directory": row(*DIFF, "tiny", "tiny", *S, "--json", "{tmp}", needles=("{tmp}", "is a directory")),
    "diff: --json missing parent": row(*DIFF, "tiny", "tiny", *S, "--json", "{tmp}/no/d.json", needles=("{tmp}/no", "does not exist")),
    "diff: --json exists": row(*DIFF, "tiny", "tiny", *S, "--json", "{tmp}/keep.json", needles=("keep.json", "exists (use --force")),
    "diff: --json into the store": row(*DIFF, "tiny", "tiny", *S, "--json", "{store}/d.json", "--force",
                                       needles="inside the golden store"),
    "diff: store is a file": row(*DIFF, "tiny", "tiny", "--store", "{tiny_copy}", needles="store path is a file"),

    # ------------------------------------------------ goldens prune
    "prune: keep 0": row("goldens", "prune", "tiny", "--keep", "0", *S, needles="--keep 0"),
    "prune: negative stale-after": row("goldens", "prune", "tiny", "--keep", "1", "--stale-after", "-1", *S, needles="--stale-after -1"),
    "prune: unknown suite": row("goldens", "prune", "other", "--keep", "1", *S, needles="unknown suite 'other'"),
    "prune: suite ../tiny": row("goldens", "prune", "../tiny", "--keep", "1", *S, needles="contains '..'"),
    "prune: store is a file": row("goldens", "prune", "tiny", "--keep", "1", "--store", "{tiny_copy}", needles="store path is a file"),

    # ------------------------------------------------ check
    "check: unknown suite": row(*CHECK, "nosuch", *S, needles="unknown suite 'nosuch'"),
    "check: unknown version": row(*CHECK, "tiny@v0099", *S, needles="unknown version 'v0099'"),
    "check: suite ../x": row(*CHECK, "../x", *S, needles="contains '..'"),
    "check: suite with ESC": row(*CHECK, "t\x1bx", *S, needles="control characters"),
    "check: golden from another model file": row("check", "{other_model}", "--suite", "tiny", *S,
                                                 needles="golden was made from another model file"),
    "check: golden with other tokens": row(*CHECK, "tiny", *S, needles="case0: tokens array differs from the recorded token ids",
                                           damage=other_token_ids),
    "check: golden token_ids not a list": row(*CHECK, "tiny", *S, needles="'token_ids' is not a list of integers",
                                              damage=token_ids_not_a_list),
    "check: bit flip": row(*CHECK, "tiny", *S, needles="case1/layers/moe_out: checksum mismatch", damage=flip_chunk_bit),
    "check: deleted array": row(*CHECK, "tiny", *S, needles="case2/logits: array is missing", damage=delete_array),
    "check: case name ../case1": row(*CHECK, "tiny", *S, needles="case name '../case1'", damage=case_name_dotdot),
    "check: store is a file": row(*CHECK, "tiny", "--store", "{tiny_copy}", needles="store path is a file"),
    "check: unknown dtype": row(*CHECK, "tiny", *S, "--dtype", "float64", needles="unknown dtype 'float64'"),
    "check: unknown device": row(*CHECK, "tiny", *S, "--device", "meta", needles="unknown device 'meta'"),
    "check: --json to a directory": row(*CHECK, "tiny", *S, "--json", "{tmp}", needles=("{tmp}", "is a directory")),
    "check: --html missing parent": row(*CHECK, "tiny", *S, "--html", "{tmp}/no/r.html", needles=("{tmp}/no", "does not exist")),
    "check: --json exists": row(*CHECK, "tiny", *S, "--json", "{tmp}/keep.json", needles=("keep.json", "exists (use --force")),
    "check: --html into a published golden": row(*CHECK, "tiny", *S, "--html", "{store}/" + V + "/zarr.json", "--force",
                                                  needles="inside the published golden version"),
    "check: --json and --html the same file": row(*CHECK, "tiny", *S, "--json", "{tmp}/r", "--html", "{tmp}/r",
                                                  needles="same file"),
    "check: bad --tol": row(*CHECK, "tiny", *S, "--tol", "moe_out.atol=-1", needles="atol"),
    "check: --config missing": row(*CHECK, "tiny", *S, "--config", "{tmp}/none.toml", needles=("none.toml", "no such file")),
    "check: --config not TOML": row(*CHECK, "tiny", *S, "--config", "{tiny_copy}", needles="not valid TOML"),
    "check: --config with 'tool = 5'": row(*CHECK, "tiny", *S, "--config", "{tmp}/tool5.toml",
                                            needles=("tool5.toml", "[tool.moesnap] must be a table")),
    "check: missing --suite": row("check", "{model}", *S, needles="--suite"),
})

# --inject: malformed specs and values out of range (checked before anything runs)
for _spec, _needle in {
    "": "expected KIND:KEY=VALUE", "boom": "expected KIND:KEY=VALUE", "boom:layer=0": "unknown fault kind 'boom'",
    "nan:": "missing layer=, expert=", "nan:layer=0": "missing expert=", "nan:layer=0,layer=1,expert=0": "given twice",
    "nan:layer=0,expert=0,x=1": "unknown key 'x'", "nan:layer,expert=0": "'layer' is not KEY=VALUE",
    "nan:layer=99,expert=0": "layer=99 is out of range: the model has 4 layers", "nan:layer=-1,expert=0": "layer=-1 is out of range",
    "nan:layer=0x1,expert=0": "layer='0x1' is not an integer", "nan:layer=0,expert=8": "expert=8 is out of range",
    "qtype:layer=0,tensor=bogus,as=q4_k": "tensor='bogus'", "qtype:layer=0,tensor=ffn_down_exps,as=q9_k": "as='q9_k'",
    "scale:layer=0,stage=topk_ids,factor=2": "cannot be scaled", "scale:layer=0,stage=bogus,factor=2": "stage='bogus'",
    "scale:layer=0,stage=moe_out,factor=nan": "must be finite", "scale:layer=0,stage=moe_out,factor=1e400": "must be finite",
    "route:layer=0,token=-1": "token=-1", "route:layer=0,token=99999": "token=99999 is out of range",
}.items():
    ROWS[f"check: --inject {_spec!r}"] = row(*CHECK, "tiny", *S, "--inject", _spec, needles=(f"--inject {_spec!r}: ", _needle))

# --inject: what only the model file or the golden's prompts can refuse, quoting the spec as given
for _spec, _needle in {
    " QTYPE : layer=0 , tensor=ffn_down_exps , as=q6_k": "blk.0.ffn_down_exps already is Q6_K, so nothing would change",
    "route: layer=0, token=99": "token=99 is out of range: the shortest of the 3 prompts has",
}.items():
    ROWS[f"check: --inject {_spec!r}"] = row(*CHECK, "tiny", *S, "--inject", _spec, needles=(f"--inject {_spec!r}: ", _needle))

ROWS.update({
    # ------------------------------------------------ compare
    "compare: candidate is not a Zarr group": row("compare", "tiny", "{tmp}/plain", *S, needles=("{tmp}/plain", "not a Zarr v3 group")),
    "compare: candidate is a GGUF file": row("compare", "tiny", "{model}", *S, needles=("{model}", "not a Zarr v3 group")),
    "compare: candidate not a Zarr group (one-case golden)": row("compare", "{store}/" + V + "/case0", "{tmp}/plain",
                                                                 needles=("{tmp}/plain", "not a Zarr v3 group")),
    "compare: candidate missing": row("compare", "tiny", "{tmp}/nowhere.zarr", *S, needles=("nowhere.zarr", "no such candidate")),
    "compare: candidate with other tokens": row("compare", "{store}/" + V + "/case0", "{cand}", needles="other tokens than the golden"),
    "compare: candidate matching no golden case": row("compare", "tiny", "{cand}", *S, needles="match none of the golden's cases"),
    "compare: candidate declaring a 2^40 shape": row("compare", "{store}/" + V + "/case0", "{huge_cand}",
                                                     needles=("logits", "declares shape")),
    "compare: candidate tokens in 220,753 chunks": row("compare", "{store}/" + V + "/case0", "{bad_cand}",
                                                     needles=("bad_cand.zarr/tokens", "in 220753 chunks but stores 1"),
                                                     candidate=lambda c: _json_edit(c / "tokens/zarr.json",
                                                                                    lambda d: d.update(shape=[2**22]))),
    "compare: candidate tokens are floats": row("compare", "{store}/" + V + "/case0", "{bad_cand}",
                                                needles=("bad_cand.zarr/tokens", "integer array of token ids, got float64"),
                                                candidate=lambda c: _replace_array(c, "tokens", lambda a: a + 0.5)),
    "compare: candidate token 2^40": row("compare", "{store}/" + V + "/case0", "{bad_cand}",
                                         needles=("bad_cand.zarr/tokens", "token id 1099511627776 is out of the int32 range"),
                                         candidate=lambda c: _replace_array(c, "tokens", lambda a: a.astype("i8") * 0 + 2**40)),
    "compare: candidate stage of strings": row("compare", "{store}/" + V + "/case0", "{bad_cand}",
                                               needles=("case0/layers/moe_out (layer 0)", "dtype <U"),
                                               candidate=lambda c: _replace_array(c, "layers/moe_out", lambda a: a.astype(str))),
    "compare: candidate stage of complex numbers": row("compare", "{store}/" + V + "/case0", "{bad_cand}",
                                                       needles=("case0/logits", "complex64"),
                                                       candidate=lambda c: _replace_array(c, "logits", lambda a: a.astype("c8"))),
    "compare: golden case path missing": row("compare", "{tmp}/gone/case0", "{cand}", needles=("{tmp}/gone/case0", "no such case group")),
    "compare: golden path not a Zarr group": row("compare", "{tmp}/plain", "{cand}", needles=("{tmp}/plain", "not a Zarr v3 group")),
    "compare: unknown suite": row("compare", "nosuch", "{cand}", *S, needles="unknown suite 'nosuch'"),
    "compare: golden bit flip": row("compare", "tiny", "{store}/" + V, *S, needles="checksum mismatch", damage=flip_chunk_bit),
    "compare: golden deleted array": row("compare", "tiny", "{store}/" + V, *S, needles="array is missing", damage=delete_array),
    "compare: unknown dtype": row("compare", "tiny", "{store}/" + V, *S, "--dtype", "int4", needles="unknown dtype 'int4'"),
    "compare: --json exists": row("compare", "tiny", "{cand}", *S, "--json", "{tmp}/keep.json", needles=("keep.json", "exists")),
    "compare: --json into a published golden": row("compare", "tiny", "{cand}", *S, "--json", "{store}/" + V + "/zarr.json",
                                                   "--force", needles="inside the published golden version"),
    "compare: --html to a directory": row("compare", "tiny", "{cand}", *S, "--html", "{tmp}", needles="is a directory"),

    # ------------------------------------------------ import
    "import: unknown format": row("import", "--format", "gguf", "{tmp}", "--like", "tiny", *S, "--out", "{tmp}/o.zarr",
                                  needles="invalid choice: 'gguf'"),
    "import: dump directory missing": row("import", "--format", "aprt", "{tmp}/nodump", "--like", "tiny", *S, "--case",
                                          "case0", "--out", "{tmp}/o.zarr", needles=("{tmp}/nodump", "no such directory")),
    "import: --out exists": row("import", "--format", "aprt", "{dump}", "--like", "tiny", *S, "--case", "case0",
                                "--out", "{tmp}/plain", needles=("{tmp}/plain", "exists (use --force"), dump=_aprt),
    "import: --force over a plain directory": row("import", "--format", "aprt", "{dump}", "--like", "tiny", *S, "--case",
                                                  "case0", "--out", "{tmp}/plain", "--force",
                                                  needles=("{tmp}/plain", "not a case group"), dump=_aprt),
    "import: --out inside a published golden": row("import", "--format", "aprt", "{dump}", "--like", "tiny", *S, "--case",
                                                   "case0", "--out", "{store}/" + V + "/case9",
                                                   needles="inside the published golden version", dump=_aprt),
    "import: unknown golden suite": row("import", "--format", "aprt", "{dump}", "--like", "nosuch", *S,
                                        "--out", "{tmp}/o.zarr", needles="unknown suite 'nosuch'", dump=_aprt),
    "import: golden of three cases, no --case": row("import", "--format", "aprt", "{dump}", "--like", "tiny", *S,
                                                    "--out", "{tmp}/o.zarr", needles=("3 cases", "--case"), dump=_aprt),
    "import: unknown --case": row("import", "--format", "aprt", "{dump}", "--like", "tiny", *S, "--case", "case7",
                                  "--out", "{tmp}/o.zarr", needles="--case 'case7'", dump=_aprt),
    "import: aprt bad magic": row("import", "--format", "aprt", "{dump}", "--like", "{store}/" + V + "/case0",
                                  "--out", "{tmp}/o.zarr", needles=("{dump}/layer-2/moe_ffn_out.bin", "bad magic"),
                                  dump=lambda d, c: _aprt(d, c, lambda n, b: b"NOPE" + b[4:] if "layer-2" in n else b)),
    "import: aprt truncated": row("import", "--format", "aprt", "{dump}", "--like", "{store}/" + V + "/case0",
                                  "--out", "{tmp}/o.zarr", needles=("{dump}/layer-1/moe_ffn_out.bin", "truncated"),
                                  dump=lambda d, c: _aprt(d, c, lambda n, b: b[:-3] if "layer-1" in n else b)),
    "import: aprt header layer disagrees": row(
        "import", "--format", "aprt", "{dump}", "--like", "{store}/" + V + "/case0", "--out", "{tmp}/o.zarr",
        needles=("{dump}/layer-3/moe_ffn_out.bin", "header layer 0, but its directory is layer-3"),
        dump=lambda d, c: _aprt(d, c, lambda n, b: b[:4] + b"\0\0\0\0" + b[8:] if "layer-3" in n else b)),
    "import: aprt count of another prompt": row(
        "import", "--format", "aprt", "{dump}", "--like", "{store}/" + V + "/case2", "--out", "{tmp}/o.zarr",
        needles=("{dump}/layer-0/moe_ffn_out.bin", "neither every token's (8 x 64 = 512)"), dump=_aprt),
    "import: aprt unknown stage": row("import", "--format", "aprt", "{dump}", "--like", "{store}/" + V + "/case0",
                                      "--out", "{tmp}/o.zarr", needles=("{dump}/layer-0/ffn_gate.bin", "unknown stage"),
                                      dump=lambda d, c: _aprt_plus(d, c, "layer-0/ffn_gate.bin", 0)),
    "import: aprt layer beyond the golden": row(
        "import", "--format", "aprt", "{dump}", "--like", "{store}/" + V + "/case0", "--out", "{tmp}/o.zarr",
        needles=("{dump}/layer-4/moe_ffn_out.bin", "beyond the golden's 4 layers"),
        dump=lambda d, c: _aprt_plus(d, c, "layer-4/moe_ffn_out.bin", 4)),
    "import: sglang hostile pickle": row("import", "--format", "sglang", "{dump}", "--like", "{store}/" + V + "/case0",
                                         "--out", "{tmp}/o.zarr", needles=("{dump}/step=0___rank=0___dump_index=9",
                                                                           "weights_only", "never runs code"),
                                         dump=lambda d, c: _sglang(d, c, extra=_hostile)),
    "import: sglang not a dumper file name": row(
        "import", "--format", "sglang", "{dump}", "--like", "{store}/" + V + "/case0", "--out", "{tmp}/o.zarr",
        needles=("{dump}/moe_out.pt", "not an SGLang dumper file name"),
        dump=lambda d, c: _sglang(d, c, extra=lambda d: (d / "moe_out.pt").write_bytes(b""))),
    "import: sglang two forward passes": row("import", "--format", "sglang", "{dump}", "--like", "{store}/" + V + "/case0",
                                             "--out", "{tmp}/o.zarr", needles=("2 forward passes", "--pass N"),
                                             dump=lambda d, c: _sglang(d, c, steps=(0, 1))),
    "import: sglang rank 1 differs": row("import", "--format", "sglang", "{dump}", "--like", "{store}/" + V + "/case0",
                                         "--out", "{tmp}/o.zarr", needles=("{dump}/step=0___rank=1___", "tensor-parallel",
                                                                           "not supported yet"),
                                         dump=lambda d, c: _sglang(d, c, ranks=(0, 1))),
    "import: sglang other tokens": row("import", "--format", "sglang", "{dump}", "--like", "{store}/" + V + "/case1",
                                       "--out", "{tmp}/o.zarr", needles=("name=input_ids.pt", "the pass ran tokens"),
                                       dump=_sglang),
    "import: --pass on an aprt dump": row("import", "--format", "aprt", "{dump}", "--like", "{store}/" + V + "/case0",
                                          "--pass", "1", "--out", "{tmp}/o.zarr", needles="--pass", dump=_aprt),

    # ------------------------------------------------ calibrate
    "calibrate: unknown dtype": row("calibrate", "{model}", "--tokens", "1", "--dtypes", "float64", needles="unknown dtype 'float64'"),
    "calibrate: no dtypes": row("calibrate", "{model}", "--tokens", "1", "--dtypes", ",", needles="--dtypes ','"),
    "calibrate: margin 0": row("calibrate", "{model}", "--tokens", "1", "--margin", "0", needles="--margin 0"),
    "calibrate: margin inf": row("calibrate", "{model}", "--tokens", "1", "--margin", "inf", needles="--margin inf"),
    "calibrate: margin nan": row("calibrate", "{model}", "--tokens", "1", "--margin", "nan", needles="--margin nan"),
    "calibrate: token out of vocab": row("calibrate", "{model}", "--tokens", "1,99999", needles="token id 99999"),
    "calibrate: --prompt with a merge that is not two tokens": row(
        "calibrate", "{vocab_bad_merge}", "--prompt", "hi", "--dtypes", "float32",
        needles=("{vocab_bad_merge}", "is not two tokens")),
    "calibrate: --tokenizer model on the synthetic byte vocabulary": row(
        "calibrate", "{model}", "--tokenizer", "model", "--dtypes", "float32", needles=("{model}", "'llama' (SentencePiece)")),
    "calibrate: empty prompt": row("calibrate", "{model}", "--prompt", "", needles="--prompt: empty"),
    "calibrate: --json to a directory": row("calibrate", "{model}", "--tokens", "1", "--json", "{tmp}", needles="is a directory"),
    "calibrate: --json missing parent": row("calibrate", "{model}", "--tokens", "1", "--json", "{tmp}/no/c.json",
                                            needles="does not exist"),
    "calibrate: --json exists": row("calibrate", "{model}", "--tokens", "1", "--json", "{tmp}/keep.json", needles="exists"),

    # ------------------------------------------------ usage
    "usage: unknown command": row("frobnicate", needles="invalid choice: 'frobnicate'"),
    "usage: unknown option": row("goldens", "list", "--stoer", "x", needles="unrecognized arguments: --stoer"),
    "usage: missing arguments": row("check", needles=("check: the following arguments are required: model, --suite",
                                                      "(see `moesnap check --help`)")),
    "usage: not an integer": row("model", "make", "{tmp}/m.gguf", "--preset", "tiny", "--layers", "two",
                                 needles="model make: argument --layers: invalid int value: 'two'"),
    "usage: --html to stdout": row(*CHECK, "tiny", *S, "--html", "-", needles="--html -: the HTML report goes to a file"),
})


# ---------------------------------------------------------------- running a row


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_path):
    """One copy of the committed goldens for the rows that do not damage it, and a candidate
    case group with other tokens than every golden case."""
    return _shared(tmp_path_factory.mktemp("bad_inputs"), Path(tiny_path))


def _shared(base: Path, tiny: Path) -> tuple[Path, Path]:
    store = base / "goldens"
    shutil.copytree(REPO_GOLDENS, store)
    cand = base / "cand.zarr"
    assert invoke(["trace", str(tiny), "--tokens", "5,6,7", "--out", str(cand)])[0] == 0
    return store, cand


def _prepare(name: str, r: Row, tmp: Path, shared_store: Path, cand: Path, tiny: Path) -> dict[str, str]:
    """Make what the row names (only that: a row costs milliseconds) and return the placeholders."""
    used = " ".join(r.argv + r.needles)
    store = shared_store
    if r.damage is not None:
        store = tmp / "goldens"
        shutil.copytree(shared_store, store)
        r.damage(store)
    ctx = {"model": str(tiny), "store": str(store), "tmp": str(tmp), "cand": str(cand)}
    bad = name.partition(": model ")[2]
    if bad:
        ctx["model"] = str(BAD_MODELS[bad][0](tmp, tiny))
    if "{tmp}/plain" in used:
        (tmp / "plain").mkdir()
        (tmp / "plain" / "mine.txt").write_text("not a case group")
    if "tool5.toml" in used:
        (tmp / "tool5.toml").write_text("tool = 5\n")
    if "keep.json" in used:
        (tmp / "keep.json").write_text("mine")
    if "{huge_cand}" in used:
        huge = tmp / "huge.zarr"
        shutil.copytree(shared_store / V / "case0", huge)
        _json_edit(huge / "logits" / "zarr.json", lambda d: d.update(shape=[2**40, 272]))
        ctx["huge_cand"] = str(huge)
    if r.dump is not None:
        ctx["dump"] = str(tmp / "dump")
        r.dump(tmp / "dump", shared_store / V / "case0")
    if r.candidate is not None:
        bad_cand = tmp / "bad_cand.zarr"
        shutil.copytree(shared_store / V / "case0", bad_cand)
        r.candidate(bad_cand)
        ctx["bad_cand"] = str(bad_cand)
    if "{nested_vocab}" in used:
        ctx["nested_vocab"] = str(_nested_vocabulary(tmp / "nested.gguf"))
    for key, make in BAD_VOCABS.items():
        if "{" + key + "}" in used:
            ctx[key] = str(make(tmp))
    if "{tiny_copy}" in used:
        ctx["tiny_copy"] = str(_copy_of_tiny(tmp, tiny, "tiny-copy.gguf", lambda d: d))
    if "{other_model}" in used:
        ctx["other_model"] = str(_copy_of_tiny(tmp, tiny, "tiny-edited.gguf", _flip_weight))
    return ctx


def invoke(argv: list[str]) -> tuple[int, str, str]:
    """``moesnap -q ARGV`` in this process: (exit code, stdout, stderr); warnings land on stderr too."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["-q", *argv])
    return code, out.getvalue(), err.getvalue()


#: each store's digest after the last row that ran on it: the next row on the shared store starts from it
#: (nothing writes there between rows) instead of hashing the 300 files again
_SEEN: dict[Path, dict[str, str]] = {}


def run_row(name: str, tmp: Path, shared_store: Path, cand: Path, tiny: Path) -> str:
    """Run one row and assert everything the module promises; return the line the user saw."""
    r = ROWS[name]
    ctx = _prepare(name, r, tmp, shared_store, cand, tiny)
    argv = [a.format(**ctx) for a in r.argv]
    store = Path(ctx["store"])
    before_tmp, before_store = tree_digest(tmp), _SEEN.get(store) or tree_digest(store)
    code, out, err = invoke(argv)
    assert code == 2, (code, out, err)
    assert out == "", out
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("moesnap: error: "), err
    assert not err.removeprefix("moesnap: error: ").startswith(("moesnap", "error")), err     # one prefix, never two
    assert "Traceback" not in err and len(err) < 700, err
    for needle in r.needles:
        assert needle.format(**ctx) in err, (needle.format(**ctx), err)
    _SEEN[store] = after_store = tree_digest(store)
    assert after_store == before_store, "the golden store changed"
    assert tree_digest(tmp) == before_tmp, "files appeared, changed or vanished"
    return err.strip()


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input(name, tmp_path, shared, tiny_path, monkeypatch):
    monkeypatch.chdir(tmp_path)            # a relative default (goldens/) never reaches the repository's store
    store, cand = shared
    run_row(name, tmp_path, store, cand, Path(tiny_path))


def test_cuda_without_a_gpu(tmp_path, tiny_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    for argv in (["trace", str(tiny_path), "--tokens", "1", "--device", "cuda", "--out", str(tmp_path / "o")],
                 ["check", str(tiny_path), "--suite", "tiny", "--store", str(REPO_GOLDENS), "--device", "cuda:0"]):
        code, out, err = invoke(argv)
        assert code == 2 and err.count("\n") == 1 and "no CUDA device is available" in err, err
    assert list(tmp_path.iterdir()) == []


def test_the_catalogue_covers_every_command():
    firsts = {(r.argv[0], r.argv[1] if r.argv[0] in ("goldens", "model") else None) for r in ROWS.values()}
    assert {("model", "make"), ("trace", None), ("goldens", "generate"), ("goldens", "list"), ("goldens", "show"),
            ("goldens", "diff"), ("goldens", "prune"), ("check", None), ("compare", None), ("calibrate", None),
            ("import", None)} <= firsts


def test_repository_goldens_untouched():
    """The rows work on copies: the committed store still verifies."""
    assert invoke(["goldens", "show", "tiny", "--store", str(REPO_GOLDENS)])[0] == 0


# ---------------------------------------------------------------- regressions


def test_golden_array_declaring_a_larger_shape_is_refused_before_reading(tmp_path, shared):
    import tracemalloc

    store = tmp_path / "goldens"
    shutil.copytree(shared[0], store)
    _json_edit(store / V / "case0/logits/zarr.json", lambda d: d.update(shape=[2**17, 272]))
    tracemalloc.start()
    try:
        code, _, err = invoke(["goldens", "show", "tiny", "--store", str(store)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 2 and "case0/logits" in err, err
    assert peak < 32 << 20, f"allocated {peak / 2**20:.0f} MiB for a 20 KiB array"


# ---------------------------------------------------------------- path safety (issue 6, item 4)


def _listing(root: Path) -> set[str]:
    return {str(q.relative_to(root)) for q in root.rglob("*")}


def test_bad_suite_names_are_refused_before_any_write(tmp_path, tiny_path):
    """Neither the CLI nor the library creates anything for a suite that would leave the store."""
    from moesnap.errors import UsageError
    from moesnap.store import LocalGoldenStore

    store = tmp_path / "area" / "store"
    store.mkdir(parents=True)
    for bad in ("../x", "..", "/tmp/x", "a/../../x", "x\x00", "x/..", ".", "~"):
        code, _, err = invoke(["goldens", "generate", str(tiny_path), "--suite", bad, "--store", str(store), "--tokens", "1"])
        assert code == 2 and err.count("\n") == 1, err
        with pytest.raises(UsageError):
            LocalGoldenStore(store).begin(bad)
    assert _listing(tmp_path) == {"area", "area/store"}


def test_generate_writes_only_inside_the_store(tmp_path, tiny_path):
    store = tmp_path / "store"
    (tmp_path / "neighbour.txt").write_text("x")
    code, out, err = invoke(["goldens", "generate", str(tiny_path), "--suite", "s", "--store", str(store), "--tokens", "1,2"])
    assert code == 0, err
    assert out == "s@v0001\n"
    assert {q.split("/")[0] for q in _listing(tmp_path)} == {"store", "neighbour.txt"}
    assert {q for q in _listing(store) if q.count("/") <= 1} == {"s", "s/v0001"}      # no leftovers beside it


def test_a_symlinked_directory_does_not_lead_into_a_golden(tmp_path, tiny_path, shared):
    store = tmp_path / "goldens"
    shutil.copytree(shared[0], store)
    before = tree_digest(store)
    (tmp_path / "link").symlink_to(store / V, target_is_directory=True)
    for argv in (["compare", str(store / V / "case0"), str(store / V / "case0"), "--json", str(tmp_path / "link/r.json")],
                 ["trace", str(tiny_path), "--tokens", "1", "--out", str(tmp_path / "link/case9")],
                 ["calibrate", str(tiny_path), "--tokens", "1", "--dtypes", "float32", "--json", str(tmp_path / "link/c.json")]):
        code, _, err = invoke(argv)
        assert code == 2 and "inside the published golden version" in err, err
    assert tree_digest(store) == before


def test_trace_force_replaces_a_case_group_and_nothing_else(tmp_path, tiny_path):
    out = tmp_path / "o.zarr"
    assert invoke(["trace", str(tiny_path), "--tokens", "1,2", "--out", str(out)])[0] == 0
    code, _, err = invoke(["trace", str(tiny_path), "--tokens", "3,4,5", "--out", str(out)])
    assert code == 2 and "exists (use --force" in err
    assert load_tokens(out) == [1, 2]
    assert invoke(["trace", str(tiny_path), "--tokens", "3,4,5", "--out", str(out), "--force"])[0] == 0
    assert load_tokens(out) == [3, 4, 5]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["o.zarr"]                   # no .tmp / .old left


def load_tokens(path: Path) -> list[int]:
    from moesnap.store.case import load_case

    return load_case(path).tokens.tolist()


def test_reports_are_not_overwritten_without_force(tmp_path, tiny_path, shared):
    store, cand = shared
    golden = str(store / V / "case0")
    same = tmp_path / "same.zarr"
    shutil.copytree(golden, same)
    js, page = tmp_path / "r.json", tmp_path / "r.html"
    js.write_text("mine")
    page.write_text("mine")
    for extra in (["--json", str(js)], ["--html", str(page)]):
        code, _, err = invoke(["compare", golden, str(same), *extra])
        assert code == 2 and "exists (use --force to overwrite)" in err, err
    assert js.read_text() == page.read_text() == "mine"
    code, _, err = invoke(["compare", golden, str(same), "--json", str(js), "--html", str(page), "--force"])
    assert code == 0, err
    assert json.loads(js.read_text())["verdict"] == "pass" and page.read_text().startswith("<!doctype html>")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["r.html", "r.json", "same.zarr"]


def test_model_make_force_replaces_only_with_force(tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    code, _, err = invoke(["model", "make", str(out), "--preset", "tiny", "--layers", "1"])
    assert code == 2 and "exists" in err and out.read_bytes() == b"mine"
    assert invoke(["model", "make", str(out), "--preset", "tiny", "--layers", "1", "--force"])[0] == 0
    assert out.read_bytes()[:4] == b"GGUF" and sorted(q.name for q in tmp_path.iterdir()) == ["m.gguf"]


# ---------------------------------------------------------------- reports are safe (issue 6, item 5)

HOSTILE = "c<script>alert(\"x&y\")<img src=x onerror=alert(1)>'&amp;\u00e9" + __import__("os").fsdecode(b"\xff\xfe")


def test_report_text_from_input_is_escaped_in_html_and_valid_in_json(tmp_path, shared):
    """A golden and a candidate whose paths hold markup, quotes, '&' and bytes that are not UTF-8."""
    store, _ = shared
    golden, cand = tmp_path / HOSTILE, tmp_path / (HOSTILE + "-cand")
    shutil.copytree(store / V / "case0", golden)
    shutil.copytree(store / V / "case0", cand)
    js, page = tmp_path / "r.json", tmp_path / "r.html"
    code, out, err = invoke(["compare", str(golden), str(cand), "--json", str(js), "--html", str(page)])
    assert code == 0, err
    doc = page.read_bytes().decode("utf-8")                      # valid UTF-8
    assert "<script" not in doc and "<img" not in doc
    assert "&lt;script&gt;alert(&quot;x&amp;y&quot;)&lt;img src=x onerror=alert(1)&gt;" in doc
    assert "&#x27;&amp;amp;" in doc                               # the quote and a literal '&amp;' escaped once more
    raw = js.read_bytes().decode("utf-8")
    rep = json.loads(raw)
    assert rep["golden"] == str(golden) and rep["candidate"] == str(cand)   # the odd bytes round-trip
    assert {r["case"] for r in rep["results"]} == {HOSTILE}
    json.dumps(rep, allow_nan=False)                              # no NaN or Infinity anywhere
    assert "\x1b" not in out
    assert sorted(q.name for q in tmp_path.iterdir()) == sorted([golden.name, cand.name, "r.json", "r.html"])


def test_prompt_with_markup_and_escapes_in_a_golden(tmp_path, tiny_path):
    """The prompt lives in the golden's provenance: show prints it escaped, check's reports stay clean."""
    prompt = "<script>alert('&')</script>\x1b[2J\nnext \"q\""
    store = tmp_path / "store"
    assert invoke(["goldens", "generate", str(tiny_path), "--suite", "p", "--store", str(store), "--prompt", prompt])[0] == 0
    code, out, err = invoke(["goldens", "show", "p", "--store", str(store)])
    assert code == 0, err
    assert "\x1b" not in out                                      # the ESC is shown, not sent
    assert "\\x1b" in out and "\\u001b" in out                    # command line / JSON-quoted prompt
    assert all(line.isprintable() for line in out.splitlines())
    js, page = tmp_path / "c.json", tmp_path / "c.html"
    code, out, err = invoke(["check", str(tiny_path), "--suite", "p", "--store", str(store), "--json", str(js), "--html", str(page)])
    assert code == 0, err
    assert "<script" not in page.read_text(encoding="utf-8")
    json.dumps(json.loads(js.read_text(encoding="utf-8")), allow_nan=False)


if __name__ == "__main__":   # python tests/test_bad_inputs.py: the catalogue as a Markdown table
    import os
    import tempfile

    from moesnap.model.synth import tiny_path as _tiny

    os.environ["MOESNAP_NO_PROGRESS"] = "1"
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        store, cand = _shared(base, _tiny())
        print("| input | what the user sees (exit 2) |\n|---|---|")
        for i, name in enumerate(ROWS):
            work = base / f"row{i}"
            work.mkdir()
            try:
                line = run_row(name, work, store, cand, _tiny())
            except AssertionError as e:
                line = f"FAILED: {e}"
            for path, short in ((str(work), "$TMP"), (str(store), "goldens"), (str(cand), "cand.zarr"),
                                (str(_tiny()), "tiny.gguf")):
                line = line.replace(path, short)
            print(f"| {name} | `{line.replace('|', '&#124;')}` |")
