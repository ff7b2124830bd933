"""`moesnap goldens generate|list|show|diff|prune`: the versioned golden store from the command line."""

from __future__ import annotations

import argparse
from typing import Sequence

from ..errors import UsageError


class _Input(argparse._AppendAction):
    """--tokens / --prompt, repeatable, kept in the order given (one case each) as ``(kind, value)``."""

    def __init__(self, *args, kind: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kind = kind

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        items.append((self.kind, values))
        setattr(namespace, self.dest, items)


def _store(a: argparse.Namespace):
    from ..store import open_store

    return open_store(a.store)


def _continuations(values: Sequence[str] | None) -> list[tuple[str, str]] | None:
    """``--continuation`` values as :data:`moesnap.run.goldens.Continuation` pairs: comma-separated
    integers are token ids, anything else is text (an empty one or a negative id refused)."""
    from ..run.prompts import continuation_value

    if values is None:
        return None
    return [("tokens" if isinstance(continuation_value(v), list) else "text", v) for v in values]


def cmd_generate(a: argparse.Namespace) -> int:
    from ..run.goldens import check_continuations, generate, shell_command
    from ..run.prompts import check_decode
    from ..util import published_version_above

    # usage errors before torch loads (generate checks them again, as the Python API's entry)
    decode = None if a.decode is None else check_decode(a.decode)
    continuation = _continuations(a.continuation)
    check_continuations(a.inputs or [], decode, continuation)

    inside = published_version_above(a.store) if a.store and "://" not in a.store else None
    if inside is not None:
        raise UsageError(f"--store {a.store}: inside the published golden version {inside}; refusing to write there")

    parts = ["moesnap", "goldens", "generate", a.model, "--suite", a.suite]
    if a.store:
        parts += ["--store", a.store]
    for kind, value in a.inputs or []:
        parts += [f"--{kind}", value]
    for value in a.continuation or []:
        parts += ["--continuation", value]
    if decode is not None:
        parts += ["--decode", str(decode)]
    parts += ["--dtype", a.dtype]
    if a.tokenizer != "auto":
        parts += ["--tokenizer", a.tokenizer]
    command = shell_command(parts)
    with _store(a) as st:
        v = generate(a.model, a.suite, store=st, inputs=a.inputs or [], dtype=a.dtype,
                     command=command, tokenizer=a.tokenizer, decode=decode,
                     continuation=continuation)
    print(v.ref)
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    from ..run.goldens_show import describe, list_suites

    with _store(a) as st:
        infos = list_suites(st)
    if not infos:
        print(f"no suites in {a.store or 'goldens'}")
    for info in infos:
        print(f"{info.suite}  {' '.join(info.versions)}  newest {info.newest.version}: {describe(info.newest.meta)}")
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    from ..run.goldens_show import show_lines

    with _store(a) as st:
        v = st.resolve(a.ref)
        lines = with_continuations(show_lines(v, verify=not a.no_verify), v.meta)
    for line in lines:
        print(line)
    return 0


def with_continuations(lines: list[str], meta: dict) -> list[str]:
    """``goldens show``'s lines with a line under each case that has a continuation (the version's
    ``continuations``): its prompt tokens and continuation tokens."""
    from ..run.goldens import continuation_line
    from ..util import printable

    entries = meta.get("continuations")
    if not isinstance(entries, dict) or not entries:
        return lines
    out = []
    for line in lines:
        out.append(line)
        for name, entry in entries.items():
            if line.startswith(f"  case {printable(str(name))}: "):
                extra = continuation_line(entry)
                if extra is not None:
                    out.append(printable(extra))
    return out


def cmd_diff(a: argparse.Namespace) -> int:
    import sys

    from ..run.goldens_diff import STDOUT, diff, json_text, write_json
    from ..run.goldens_diff_text import diff_lines
    from ..store import DEFAULT_ROOT
    from ._options import check_output_file

    to_stdout = a.json == STDOUT                # the JSON on stdout, the lines on stderr: `... --json - | jq`
    if a.json is not None and not to_stdout:
        check_output_file(a.json, force=a.force, option="--json", store=a.store or DEFAULT_ROOT)
    with _store(a) as st:
        rep = diff(st.resolve(a.a), st.resolve(a.b))
    text = json_text(rep) if to_stdout else None    # a report JSON cannot hold is refused before anything is printed
    human = sys.stderr if to_stdout else sys.stdout
    for line in diff_lines(rep, details=a.details):
        print(line, file=human)
    if text is not None:
        sys.stdout.write(text)
        sys.stdout.flush()
    elif a.json:
        write_json(rep, a.json)
        print(f"wrote {a.json}")
    return 1 if rep.any_changed else 0


def cmd_prune(a: argparse.Namespace) -> int:
    from ..run.goldens import prune

    if a.keep < 1:
        raise UsageError(f"--keep {a.keep}: must be ≥ 1 (the newest version is never deleted)")
    if a.stale_after is not None and a.stale_after < 0:
        raise UsageError(f"--stale-after {a.stale_after}: must be ≥ 0")
    with _store(a) as st:
        res = prune(st, a.suite, a.keep, stale_after=a.stale_after)
    print(f"{a.suite}: deleted {', '.join(res.deleted) or 'nothing'}; kept {', '.join(res.kept) or 'nothing'}"
          + (f"; removed unpublished {', '.join(res.cleaned)}" if res.cleaned else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ..run.prompts import CONTINUATION_HELP, TOKENIZER_HELP

    g = sub.add_parser("goldens", help="versioned golden snapshots: generate, list, show, diff, prune")
    gsub = g.add_subparsers(dest="goldens_command", required=True, parser_class=type(g), metavar="COMMAND",
                            help="generate | list | show | diff | prune")
    store_help = "golden store root: a directory (default goldens/) or s3://bucket/prefix"

    p = gsub.add_parser("generate", help="run the reference forward and publish a new immutable version")
    p.add_argument("model", help="the model: a GGUF file, or a checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--suite", required=True, help="suite name (letters, digits, '.', '_', '-')")
    p.add_argument("--store", help=store_help)
    p.add_argument("--tokens", dest="inputs", action=_Input, kind="tokens", metavar="IDS",
                   help="comma-separated token ids: one case (repeatable)")
    p.add_argument("--prompt", dest="inputs", action=_Input, kind="prompt", metavar="TEXT",
                   help="text, encoded with the model's own tokenizer (see --tokenizer): one case (repeatable)")
    p.add_argument("--decode", type=int, metavar="N",
                   help="each case: its prompt followed by the reference's own greedy continuation of N tokens, "
                        "one reference forward over both (its rows after the prompt are the golden of N decode "
                        "steps: check --decode N); the case records prompt_tokens, continuation and decode")
    p.add_argument("--continuation", action="append", metavar="IDS|TEXT",
                   help=CONTINUATION_HELP + "; one per case, the k-th for the k-th --tokens/--prompt (repeatable); "
                        "with --decode N each holds N tokens")
    p.add_argument("--tokenizer", default="auto", metavar="auto|model|bytes", help=TOKENIZER_HELP)
    p.add_argument("--dtype", default="float32", help="reference arithmetic: float32 (default) or float64")
    p.set_defaults(func=cmd_generate)

    p = gsub.add_parser("list", help="suites and their published versions")
    p.add_argument("--store", help=store_help)
    p.set_defaults(func=cmd_list)

    p = gsub.add_parser("show", help="provenance, tensor types by layer, cases and stages of a version "
                                     "(verifies its checksums)",
                        epilog="example (from the repository root, on the bundled goldens of the bundled "
                               "model): moesnap goldens show tiny; its 'inject:' line is a --inject qtype "
                               "spec for moesnap check that fires on that model")
    p.add_argument("ref", metavar="NAME[@vNNNN]", help="a suite (its newest version) or one version of it")
    p.add_argument("--store", help=store_help)
    p.add_argument("--no-verify", action="store_true", help="do not read the arrays to verify their checksums")
    p.set_defaults(func=cmd_show)

    p = gsub.add_parser("diff", help="which stages (of a pytest snapshot suite: which arrays) changed between "
                                     "two versions, judged by the classifier (exit 0 identical, 1 changed)")
    p.add_argument("a", metavar="NAME@vA", help="the older version (the golden side of the comparison)")
    p.add_argument("b", metavar="NAME@vB", help="the newer version (NAME alone: the newest)")
    p.add_argument("--store", help=store_help)
    p.add_argument("--details", action="store_true",
                   help="every provenance key that differs and one line per changed stage, or per array of a "
                        "snapshot suite's check (default: a summary per case or check)")
    p.add_argument("--json", metavar="PATH",
                   help="write the diff as JSON here (every stage or array, whatever --details); - writes it to "
                        "stdout (and the summary to stderr, so `... --json - | jq` works)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.set_defaults(func=cmd_diff)

    p = gsub.add_parser("prune", help="delete old versions (never the newest) and dead unpublished leftovers")
    p.add_argument("suite", metavar="NAME", help="the suite whose old versions to delete")
    p.add_argument("--keep", type=int, required=True, help="how many of the newest versions to keep (≥ 1)")
    p.add_argument("--store", help=store_help)
    p.add_argument("--stale-after", type=float, metavar="SECONDS",
                   help="remote stores: an unpublished version with no write for this long is dead (default 1 day)")
    p.set_defaults(func=cmd_prune)
