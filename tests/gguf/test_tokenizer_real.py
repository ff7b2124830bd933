"""Real vocabularies without llama.cpp: GPT-2's, StarCoder's and Falcon's GGUF vocabularies
(tests/data/vocab) encode llama.cpp's tokenizer test texts to the ids their original HF tokenizers
give (llama.cpp's ``models/ggml-vocab-*.gguf.out``, one line of ids per text)."""

from __future__ import annotations

import pytest

from moesnap.gguf.reader import open_gguf
from moesnap.gguf.tokenizer import encode, gguf_tokenizer
from vocabgen import DATA, real_vocab

SEP = "\n__ggml_vocab_test__\n"


@pytest.mark.parametrize("name, pre", [("gpt-2", "gpt-2"), ("starcoder", "starcoder"), ("falcon", "falcon")])
def test_ids_equal_the_original_tokenizers(name, pre, tmp_path):
    texts = (DATA / "ggml-vocab-test.inp").read_text(encoding="utf-8").split(SEP)
    lines = (DATA / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    gf = open_gguf(real_vocab(name, tmp_path))
    tok = gguf_tokenizer(gf)            # auto: a real BPE vocabulary gets its own tokenizer
    assert tok.provenance["kind"] == "gguf-bpe" and tok.provenance["pre"] == pre
    pairs = [(t, [int(i) for i in line.split()]) for t, line in zip(texts, lines) if t]
    assert len(pairs) == 45
    assert [tok.encode(t) for t, _ in pairs] == [ids for _, ids in pairs]
    assert encode(gf, "Hello world").ids == tok.encode("Hello world")
