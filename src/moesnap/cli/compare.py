"""`moesnap compare GOLDEN CANDIDATE`: judge any engine's dump against a golden."""

from __future__ import annotations

import argparse

from ..judge.policy import DTYPES
from ._options import add_report_options, check_report_outputs, device_name, dtype_arg, emit, settings


def cmd_compare(a: argparse.Namespace) -> int:
    from ..run.compare import compare

    from ..run.compare import check_candidate_path

    check_report_outputs(a, a.store)
    asked = settings(a, dtype=a.dtype)
    check_candidate_path(a.candidate)
    report = compare(a.golden, a.candidate, store=a.store, settings=asked, model=a.model,
                     local=not a.no_local, allow_missing=a.allow_missing, case=a.case, device=a.device)
    return emit(report, a, "moesnap compare")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="check a candidate case group (any engine's dump) against a golden")
    p.add_argument("golden", help="NAME[@vNNNN] in the store, or a case group path")
    p.add_argument("candidate", help="a Zarr v3 group in the case layout (or a group of case groups)")
    p.add_argument("--store", help="golden store root (default goldens/)")
    p.add_argument("--dtype", type=dtype_arg(DTYPES), metavar="DTYPE", help="the candidate's dtype, for tolerances (default: its 'dtype' attribute, else float32)")
    p.add_argument("--allow-missing", action="store_true",
                   help="skip stages the candidate does not have at all instead of failing them as MISSING")
    p.add_argument("--model", metavar="MODEL",
                   help="the golden's model file: re-run the reference on each layer from the candidate's own "
                        "input and judge the error each layer introduces (default: the model file the golden "
                        "records, where it is found with the same sha256)")
    p.add_argument("--no-local", action="store_true", help="judge free-running only, even where the model is found")
    p.add_argument("--device", default=None, type=device_name,
                   help="where the local re-reference runs, in float32: cuda[:N] (the default where there is one) "
                        "or cpu")
    p.add_argument("--case", metavar="NAME",
                   help="judge the candidate against this one golden case (default: the case with the candidate's "
                        "tokens, or every case for a directory of case groups)")
    add_report_options(p)
    p.set_defaults(func=cmd_compare)
