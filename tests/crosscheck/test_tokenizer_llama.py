"""moesnap's --prompt ids against llama.cpp's tokenizer, id for id, on several vocabularies.

llama.cpp (llama-cpp-python, ``Llama(path, vocab_only=True).tokenize(text, add_bos=True,
special=True)``: what llama-server and llama-cli call on a prompt) against
:func:`moesnap.gguf.tokenizer.gguf_tokenizer` on

* llama.cpp's own real vocabularies (``tests/data/vocab``): GPT-2, GPT-NeoX (no pre-tokenizer
  named: ``default``; user-defined whitespace tokens), StarCoder, Falcon;
* GPT-2's vocabulary under other pre-tokenizers: ``qwen2``, ``llama-bpe`` (BOS added, whole words
  taken before merging), ``qwen35``, ``dbrx``, ``default``;
* byte-level BPEs trained here with a pre-tokenizer's own regexes and Qwen3's control and
  user-defined tokens: ``qwen2`` (Qwen3-MoE's), ``llama-bpe``, ``gpt-2``, ``default``;

each over llama.cpp's tokenizer test texts, 1500 random strings from an alphabet of ASCII,
whitespace runs, contractions, accented Latin, Cyrillic, CJK, Korean, combining marks, exotic
spaces, emoji and digits of other scripts, 300 lines of the training corpus, and a chat prompt
with special tokens.  Every mismatch fails; the count is printed in the crosscheck summary.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from moesnap.gguf.reader import open_gguf
from moesnap.gguf.tokenizer import gguf_tokenizer
from vocabgen import CHAT, qwen_like, real_vocab, retarget
from vocabgen import sample_texts as texts

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.crosscheck


def _real(name: str):
    return lambda tmp: real_vocab(name, tmp)


def _gpt2_as(pre: str | None):
    return lambda tmp: retarget(real_vocab("gpt-2", tmp), tmp / f"gpt-2-as-{pre}.gguf", pre=pre)


def _trained(pre: str):
    return lambda tmp: qwen_like(tmp / f"trained-{pre}.gguf", pre=pre, vocab_size=4000)


VOCABULARIES = {
    "gpt-2": _real("gpt-2"),
    "gpt-neox": _real("gpt-neox"),
    "starcoder": _real("starcoder"),
    "falcon": _real("falcon"),
    "gpt-2 as qwen2": _gpt2_as("qwen2"),
    "gpt-2 as llama-bpe": _gpt2_as("llama-bpe"),
    "gpt-2 as qwen35": _gpt2_as("qwen35"),
    "gpt-2 as dbrx": _gpt2_as("dbrx"),
    "gpt-2 as default": _gpt2_as("default"),
    "trained qwen2": _trained("qwen2"),
    "trained llama-bpe": _trained("llama-bpe"),
    "trained gpt-2": _trained("gpt-2"),
    "trained default": _trained("default"),
}


@pytest.mark.parametrize("name", list(VOCABULARIES))
def test_ids_equal_llama_cpps(name, tmp_path_factory, figures):
    path: Path = VOCABULARIES[name](tmp_path_factory.mktemp("vocab"))
    ours = gguf_tokenizer(open_gguf(path), "model")
    theirs = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    prompts = texts()
    bad = []
    for text in prompts:
        a = ours.encode(text)
        b = theirs.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        if a != b:
            bad.append((text, a, b))
    figures(f"tokenizer {name}", "vs llama.cpp", f"mismatched of {len(prompts)} prompts", len(bad))
    assert not bad, f"{len(bad)} of {len(prompts)} differ; first: {bad[:3]}"


def test_the_qwen2_vocabulary_puts_no_bos_and_parses_special_tokens(tmp_path):
    """What a Qwen3 GGUF says (add_bos_token false, <|im_start|> a control token) is what both do."""
    path = qwen_like(tmp_path / "q.gguf")
    ours = gguf_tokenizer(open_gguf(path), "model").encode(CHAT)
    theirs = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    assert ours == theirs.tokenize(CHAT.encode(), add_bos=True, special=True)
    assert ours[0] == theirs.tokenize(b"<|im_start|>", add_bos=False, special=True)[0]
