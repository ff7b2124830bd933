"""`moesnap check MODEL --suite NAME[@vNNNN]`: the candidate forward against the goldens."""

from __future__ import annotations

import argparse

from .cli_compare import add_report_options, check_report_outputs, emit, load_tolerances


def cmd_check(a: argparse.Namespace) -> int:
    from .check import check_golden_matches_model, run_check
    from .inject import parse_inject
    from .trace import parse_device, parse_dtype
    from .weights import GGUFModel

    dtype = parse_dtype(a.dtype, allowed=("float32", "bfloat16", "float16"))
    device = parse_device(a.device)
    check_report_outputs(a, a.store)
    tols = load_tolerances(a)
    model = GGUFModel.open(a.model)
    injections = [parse_inject(s, model.config) for s in a.inject]
    ref, meta, goldens = load_goldens(a.suite, a.store)
    check_golden_matches_model(goldens, model, where=ref, meta=meta)
    report = run_check(model, goldens, device=device, dtype=dtype, replay=a.replay, injections=injections,
                       tols=tols, golden_ref=ref, show_progress=not getattr(a, "quiet", False))
    return emit(report, a, f"moesnap check {ref}")


def load_goldens(spec: str, store: str | None):
    """(resolved NAME@vNNNN, version metadata, [(case name, Case)]) from a golden store."""
    from .store import open_store, parse_ref

    suite, version = parse_ref(spec)
    st = open_store(store)
    v = st.open_version(suite, version)
    return v.ref, v.meta, [(name, v.read_case(name)) for name in v.case_names()]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="run the candidate forward and check every stage against the goldens")
    p.add_argument("model")
    p.add_argument("--suite", required=True, help="NAME or NAME@vNNNN (default: newest version)")
    p.add_argument("--store", help="golden store root: a directory (default goldens/) or s3://bucket/prefix")
    p.add_argument("--device", default="cpu", help="cuda or cpu (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--replay", action="store_true",
                   help="also run each layer on its golden input: error introduced vs inherited")
    p.add_argument("--inject", action="append", default=[], metavar="SPEC",
                   help="plant a fault: nan:layer=L,expert=E | qtype:layer=L,tensor=ffn_down_exps,as=q4_k | "
                        "scale:layer=L,stage=STAGE,factor=F | route:layer=L,token=T")
    add_report_options(p)
    p.set_defaults(func=cmd_check)
