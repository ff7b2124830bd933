"""Reading GGUF files: ``reader`` (bounds-checked header, metadata and tensor records, memory-mapped,
no maths), ``tokenizer`` (prompt text to token ids: the file's own tokenizer or one token per byte),
``hf_tokenizer`` and ``pretokenizers`` (a BPE vocabulary or a tokenizer.json run through HF
tokenizers, with llama.cpp's pre-tokenizer regexes) and ``quants_torch`` (dequantizing GGUF blocks
on any torch device).

May import: :mod:`moesnap.errors`, gguf-py and HF tokenizers; nothing else of moesnap.  (``import
gguf`` inside this package is gguf-py: imports are absolute.)
"""
