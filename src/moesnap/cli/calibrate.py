"""`moesnap calibrate MODEL`: the per-stage float noise floor and the tolerances it suggests."""

from __future__ import annotations

import argparse
import json
import math
import sys

from ..errors import UsageError
from ._options import STDOUT


#: what calibrate measures on when given neither --tokens nor --prompt
DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. 0123456789"


def cmd_calibrate(a: argparse.Namespace) -> int:
    from ..model.load import check_model_path
    from ..util import loading_torch

    check_model_path(a.model)     # a missing or wrong MODEL: its one line, before any status line
    loading_torch()
    from ..run.calibrate import MARGIN, measure, suggested, toml_block
    from ..run.prompts import check_choice, encode_prompt, prompt_tokenizer
    from ..run.trace import parse_dtype, parse_tokens
    from ..util import LayerProgress, status, write_text_atomic
    from ._options import check_output_file
    from ..model.load import open_model
    from ..model.ggml import ActivationQuant, identity

    if a.json is not None and a.json != STDOUT:
        check_output_file(a.json, force=a.force, option="--json")
    human = sys.stderr if a.json == STDOUT else sys.stdout      # --json -: stdout holds the JSON alone

    def say(line: str) -> None:
        print(line, file=human)

    margin = a.margin if a.margin is not None else MARGIN
    if not (margin > 0 and math.isfinite(margin)):
        raise UsageError(f"--margin {margin} must be a finite number > 0")
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    if not dtypes:
        raise UsageError(f"--dtypes {a.dtypes!r}: name at least one of float32, bfloat16, float16")
    for d in dtypes:
        parse_dtype(d, allowed=("float32", "bfloat16", "float16"))
    status(f"opening {a.model}")
    model = open_model(a.model)
    check_choice(a.tokenizer)
    prompts = a.prompt or ([] if a.tokens else [DEFAULT_PROMPT])
    tok = prompt_tokenizer(model, a.tokenizer) if prompts else None
    encoded = [encode_prompt(tok, p, model=model) for p in prompts] if tok is not None else []
    token_lists = [parse_tokens(t) for t in a.tokens] + [e.ids for e in encoded]
    for t in token_lists:
        model.check_tokens(t)
    out: dict = {"model": model.path.name, "margin": margin, "profile": a.profile, "tokens": token_lists,
                 "tokenizer": tok.provenance if tok is not None else None, "dtypes": {}}
    for d in dtypes:
        bar = LayerProgress(f"calibrate {d}").start(model.config.n_layer)
        aq = identity
        if a.profile == "ggml":
            if d != "float32":
                raise UsageError("--profile ggml calibrates float32 activations (what ggml computes in)")
            aq = ActivationQuant(model.qtypes())
        spread, flips = measure(model, token_lists, parse_dtype(d), progress=bar, aq=aq)
        bar.close()
        sugg = suggested(spread, margin)
        what = d + (" with ggml's activation rounding" if a.profile == "ggml" else "")
        say(f"{what} vs float64 on {model.path.name} ({sum(map(len, token_lists))} tokens, "
            f"{flips} routing flips left out):")
        say(f"  {'stage':<14} {'max_abs':>10} {'rel_p99':>10} {'max_rel_l2':>11}")
        for stage, sp in spread.items():
            if sp.n:
                say(f"  {stage:<14} {sp.max_abs:10.3g} {sp.rel_p99:10.3g} {sp.max_rel_l2:11.3g}")
        say(f"suggested (x{margin:g}):")
        for line in toml_block(d, sugg):
            say("  " + line)
        out["dtypes"][d] = {"flips": flips,
                            "spread": {s: vars(sp) for s, sp in spread.items() if sp.n},
                            "suggested": {s: {"atol": t[0], "rtol": t[1]} for s, t in sugg.items()}}
    if a.json == STDOUT:
        sys.stdout.write(json.dumps(out, indent=1) + "\n")
    elif a.json:
        write_text_atomic(a.json, json.dumps(out, indent=1))
        say(f"wrote {a.json}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ..run.prompts import TOKENIZER_HELP

    p = sub.add_parser("calibrate", help="measure the per-stage float noise floor (dtype vs float64 reference)")
    p.add_argument("model", help="the model: a GGUF file or a checkpoint directory")
    p.add_argument("--tokens", action="append", default=[], metavar="IDS", help="comma-separated token ids (repeatable)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="prompt text, encoded with the model's own tokenizer (repeatable; see --tokenizer)")
    p.add_argument("--tokenizer", default="auto", metavar="auto|model|bytes", help=TOKENIZER_HELP)
    p.add_argument("--dtypes", default="float32,bfloat16,float16", metavar="DTYPE,...",
                   help="the dtypes to measure against float64, comma-separated (default float32,bfloat16,float16)")
    p.add_argument("--margin", type=float, help="multiplier on the measured spread (default 10)")
    p.add_argument("--profile", choices=("default", "ggml"), default="default",
                   help="ggml: round every matmul input as ggml does (Q8_0/Q8_K activations) before measuring")
    p.add_argument("--json", metavar="PATH", help="write the measurements and suggested tolerances as JSON here (- for stdout)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.set_defaults(func=cmd_calibrate)
