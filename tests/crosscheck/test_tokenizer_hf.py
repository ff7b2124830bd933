"""A checkpoint's tokenizer.json: moesnap's ids against transformers' tokenizer, id for id.

``encode_with_tokenizer_json(path, text)`` against ``PreTrainedTokenizerFast(tokenizer_file=path)
.encode(text)`` (what an engine serving the checkpoint through transformers' tokenizer computes:
special tokens in the text parsed, the file's post-processor applied) on a Qwen-style tokenizer.json
(no BOS) and a Llama-3-style one (a post-processor that puts BOS first), over the same texts as the
llama.cpp crosscheck.  And the tokenizer.json written from a GGUF vocabulary encodes as the GGUF
does, so a checkpoint and its GGUF conversion get the same ids.
"""

from __future__ import annotations

import pytest

from moesnap.gguf.reader import open_gguf
from moesnap.gguf.tokenizer import encode_with_tokenizer_json, gguf_tokenizer, tokenizer_json
from vocabgen import qwen_like
from vocabgen import sample_texts as texts

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.crosscheck


def _tokenizer_json(tmp_path, *, bos: bool):
    from tokenizers import processors

    gguf_path = qwen_like(tmp_path / "q.gguf", pre="llama-bpe" if bos else "qwen2", vocab_size=4000)
    tok = gguf_tokenizer(open_gguf(gguf_path), "model")
    hf = tok.tokenizer
    if bos:
        hf.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", hf.token_to_id("<|endoftext|>"))])
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    return gguf_path, path


@pytest.mark.parametrize("style", ["qwen", "llama3"])
def test_ids_equal_transformers(style, tmp_path, figures):
    from transformers import PreTrainedTokenizerFast

    _, path = _tokenizer_json(tmp_path, bos=style == "llama3")
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(path))
    ours = tokenizer_json(path)
    prompts = texts(seed=3)
    bad = [(t, a, b) for t in prompts if (a := ours.encode(t)) != (b := theirs.encode(t))]
    figures(f"tokenizer.json {style}", "vs transformers", f"mismatched of {len(prompts)} prompts", len(bad))
    assert not bad, f"{len(bad)} of {len(prompts)} differ; first: {bad[:3]}"
    first = encode_with_tokenizer_json(path, "Hello").ids[0]
    assert (first == theirs.convert_tokens_to_ids("<|endoftext|>")) == (style == "llama3")


def test_the_gguf_and_its_tokenizer_json_agree(tmp_path):
    gguf_path, path = _tokenizer_json(tmp_path, bos=False)
    from_gguf = gguf_tokenizer(open_gguf(gguf_path), "model")
    from_json = tokenizer_json(path)
    for t in texts(seed=4, n=300):
        assert from_gguf.encode(t) == from_json.encode(t), t
