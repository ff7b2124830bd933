"""``--prompt`` for any model moesnap opens: the tokenizer of a GGUF's vocabulary, or of a
checkpoint directory's ``tokenizer.json`` (:mod:`moesnap.gguf.tokenizer` says what ``--tokenizer``
``auto``/``model``/``bytes`` pick)."""

from __future__ import annotations

import operator
import re
from pathlib import Path
from typing import Any, Sequence

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


# ---------------------------------------------------------------- continuations (--decode, --continuation)

#: ``--continuation`` text that is token ids: comma-separated integers (``5,6,7``; ``42`` is one id)
_IDS = re.compile(r"\s*-?\d+(\s*,\s*-?\d+)*\s*,?\s*")

#: ``--continuation``'s help, the same on every command that takes it
CONTINUATION_HELP = ("the tokens after the prompt: comma-separated token ids (like --tokens), or else text "
                     "encoded with the same tokenizer as --prompt, on its own (not joined to the prompt's text)")


def check_decode(decode: Any, *, option: str = "--decode") -> int:
    """``decode`` (how many decode steps after the prompt) as an int ≥ 0, else a UsageError naming it."""
    try:
        n = operator.index(decode)
    except TypeError:
        raise UsageError(f"{option} {decode!r}: expected a whole number of decode steps") from None
    if isinstance(decode, bool) or n < 0:
        raise UsageError(f"{option} {decode!r}: must be a number of decode steps >= 0")
    return n


def continuation_value(value: str | Sequence[int], *, option: str = "--continuation") -> list[int] | str:
    """One continuation as given: token ids (a sequence of integers, or text of comma-separated
    integers such as ``5,6,7``), else text to encode (:func:`encode_continuation`).  An empty one, a
    negative id or a value that is neither is a UsageError naming it."""
    if isinstance(value, str):
        if not value:
            raise UsageError(f"{option}: empty; give token ids like 5,6,7 or text")
        if not _IDS.fullmatch(value):
            return value
        ids = [int(t) for t in value.replace(" ", "").split(",") if t]
    else:
        try:
            ids = [operator.index(t) for t in value]
        except TypeError:
            raise UsageError(f"{option} {value!r}: expected token ids like [5, 6, 7] or text") from None
        if not ids:
            raise UsageError(f"{option}: an empty list of token ids")
    negative = [t for t in ids if t < 0]
    if negative:
        raise UsageError(f"{option} {value!r}: token id {negative[0]} is negative")
    return ids


def check_continuation_length(ids: Sequence[int], decode: int | None, *, what: str = "--continuation") -> None:
    """A continuation of ``decode`` tokens where ``--decode`` is given too, else a UsageError saying both."""
    if decode is not None and len(ids) != decode:
        raise UsageError(f"{what} holds {len(ids)} token{'' if len(ids) == 1 else 's'} and --decode {decode} asks for "
                         f"{decode}: give a continuation of {decode} tokens, or leave one of the two out")


def encode_continuation(tok: PromptTokenizer, text: str, *, model: Any, option: str = "--continuation") -> list[int]:
    """Continuation ``text`` through ``tok``, on its own (its ids follow the prompt's; a BPE never merges
    across the two); one that is not UTF-8 or yields no token is refused, naming ``model``'s path."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{option}: not UTF-8 text (undecodable byte at character {e.start})") from None
    ids = [int(i) for i in tok.encode(text)]
    if not ids:
        raise UsageError(f"{option} {text[:40]!r}: yields no token with the tokenizer of {model.path}")
    return ids
