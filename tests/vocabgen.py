"""Vocabulary-only GGUF files for the tokenizer tests: trained in-process or copied from a real one.

* :func:`train_bpe` trains a small byte-level BPE with HF ``tokenizers`` on a deterministic
  multilingual corpus (English prose, code, accented Latin, Cyrillic, Greek, CJK, Korean, Arabic,
  emoji, numbers), pre-tokenized by the regexes of the llama.cpp pre-tokenizer it is for, so its
  merges cross the same word boundaries a real vocabulary's do;
* :func:`write_vocab` writes tokens, merges, token types and BOS/EOS settings as a GGUF that
  llama.cpp loads with ``vocab_only=True`` (architecture ``qwen3moe``, no tensors);
* :func:`real_vocab` unpacks one of llama.cpp's real vocabularies kept under ``tests/data/vocab``
  (``models/ggml-vocab-*.gguf`` of llama.cpp, MIT; xz-compressed) and :func:`retarget` rewrites
  one with other metadata (another ``tokenizer.ggml.pre``);
* :func:`model_with_vocab` writes a small qwen3moe model file with a given vocabulary;
* :func:`sample_texts` is what the crosschecks encode both ways.
"""

from __future__ import annotations

import lzma
import random
from pathlib import Path
from typing import Sequence

import gguf
from gguf import TokenType

DATA = Path(__file__).resolve().parent / "data" / "vocab"

#: Qwen3's added tokens: control tokens, and user-defined ones its converter leaves normal-looking
QWEN_CONTROL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_USER_DEFINED = ("<think>", "</think>", "<tool_call>", "</tool_call>")

_WORDS = """the quick brown fox jumps over the lazy dog while a mixture of experts routes every token to
two of its sixty-four experts and the router's softmax picks them in float32 don't can't won't it's we'll
they've I'm you'd HELLO World Python def return import class self lambda yield async await print format
tokenizer merges vocabulary golden snapshot layer stage attention norm rotary embedding logits""".split()
_SCRIPTS = ["éèêàâüöäßçñÅØæœ", "привет мир как дела", "γειά σου κόσμε", "中文字符测试你好世界的模型专家路由",
            "日本語のテキストです", "한국어 텍스트 입니다", "مرحبا بالعالم", "नमस्ते दुनिया", "😀👍🏽🚀✅🎉", "€£©™…—«»", "١٢٣٤ ४५६ Ⅻ ½ ²"]
_CODE = ["def main():\n    return 0\n", "for (int i = 0; i < n; ++i) { x[i] += 1; }\n", "if x == 3:\n\tprint('y')\n",
         "    \n\n  \r\n", "a_b-c.d/e\\f|g@h#i$j%k^l&m*n(o)p[q]r{s}t<u>v", "1234567890 3.14159 1e-6 0x1F"]


def corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic multilingual lines to train on."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        parts = []
        for _ in range(rng.randint(3, 14)):
            r = rng.random()
            if r < 0.6:
                parts.append(rng.choice(_WORDS))
            elif r < 0.8:
                s = rng.choice(_SCRIPTS)
                i = rng.randrange(len(s))
                parts.append(s[i:i + rng.randint(1, 8)])
            elif r < 0.9:
                parts.append(rng.choice(_CODE))
            else:
                parts.append(str(rng.randint(0, 10**rng.randint(1, 7))))
        lines.append(" ".join(parts))
    return lines


def train_bpe(regexes: Sequence[str], *, vocab_size: int = 3000, seed: int = 0) -> tuple[list[str], list[str]]:
    """A byte-level BPE trained by HF tokenizers: (tokens, merges as "a b" strings), the 256 byte
    characters first."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(seed=seed), trainer=trainer)
    import json

    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def write_vocab(path: Path, tokens: Sequence[str], merges: Sequence[str] | None, *, pre: str | None = "qwen2",
                model: str = "gpt2", types: Sequence[int] | None = None, control: Sequence[str] = (),
                user_defined: Sequence[str] = (), bos: int | None = None, eos: int | None = None,
                add_bos: bool | None = None, add_eos: bool | None = None) -> Path:
    """A vocabulary-only GGUF: ``control`` and ``user_defined`` tokens are appended to ``tokens``
    with those types (all others NORMAL unless ``types`` is given)."""
    tokens = list(tokens) + list(control) + list(user_defined)
    if types is None:
        types = ([int(TokenType.NORMAL)] * (len(tokens) - len(control) - len(user_defined))
                 + [int(TokenType.CONTROL)] * len(control) + [int(TokenType.USER_DEFINED)] * len(user_defined))
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if merges is not None:
        w.add_token_merges(list(merges))
    w.add_token_types(list(types))
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_eos is not None:
        w.add_add_eos_token(add_eos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def qwen_like(path: Path, *, pre: str = "qwen2", vocab_size: int = 3000, seed: int = 0) -> Path:
    """A Qwen-style vocabulary: byte-level BPE trained with ``pre``'s regexes, Qwen3's control and
    user-defined tokens, ``<|endoftext|>`` as BOS/EOS, no BOS added (as Qwen3's GGUFs say)."""
    from moesnap.gguf.pretokenizers import lookup

    pt = lookup(pre)
    assert pt is not None, pre
    tokens, merges = train_bpe(pt.regexes, vocab_size=vocab_size, seed=seed)
    eot = len(tokens)
    return write_vocab(path, tokens, merges, pre=pre, control=QWEN_CONTROL, user_defined=QWEN_USER_DEFINED,
                       bos=eot, eos=eot + 2, add_bos=False)


def read_vocab(path: Path) -> dict:
    """tokens, merges, token types and the scalar tokenizer keys of a GGUF (gguf-py's reader)."""
    r = gguf.GGUFReader(str(path))

    def strings(key: str) -> list[str] | None:
        f = r.fields.get(key)
        return None if f is None else [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    f = r.fields.get("tokenizer.ggml.token_type")
    scalars = {k: f2.contents() for k, f2 in r.fields.items()
               if k.startswith("tokenizer.ggml.") and k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                                "tokenizer.ggml.token_type", "tokenizer.ggml.scores")}
    return {"tokens": strings("tokenizer.ggml.tokens"), "merges": strings("tokenizer.ggml.merges"),
            "types": None if f is None else [int(f.parts[i][0]) for i in f.data], **scalars}


def real_vocab(name: str, tmp: Path) -> Path:
    """``tests/data/vocab/ggml-vocab-<name>.gguf.xz`` unpacked into ``tmp``."""
    out = tmp / f"ggml-vocab-{name}.gguf"
    if not out.exists():
        out.write_bytes(lzma.decompress((DATA / f"ggml-vocab-{name}.gguf.xz").read_bytes()))
    return out


def retarget(src: Path, dst: Path, *, pre: str | None, **keys) -> Path:
    """``src``'s tokens, merges and types under another ``tokenizer.ggml.pre`` (None: the key left out);
    ``keys`` (bos, eos, add_bos, add_eos) as :func:`write_vocab` takes them, else ``src``'s."""
    v = read_vocab(src)
    kw = {"bos": v.get("tokenizer.ggml.bos_token_id"), "eos": v.get("tokenizer.ggml.eos_token_id"),
          "add_bos": v.get("tokenizer.ggml.add_bos_token"), "add_eos": v.get("tokenizer.ggml.add_eos_token")}
    kw.update(keys)
    return write_vocab(dst, v["tokens"], v["merges"], pre=pre, model=v["tokenizer.ggml.model"], types=v["types"], **kw)


def byte_chars() -> list[str]:
    """The 256 characters byte-level BPE stands bytes for (GPT-2's table, byte order)."""
    from moesnap.gguf.tokenizer import _gpt2_byte_chars

    return list(_gpt2_byte_chars())


def small_bpe(words: Sequence[str] = ("Ġthe", "Ġquick", "Ġfox", "Hello", "Ġworld", "ing", "er")) -> tuple[list[str], list[str]]:
    """A hand-made byte-level BPE: the 256 byte characters, then each word of ``words`` built left
    to right by one merge per character (tokens, merges)."""
    tokens, merges = byte_chars(), []
    for w in words:
        for i in range(2, len(w) + 1):
            left, piece = w[:i - 1], w[:i]
            if piece not in tokens:
                tokens.append(piece)
                merges.append(f"{left} {w[i - 1]}")
    return tokens, merges


def model_with_vocab(path: Path, tokens: Sequence[str], merges: Sequence[str] | None, **kw) -> Path:
    """A small qwen3moe model file (tests/ggufgen.py's weights) whose vocabulary is ``tokens`` and
    ``merges`` with :func:`write_vocab`'s metadata ``kw`` (``pre``, ``model``, ``control``, ...)."""
    from ggufgen import write_gguf

    control, user = tuple(kw.pop("control", ())), tuple(kw.pop("user_defined", ()))
    full = list(tokens) + list(control) + list(user)
    types = kw.pop("types", None)
    if types is None:
        types = ([int(TokenType.NORMAL)] * len(tokens) + [int(TokenType.CONTROL)] * len(control)
                 + [int(TokenType.USER_DEFINED)] * len(user))
    pre, model = kw.pop("pre", "qwen2"), kw.pop("model", "gpt2")
    raw_merges = kw.pop("raw_merges", None)   # written as given: an array of any type

    class Writer(gguf.GGUFWriter):
        def add_tokenizer_model(self, _model: str) -> None:
            super().add_tokenizer_model(model)
            if pre is not None:
                self.add_tokenizer_pre(pre)
            if raw_merges is not None:
                self.add_array(gguf.Keys.Tokenizer.MERGES, list(raw_merges))
            elif merges is not None:
                self.add_token_merges(list(merges))
            self.add_token_types(list(types))
            for key, add in (("bos", self.add_bos_token_id), ("eos", self.add_eos_token_id),
                             ("add_bos", self.add_add_bos_token), ("add_eos", self.add_add_eos_token)):
                if kw.get(key) is not None:
                    add(kw[key])

        def add_token_list(self, _tokens) -> None:
            super().add_token_list(full)

    real, gguf.GGUFWriter = gguf.GGUFWriter, Writer
    try:
        return write_gguf(path, vocab=len(full))
    finally:
        gguf.GGUFWriter = real


#: what random test strings are drawn from: every kind of text a pre-tokenizer cuts differently
ALPHABET = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") * 3 + list("0123456789") * 3 + [" "] * 12
            + list("\n\r\t'\".,;:!?-_()[]{}<>/\\|@#$%^&*+=~`") + ["'s", "'S", "'ll", "'LL", "'re", "'ve", "'d", "'M"]
            + list("éèàüößçñÅØæ") + list("привет") + list("中文字符测试日本語") + list("한국어") + ["\u0301", "\u0308"]
            + ["\u00a0", "\u3000", "\u2009", "\u200b", "\u0085", "\u2028"]
            + ["😀", "👍🏽", "🚀", "✅", "€", "£", "©", "™", "…", "—", "«", "»"] + ["١٢٣", "४५६", "Ⅻ", "½", "²"])
CHAT = "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi <think>x</think> 123<|im_end|>\n"


def sample_texts(seed: int = 0, n: int = 1500) -> list[str]:
    """llama.cpp's tokenizer test texts, ``n`` random strings of :data:`ALPHABET`, 300 corpus lines and
    prompts with special tokens: what the crosschecks encode both ways."""
    inp = (DATA / "ggml-vocab-test.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    rng = random.Random(seed)
    rand = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 80))) for _ in range(n)]
    return [t for t in inp if t] + rand + corpus(300, seed=seed + 1) + [CHAT, "<|endoftext|>Hello<|endoftext|>"]
