"""The next-token distribution, per row: how the candidate's logits differ from the golden's as a
distribution, and whether it picks the golden's next token.

These are the figures people compare engines by when training and inference disagree: KL(golden ‖
candidate) of the softmax, top-1 agreement, and |Δ logprob| of the golden's next token (the token the
golden sequence holds at the next position; at its last position, the golden's own greedy choice).
Where the candidate's top-1 differs from the golden's, the golden's logits decide whether that is a
near tie (their gap within twice the logits tolerance at that depth: ``tie``) or a clear choice
(``diverge``).  All in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..case import Case
from .policy import Policy
from .pool import map_chunks

#: rows of logits turned into float64 at once, per chunk thread (8 rows of a 151936-word vocabulary: ~60 MB
#: of float64 temporaries each)
_ROWS = 8


@dataclass(frozen=True)
class NextToken:
    """One row's next-token figures."""

    case: str
    step: int | None
    position: int
    kl: float                   # KL(golden ‖ candidate), nats; NaN where either row is not finite
    golden_top1: int
    candidate_top1: int
    token: int                  # the golden's next token (its sequence's, else its greedy choice)
    dlogprob: float             # |log p_golden(token) - log p_candidate(token)|
    choice: str                 # "match", "tie" (a near tie of the golden's logits) or "diverge"
    gap: float                  # golden logit of its top-1 minus that of the candidate's (0 on a match)

    @property
    def agree(self) -> bool:
        return self.golden_top1 == self.candidate_top1

    def to_dict(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return None if not math.isfinite(x) else float(x)

        return {"case": self.case, "step": self.step, "position": self.position, "kl": num(self.kl),
                "top1_agree": self.agree, "golden_top1": self.golden_top1, "candidate_top1": self.candidate_top1,
                "token": self.token, "dlogprob": num(self.dlogprob), "choice": self.choice, "gap": num(self.gap)}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return np.asarray(z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True)))


def next_tokens(golden: Case, rows: Case, candidate: Case, name: str, step: int | None, policy: Policy,
                dtype: str, judged: np.ndarray | None = None) -> list[NextToken]:
    """The figures of every row of ``candidate`` that holds logits, against ``rows`` (the golden's rows
    at the candidate's positions) of the whole golden sequence ``golden``; ``judged``: the rows whose
    logits were judged (a row a routing flip excused computes another function: no figure).

    Blocks of :data:`_ROWS` rows are worked on the judge's chunk threads (numpy releases the GIL over a
    row of a vocabulary), each row's figures the same whichever block and thread holds it: at 2048 rows of
    151936 logits, one thread took ~16 s of a 48 s CPU check."""
    g_all, c_all = rows.model.get("logits"), candidate.model.get("logits")
    if g_all is None or c_all is None or g_all.shape != c_all.shape or g_all.ndim != 2:
        return []
    held = candidate.attrs.get("held_tokens") if isinstance(candidate.attrs, dict) else None
    if held:   # an imported dump holding some rows' logits only: those rows alone
        keep = {t for stage, layer, toks in held if stage == "logits" for t in toks}
        only = any(stage == "logits" for stage, _, _ in held)
    else:
        keep, only = set(), False
    pos = candidate.positions if "positions" in candidate.attrs else np.arange(g_all.shape[0])
    T = int(golden.tokens.shape[0])
    tol = policy.tolerances.carried("logits", dtype, golden.n_layer)
    wanted = [r for r in range(g_all.shape[0])
              if not ((only and r not in keep) or (judged is not None and not judged[r]))]
    if not wanted:
        return []
    tokens = [int(golden.tokens[int(pos[r]) + 1]) if int(pos[r]) + 1 < T else -1 for r in range(g_all.shape[0])]

    def block(lo: int) -> list[tuple[float, int, int, int, float, float, float]]:
        return _block(g_all, c_all, lo, tokens)

    figures = [f for part in map_chunks(block, list(range(0, g_all.shape[0], _ROWS))) for f in part]
    out: list[NextToken] = []
    for r in wanted:
        kl, gt, ct, token, dlogprob, gap, top = figures[r]
        width = 2.0 * (tol.atol + tol.rtol * abs(top))
        finite = ct >= 0
        choice = "match" if gt == ct else "tie" if finite and gap <= width else "diverge"
        out.append(NextToken(name, step, int(pos[r]), kl, gt, ct, token, dlogprob, choice, gap if gt != ct else 0.0))
    return out


def _block(g_all: np.ndarray, c_all: np.ndarray, lo: int, tokens: Sequence[int]
           ) -> list[tuple[float, int, int, int, float, float, float]]:
    """Rows ``lo .. lo + _ROWS`` of the logits: per row (KL, golden top-1, candidate top-1 (-1 where a row is not
    finite), the golden's next token (``tokens[r]``; its top-1 where that is -1), |Δ logprob| of it, the
    golden's gap from its top-1 to the candidate's, the golden's top logit), all in float64; NaN figures
    where either row is not finite."""
    g = g_all[lo:lo + _ROWS].astype(np.float64)
    c = c_all[lo:lo + _ROWS].astype(np.float64)
    with np.errstate(all="ignore"):
        lg, lc = _log_softmax(g), _log_softmax(c)
        kl = np.sum(np.exp(lg) * (lg - lc), axis=-1)
    finite = np.isfinite(g).all(axis=-1) & np.isfinite(c).all(axis=-1)
    gts, cts = np.argmax(g, axis=-1), np.argmax(c, axis=-1)
    out = []
    for j in range(g.shape[0]):
        ok = bool(finite[j])
        gt, ct = int(gts[j]), int(cts[j]) if ok else -1
        token = tokens[lo + j] if tokens[lo + j] >= 0 else gt
        out.append((float(kl[j]) if ok else math.nan, gt, ct, token,
                    abs(float(lg[j, token] - lc[j, token])) if ok else math.nan,
                    float(g[j, gt] - g[j, ct]) if ok else math.nan, float(g[j, gt])))
    return out


def summary(rows: Sequence[NextToken]) -> str | None:
    """``next token: top-1 agreement 31 of 32 rows; KL mean 2.1e-07, max 3.4e-06 (case0/step3,
    position 21); |Δ logprob| mean …, max …; 1 near tie, 0 clear flips``."""
    if not rows:
        return None
    kls = [r for r in rows if math.isfinite(r.kl)]
    dls = [r.dlogprob for r in rows if math.isfinite(r.dlogprob)]
    agree = sum(r.agree for r in rows)
    text = f"next token: top-1 agreement {agree} of {len(rows)} row{'s' if len(rows) != 1 else ''}"
    if kls:
        worst = max(kls, key=lambda r: r.kl)
        text += (f"; KL(golden‖candidate) mean {np.mean([r.kl for r in kls]):.3g}, max {worst.kl:.3g} "
                 f"({worst.case}, position {worst.position})")
    if dls:
        text += f"; |Δ logprob| of the golden's next token mean {np.mean(dls):.3g}, max {max(dls):.3g}"
    ties = sum(r.choice == "tie" for r in rows)
    flips = [r for r in rows if r.choice == "diverge"]
    text += f"; {ties} near tie{'s' if ties != 1 else ''}, {len(flips)} clear flip{'s' if len(flips) != 1 else ''}"
    if flips:
        f = flips[0]
        text += (f" (first: {f.case}, position {f.position}: candidate {f.candidate_top1}, golden {f.golden_top1}, "
                 f"gap {f.gap:.3g})")
    return text
