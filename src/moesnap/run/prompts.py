"""``--prompt`` for any model moesnap opens: the tokenizer of a GGUF's vocabulary, or of a
checkpoint directory's ``tokenizer.json`` (:mod:`moesnap.gguf.tokenizer` says what ``--tokenizer``
``auto``/``model``/``bytes`` pick)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelFileError, UsageError
from ..gguf.reader import GGUFFile
from ..gguf.tokenizer import CHOICES, Encoded, PromptTokenizer, encode_with, gguf_tokenizer, tokenizer_json

#: the file in an HF checkpoint directory that holds its tokenizer
TOKENIZER_JSON = "tokenizer.json"

#: ``--tokenizer``'s help, the same on every command that takes ``--prompt``
TOKENIZER_HELP = ("how --prompt becomes token ids: model (the model's own tokenizer: a GGUF's BPE vocabulary "
                  "as llama.cpp runs it, a checkpoint's tokenizer.json), bytes (one token per UTF-8 byte), "
                  "auto (default: bytes for moesnap's synthetic byte vocabulary, model otherwise)")


def check_choice(choice: str) -> str:
    """``choice`` when it is a ``--tokenizer`` value, else a UsageError naming it."""
    if choice not in CHOICES:
        raise UsageError(f"--tokenizer {choice!r}: choose one of {', '.join(CHOICES)}")
    return choice


def prompt_tokenizer(model: Any, choice: str = "auto") -> PromptTokenizer:
    """The tokenizer ``--tokenizer choice`` picks for ``model``: a GGUF model's own vocabulary, or the
    ``tokenizer.json`` of a checkpoint directory (``model.path``)."""
    check_choice(choice)
    gf = getattr(model, "file", None)
    if isinstance(gf, GGUFFile):
        return gguf_tokenizer(gf, choice)
    where = Path(model.path)
    if choice == "bytes":
        raise UsageError(f"--tokenizer bytes encodes with a GGUF vocabulary's byte tokens; {where} is a checkpoint "
                         "directory: use its tokenizer.json (--tokenizer auto) or pass --tokens")
    path = where / TOKENIZER_JSON if where.is_dir() else where
    if not path.is_file():
        raise ModelFileError(f"{where}: no {TOKENIZER_JSON} to encode --prompt with; pass --tokens")
    return tokenizer_json(path)


def encode_prompt(tok: PromptTokenizer, text: str, *, model: Any) -> Encoded:
    """``text`` through ``tok`` (an empty or non-UTF-8 prompt refused, naming ``model``'s path)."""
    return encode_with(tok, text, where=model.path)
