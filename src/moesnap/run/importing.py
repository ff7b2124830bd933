"""Import another engine's flat dump directory as a candidate case group that ``moesnap compare`` judges.

A flat dump (SGLang's dumper, aprender's trace) holds values and names but neither the prompt's token
ids nor each stage's shape: the golden it is to be judged against gives both (``like``: a case group
path, or ``NAME[@vNNNN]`` in a golden store, resolved as ``moesnap compare`` resolves its golden).  The
adapter (:mod:`moesnap.capture.sglang`, :mod:`moesnap.capture.aprt`) reads the directory into a case;
the case group is written atomically at ``out``, which is refused before anything is read if it
exists (without ``force``, which replaces only a case group) or lies inside a published golden.

The dump directory, the format and the forward pass are checked first (:func:`check_dump`, which
needs no torch: importing this module loads none), then the output, then the golden.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..util import spans

if TYPE_CHECKING:
    from ..case import Case

FORMATS: tuple[str, ...] = ("sglang", "vllm", "aprt")
#: formats read by capture/sglang.py: vLLM's dumper is a port of SGLang's (same file names and files)
DUMPERS: tuple[str, ...] = ("sglang", "vllm")


def _golden_case(golden: list[tuple[str, Case]], like: str, case: str | None, fmt: str, dump: str | Path,
                 forward_pass: int | None) -> tuple[str, Case]:
    """The golden case the dump ran: ``case`` by name, the only one, or (SGLang) the one whose tokens
    the dump's ``input_ids`` hold."""
    names = [n for n, _ in golden]
    if case is not None:
        found = [(n, c) for n, c in golden if n == case]
        if not found:
            raise UsageError(f"--case {case!r}: {like} holds no such case (it holds: {', '.join(names)})")
        return found[0]
    if len(golden) == 1:
        return golden[0]
    if fmt in DUMPERS:
        from ..capture.sglang import dumped_tokens

        tokens = dumped_tokens(dump, forward_pass)
        if tokens is not None:
            for n, c in golden:
                if tokens.size <= c.tokens.size and (c.tokens[:tokens.size] == tokens).all():  # prompt + steps
                    return n, c
            raise UsageError(f"{dump}: its input_ids match none of {like}'s cases ({', '.join(names)})")
    raise UsageError(f"{like} holds {len(golden)} cases ({', '.join(names)}): choose the one the dump ran "
                     f"with --case NAME")


def check_dump(fmt: str, dump: str | Path, forward_pass: int | None = None) -> Path:
    """Refuse, before torch loads or the golden is read, an unknown format, a forward pass that the
    format has not or that is negative, and a dump directory that does not exist or is not one."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown dump format {fmt!r}; choose one of {', '.join(FORMATS)}")
    d = Path(dump)
    if not str(dump):
        raise UsageError("DIR: empty path (the dump directory to import)")
    if not d.exists():
        raise UsageError(f"{d}: no such directory (the {fmt} dump to import)")
    if not d.is_dir():
        raise UsageError(f"{d}: not a directory (--format {fmt} reads a dump directory)")
    if forward_pass is not None:
        if fmt not in DUMPERS:
            raise UsageError(f"--pass: only an SGLang or vLLM dump holds several forward passes (an {fmt} dump holds one)")
        if forward_pass < 0:
            raise UsageError(f"--pass {forward_pass}: a forward pass number is not negative")
    return d


def import_dump(fmt: str, dump: str | Path, *, like: str, out: str | Path, store: str | None = None,
                case: str | None = None, forward_pass: int | None = None, force: bool = False) -> tuple[Case, str]:
    """Read the ``fmt`` dump at ``dump`` into a case shaped like ``like``'s and write it at ``out``;
    return (the case, the golden case's name)."""
    from .. import capture
    from .compare import resolve_golden_meta
    from .trace import check_output, write_output

    check_dump(fmt, dump, forward_pass)
    check_output(out, force=force)
    _, _, golden = resolve_golden_meta(like, store)
    name, g = _golden_case(golden, like, case, fmt, dump, forward_pass)
    attrs = {"imported": {"format": fmt, "like": like, "case": name}}
    if fmt in DUMPERS:
        cand = capture.import_sglang(dump, g, forward_pass=forward_pass, attrs=attrs)
    else:
        cand = capture.import_aprt(dump, g, attrs=attrs)
    write_output(cand, out, force=force)
    return cand, name


def describe(case: Case) -> list[str]:
    """One line per stage the imported case holds: its layers and, where partial, what it lacks."""
    held: dict[tuple[str, int | None], list[int]] = {}
    for item in case.attrs.get("held_tokens") or []:
        held[(item[0], item[1])] = list(item[2])
    T = int(case.tokens.shape[0])
    out = []
    for stage in case.model:
        out.append(f"{stage}: {'last token only' if (stage, None) in held else f'{T} tokens'}")
    for stage, a in case.layers.items():
        lays = [lay for lay in range(a.shape[0]) if held.get((stage, lay), [0]) != []]
        last = [lay for lay in lays if (stage, lay) in held]
        text = f"{stage}: layers {spans(lays)}"
        if last:
            text += f" (last token only{'' if last == lays else ' at layers ' + spans(last)})"
        out.append(text)
    for n, step in enumerate(case.steps):
        out.append(f"decode step {step.attrs.get('step', n)}: position {[int(x) for x in step.positions]}, {len(step.layers)} "
                   f"per-layer stages")
    for n, part in enumerate([case, *case.steps]):
        at = "" if part is case else f" (decode step {part.attrs.get('step', n - 1)})"
        for x in part.attrs.get("parted") or []:
            rel = "?" if x.get("rel_l2") is None else format(x["rel_l2"], ".3g")
            out.append(f"{x['stage']}{'' if x['layer'] is None else ' of layer ' + str(x['layer'])}{at}: {x['other']} "
                       f"and {x['kept']} part from token {x.get('token')} (rel L2 {rel}): both kept and judged "
                       f"({x['array']} holds {x['other']})")
    skipped: dict[str, set[int]] = {}
    for part in (case, *case.steps):
        for stage, layer in part.attrs.get("skipped") or []:
            skipped.setdefault(stage, set()).add(layer)
    if skipped:
        out.append("skipped (the golden's model has no such stage at the layer): "
                   + "; ".join(f"{s} at {'layer' if len(ls) == 1 else 'layers'} {spans(sorted(ls))}"
                               for s, ls in skipped.items()))
    names = case.attrs.get("ignored_names") or []
    if names:
        out.append(f"ignored (no stage): {len(names)} names: {', '.join(names[:6])}{' …' if len(names) > 6 else ''}")
    for x in case.attrs.get("passes_left_out") or []:
        out.append(f"pass left out (not the golden's request): {x}")
    return out

