"""A model's own tokenizer through HF ``tokenizers``: built from a GGUF's BPE vocabulary, or read
from a checkpoint's ``tokenizer.json``.

moesnap implements no merge algorithm.  For a GGUF whose ``tokenizer.ggml.model`` is ``gpt2``
(byte-level BPE: Qwen2/3, Llama 3, GPT-2, StarCoder, ...) it hands the file's tokens and merges to
``tokenizers.models.BPE``, puts the regexes ``tokenizer.ggml.pre`` names in front
(:mod:`.pretokenizers`) and behaves as llama.cpp's ``llama_tokenize(add_special=true,
parse_special=true)`` does, which is what ``llama-server`` and ``llama-cli`` call on a prompt:

* the text of a control, user-defined or unknown-typed token (``<|im_start|>``, ``<think>``) is
  that token, wherever it appears in the prompt;
* the BOS token is put first when ``tokenizer.ggml.add_bos_token`` says so (absent: llama.cpp's
  default for the pre-tokenizer, true for ``llama3``), the EOS token last when
  ``tokenizer.ggml.add_eos_token`` does.

Every problem with the vocabulary is a :class:`~moesnap.errors.ModelFileError` naming the file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gguf import Keys, TokenType

from ..errors import ModelFileError
from . import pretokenizers

if TYPE_CHECKING:
    import tokenizers

    from .reader import GGUFFile

#: token types whose text is matched in the prompt before the BPE runs (llama.cpp's special-token cache)
_SPECIAL_TYPES = (int(TokenType.CONTROL), int(TokenType.USER_DEFINED), int(TokenType.UNKNOWN))
#: llama.cpp's default BOS/EOS id for a BPE vocabulary without tokenizer.ggml.bos_token_id
_BPE_DEFAULT_SPECIAL_ID = 11


def library() -> str:
    import tokenizers

    return f"tokenizers {tokenizers.__version__}"


@dataclass(frozen=True)
class HFTokenizer:
    """An HF ``tokenizers.Tokenizer`` plus the ids llama.cpp's convention puts around the text."""

    tokenizer: "tokenizers.Tokenizer"
    provenance: dict[str, Any]
    bos: int | None = None        # put first (GGUF vocabularies; tokenizer.json adds its own)
    eos: int | None = None        # put last
    add_special_tokens: bool = False   # run the tokenizer.json's own post-processor
    where: str = field(default="", compare=False)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens).ids
        return ([self.bos] if self.bos is not None else []) + list(ids) + ([self.eos] if self.eos is not None else [])


# -- a GGUF's byte-level BPE vocabulary --------------------------------------------------------


def _strings(gf: "GGUFFile", key: str) -> list[str]:
    value = gf.get(key)
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ModelFileError(f"{gf.path}: metadata key {key!r} is not an array of strings")
    return value


def _ints(gf: "GGUFFile", key: str, n: int) -> list[int] | None:
    if not gf.has(key):
        return None
    value = gf.get(key)
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ModelFileError(f"{gf.path}: metadata key {key!r} is not an array of integers")
    if len(value) < n:
        raise ModelFileError(f"{gf.path}: metadata key {key!r} has {len(value)} entries for {n} tokens")
    return value


def _flag(gf: "GGUFFile", key: str, default: bool) -> bool:
    if not gf.has(key):
        return default
    value = gf.get(key)
    if not isinstance(value, bool):
        raise ModelFileError(f"{gf.path}: metadata key {key!r} = {value!r} is not a boolean")
    return value


def _special_id(gf: "GGUFFile", key: str, n_tokens: int) -> int | None:
    """llama.cpp's rule: the key's id when it is inside the vocabulary, else the BPE default (11) when
    that is, else none."""
    default = _BPE_DEFAULT_SPECIAL_ID if _BPE_DEFAULT_SPECIAL_ID < n_tokens else None
    if not gf.has(key):
        return default
    value = gf.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ModelFileError(f"{gf.path}: metadata key {key!r} = {value!r} is not a token id")
    return value if value < n_tokens else default


def vocabulary(gf: "GGUFFile") -> list[str]:
    """``tokenizer.ggml.tokens``, each one distinct (llama.cpp refuses a vocabulary that repeats a token)."""
    tokens = _strings(gf, Keys.Tokenizer.LIST)
    if not tokens:
        raise ModelFileError(f"{gf.path}: metadata key {Keys.Tokenizer.LIST!r} is empty")
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t == "":               # llama.cpp's name for an empty token
            t = tokens[i] = f"[EMPTY_{i}]"
        j = seen.setdefault(t, i)
        if j != i:
            raise ModelFileError(f"{gf.path}: {Keys.Tokenizer.LIST!r} holds {t!r} twice (ids {j} and {i})")
    return tokens


def _merges(gf: "GGUFFile", index: dict[str, int]) -> list[tuple[str, str]]:
    key = Keys.Tokenizer.MERGES
    if not gf.has(key):
        raise ModelFileError(f"{gf.path}: BPE vocabulary without {key!r}")
    out = []
    for i, m in enumerate(_strings(gf, key)):
        cut = m.find(" ", 1)      # as llama.cpp splits "a b": at the first space after the first character
        left, right = (m[:cut], m[cut + 1:]) if cut > 0 else ("", "")
        if not left or not right or left not in index or right not in index or left + right not in index:
            raise ModelFileError(f"{gf.path}: {key!r}[{i}] = {m!r} is not two tokens of the vocabulary "
                                 "whose concatenation is one")
        out.append((left, right))
    return out


def from_gguf(gf: "GGUFFile") -> HFTokenizer:
    """The byte-level BPE tokenizer of a ``gpt2`` GGUF vocabulary, as llama.cpp runs it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    pre_name = gf.get(Keys.Tokenizer.PRE) if gf.has(Keys.Tokenizer.PRE) else None
    if pre_name is not None and not isinstance(pre_name, str):
        raise ModelFileError(f"{gf.path}: metadata key {Keys.Tokenizer.PRE!r} = {pre_name!r} is not a string")
    pre = pretokenizers.lookup(pre_name)
    if pre is None:
        known = ", ".join(sorted(pretokenizers.BY_NAME))
        raise ModelFileError(f"{gf.path}: pre-tokenizer {Keys.Tokenizer.PRE} = {pre_name!r} is not one moesnap "
                             f"knows ({known}); pass --tokens, or --tokenizer bytes")
    tokens = vocabulary(gf)
    index = {t: i for i, t in enumerate(tokens)}
    merges = _merges(gf, index)
    types = _ints(gf, Keys.Tokenizer.TOKEN_TYPE, len(tokens))

    try:
        model = models.BPE(vocab=index, merges=merges, ignore_merges=pre.ignore_merges)
    except Exception as e:  # tokenizers raises plain Exceptions
        raise ModelFileError(f"{gf.path}: HF tokenizers refuses the BPE vocabulary: {_first_line(e)}") from None
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    if types is not None:
        special = [tokens[i] for i, t in enumerate(types[:len(tokens)]) if t in _SPECIAL_TYPES]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])

    n = len(tokens)
    add_bos = _flag(gf, Keys.Tokenizer.ADD_BOS, pre.add_bos)
    add_eos = _flag(gf, Keys.Tokenizer.ADD_EOS, False)
    bos = _special_id(gf, Keys.Tokenizer.BOS_ID, n) if add_bos else None
    eos = _special_id(gf, Keys.Tokenizer.EOS_ID, n) if add_eos else None
    if add_bos and bos is None:
        raise ModelFileError(f"{gf.path}: {Keys.Tokenizer.ADD_BOS} is true but there is no BOS token id")
    if add_eos and eos is None:
        raise ModelFileError(f"{gf.path}: {Keys.Tokenizer.ADD_EOS} is true but there is no EOS token id")
    provenance = {"kind": "gguf-bpe", "pre": pre_name if pre_name else "default", "add_bos": add_bos,
                  "add_eos": add_eos, "library": library()}
    return HFTokenizer(tok, provenance, bos=bos, eos=eos, where=str(gf.path))


# -- a checkpoint's tokenizer.json -------------------------------------------------------------


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit] + " …"


def from_tokenizer_json(path: str | Path) -> HFTokenizer:
    """The tokenizer a checkpoint's ``tokenizer.json`` describes, run as transformers runs it
    (``tokenizer.encode(text)``: special tokens in the text parsed, the file's own post-processor
    adding BOS/EOS where it says so)."""
    from tokenizers import Tokenizer

    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError:
        raise ModelFileError(f"{p}: is a directory, not a tokenizer.json") from None
    except OSError as e:
        raise ModelFileError(f"{p}: cannot read the tokenizer: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{p}: not a tokenizer.json (not UTF-8 at byte {e.start})") from None
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises plain Exceptions (serde's message)
        raise ModelFileError(f"{p}: not a tokenizer.json HF tokenizers can read: {_first_line(e)}") from None
    provenance = {"kind": "tokenizer.json", "file": p.name, "sha256": hashlib.sha256(data).hexdigest(),
                  "library": library()}
    return HFTokenizer(tok, provenance, add_special_tokens=True, where=str(p))
