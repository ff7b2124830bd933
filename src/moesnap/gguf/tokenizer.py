"""Prompt text to token ids: the model's own tokenizer, or one token per UTF-8 byte.

``--tokenizer`` chooses (:data:`CHOICES`):

* ``model``: the model's own tokenizer, the ids an engine would feed.  A GGUF with a byte-level
  BPE vocabulary (``tokenizer.ggml.model = "gpt2"``: Qwen3-MoE's) runs through HF ``tokenizers``
  as llama.cpp runs it (:mod:`.hf_tokenizer`); a checkpoint's ``tokenizer.json`` through
  :func:`tokenizer_json`.  Any other vocabulary type, or a pre-tokenizer moesnap does not know, is
  refused by name.
* ``bytes``: each UTF-8 byte of the text as the vocabulary's token for that byte: ``<0xNN>`` in a
  ``llama`` (SentencePiece) vocabulary, the GPT-2 byte-to-unicode character in a ``gpt2`` one.
  Valid, deterministic ids that no engine would produce; no BOS.
* ``auto`` (the default): ``bytes`` for the byte vocabulary moesnap's synthetic models carry
  (``<unk> <s> </s>``, the 256 byte tokens, ``tok_259`` ...: no real tokenizer exists for it, and the
  committed goldens were made so), ``model`` for every other file.

What produced the ids is recorded with them (:attr:`Encoded.tokenizer`), e.g.
``{"kind": "gguf-bpe", "pre": "qwen2", ...}`` or ``{"kind": "bytes"}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from gguf import Keys

from ..errors import ModelFileError, UsageError
from .reader import GGUFFile

#: ``--tokenizer`` values
CHOICES: tuple[str, ...] = ("auto", "model", "bytes")


@dataclass(frozen=True)
class Encoded:
    """A prompt's token ids and what produced them."""

    ids: list[int]
    tokenizer: dict[str, Any]


class PromptTokenizer(Protocol):
    """Text to token ids, and what to record about how (:attr:`Encoded.tokenizer`)."""

    @property
    def provenance(self) -> dict[str, Any]: ...

    def encode(self, text: str) -> list[int]: ...


# -- one token per byte --------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _gpt2_byte_chars() -> list[str]:
    """GPT-2's reversible byte -> printable unicode character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def _tokens(gf: GGUFFile) -> list[str]:
    if not gf.has(Keys.Tokenizer.MODEL) or not gf.has(Keys.Tokenizer.LIST):
        raise ModelFileError(f"{gf.path}: has no tokenizer vocabulary; pass --tokens instead of --prompt")
    tokens = gf.get(Keys.Tokenizer.LIST)
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ModelFileError(f"{gf.path}: metadata key {Keys.Tokenizer.LIST!r} is not an array of strings; pass --tokens")
    return tokens


def _model(gf: GGUFFile) -> str:
    kind = gf.get(Keys.Tokenizer.MODEL)
    if not isinstance(kind, str):
        raise ModelFileError(f"{gf.path}: metadata key {Keys.Tokenizer.MODEL!r} = {kind!r} is not a string")
    return kind


def byte_token_ids(gf: GGUFFile) -> list[int]:
    """The token id of each byte value 0..255 in this file's vocabulary."""
    tokens = _tokens(gf)
    kind = _model(gf)
    index = {t: i for i, t in enumerate(tokens)}
    if kind == "llama":
        wanted = [f"<0x{b:02X}>" for b in range(256)]
    elif kind == "gpt2":
        wanted = _gpt2_byte_chars()
    else:
        raise ModelFileError(f"{gf.path}: tokenizer model {kind!r} has no byte tokens for --tokenizer bytes; pass --tokens")
    ids = []
    for b, tok in enumerate(wanted):
        if tok not in index:
            raise ModelFileError(f"{gf.path}: vocabulary has no token for byte 0x{b:02X}; pass --tokens")
        ids.append(index[tok])
    return ids


@dataclass(frozen=True)
class ByteTokenizer:
    """Each UTF-8 byte of the text as the vocabulary's token for that byte."""

    table: tuple[int, ...]
    provenance: dict[str, Any]

    def encode(self, text: str) -> list[int]:
        return [self.table[b] for b in text.encode("utf-8")]


def byte_tokenizer(gf: GGUFFile) -> ByteTokenizer:
    return ByteTokenizer(tuple(byte_token_ids(gf)), {"kind": "bytes"})


# -- choosing ----------------------------------------------------------------------------------


def is_synthetic_byte_vocabulary(kind: str, tokens: list[str]) -> bool:
    """The vocabulary moesnap's synthetic models carry (``model/synth.py``): ``llama`` type,
    ``<unk> <s> </s>``, ``<0x00>`` … ``<0xFF>``, then ``tok_<id>`` fillers."""
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    return (kind == "llama" and tokens[:len(head)] == head
            and all(t == f"tok_{i}" for i, t in enumerate(tokens[len(head):], start=len(head))))


def gguf_tokenizer(gf: GGUFFile, choice: str = "auto") -> PromptTokenizer:
    """The tokenizer ``--tokenizer choice`` picks for this GGUF file (see the module docstring)."""
    if choice not in CHOICES:
        raise UsageError(f"--tokenizer {choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "bytes":
        return byte_tokenizer(gf)
    tokens = _tokens(gf)
    kind = _model(gf)
    if choice == "auto" and is_synthetic_byte_vocabulary(kind, tokens):
        return byte_tokenizer(gf)
    if kind == "gpt2":
        from .hf_tokenizer import from_gguf

        return from_gguf(gf)
    name = {"llama": "'llama' (SentencePiece)"}.get(kind, repr(kind))
    raise ModelFileError(f"{gf.path}: tokenizer model {Keys.Tokenizer.MODEL} = {name} is not supported for --prompt "
                         "(moesnap runs byte-level BPE vocabularies, 'gpt2'); pass --tokens, or --tokenizer bytes")


def tokenizer_json(path: str | Path) -> PromptTokenizer:
    """The tokenizer of a checkpoint's ``tokenizer.json`` (HF ``tokenizers``; exit 2 naming the file
    when it does not parse)."""
    from .hf_tokenizer import from_tokenizer_json

    return from_tokenizer_json(path)


# -- encoding ----------------------------------------------------------------------------------


def encode_with(tok: PromptTokenizer, text: str, *, where: str | Path) -> Encoded:
    """``text`` through ``tok``; an empty prompt, one that is not UTF-8 text or one that yields no
    token is refused (``where`` names the model in the message)."""
    if not text:
        raise UsageError("--prompt: empty; give some text, or token ids with --tokens")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:   # a command line that was not UTF-8 (lone surrogates)
        raise UsageError(f"--prompt: not UTF-8 text (undecodable byte at character {e.start})") from None
    ids = [int(i) for i in tok.encode(text)]
    if not ids:
        raise ModelFileError(f"{where}: the prompt {text[:40]!r} yields no token with this tokenizer")
    return Encoded(ids, dict(tok.provenance))


def encode(gf: GGUFFile, text: str, *, tokenizer: str = "auto") -> Encoded:
    """One prompt through the tokenizer ``tokenizer`` picks for this file."""
    if not text:
        raise UsageError("--prompt: empty; give some text, or token ids with --tokens")
    return encode_with(gguf_tokenizer(gf, tokenizer), text, where=gf.path)


def encode_with_tokenizer_json(path: str | Path, text: str) -> Encoded:
    """One prompt through a checkpoint's ``tokenizer.json``."""
    return encode_with(tokenizer_json(path), text, where=path)
