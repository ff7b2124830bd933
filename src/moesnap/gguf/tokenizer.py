"""Prompt text to token ids with the GGUF's own vocabulary, byte by byte.

moesnap does not reimplement BPE or SentencePiece merges.  ``--prompt``
encodes each UTF-8 byte of the text as the vocabulary's token for that byte:
``<0xNN>`` tokens in a ``llama`` (SentencePiece) vocabulary, or the GPT-2
byte-to-unicode character in a ``gpt2`` (BPE) vocabulary such as Qwen3's.
The ids are valid and deterministic, which is all a golden needs; for the ids
an engine's tokenizer would produce, pass ``--tokens``.
"""

from __future__ import annotations

from functools import lru_cache

from ..errors import ModelFileError, UsageError
from .reader import GGUFFile


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


def byte_token_ids(gf: GGUFFile) -> list[int]:
    """The token id of each byte value 0..255 in this file's vocabulary."""
    if not gf.has("tokenizer.ggml.model") or not gf.has("tokenizer.ggml.tokens"):
        raise ModelFileError(f"{gf.path}: has no tokenizer vocabulary; pass --tokens instead of --prompt")
    kind = gf.get("tokenizer.ggml.model")
    tokens = gf.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ModelFileError(f"{gf.path}: metadata key 'tokenizer.ggml.tokens' is not an array of strings; pass --tokens")
    index = {t: i for i, t in enumerate(tokens)}
    if kind == "llama":
        wanted = [f"<0x{b:02X}>" for b in range(256)]
    elif kind == "gpt2":
        wanted = _gpt2_byte_chars()
    else:
        raise ModelFileError(f"{gf.path}: tokenizer model {kind!r} is not supported for --prompt; pass --tokens")
    ids = []
    for b, tok in enumerate(wanted):
        if tok not in index:
            raise ModelFileError(f"{gf.path}: vocabulary has no token for byte 0x{b:02X}; pass --tokens")
        ids.append(index[tok])
    return ids


def encode(gf: GGUFFile, text: str) -> list[int]:
    if not text:
        raise ModelFileError(f"{gf.path}: empty prompt")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:   # a command line that was not UTF-8 (lone surrogates)
        raise UsageError(f"--prompt: not UTF-8 text (undecodable byte at character {e.start})") from None
    table = byte_token_ids(gf)
    return [table[b] for b in data]
