"""Golden versions: generate and prune (the logic behind ``moesnap goldens generate|prune``).

``goldens list|show`` is :mod:`moesnap.run.goldens_show`, ``goldens diff`` is
:mod:`moesnap.run.goldens_diff` (what changed) and :mod:`moesnap.run.goldens_diff_text` (saying it).
Storing is :mod:`moesnap.store`'s business and judging is the classifier's; these modules only
string them together.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import operator
import platform
import shlex
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import UsageError
from ..store import GoldenStore, GoldenVersion, PruneResult, validate_suite
from ..store.base import interrupts_held
from ..stages import GOLDEN_DTYPES
from ..util import plural, printable, show_progress_switch, status

#: the provenance ``kind`` of a pytest snapshot suite (the ``moesnap_snapshot`` fixture's named arrays)
SNAPSHOT_KIND = "moesnap_snapshot"

#: what :func:`generate` takes for one case: ``("tokens", [1, 2, 3])`` (or the ``--tokens`` text
#: ``"1,2,3"``), or ``("prompt", text)``
Input = tuple[str, "str | Sequence[int]"]

#: what :func:`generate` takes for one case's continuation: ``("tokens", [5, 6])`` (or the text
#: ``"5,6"``), or ``("text", text)`` encoded by the prompt's tokenizer on its own
Continuation = tuple[str, "str | Sequence[int]"]


def is_snapshot(v: GoldenVersion) -> bool:
    """A pytest snapshot suite (the ``moesnap_snapshot`` fixture's named arrays), not a forward's cases."""
    return v.meta.get("kind") == SNAPSHOT_KIND


# ---------------------------------------------------------------- generate


def token_ids(value: str | Sequence[int]) -> list[int]:
    """A case's token ids: the ``--tokens`` text ``"1,2,3"`` parsed, or a sequence of integers
    (Python or numpy) checked; an empty list or a value that is not an integer is a UsageError."""
    if isinstance(value, str):
        from .trace import parse_tokens

        return parse_tokens(value)
    try:
        ids = [operator.index(t) for t in value]
    except TypeError:
        raise UsageError(f"token ids {value!r}: expected a list of integers like [1, 2, 3]") from None
    if not ids:
        raise UsageError("an empty list of token ids")
    return ids


def check_continuations(inputs: Sequence[Input], decode: int | None,
                        continuation: Sequence[Continuation] | None) -> list[list[int] | str] | None:
    """Each case's continuation as given (token ids, or text still to encode), one per case in order,
    or None; refused in one line: a count that is not one per case, an id list whose length is not
    ``decode``, ``decode`` 0 with a continuation.  Needs no model (the command line calls it before
    torch loads)."""
    from .prompts import check_continuation_length, continuation_value

    if continuation is None:
        return None
    out: list[list[int] | str] = []
    for kind, value in continuation:
        if kind not in ("tokens", "text"):
            raise UsageError(f"continuation kind {kind!r}: expected 'tokens' or 'text'")
        if kind == "text":
            if not isinstance(value, str) or not value:
                raise UsageError(f"--continuation {value!r}: expected non-empty text")
            out.append(value)
        else:
            ids = continuation_value(value)
            if isinstance(ids, str):
                raise UsageError(f"--continuation {value!r}: expected comma-separated token ids like 5,6,7")
            out.append(ids)
    if len(out) != len(inputs):
        raise UsageError(f"{plural(len(out), '--continuation')} for {plural(len(inputs), 'case')}: give one "
                         f"--continuation per case (--tokens or --prompt), the k-th for the k-th case")
    if decode == 0:
        raise UsageError("--decode 0 with --continuation: the continuation is fed to decode steps; give --decode "
                         "as its length, or leave --decode out")
    for i, c in enumerate(out):
        if isinstance(c, list):
            check_continuation_length(c, decode, what=f"--continuation {i + 1} (case{i})")
    return out


def generate(model_path: str | Path, suite: str, *, store: GoldenStore, inputs: Sequence[Input],
             dtype: str = "float32", command: str | None = None,
             tokenizer: str = "auto", decode: int | None = None,
             continuation: Sequence[Continuation] | None = None) -> GoldenVersion:
    """Run the reference forward over each input and publish the cases as one new version.

    ``inputs`` are ``("tokens", ids)`` (a list of integers, or the ``--tokens`` text ``"1,2,3"``)
    or ``("prompt", text)`` pairs; case ``i`` is named ``case{i}``.  A prompt goes through the
    tokenizer ``tokenizer`` picks (:func:`moesnap.run.prompts.prompt_tokenizer`), recorded as the
    case's ``tokenizer`` attribute.  Every input is validated before anything is written; the
    version becomes visible only once every case is stored, and an interrupt (KeyboardInterrupt)
    leaves either the whole version or nothing of it.

    Beyond one prefill: ``decode=N`` makes each case its prompt followed by the reference's own
    greedy continuation of N tokens, and ``continuation`` (one ``("tokens", ids)`` or ``("text",
    text)`` per case, in order; N tokens each where ``decode`` is given) a given one.  Either way the
    case is ONE reference forward over prompt + continuation (:func:`moesnap.run.trace.continued_reference`),
    its rows at positions >= the prompt's length the golden of each decode step (``check --decode``),
    with attributes ``prompt_tokens``, ``continuation`` and ``decode``, recorded in the version's
    provenance too (``continuations``).
    """
    from .prompts import check_decode

    n_decode = None if decode is None else check_decode(decode)
    given_after = check_continuations(inputs, n_decode, continuation)
    with interrupts_held():    # Ctrl-C inside torch's import aborts the process (a C++ std::terminate)
        import torch  # noqa: F401
    from .prompts import check_choice, check_continuation_length, encode_continuation, encode_prompt, prompt_tokenizer
    from .trace import DTYPES, continued_reference, model_provenance, run_case
    from ..util import hash_ahead, versions
    from ..model.load import open_model

    validate_suite(suite)
    if dtype not in GOLDEN_DTYPES:
        raise UsageError(f"unknown golden dtype {dtype!r}; choose one of {', '.join(GOLDEN_DTYPES)}")
    if not inputs:
        raise UsageError("give at least one --tokens or --prompt")
    for kind, _ in inputs:
        if kind not in ("tokens", "prompt"):
            raise UsageError(f"input kind {kind!r}: expected 'tokens' or 'prompt'")
    check_choice(tokenizer)
    given: list[list[int] | str] = [token_ids(value) if kind == "tokens" else str(value) for kind, value in inputs]
    model = open_model(model_path)
    hash_ahead(model.hashed_files())     # the provenance's sha256, on a thread beside the forwards
    if n_decode and given_after is None:     # where the greedy continuation is proposed: refused now if misnamed
        from ..model.draft import draft_device

        draft_device(model)
    tok = None
    cases: list[tuple[str, list[int], str | None, dict[str, Any] | None]] = []
    for i, value in enumerate(given):
        if isinstance(value, list):
            ids, prompt, made_by = value, None, None
        else:
            tok = tok or prompt_tokenizer(model, tokenizer)
            enc = encode_prompt(tok, value, model=model)
            ids, prompt, made_by = enc.ids, value, enc.tokenizer
        model.check_tokens(np.asarray(ids))
        cases.append((f"case{i}", ids, prompt, made_by))
    # each case's continuation: token ids (given, or None for the reference's greedy one) and its text
    after: list[tuple[list[int] | None, str | None]] = []
    for i, c in enumerate(given_after or []):
        if isinstance(c, str):
            tok = tok or prompt_tokenizer(model, tokenizer)
            ids = encode_continuation(tok, c, model=model)
            check_continuation_length(ids, n_decode, what=f"--continuation {i + 1} (case{i}, {plural(len(ids), 'token')} "
                                                          f"from its text)")
            after.append((ids, c))
        else:
            after.append((c, None))
        model.check_tokens(np.asarray(after[-1][0]))
    if given_after is None and n_decode:
        after = [(None, None)] * len(cases)
    meta: dict[str, Any] = {
        "suite": suite,
        "model": None,          # once the forwards ran: the sha256 is being taken beside them
        "dtype": dtype,
        "versions": versions(),
        "platform": platform.platform(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }
    made = {name: made_by for name, _, _, made_by in cases if made_by is not None}
    if made:
        meta["tokenizers"] = made
    if n_decode is not None:
        meta["decode"] = n_decode
    timing: dict[str, Any] = {}
    continued: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        with interrupts_held():     # the staging area exists only with the writer that removes it
            writer = stack.enter_context(store.begin(suite))
        for i, (name, ids, prompt, made_by) in enumerate(cases, 1):
            # one bar at a time (the forward's, per layer), a status line between bars: nothing
            # is drawn over a bar, and a log file gets whole lines
            if after:
                then, text = after[i - 1]
                n = len(then) if then is not None else n_decode or 0
                how = "given" if then is not None else "the reference's greedy choice"
                status(f"{suite}: {name} ({i} of {len(cases)}), {plural(len(ids), 'token')} + a continuation of "
                       f"{n} ({how})")
                case = continued_reference(model, ids, decode=n, continuation=then, dtype=DTYPES[dtype],
                                           prompt_text=prompt)
                if text is not None:
                    case.attrs["continuation_text"] = text
                continued[name] = {key: case.attrs[key] for key in (*CONTINUATION_ATTRS, "reference_forwards")
                                   if key in case.attrs}
            else:
                status(f"{suite}: {name} ({i} of {len(cases)}), {plural(len(ids), 'token')}")
                # each layer's stages go to the store as the layer ends, written while the next one runs
                stream = writer.begin_case(name)
                case = run_case(model, ids, dtype=DTYPES[dtype], prompt=prompt, layer_sink=stream.put_layer)
            if made_by is not None:
                case.attrs["tokenizer"] = made_by
            timing[name] = case.attrs.get("layer_timing") or []
            status(f"{name}: {timing_summary(timing[name])}")
            if after:
                writer.add_case(name, case)
            else:
                stream.finish(case)
        meta["layer_timing"] = timing
        meta["model"] = model_provenance(model)
        if continued:
            meta["continuations"] = continued
        version = writer.commit(meta)
    return version


#: a case's attributes (and its entry of the version's ``continuations``) that say what follows its prompt
CONTINUATION_ATTRS = ("prompt_tokens", "continuation", "decode", "continuation_source", "continuation_text")


def continuation_line(entry: Any) -> str | None:
    """``goldens show``'s line for a case with a continuation (its entry of the version's
    ``continuations``): prompt tokens, continuation tokens and where they came from."""
    if not isinstance(entry, Mapping):
        return None
    P, after = entry.get("prompt_tokens"), entry.get("continuation")
    if not isinstance(P, int) or not isinstance(after, list):
        return None
    head = ", ".join(map(str, after[:12])) + (", …" if len(after) > 12 else "")
    source = entry.get("continuation_source")
    how = ("the reference's greedy choice" if source == "greedy" else
           f"given as text {json.dumps(entry['continuation_text'], ensure_ascii=False)}"
           if isinstance(entry.get("continuation_text"), str) else "given" if source == "given" else str(source))
    return (f"    decode:    prompt {plural(P, 'token')}, continuation {plural(len(after), 'token')} [{head}] ({how}); "
            f"serves check --decode up to {len(after)}")


def timing_summary(entries: Sequence[Mapping[str, Any]]) -> str:
    """One line from a forward's per-layer clock (:meth:`moesnap.util.LayerProgress.timing`): time per
    layer, the slowest layer, peak memory and whether resident memory grew from the first layer to the last."""
    rows = [e for e in entries if isinstance(e, Mapping) and isinstance(e.get("seconds"), (int, float))]
    if not rows:
        return "no per-layer timing recorded"
    total = sum(float(e["seconds"]) for e in rows)
    slow = max(rows, key=lambda e: float(e["seconds"]))
    text = (f"{plural(len(rows), 'layer')} in {total:.3g} s, {total / len(rows):.3g} s/layer "
            f"(slowest: layer {slow.get('layer')}, {float(slow['seconds']):.3g} s)")
    peak = rows[-1].get("peak_rss_gib")
    if isinstance(peak, (int, float)):
        text += f"; peak memory {peak:.2f} GiB"
    first, last = rows[0].get("rss_gib"), rows[-1].get("rss_gib")
    if isinstance(first, (int, float)) and isinstance(last, (int, float)):
        text += f", resident {first:.2f} GiB after layer {rows[0].get('layer')}, {last:.2f} GiB after layer {rows[-1].get('layer')}"
    return text


@show_progress_switch
def generate_suite(model: str | Path, suite: str, cases: Sequence[Sequence[int] | str], *,
                   store: str | Path | GoldenStore | None = None, dtype: str = "float32",
                   show_progress: bool = False, tokenizer: str = "auto", decode: int | None = None,
                   continuation: Sequence[int] | str | Sequence[Sequence[int] | str] | None = None) -> str:
    """Publish a new version of golden ``suite`` from ``model``: one case per entry of ``cases`` (a
    list of token ids, or a prompt string tokenized with the model's own tokenizer; ``tokenizer``
    ``"auto"``, ``"model"`` or ``"bytes"`` as ``--tokenizer`` picks).  ``store``: a
    directory, ``s3://bucket/prefix``, an open store, or None for ``goldens/``.  Returns
    ``"suite@vNNNN"``, the reference to check against.

    ``decode=N``: each case is its prompt followed by the reference's own greedy continuation of N
    tokens (one reference forward over both; ``check(..., decode=N)`` serves it).  ``continuation``:
    a given one instead, one per case in order (token ids, or text through the prompt's tokenizer);
    for a single case the ids or the text alone will do.  With both, each continuation holds N tokens.

    >>> import moesnap, tempfile                                             # doctest: +SKIP
    >>> moesnap.generate("model.gguf", "smoke", [[1, 2, 3], "Hello"], store=tempfile.mkdtemp())
    'smoke@v0001'
    >>> moesnap.generate("model.gguf", "served", ["Hello"], decode=8, store=tempfile.mkdtemp())
    'served@v0001'
    """
    from ..store import open_store

    inputs: list[Input] = [("prompt", c) if isinstance(c, str) else ("tokens", token_ids(c)) for c in cases]
    st = store if isinstance(store, GoldenStore) else open_store(None if store is None else str(store))
    v = generate(model, suite, store=st, inputs=inputs, dtype=dtype,
                 tokenizer=tokenizer, decode=decode, continuation=per_case(continuation, len(inputs)))
    return f"{suite}@{v.version}"


def per_case(continuation: Sequence[int] | str | Sequence[Sequence[int] | str] | None,
             n_cases: int) -> list[Continuation] | None:
    """:func:`generate_suite`'s ``continuation`` as one :data:`Continuation` per case: a list of them
    (each token ids or text), or, for one case, its ids or text alone; anything else is a UsageError."""
    if continuation is None:
        return None
    if isinstance(continuation, str):
        items: list[Any] = [continuation]
    else:
        try:
            items = list(continuation)
        except TypeError:
            raise UsageError(f"continuation={continuation!r}: expected token ids, text, or one of them per case") from None
        if items and all(_is_index(t) for t in items):
            items = [items]     # one case's token ids
    if len(items) != n_cases:
        raise UsageError(f"continuation: {plural(len(items), 'continuation')} for {plural(n_cases, 'case')}; give "
                         f"one per case, in order (a list of token-id lists or texts)")
    return [("text", c) if isinstance(c, str) else ("tokens", token_ids(c)) for c in items]


def _is_index(value: Any) -> bool:
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


# ---------------------------------------------------------------- the command that made a version


#: what bash's ``$'...'`` quoting writes as an escape of its own
_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\a": "\\a", "\b": "\\b",
            "\f": "\\f", "\v": "\\v"}


def shell_word(text: str) -> str:
    """``text`` as one word a POSIX shell gives back exactly: ``shlex.quote`` where that is plain
    printable text; else bash's ``$'...'`` (zsh and ksh read it too), with control characters and
    other unprintable ones written as escapes (``\\n``; a character beyond ASCII as its UTF-8
    bytes ``\\xe2\\x80\\xa8``, whatever the shell's locale) and the lone surrogates of a
    non-UTF-8 argument as the byte they stand for; in a run of spaces each after the first is
    ``\\x20``.  A prompt holding a newline inside ``'...'`` would not survive a paste whole, nor a
    note that joins a command's words with single spaces; the escaped command, pasted, makes the
    same golden."""
    if all(ch.isprintable() for ch in text) and "  " not in text:
        return shlex.quote(text)
    out = []
    for i, ch in enumerate(text):
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch == " " and i and text[i - 1] == " ":
            out.append("\\x20")
        elif ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:              # surrogateescape: a byte that was not UTF-8
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.extend(f"\\x{byte:02x}" for byte in ch.encode("utf-8", "surrogatepass"))
    return "$'" + "".join(out) + "'"


def shell_command(parts: Sequence[str]) -> str:
    """A command line from its words, each quoted by :func:`shell_word`."""
    return " ".join(shell_word(x) for x in parts)


def command_text(command: str) -> str:
    """A recorded generating command as a line to paste: as recorded, or where it holds a control
    character (a version recorded before commands were quoted as :func:`shell_word` quotes them: a
    prompt's newline inside ``'...'``) re-quoted word by word, so that it still makes the same golden."""
    if command.isprintable():
        return command
    try:
        return shell_command(shlex.split(command))
    except ValueError:       # not a command shlex.quote made: shown as it is, escaped
        return printable(command)


# ---------------------------------------------------------------- prune


def prune(store: GoldenStore, suite: str, keep: int, *, stale_after: float | None = None) -> PruneResult:
    from ..store import DEFAULT_STALE_AFTER

    return store.prune(suite, keep, stale_after=DEFAULT_STALE_AFTER if stale_after is None else stale_after)
