"""Engines as candidates: capture other engines' forwards and import their dumps as moesnap cases.

Each adapter turns one engine's view of a Qwen3-MoE forward into a
:class:`~moesnap.case.Case` holding the stages that engine exposes; stages it
cannot see are absent, never reconstructed.  Adapters whose engine is an
optional dependency import it only when called and refuse with one line
(:class:`~moesnap.errors.UsageError`) when it is missing.

- :func:`transformers` (``hf``): forward hooks on a transformers ``Qwen3MoeForCausalLM``.

May import: ``gguf``, ``model``, ``case``, ``errors``, ``stages``, ``util``.  Imported by
``run`` (trace ``--engine``, ``import``) and by users' own code.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..case import Case


def transformers(model: Any, tokens: Sequence[int], *, attrs: dict[str, Any] | None = None) -> Case:
    """Run ``tokens`` through a transformers ``Qwen3MoeForCausalLM`` and capture every visible stage.

    See :func:`moesnap.capture.hf.transformers_case`.  Example::

        from transformers import AutoModelForCausalLM
        import moesnap.capture
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype="bfloat16").cuda()
        case = moesnap.capture.transformers(model, [1, 2, 3])
    """
    from .hf import transformers_case

    return transformers_case(model, tokens, attrs=attrs)


__all__ = ["transformers"]
