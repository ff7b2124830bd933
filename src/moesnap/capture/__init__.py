"""Engines as candidates: capture other engines' forwards and import their dumps as moesnap cases.

Each adapter turns one engine's view of a Qwen3-MoE forward into a
:class:`~moesnap.case.Case` holding the stages that engine exposes; stages it
cannot see are absent, never reconstructed.  Adapters whose engine is an
optional dependency import it only when called and refuse with one line
(:class:`~moesnap.errors.UsageError`) when it is missing.

- :func:`transformers` (``hf``): forward hooks on a transformers ``Qwen3MoeForCausalLM``.
- :func:`llama_cpp` (``llama``): llama.cpp's own forward of a GGUF, its graph's named tensors.

Both run the prompt, then with ``decode=N`` N decode steps through the engine's own KV cache, and
return the prompt's case with one case per step in its ``steps`` (``attrs`` ``positions`` and
``step``), judged against the golden's rows at those positions (the golden of prompt + continuation
is one reference forward over both).  ``continuation=IDS`` feeds the steps the given tokens
(teacher-forced, as ``check --decode`` does with the golden's); without it each step is fed the
engine's own greedy choice.
- :func:`import_sglang` (``sglang``): the ``.pt`` files of SGLang's tensor dumper.
- :func:`import_aprt` (``aprt``): an aprender trace directory (``layer-<N>/<stage>.bin``).

The two dump importers take the golden case of the same model and prompt (a flat dump holds neither
token ids nor shapes); stages a dump holds for the last token only are marked so (``held_tokens``,
:mod:`moesnap.capture._flat`) and judged on that token alone.

May import: ``gguf``, ``model``, ``case``, ``errors``, ``stages``, ``util``.  Imported by
``run`` (trace ``--engine``, ``import``) and by users' own code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


from ..case import Case
from ._decode import decode_plan


def transformers(model: Any, tokens: Sequence[int], *, decode: int = 0, continuation: Sequence[int] | None = None,
                 attrs: dict[str, Any] | None = None) -> Case:
    """Run ``tokens`` through a transformers ``Qwen3MoeForCausalLM`` and capture every visible stage;
    with ``decode=N``, then N decode steps through transformers' own KV cache (``continuation``: the
    tokens they are fed, teacher-forced; without it each step is fed the model's own greedy choice),
    one case each in the returned case's ``steps``.

    See :func:`moesnap.capture.hf.transformers_case`.  Example::

        from transformers import AutoModelForCausalLM
        import moesnap.capture
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype="bfloat16").cuda()
        case = moesnap.capture.transformers(model, [1, 2, 3], decode=4)
        case.steps[0].positions                     # array([3], dtype=int32)
    """
    from .hf import transformers_case

    return transformers_case(model, tokens, decode=decode, continuation=continuation, attrs=attrs)


def llama_cpp(path: str | Path, tokens: Sequence[int], *, decode: int = 0, continuation: Sequence[int] | None = None,
              attrs: dict[str, Any] | None = None, forget: tuple[int, int] | None = None) -> Case:
    """Run ``tokens`` through llama.cpp's own forward of the GGUF at ``path`` and capture every stage its
    graph names; with ``decode=N``, then N decode steps, one ``llama_decode`` per token through
    llama.cpp's KV cache (``continuation`` as for :func:`transformers`).

    See :func:`moesnap.capture.llama.llama_case` (``forget``: a decode fault planted in llama.cpp's KV cache).
    """
    from .llama import llama_case

    return llama_case(path, tokens, decode=decode, continuation=continuation, attrs=attrs, forget=forget)


def import_sglang(path: str | Path, like: Case, *, forward_pass: int | None = None,
                  attrs: dict[str, Any] | None = None) -> Case:
    """The case one forward pass of an SGLang dump directory holds, shaped like golden case ``like``.

    See :func:`moesnap.capture.sglang.sglang_case`.  Example::

        import moesnap.capture
        from moesnap.store.case import load_case
        case = moesnap.capture.import_sglang("/tmp/dumper/dump_20250101_000000_000000",
                                             load_case("goldens/tiny/v0001/case0"))
    """
    from ._flat import Like
    from .sglang import sglang_case

    return sglang_case(path, Like.of(like), forward_pass=forward_pass, attrs=attrs)


def import_aprt(path: str | Path, like: Case, *, attrs: dict[str, Any] | None = None) -> Case:
    """The case an aprender trace directory holds, shaped like golden case ``like``.

    See :func:`moesnap.capture.aprt.aprt_case`.
    """
    from ._flat import Like
    from .aprt import aprt_case

    return aprt_case(path, Like.of(like), attrs=attrs)


__all__ = ["transformers", "llama_cpp", "import_sglang", "import_aprt", "decode_plan"]
