"""Reading GGUF files: ``reader`` (bounds-checked header, metadata and tensor records, memory-mapped,
no maths), ``tokenizer`` (prompt text to token ids from the file's vocabulary) and ``quants_torch``
(dequantizing GGUF blocks on any torch device).

May import: :mod:`moesnap.errors` and gguf-py; nothing else of moesnap.  (``import gguf`` inside
this package is gguf-py: imports are absolute.)
"""
