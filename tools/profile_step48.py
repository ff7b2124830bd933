"""torch.profiler over two decode steps of the candidate on an existing file (where a 48-layer step's
milliseconds go), host and device totals and the synchronising calls.

    python tools/profile_step48.py MODEL STORE [DTYPE]
"""

import sys
import time

import torch


def main() -> None:
    from moesnap.model.candidate import CandidateModel
    from moesnap.model.load import open_model
    from moesnap.model.serve import Session
    from moesnap.store import open_store

    m, store = sys.argv[1], sys.argv[2]
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[sys.argv[3] if len(sys.argv) > 3 else "float32"]
    v = open_store(store).open_version("gen_decode1", None)
    toks = v.read_case(v.case_names()[0]).tokens
    cand = CandidateModel(open_model(m), device="cuda", dtype=dt)
    cand.keep_weights()
    s = Session(cand, capacity=len(toks))
    s.prefill(toks[:128].tolist())
    for p in range(128, 132):
        torch.cuda.synchronize(); t = time.perf_counter(); s.decode(int(toks[p])); torch.cuda.synchronize()
        print(f"warm step at {p}: {1000 * (time.perf_counter() - t):.1f} ms", flush=True)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for p in range(132, 134):
            s.decode(int(toks[p]))
        torch.cuda.synchronize()
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=50))
    print(ka.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=50))
    print("calls:", {e.key: e.count for e in ka if any(w in e.key for w in ("Synchronize", "Memcpy", "item",
                                                                           "nonzero", "_local_scalar"))})


if __name__ == "__main__":
    main()
