"""Qwen3-MoE as moesnap computes it: ``config`` (hyper-parameters from GGUF metadata), ``weights``
(GGUF names to model weights, dequantized lazily), ``recorder`` (explicit stage capture),
``reference`` (the plain CPU forward everything is judged against), ``candidate`` (the GPU-minded
second implementation), ``inject`` (planted faults) and ``synth`` (synthetic GGUF files).

May import: :mod:`moesnap.gguf`, :mod:`moesnap.errors`, :mod:`moesnap.stages`, :mod:`moesnap.util`;
never the store, the judge, the use cases or the command line (the candidate's router replay is
handed the judge's tie rule as an argument).
"""
