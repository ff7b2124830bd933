"""The prompt tokenizers without llama.cpp: choosing one, building one from a GGUF vocabulary or a
tokenizer.json, what they put around the text, and every way a vocabulary can be refused.

Id-for-id agreement with llama.cpp is tests/crosscheck/test_tokenizer_llama.py's business.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesnap.errors import ModelFileError, UsageError
from moesnap.gguf import pretokenizers
from moesnap.gguf.reader import open_gguf
from moesnap.gguf.tokenizer import (CHOICES, ByteTokenizer, encode, encode_with_tokenizer_json, gguf_tokenizer,
                                    is_synthetic_byte_vocabulary, tokenizer_json)
from vocabgen import QWEN_CONTROL, QWEN_USER_DEFINED, byte_chars, qwen_like, small_bpe, write_vocab


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    """A trained byte-level BPE with the qwen2 pre-tokenizer and Qwen3's added tokens."""
    return qwen_like(tmp_path_factory.mktemp("vocab") / "qwen.gguf")


@pytest.fixture(scope="module")
def qwen_tok(qwen):
    return gguf_tokenizer(open_gguf(qwen), "model")


def vocab_file(tmp_path: Path, name: str = "v.gguf", **kw) -> Path:
    tokens, merges = kw.pop("vocab", None) or small_bpe()
    return write_vocab(tmp_path / name, tokens, merges, **kw)


# ---------------------------------------------------------------- the pre-tokenizer table


def test_the_regexes_are_llama_cpps_strings():
    """Spot checks against the C++ literals of llama-vocab.cpp, escapes undone by hand."""
    cpp_qwen2 = ("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
                 "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
    assert pretokenizers.lookup("qwen2").regexes == (cpp_qwen2,)
    assert pretokenizers.lookup("gpt-2").regexes == ("'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",)
    assert pretokenizers.lookup("llama-bpe").regexes[0].replace("\\p{N}{1,3}", "\\p{N}") == cpp_qwen2
    assert len(pretokenizers.lookup("default").regexes) == 4
    assert pretokenizers.lookup(None) is pretokenizers.lookup("") is pretokenizers.lookup("default")


def test_every_named_pre_tokenizer_builds(tmp_path):
    """Every name in the table gives a tokenizer that encodes (the regexes compile in HF's engine)."""
    for name in sorted(set(pretokenizers.BY_NAME)):
        tok = gguf_tokenizer(open_gguf(vocab_file(tmp_path, f"{name}.gguf", pre=name)), "model")
        assert tok.encode("Hello the quick fox, 12345 don't\n\n  x") and tok.provenance["pre"] == name


def test_llama3_flags():
    llama3 = pretokenizers.lookup("llama-bpe")
    assert llama3.ignore_merges and llama3.add_bos
    assert not pretokenizers.lookup("qwen2").ignore_merges and not pretokenizers.lookup("qwen2").add_bos
    assert pretokenizers.lookup("nope") is None


# ---------------------------------------------------------------- choosing


def test_the_synthetic_byte_vocabulary_defaults_to_bytes(tiny_path):
    gf = open_gguf(tiny_path)
    tok = gguf_tokenizer(gf)
    assert isinstance(tok, ByteTokenizer) and tok.provenance == {"kind": "bytes"}
    enc = encode(gf, "Hi é")
    assert enc.ids == [3 + b for b in "Hi é".encode()] and enc.tokenizer == {"kind": "bytes"}
    assert encode(gf, "Hi é", tokenizer="bytes") == enc


def test_the_synthetic_byte_vocabulary_has_no_model_tokenizer(tiny_path):
    with pytest.raises(ModelFileError, match=r"tiny\.gguf: tokenizer model .*'llama' \(SentencePiece\).*--tokenizer bytes"):
        encode(open_gguf(tiny_path), "Hi", tokenizer="model")


def test_is_synthetic_byte_vocabulary():
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    assert is_synthetic_byte_vocabulary("llama", head + ["tok_259", "tok_260"])
    assert not is_synthetic_byte_vocabulary("gpt2", head + ["tok_259"])
    assert not is_synthetic_byte_vocabulary("llama", head + ["tok_259", "▁the"])
    assert not is_synthetic_byte_vocabulary("llama", head[:-1])


def test_a_bpe_vocabulary_defaults_to_its_tokenizer(qwen, qwen_tok):
    enc = encode(open_gguf(qwen), "Hello world")
    assert enc.tokenizer["kind"] == "gguf-bpe" and enc.tokenizer["pre"] == "qwen2"
    assert enc.tokenizer["library"].startswith("tokenizers ")
    assert enc.ids == qwen_tok.encode("Hello world") and len(enc.ids) < len("Hello world")


def test_bytes_on_a_bpe_vocabulary_uses_the_byte_characters(qwen):
    gf = open_gguf(qwen)
    tokens = gf.get("tokenizer.ggml.tokens")
    chars = byte_chars()
    assert encode(gf, "é a", tokenizer="bytes").ids == [tokens.index(chars[b]) for b in "é a".encode()]
    assert [chars[b] for b in "é a".encode()] == ["Ã", "©", "Ġ", "a"]


def test_unknown_choice():
    assert CHOICES == ("auto", "model", "bytes")
    with pytest.raises(UsageError, match="--tokenizer 'sentencepiece': choose one of auto, model, bytes"):
        gguf_tokenizer(None, "sentencepiece")  # type: ignore[arg-type]


def test_empty_and_non_utf8_prompts(qwen):
    gf = open_gguf(qwen)
    with pytest.raises(UsageError, match="--prompt: empty; give some text"):
        encode(gf, "")
    with pytest.raises(UsageError, match="--prompt: not UTF-8"):
        encode(gf, "ab\udcff")


# ---------------------------------------------------------------- what a BPE tokenizer does


def test_added_tokens_are_parsed_and_no_bos_is_added(qwen, qwen_tok):
    tokens = open_gguf(qwen).get("tokenizer.ggml.tokens")
    ids = qwen_tok.encode("<|im_start|>user\nHi<think>x</think><|im_end|>")
    for t in ("<|im_start|>", "<think>", "</think>", "<|im_end|>"):
        assert tokens.index(t) in ids, t
    assert ids[0] == tokens.index("<|im_start|>")
    assert set(QWEN_CONTROL) | set(QWEN_USER_DEFINED) <= set(tokens)


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=80))
def test_byte_level_bpe_is_lossless(qwen_tok, text):
    """Decoding the ids gives the text back, whatever it holds (no special-token text in it)."""
    ids = qwen_tok.encode(text)
    assert qwen_tok.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_bos_and_eos_as_the_metadata_says(tmp_path):
    tokens, merges = small_bpe()
    n = len(tokens)
    plain = gguf_tokenizer(open_gguf(vocab_file(tmp_path, "plain.gguf", control=["<s>", "</s>"])))
    both = gguf_tokenizer(open_gguf(vocab_file(tmp_path, "both.gguf", control=["<s>", "</s>"], bos=n, eos=n + 1,
                                               add_bos=True, add_eos=True)))
    body = plain.encode("Hello world")
    assert both.encode("Hello world") == [n, *body, n + 1]
    assert both.provenance["add_bos"] and both.provenance["add_eos"]
    # llama3's default adds BOS; with no bos_token_id llama.cpp falls back to id 11
    llama3 = gguf_tokenizer(open_gguf(vocab_file(tmp_path, "l3.gguf", pre="llama-bpe")))
    assert llama3.encode("Hello")[0] == 11 and llama3.provenance["add_bos"]
    off = gguf_tokenizer(open_gguf(vocab_file(tmp_path, "l3off.gguf", pre="llama-bpe", add_bos=False)))
    assert off.encode("Hello") == plain.encode("Hello")


def test_ignore_merges_takes_a_whole_word_from_the_vocabulary(tmp_path):
    """'Ġfoxy' is a token no merge reaches: llama3 (ignore_merges) takes it whole, qwen2 merges."""
    tokens, merges = small_bpe()
    tokens = tokens + ["Ġfoxy"]
    l3 = gguf_tokenizer(open_gguf(write_vocab(tmp_path / "l3.gguf", tokens, merges, pre="llama-bpe", add_bos=False)))
    q2 = gguf_tokenizer(open_gguf(write_vocab(tmp_path / "q2.gguf", tokens, merges, pre="qwen2")))
    assert l3.encode(" foxy") == [tokens.index("Ġfoxy")]
    assert q2.encode(" foxy") == [tokens.index("Ġfox"), tokens.index("y")]


# ---------------------------------------------------------------- vocabularies refused


@pytest.mark.parametrize("kw, needle", [
    ({"pre": "nope"}, "pre-tokenizer tokenizer.ggml.pre = 'nope' is not one moesnap knows"),
    ({"pre": "deepseek-coder"}, "'deepseek-coder' is not one moesnap knows"),
    ({"model": "t5"}, "tokenizer model tokenizer.ggml.model = 't5' is not supported"),
    ({"merges": None}, "BPE vocabulary without 'tokenizer.ggml.merges'"),
    ({"merges": ["Ġ t", "Ġtqq"]}, "'tokenizer.ggml.merges'[1] = 'Ġtqq' is not two tokens of the vocabulary"),
    ({"merges": ["Ġ t", "x y"]}, "'tokenizer.ggml.merges'[1] = 'x y' is not two tokens"),
    ({"tokens": ["a", "b", "a"]}, "'tokenizer.ggml.tokens' holds 'a' twice (ids 0 and 2)"),
    ({"types": [1, 2]}, "'tokenizer.ggml.token_type' has 2 entries for"),
])
def test_a_bad_vocabulary_is_refused_naming_the_file(tmp_path, kw, needle):
    tokens, merges = small_bpe()
    tokens = kw.pop("tokens", tokens)
    merges = kw.pop("merges", merges)
    path = write_vocab(tmp_path / "bad.gguf", tokens, merges, **kw)
    with pytest.raises(ModelFileError) as e:
        encode(open_gguf(path), "Hello", tokenizer="model")
    assert str(e.value).startswith(f"{path}: ") and needle in str(e.value) and "\n" not in str(e.value)


def test_bytes_needs_the_byte_tokens(tmp_path):
    path = write_vocab(tmp_path / "few.gguf", ["a", "b", "ab"], ["a b"])
    with pytest.raises(ModelFileError, match="few.gguf: vocabulary has no token for byte 0x00"):
        encode(open_gguf(path), "ab", tokenizer="bytes")
    assert encode(open_gguf(path), "ab", tokenizer="model").ids == [2]


# ---------------------------------------------------------------- tokenizer.json


def _tokenizer_json(tmp_path: Path, qwen_tok) -> Path:
    path = tmp_path / "tokenizer.json"
    qwen_tok.tokenizer.save(str(path))
    return path


def test_tokenizer_json_encodes_as_the_tokenizer(tmp_path, qwen_tok):
    path = _tokenizer_json(tmp_path, qwen_tok)
    text = "<|im_start|>Hello world, 12345 — 中文<|im_end|>"
    enc = encode_with_tokenizer_json(path, text)
    assert enc.ids == qwen_tok.encode(text)
    import hashlib

    assert enc.tokenizer == {"kind": "tokenizer.json", "file": "tokenizer.json",
                             "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                             "library": qwen_tok.provenance["library"]}


def test_tokenizer_json_runs_its_post_processor(tmp_path, qwen_tok):
    """A BOS the file's own post-processor adds is added (transformers' encode does the same)."""
    from tokenizers import processors

    tok = qwen_tok.tokenizer
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[
        ("<|endoftext|>", tok.token_to_id("<|endoftext|>"))])
    try:
        path = _tokenizer_json(tmp_path, qwen_tok)
    finally:
        tok.post_processor = None
    assert encode_with_tokenizer_json(path, "Hi").ids == [tok.token_to_id("<|endoftext|>"), *qwen_tok.encode("Hi")]


@pytest.mark.parametrize("content, needle", [
    (b"{not json", "not a tokenizer.json HF tokenizers can read: "),
    (b'{"version": "1.0"}', "not a tokenizer.json HF tokenizers can read: "),
    (b"\xff\xfe{}", "not a tokenizer.json (not UTF-8 at byte 0)"),
    (json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}).encode(), "can read: "),
])
def test_a_tokenizer_json_that_does_not_parse(tmp_path, content, needle):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(ModelFileError) as e:
        tokenizer_json(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and needle in msg and "\n" not in msg and len(msg) < 400


def test_a_missing_tokenizer_json(tmp_path):
    with pytest.raises(ModelFileError, match="missing.json: cannot read the tokenizer"):
        tokenizer_json(tmp_path / "missing.json")
    with pytest.raises(ModelFileError, match="is a directory, not a tokenizer.json"):
        tokenizer_json(tmp_path)
