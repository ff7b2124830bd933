"""--prompt end to end: the tokenizer each command picks, the ids it makes, and where it is recorded."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import zarr

from moesnap.cli.main import main
from moesnap.errors import ModelFileError, UsageError
from moesnap.gguf.reader import open_gguf
from moesnap.gguf.tokenizer import gguf_tokenizer
from moesnap.run.prompts import encode_prompt, prompt_tokenizer
from moesnap.store import open_store
from vocabgen import QWEN_CONTROL, QWEN_USER_DEFINED, model_with_vocab, qwen_like, read_vocab

PROMPT = "<|im_start|>user\nHello world, 12345 — 中文<|im_end|>"


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """A small qwen3moe model whose vocabulary is a trained byte-level BPE with the qwen2 pre-tokenizer."""
    tmp = tmp_path_factory.mktemp("bpe_model")
    v = read_vocab(qwen_like(tmp / "vocab.gguf"))
    n = len(v["tokens"]) - len(QWEN_CONTROL) - len(QWEN_USER_DEFINED)
    return model_with_vocab(tmp / "bpe.gguf", v["tokens"][:n], v["merges"], pre="qwen2", control=QWEN_CONTROL,
                            user_defined=QWEN_USER_DEFINED, bos=n, eos=n + 2, add_bos=False)


def test_trace_uses_the_models_tokenizer_and_records_it(bpe_model, tmp_path, capsys):
    out = tmp_path / "case.zarr"
    assert main(["-q", "trace", str(bpe_model), "--prompt", PROMPT, "--out", str(out)]) == 0
    g = zarr.open_group(str(out), mode="r")
    want = gguf_tokenizer(open_gguf(bpe_model), "model").encode(PROMPT)
    assert g["tokens"][:].tolist() == want == g.attrs["token_ids"] and len(want) < len(PROMPT.encode())
    assert g.attrs["prompt"] == PROMPT
    assert g.attrs["tokenizer"]["kind"] == "gguf-bpe" and g.attrs["tokenizer"]["pre"] == "qwen2"


def test_trace_with_bytes_and_with_token_ids(bpe_model, tmp_path, capsys):
    out = tmp_path / "b.zarr"
    assert main(["-q", "trace", str(bpe_model), "--prompt", "Hi é", "--tokenizer", "bytes", "--out", str(out)]) == 0
    g = zarr.open_group(str(out), mode="r")
    assert g["tokens"].shape == (len("Hi é".encode()),) and g.attrs["tokenizer"] == {"kind": "bytes"}
    assert main(["-q", "trace", str(bpe_model), "--tokens", "1,2", "--out", str(tmp_path / "t.zarr")]) == 0
    assert "tokenizer" not in zarr.open_group(str(tmp_path / "t.zarr"), mode="r").attrs


def test_goldens_generate_records_the_tokenizer_per_case(bpe_model, tmp_path, capsys):
    store = tmp_path / "goldens"
    assert main(["-q", "goldens", "generate", str(bpe_model), "--suite", "s", "--store", str(store),
                 "--prompt", PROMPT, "--tokens", "5,6", "--prompt", "Hi"]) == 0
    with open_store(str(store)) as st:
        v = st.open_version("s")
        meta = v.meta
        assert set(meta["tokenizers"]) == {"case0", "case2"} and meta["tokenizers"]["case0"]["pre"] == "qwen2"
        assert v.read_case("case0").attrs["tokenizer"] == meta["tokenizers"]["case0"]
        assert "tokenizer" not in v.read_case("case1").attrs
        assert "--tokenizer" not in meta["command"]
    capsys.readouterr()
    assert main(["-q", "goldens", "show", "s", "--store", str(store), "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer gguf-bpe qwen2" in out and "prompt (token ids)  ids [5, 6]\n" in out


def test_goldens_generate_with_bytes_says_so_in_the_command(bpe_model, tmp_path, capsys):
    store = tmp_path / "goldens"
    assert main(["-q", "goldens", "generate", str(bpe_model), "--suite", "s", "--store", str(store),
                 "--prompt", "Hi", "--tokenizer", "bytes"]) == 0
    with open_store(str(store)) as st:
        meta = st.open_version("s").meta
    assert meta["command"].endswith("--tokenizer bytes") and meta["tokenizers"] == {"case0": {"kind": "bytes"}}


def test_the_tiny_model_keeps_its_byte_ids(tiny_path, tmp_path, capsys):
    """The synthetic byte vocabulary: auto is bytes (the committed goldens' ids), model is refused."""
    store = tmp_path / "goldens"
    assert main(["-q", "goldens", "generate", str(tiny_path), "--suite", "t", "--store", str(store),
                 "--prompt", "Hi"]) == 0
    with open_store(str(store)) as st:
        meta = st.open_version("t").meta
    assert meta["cases"][0]["token_ids"] == [3 + ord("H"), 3 + ord("i")]
    assert meta["tokenizers"] == {"case0": {"kind": "bytes"}}
    capsys.readouterr()
    assert main(["-q", "trace", str(tiny_path), "--prompt", "Hi", "--tokenizer", "model",
                 "--out", str(tmp_path / "x.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'llama' (SentencePiece) is not supported" in err and str(tiny_path) in err


def test_calibrate_records_the_tokenizer(bpe_model, tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["-q", "calibrate", str(bpe_model), "--prompt", "Hello world", "--dtypes", "float32",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["tokenizer"]["pre"] == "qwen2"
    assert data["tokens"] == [gguf_tokenizer(open_gguf(bpe_model), "model").encode("Hello world")]
    assert main(["-q", "calibrate", str(bpe_model), "--tokens", "5,6", "--dtypes", "float32",
                 "--json", str(out), "--force"]) == 0
    assert json.loads(out.read_text())["tokenizer"] is None


# ---------------------------------------------------------------- a checkpoint directory


def test_trace_of_a_checkpoint_encodes_with_its_tokenizer_json(bpe_model, tmp_path, capsys):
    """The same weights and vocabulary as a GGUF and as a checkpoint directory: the same ids."""
    from ckptgen import write_checkpoint
    from moesnap.model.weights import GGUFModel

    ckpt = write_checkpoint(tmp_path / "ckpt", GGUFModel.open(bpe_model))
    tok = gguf_tokenizer(open_gguf(bpe_model), "model")
    tok.tokenizer.save(str(ckpt / "tokenizer.json"))
    out = tmp_path / "c.zarr"
    assert main(["-q", "trace", str(ckpt), "--prompt", PROMPT, "--out", str(out)]) == 0
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["token_ids"] == tok.encode(PROMPT) and g.attrs["tokenizer"]["kind"] == "tokenizer.json"
    (ckpt / "tokenizer.json").write_text("{not json")
    capsys.readouterr()
    assert main(["-q", "trace", str(ckpt), "--prompt", PROMPT, "--out", str(tmp_path / "d.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{ckpt / 'tokenizer.json'}: not a tokenizer.json HF tokenizers can read" in err


def test_a_checkpoint_directory_uses_its_tokenizer_json(bpe_model, tmp_path):
    tok = gguf_tokenizer(open_gguf(bpe_model), "model")
    tok.tokenizer.save(str(tmp_path / "tokenizer.json"))
    ckpt = SimpleNamespace(path=tmp_path)
    enc = encode_prompt(prompt_tokenizer(ckpt), PROMPT, model=ckpt)
    assert enc.ids == tok.encode(PROMPT) and enc.tokenizer["kind"] == "tokenizer.json"
    assert prompt_tokenizer(ckpt, "model").provenance == enc.tokenizer
    with pytest.raises(UsageError, match="--tokenizer bytes encodes with a GGUF vocabulary's byte tokens"):
        prompt_tokenizer(ckpt, "bytes")
    with pytest.raises(UsageError, match="--prompt: empty"):
        encode_prompt(prompt_tokenizer(ckpt), "", model=ckpt)


def test_a_checkpoint_directory_without_tokenizer_json(tmp_path):
    with pytest.raises(ModelFileError, match=f"{tmp_path}: no tokenizer.json to encode --prompt with; pass --tokens"):
        prompt_tokenizer(SimpleNamespace(path=tmp_path))


def test_the_python_api_takes_the_tokenizer(bpe_model, tmp_path):
    import moesnap

    ref = moesnap.generate(bpe_model, "api", ["Hi", [5, 6]], store=tmp_path, tokenizer="bytes")
    with open_store(str(tmp_path)) as st:
        meta = st.open_version(*ref.split("@")).meta
    assert meta["tokenizers"] == {"case0": {"kind": "bytes"}}
    assert meta["cases"][0]["token_ids"] == gguf_tokenizer(open_gguf(bpe_model), "bytes").encode("Hi")
