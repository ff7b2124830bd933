"""The command line: parse, call library functions, print, exit 0/1/2.

Exit codes: 0 every stage passes, 1 something diverged or went non-finite,
2 bad input or usage (one line on stderr, no traceback), 3 an internal error
(one line naming the command and its input; set MOESNAP_DEBUG=1 for the
traceback), 130 interrupted (Ctrl-C: ``moesnap: interrupted``, whatever the
command had begun to write removed or, once published, whole).
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
import traceback
from typing import Any, NoReturn, Sequence

from ..errors import MoesnapError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse's errors as a :class:`UsageError` (one line, exit 2), printed once under main's
    ``moesnap: error:`` prefix: the message names the subcommand, never the program again."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()
        raise UsageError(f"{command + ': ' if command else ''}{message} (see `{self.prog} --help`)")


PROG = "moesnap"
QUIET_HELP = "no progress bars or status lines on stderr (also MOESNAP_NO_PROGRESS=1)"


# -- commands -----------------------------------------------------------------

def cmd_model_make(a: argparse.Namespace) -> int:
    from ..model.synth import make_model, preset

    spec = preset(a.preset, layers=a.layers, seed=a.seed)
    path = make_model(a.out, spec, force=a.force, progress=True)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, preset {a.preset}, {spec.n_layer} layers)")
    return 0


def _tokens_from(a: argparse.Namespace, model) -> tuple[list[int], str | None, dict | None]:
    """The token ids, the prompt they came from and what tokenized it (None, None for --tokens)."""
    from ..run.prompts import check_choice, encode_prompt, prompt_tokenizer
    from ..run.trace import parse_tokens

    check_choice(a.tokenizer)
    if (a.tokens is None) == (a.prompt is None):
        raise UsageError("give exactly one of --tokens or --prompt")
    if a.tokens is not None:
        return parse_tokens(a.tokens), None, None
    enc = encode_prompt(prompt_tokenizer(model, a.tokenizer), a.prompt, model=model)
    return enc.ids, a.prompt, enc.tokenizer


def cmd_trace(a: argparse.Namespace) -> int:
    from ..run.prompts import check_continuation_length, check_decode, continuation_value
    from ..util import loading_torch, status

    # usage errors before torch loads (seconds on a cold start)
    decode = None if a.decode is None else check_decode(a.decode)
    given = None if a.continuation is None else continuation_value(a.continuation)
    if decode == 0 and given is not None:
        raise UsageError("--decode 0 with --continuation: the continuation is fed to decode steps; give --decode "
                         "as its length, or leave --decode out")
    ids = given if isinstance(given, list) else None
    if ids is not None:
        check_continuation_length(ids, decode)
    text = given if isinstance(given, str) else None
    from ..model.load import check_model_path

    check_model_path(a.model)     # a missing or wrong MODEL: its one line, before any status line
    loading_torch()
    from ..model.load import parse_device
    from ..run.trace import check_output, parse_dtype, run_case, summary, write_output
    from ..model.load import open_model

    dtype = parse_dtype(a.dtype)
    device = parse_device(a.device)
    check_output(a.out, force=a.force)
    status(f"opening {a.model}")
    model = open_model(a.model)
    tokens, prompt, tokenizer = _tokens_from(a, model)
    if text is not None:
        from ..run.prompts import encode_continuation, prompt_tokenizer

        ids = encode_continuation(prompt_tokenizer(model, a.tokenizer), text, model=model)
        check_continuation_length(ids, decode)
    case = run_case(model, tokens, dtype=dtype, device=device, candidate=a.candidate, prompt=prompt,
                    engine=a.engine, decode=decode or 0, continuation=ids)
    if tokenizer is not None:
        case.attrs["tokenizer"] = tokenizer
    if text is not None:
        case.attrs["continuation_text"] = text
    write_output(case, a.out, force=a.force)
    for line in summary(case):
        print(line)
    print(f"wrote {a.out}")
    return 0


# -- parser -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__
    from ..run.prompts import CONTINUATION_HELP, TOKENIZER_HELP

    p = _Parser(prog=PROG, description="Find where a GPU forward of a Qwen3-MoE model goes wrong.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}",
                   help="print moesnap's version and exit")
    p.add_argument("--quiet", "-q", action="store_true", help=QUIET_HELP)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND",
                           help="what to do (`moesnap COMMAND --help` for its options)")

    model = sub.add_parser("model", help="synthetic model files")
    msub = model.add_subparsers(dest="model_command", required=True, parser_class=_Parser, metavar="COMMAND",
                                help="make: write a synthetic model file")
    mk = msub.add_parser("make", help="write a synthetic qwen3moe GGUF")
    mk.add_argument("out", help="the GGUF file to write")
    mk.add_argument("--preset", required=True, help="tiny | qwen3-30b-a3b | qwen3-235b-a22b (the real models' shapes, a Q4_K_M quant mix) | gpt-oss-tiny | gpt-oss-20b (MXFP4 experts, Q8_0 elsewhere) | deepseek-v2-tiny | deepseek-v3-tiny | deepseek-v2-lite | qwen2-moe-tiny | qwen1.5-moe-a2.7b | mixtral-tiny | mixtral-8x7b | olmoe-tiny | olmoe-1b-7b")
    mk.add_argument("--layers", type=int, metavar="N", help="number of layers (default: the preset's)")
    mk.add_argument("--seed", type=int, metavar="S", help="random seed of the weights (default: the preset's)")
    mk.add_argument("--force", action="store_true", help="overwrite an existing file")
    mk.set_defaults(func=cmd_model_make)

    tr = sub.add_parser("trace", help="run a forward over one prompt and write every stage to a Zarr group")
    tr.add_argument("model", help="the model: a GGUF file, or a checkpoint directory (config.json + *.safetensors)")
    tr.add_argument("--tokens", metavar="IDS", help="comma-separated token ids")
    tr.add_argument("--prompt", metavar="TEXT", help="text, encoded with the model's own tokenizer (see --tokenizer)")
    tr.add_argument("--tokenizer", default="auto", metavar="auto|model|bytes", help=TOKENIZER_HELP)
    tr.add_argument("--out", required=True, metavar="OUT.zarr", help="the case group to write (Zarr v3)")
    tr.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    tr.add_argument("--dtype", default="float32",
                    help="activations: float32 (default), float64 (reference only), bfloat16, float16")
    tr.add_argument("--candidate", action="store_true", help="trace moesnap's candidate (device) forward")
    tr.add_argument("--engine", default="moesnap", metavar="ENGINE",
                    help="moesnap (default: the reference, or the candidate with --candidate), transformers "
                         "(its Qwen3MoeForCausalLM on --device in --dtype), llama.cpp (CPU, float32 activations)")
    tr.add_argument("--decode", type=int, metavar="N",
                    help="N decode steps after the prompt: the reference over prompt + continuation as one case, "
                         "or the engine (--candidate, --engine) serving the prompt and then N single-token steps "
                         "through its KV cache, each step a case group steps/<n>/ in OUT; fed --continuation, else "
                         "greedy (each step the argmax after the one before)")
    tr.add_argument("--continuation", metavar="IDS|TEXT", help=CONTINUATION_HELP + "; with --decode N it holds N tokens")
    tr.add_argument("--force", action="store_true", help="replace an existing output")
    tr.set_defaults(func=cmd_trace)

    from . import calibrate, check, compare, goldens, importing

    for command in (compare, calibrate, check, goldens, importing):
        command.register(sub)
    for child in subcommands(p):      # -q after the subcommand too: `moesnap check ... -q`
        child.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
    return p


def subcommands(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below ``p`` (``check``, ``goldens``, ``goldens list``, ...), depth first."""
    found: list[argparse.ArgumentParser] = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):     # an alias maps to the same parser
                found += [child, *subcommands(child)]
    return found


MAX_MESSAGE = 600   # characters: a hostile file's 1 MB tensor name or metadata array stays one short line


def _capped(text: str) -> str:
    """``text`` on one short line: a file name holding a newline or an ANSI escape cannot split the
    error over lines or repaint the terminal, and a value read from a file cannot flood it."""
    from ..util import printable

    text = printable(text)
    if len(text) > MAX_MESSAGE:
        half = MAX_MESSAGE // 2 - 10
        text = f"{text[:half]} … ({len(text) - 2 * half} characters left out) … {text[-half:]}"
    return text


def _unprefixed(message: str) -> str:
    """``message`` without a leading ``moesnap: error:`` / ``moesnap:`` of its own: main prints the prefix once."""
    for prefix in (f"{PROG}: error: ", f"{PROG}: "):
        message = message.removeprefix(prefix)
    return message


#: the exit code of a command stopped by Ctrl-C (SIGINT), as a shell reports it: 128 + 2
INTERRUPTED = 130


def _say_interrupted() -> None:
    print(f"{PROG}: interrupted", file=sys.stderr, flush=True)


#: seconds after which a SIGINT that came inside an import is sent again
RETRY_S = 0.05


def _importing(frame: Any) -> bool:
    """Whether the main thread was inside an import when a signal came (its frame or a caller's is
    importlib's)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


class _Interrupts:
    """SIGINT in the process whose entry point main() is (called without arguments: the console
    script, ``python -m moesnap``).

    While the command works, the first SIGINT raises KeyboardInterrupt where it lands, or once an
    import under way is done (``with``
    blocks unwind: a golden version being written is removed; the store holds it off while it
    publishes or removes, :func:`moesnap.store.base.interrupts_held`), and main says ``moesnap:
    interrupted`` and exits 130.  Any later one, and one that comes after the command is done while
    the interpreter shuts down (joining worker threads, running torch's exit handlers, where a
    KeyboardInterrupt would print ``Exception ignored in: <module 'threading'>`` and a traceback),
    is only noted.  The last exit handler ends the process: stdout and stderr flushed, it exits
    with the command's code, or says ``moesnap: interrupted`` (if nothing has yet) and exits 130
    when a SIGINT came.  What it skips is the interpreter's own teardown (a second or more of
    torch's C++ state on a small model), where SIGINT has no Python handler any more: the default
    one would kill the process silently after its output was printed."""

    def __init__(self) -> None:
        self.working = True     # the command has not returned: SIGINT raises KeyboardInterrupt
        self.noted = False      # a SIGINT came when it could not be raised
        self.said = False       # "moesnap: interrupted" is on stderr
        self.code: int | None = None   # what main returned

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        atexit.register(self._at_exit)   # before torch and zarr register theirs: runs after them

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.working and _importing(frame):
            # not inside an import: torch's runs Python code from C++, where a KeyboardInterrupt ends
            # the process in std::terminate (a core dump, no message); the signal comes again shortly
            import threading

            threading.Timer(RETRY_S, os.kill, (os.getpid(), signal.SIGINT)).start()
            return
        if self.working:
            self.working = False
            raise KeyboardInterrupt
        self.noted = True

    def _at_exit(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # the command is over: nothing left to interrupt
        interrupted = self.noted or self.said
        if self.code is None and not interrupted:
            return    # main did not return (an exit from inside it): the interpreter ends as usual
        try:
            if interrupted and not self.said:
                self.said = True
                _say_interrupted()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        except (OSError, ValueError):   # a closed pipe or stream: nothing more to say there
            pass
        # (interrupted: also what keeps Python from turning a KeyboardInterrupt that a C library's own
        # run of Python code saw go by into a death by SIGINT after this handler)
        os._exit(INTERRUPTED if interrupted else int(self.code or 0))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``moesnap ARGV`` and return its exit code.  Without ``argv`` (the process's own command
    line) it is the process's entry point: it also handles SIGINT for all of the process, and ends
    it at exit with that code (:class:`_Interrupts`)."""
    if argv is not None:
        return _main(list(argv))
    guard = _Interrupts()
    guard.install()
    code = INTERRUPTED
    try:
        code = _main(sys.argv[1:], guard)
    except KeyboardInterrupt:         # one that landed in _main's own error handling
        guard.working = False
        if not guard.said:
            guard.said = True
            _say_interrupted()
    finally:
        guard.working = False         # first: no SIGINT is raised from here on, only noted
        guard.code = code
    return code


def _main(argv: list[str], guard: _Interrupts | None = None) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:     # --help, --version: argparse printed them and exits 0
            return e.code if isinstance(e.code, int) else 0
        from ..judge.device import judge_device
        from ..judge.pool import case_processes, processes_by_default
        from ..util import quiet

        judge_device(None)      # MOESNAP_JUDGE and MOESNAP_JUDGE_PROCESSES: a bad one refused before any work
        case_processes()
        processes_by_default()
        with quiet(bool(getattr(args, "quiet", False))):     # -q: this command's own switch, not the environment's
            return int(args.func(args) or 0)
    except MoesnapError as e:
        print(f"{PROG}: error: {_capped(_unprefixed(str(e)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if guard is not None:
            guard.working, guard.said = False, True
        _say_interrupted()
        return INTERRUPTED
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug of ours: say where, keep it to one line
        if os.environ.get("MOESNAP_DEBUG"):
            traceback.print_exc()
        cmd = " ".join(argv[:3])
        print(_capped(f"moesnap: internal error in `moesnap {cmd}`: {type(e).__name__}: {e} ")
              + "(set MOESNAP_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
