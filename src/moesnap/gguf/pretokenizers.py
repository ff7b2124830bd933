"""llama.cpp's BPE pre-tokenizers: what ``tokenizer.ggml.pre`` names, and the regexes it splits text with.

A byte-level BPE vocabulary (``tokenizer.ggml.model = "gpt2"``) does not say how text is cut into
words before the merges run; the GGUF names it in ``tokenizer.ggml.pre`` and llama.cpp keeps the
table.  The regex strings below are copied verbatim from llama.cpp's ``src/llama-vocab.cpp``
(``llm_tokenizer_bpe``'s constructor; the names and flags from ``llama_vocab::impl::load``),
the C++ escapes undone.  Several regexes are applied in turn, each splitting the pieces the
previous one left, and the text between matches stays a piece of its own (HF tokenizers'
``Split(..., behavior="isolated")`` in a ``Sequence``).

The table holds the pre-tokenizers checked id for id against llama.cpp
(``tests/crosscheck/test_tokenizer_llama.py``): ``default``, ``llama3`` (with ``dbrx``, ``smaug``,
``chatglm4``), ``gpt2``, ``qwen2`` (Qwen2/Qwen3 and Qwen3-MoE), ``qwen35``, ``starcoder``,
``falcon``.  Any other ``tokenizer.ggml.pre`` (deepseek's regexes of literal non-ASCII ranges,
llama.cpp's hand-written splitters for kimi-k2 or afmoe, ...) is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PreTokenizer:
    """One of llama.cpp's ``LLAMA_VOCAB_PRE_TYPE_*``: its regexes and the flags it sets."""

    kind: str                      # llama.cpp's pre type, lower case ("qwen2", "llama3", ...)
    regexes: tuple[str, ...]       # applied in order
    ignore_merges: bool = False    # a word already in the vocabulary is one token, merges or not
    add_bos: bool = False          # llama.cpp's default, before tokenizer.ggml.add_bos_token


# -- the regexes (llama-vocab.cpp, llm_tokenizer_bpe::llm_tokenizer_bpe) ------------------------

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
         r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN35 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
          r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_DEFAULT = PreTokenizer("default", (r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_LLAMA3 = PreTokenizer("llama3", (LLAMA3,), ignore_merges=True, add_bos=True)
_DBRX = PreTokenizer("dbrx", (LLAMA3,))
_SMAUG = PreTokenizer("smaug", (LLAMA3,))
_CHATGLM4 = PreTokenizer("chatglm4", (LLAMA3,))
_GPT2 = PreTokenizer("gpt2", (GPT2,))
_QWEN2 = PreTokenizer("qwen2", (QWEN2,))
_QWEN35 = PreTokenizer("qwen35", (QWEN35,))
_STARCODER = PreTokenizer("starcoder", (r"\p{N}", GPT2))
_FALCON = PreTokenizer("falcon", (r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"))

#: ``tokenizer.ggml.pre`` value -> pre-tokenizer, as llama.cpp's ``llama_vocab::impl::load`` maps them
BY_NAME: dict[str, PreTokenizer] = {
    "default": _DEFAULT,
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
                    _LLAMA3),
    "dbrx": _DBRX,
    "smaug-bpe": _SMAUG,
    **dict.fromkeys(("glm4", "chatglm-bpe"), _CHATGLM4),
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
                     "mellum", "modern-bert", "exaone4", "mpt", "olmo", "jais", "trillion", "granite-docling"), _GPT2),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan", "solar-open"), _QWEN2),
    "qwen35": _QWEN35,
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"), _STARCODER),
    "falcon": _FALCON,
}


def lookup(name: str | None) -> PreTokenizer | None:
    """The pre-tokenizer ``tokenizer.ggml.pre = name`` selects (``default`` when the key is absent),
    or None when moesnap does not know it."""
    return _DEFAULT if name is None or name == "" else BY_NAME.get(name)
