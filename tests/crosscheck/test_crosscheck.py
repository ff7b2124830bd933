"""moesnap's reference forward against HF transformers and llama.cpp on the same weights.

Three independent implementations of Qwen3-MoE read the same GGUF file:

* moesnap's reference (:func:`moesnap.model.reference.run_reference`),
* transformers' ``Qwen3MoeForCausalLM`` loaded by :mod:`.hf_model` (gguf-py
  dequantization, no moesnap code),
* llama.cpp through llama-cpp-python (:mod:`moesnap.capture.llama`, own loader, own
  kernels, run in a child process).

On all-F32 files every pair must agree to ``max |Δlogits| <= 1e-4`` with the
same expert *set* at every layer and token, and stage by stage (router
logits, top-k weights, expert outputs, moe_out, layer_out, ...).  On the
quantized tiny preset transformers gets the same dequantized weights as the
reference (same bound), while llama.cpp quantizes activations inside its
quantized matmuls, so that pair is compared stage by stage with a loose
relative bound, routing-aware: a token whose expert set differs must be a
near-tie in the reference, and only what causality leaves untouched by the
flip is compared after it.

Every measured figure is printed (run with ``-s``) and listed in the
terminal summary.  Run: ``pytest -m crosscheck -s tests/crosscheck`` (or
``nox -s crosscheck``).
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.crosscheck

LOGITS_ATOL = 1e-4         # all-F32 files, every pair
STAGE_RTOL_F32 = 1e-4      # stages on all-F32 files: max|Δ| <= STAGE_RTOL_F32 * max(1, max|golden|)
STAGE_RTOL_QUANT = 0.08    # reference vs llama.cpp on quantized files (activation quantization)
COSINE_MIN_QUANT = 0.998
TIE_MARGIN = 0.25          # router-logit gap (k-th vs (k+1)-th) under which a flip vs llama.cpp is a tie
                           # (measured |Δrouter_logits| before the first flip on the tiny preset: <= 0.1)
N_TOKENS = 12


def _need_transformers():
    return pytest.importorskip("transformers", reason="transformers not installed (pip install -r requirements-crosscheck.txt)")


def _need_llama():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install -r requirements-crosscheck.txt; builds from source)")


# ---------------------------------------------------------------- configurations


def _specs() -> dict[str, object]:
    from gguf import GGMLQuantizationType as QT
    from moesnap.model.synth import QTYPE_KINDS, preset

    tiny = preset("tiny")
    f32 = {k: QT.F32 for k in QTYPE_KINDS}
    base = tiny.with_(qtypes=f32, down_exps_alternate=None)
    return {
        # name: spec  (all-F32 unless the name says otherwise)
        "gqa-top2-d32-rope1e4": base.with_(n_layer=2, hidden=64, n_head=4, n_head_kv=2, head_dim=32, n_expert=8,
                                           n_expert_used=2, expert_ff=64, vocab_size=300, rope_base=1e4, seed=1),
        "mha-top4-d64-rope1e6": base.with_(n_layer=2, hidden=64, n_head=4, n_head_kv=4, head_dim=64, n_expert=8,
                                           n_expert_used=4, expert_ff=64, vocab_size=300, rope_base=1e6, seed=2),
        "gqa-top1-d64-rope1e6": base.with_(n_layer=3, hidden=96, n_head=6, n_head_kv=2, head_dim=64, n_expert=16,
                                           n_expert_used=1, expert_ff=32, vocab_size=320, rope_base=1e6, seed=3),
        "mha-top4-d32-rope1e4": base.with_(n_layer=2, hidden=128, n_head=4, n_head_kv=4, head_dim=32, n_expert=12,
                                           n_expert_used=4, expert_ff=96, vocab_size=280, rope_base=1e4, seed=4),
        "tiny-f32": base,
        "tiny": tiny,  # Q8_0 / Q6_K / Q4_K
    }


F32_CONFIGS = ["gqa-top2-d32-rope1e4", "mha-top4-d64-rope1e6", "gqa-top1-d64-rope1e6", "mha-top4-d32-rope1e4",
               "tiny-f32"]
ALL_CONFIGS = F32_CONFIGS + ["tiny"]


class Runs:
    """Builds each model once and caches each implementation's results per config."""

    def __init__(self, root) -> None:
        self.root = root
        self._cache: dict[tuple[str, str], dict] = {}
        self._specs = _specs()

    def spec(self, name):
        return self._specs[name]

    def tokens(self, name) -> list[int]:
        rng = np.random.default_rng(sum(map(ord, name)))  # deterministic per config
        V = self.spec(name).vocab_size
        return [1] + rng.integers(3, V, N_TOKENS - 1).tolist()

    def path(self, name):
        from moesnap.model.synth import make_model

        p = self.root / f"{name}.gguf"
        if not p.exists():
            make_model(p, self.spec(name))
        return p

    def llama_path(self, name):
        """The file llama.cpp reads: the synth file itself once its tensors carry ``.weight`` names."""
        from moesnap.capture.llama import copy_with_weight_suffix, has_weight_suffix

        p = self.path(name)
        if has_weight_suffix(p):
            return p
        q = self.root / f"{name}.llama.gguf"
        if not q.exists():
            copy_with_weight_suffix(p, q)
        return q

    def _get(self, kind, name, fn):
        if (kind, name) not in self._cache:
            self._cache[(kind, name)] = fn()
        return self._cache[(kind, name)]

    def ref(self, name) -> dict[str, np.ndarray]:
        def run():
            from moesnap.model.recorder import ArrayRecorder
            from moesnap.model.reference import run_reference

            rec = ArrayRecorder()
            logits = run_reference(self.path(name), self.tokens(name), recorder=rec)
            out = dict(rec.stacked())
            out.update(rec.model)
            out["logits"] = logits.float().numpy()
            return out

        return self._get("ref", name, run)

    def hf(self, name) -> dict[str, np.ndarray]:
        def run():
            from .hf_model import hf_forward, load_hf_from_gguf

            return hf_forward(load_hf_from_gguf(self.path(name)), self.tokens(name))

        return self._get("hf", name, run)

    def llama(self, name) -> dict[str, np.ndarray]:
        def run():
            from moesnap.capture.llama import llama_forward

            return llama_forward(self.llama_path(name), self.tokens(name), stages=True, derive_attn_out=True)

        return self._get("llama", name, run)


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("crosscheck"))


# ---------------------------------------------------------------- comparison helpers


def _align_by_expert(ids: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    """Reorder the k axis (axis -1 of ids, the axis after it in each array) by ascending expert id."""
    order = np.argsort(ids, axis=-1, kind="stable")
    out = [np.take_along_axis(ids, order, axis=-1)]
    for a in arrays:
        idx = order.reshape(order.shape + (1,) * (a.ndim - order.ndim))
        out.append(np.take_along_axis(a, idx, axis=order.ndim - 1))
    return out


def _expert_sets_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[L, T] bool: same expert set per layer and token."""
    return (np.sort(a, axis=-1) == np.sort(b, axis=-1)).all(axis=-1)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


PAIR_STAGES = {
    # stages each pair can compare (llama.cpp has no named o-projection output: attn_out is derived there)
    "hf": ["embed", "attn_norm", "attn_out", "ffn_norm", "router_logits", "topk_weights", "moe_out",
           "layer_out", "final_norm"],
    "llama": ["embed", "attn_norm", "q", "k", "v", "q_norm", "k_norm", "q_rope", "k_rope", "attn", "attn_out",
              "attn_resid", "ffn_norm", "router_logits", "topk_weights", "expert_out", "moe_out", "layer_out",
              "final_norm"],
}


def _compare_f32(config, pair, gold, cand, stages, figures) -> list[str]:
    """Strict comparison of two runs on an all-F32 file; returns failure messages."""
    fails = []
    d = float(np.abs(gold["logits"] - cand["logits"]).max())
    figures(config, pair, "max|Δlogits|", d)
    if not d <= LOGITS_ATOL:
        fails.append(f"max|Δlogits| = {d:.3e} > {LOGITS_ATOL:g}")
    same = _expert_sets_equal(gold["topk_ids"], cand["topk_ids"])
    if not same.all():
        L, T = np.nonzero(~same)
        fails.append(f"expert sets differ at (layer, token) {list(zip(L.tolist(), T.tolist()))[:10]}: "
                     f"{gold['topk_ids'][L[0], T[0]].tolist()} vs {cand['topk_ids'][L[0], T[0]].tolist()}")
        return fails
    order_same = bool((gold["topk_ids"] == cand["topk_ids"]).all())
    figures(config, pair, "topk order identical", float(order_same))
    g_ids, g_w = _align_by_expert(gold["topk_ids"], gold["topk_weights"])
    _, c_w = _align_by_expert(cand["topk_ids"], cand["topk_weights"])
    worst = (0.0, "")
    for stage in stages:
        if stage not in gold or stage not in cand:
            fails.append(f"stage {stage!r} missing ({'golden' if stage not in gold else 'candidate'})")
            continue
        g, c = gold[stage], cand[stage]
        if stage == "topk_weights":
            g, c = g_w, c_w
        elif stage == "expert_out":
            _, g = _align_by_expert(gold["topk_ids"], g)
            _, c = _align_by_expert(cand["topk_ids"], c)
        if g.shape != c.shape:
            fails.append(f"{stage}: shape {g.shape} vs {c.shape}")
            continue
        err = float(np.abs(g.astype(np.float64) - c).max())
        scale = max(1.0, float(np.abs(g).max()))
        if err / scale > worst[0]:
            worst = (err / scale, stage)
        if not err <= STAGE_RTOL_F32 * scale:
            fails.append(f"{stage}: max|Δ| = {err:.3e} > {STAGE_RTOL_F32:g} * {scale:.3g}")
    figures(config, pair, f"worst stage ({worst[1]}) rel", worst[0])
    return fails


# ---------------------------------------------------------------- all-F32: every pair, strictly


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_reference_vs_transformers(runs, figures, config):
    """transformers gets gguf-py-dequantized weights, like the reference: strict on every config."""
    _need_transformers()
    fails = _compare_f32(config, "ref-vs-hf", runs.ref(config), runs.hf(config), PAIR_STAGES["hf"], figures)
    assert not fails, f"{config}: reference vs transformers:\n  " + "\n  ".join(fails)


@pytest.mark.parametrize("config", F32_CONFIGS)
def test_reference_vs_llama_cpp(runs, figures, config):
    _need_llama()
    fails = _compare_f32(config, "ref-vs-llama", runs.ref(config), runs.llama(config), PAIR_STAGES["llama"], figures)
    assert not fails, f"{config}: reference vs llama.cpp:\n  " + "\n  ".join(fails)


@pytest.mark.parametrize("config", F32_CONFIGS)
def test_transformers_vs_llama_cpp(runs, figures, config):
    """The two independent harnesses agree with each other (checks the harnesses themselves)."""
    _need_transformers()
    _need_llama()
    stages = [s for s in PAIR_STAGES["hf"] if s in PAIR_STAGES["llama"]]
    fails = _compare_f32(config, "hf-vs-llama", runs.hf(config), runs.llama(config), stages, figures)
    assert not fails, f"{config}: transformers vs llama.cpp:\n  " + "\n  ".join(fails)


def test_llama_logits_both_apis_agree(runs, figures):
    """The high-level Llama(logits_all=True) and the low-level cb_eval pass give the same logits."""
    _need_llama()
    ll = runs.llama("gqa-top2-d32-rope1e4")
    d = float(np.abs(ll["logits"] - ll["logits_lowlevel"]).max())
    figures("gqa-top2-d32-rope1e4", "llama-hi-vs-lo", "max|Δlogits|", d)
    assert d <= 1e-6


# ---------------------------------------------------------------- quantized: llama.cpp, routing-aware


def _tie_gap(router_logits: np.ndarray, k: int) -> np.ndarray:
    """[L, T] gap between the k-th and (k+1)-th largest router logit."""
    s = -np.sort(-router_logits, axis=-1)
    return s[..., k - 1] - s[..., k] if s.shape[-1] > k else np.full(s.shape[:-1], np.inf)


def _causal_flips(flipped: np.ndarray) -> np.ndarray:
    """[L, T] bool: flips not explained by an earlier one.

    A flip at (l', t') changes layer l' output of token t', hence (through
    attention) every token >= t' from layer l'+1 on; a flip at (l, t) with an
    earlier flip at l' < l, t' <= t is a consequence, not a new decision.
    """
    L, T = flipped.shape
    independent = flipped.copy()
    for l in range(1, L):
        prior = flipped[:l].any(axis=0)                 # [T] tokens flipped in some earlier layer
        contaminated = np.cumsum(prior) > 0             # tokens at or after the first such token
        independent[l] &= ~contaminated
    return independent


def _compare_quantized(config, pair, gold, cand, stages, k, figures) -> list[str]:
    """Loose, routing-aware comparison (llama.cpp quantizes activations in quantized matmuls).

    Every routing flip that is not a causal consequence of an earlier one must
    be a near-tie in ``gold``'s router (gap between the k-th and (k+1)-th
    logit <= TIE_MARGIN).  Stages are compared on what the first flip leaves
    untouched: every layer before it, the pre-routing stages of its layer and
    the post-routing stages of its unflipped tokens; whole-model stages on the
    tokens before the first flipped token.
    """
    L, T = gold["topk_ids"].shape[:2]
    same = _expert_sets_equal(gold["topk_ids"], cand["topk_ids"])
    flipped = ~same
    gap = _tie_gap(gold["router_logits"], k)
    fails = []
    bad = _causal_flips(flipped) & (gap > TIE_MARGIN)
    if bad.any():
        Ls, Ts = np.nonzero(bad)
        fails.append("expert sets differ where the golden router is not near a tie: (layer, token, gap) "
                     f"{[(int(a), int(b), round(float(gap[a, b]), 4)) for a, b in zip(Ls, Ts)][:8]}")
    figures(config, pair, "routing flips (all)", float(flipped.sum()))
    figures(config, pair, "routing flips (causal)", float(_causal_flips(flipped).sum()))
    if flipped.any():
        figures(config, pair, "max gap of causal flips", float(gap[_causal_flips(flipped)].max()))
    first_layer = int(np.nonzero(flipped.any(axis=1))[0][0]) if flipped.any() else L
    first_tok = int(np.nonzero(flipped[first_layer])[0].min()) if flipped.any() else T
    worst = (0.0, "")
    for stage in stages:
        if stage not in gold or stage not in cand:
            fails.append(f"stage {stage!r} missing")
            continue
        g, c = gold[stage], cand[stage]
        if stage in ("topk_weights", "expert_out"):
            _, g = _align_by_expert(gold["topk_ids"], g)
            _, c = _align_by_expert(cand["topk_ids"], c)
        if g.ndim >= 3 and g.shape[0] == L:  # per-layer stage
            parts_g, parts_c = [g[:first_layer].reshape(-1)], [c[:first_layer].reshape(-1)]
            if first_layer < L:
                keep = np.ones(T, bool)
                if stage in ("topk_weights", "expert_out", "moe_out", "layer_out"):
                    keep = same[first_layer]
                parts_g.append(g[first_layer][keep].reshape(-1))
                parts_c.append(c[first_layer][keep].reshape(-1))
            g, c = np.concatenate(parts_g), np.concatenate(parts_c)
        else:  # whole-model stage: tokens before the first flipped one
            g, c = g[:first_tok], c[:first_tok]
        if g.size == 0:
            continue
        err = float(np.abs(g.astype(np.float64) - c).max())
        rel = err / max(1e-6, float(np.abs(g).max()))
        cos = _cosine(g, c)
        if rel > worst[0]:
            worst = (rel, stage)
        if not (rel <= STAGE_RTOL_QUANT and cos >= COSINE_MIN_QUANT):
            fails.append(f"{stage}: max|Δ|/max|golden| = {rel:.3e} (bound {STAGE_RTOL_QUANT}), cosine {cos:.6f}")
    lg, lc = gold["logits"][:first_tok], cand["logits"][:first_tok]
    if lg.size:
        d = float(np.abs(lg - lc).max())
        figures(config, pair, f"max|Δlogits| tok<{first_tok}", d)
        if not d <= STAGE_RTOL_QUANT * float(np.abs(lg).max()):
            fails.append(f"logits (tokens < {first_tok}): max|Δ| = {d:.3e}")
    figures(config, pair, "max|Δlogits| all tokens", float(np.abs(gold["logits"] - cand["logits"]).max()))
    figures(config, pair, f"worst stage ({worst[1]}) rel", worst[0])
    return fails


@pytest.mark.parametrize("config", ["tiny"])
def test_reference_vs_llama_cpp_quantized(runs, figures, config):
    """llama.cpp quantizes activations for Q8_0/Q4_K/Q6_K matmuls: loose bounds, stage by stage, routing-aware."""
    _need_llama()
    fails = _compare_quantized(config, "ref-vs-llama", runs.ref(config), runs.llama(config), PAIR_STAGES["llama"],
                               runs.spec(config).n_expert_used, figures)
    assert not fails, f"{config}: reference vs llama.cpp (quantized):\n  " + "\n  ".join(fails)


@pytest.mark.parametrize("config", ["tiny"])
def test_transformers_vs_llama_cpp_quantized(runs, figures, config):
    """The same routing-aware comparison between the two independent engines."""
    _need_transformers()
    _need_llama()
    stages = [s for s in PAIR_STAGES["hf"] if s in PAIR_STAGES["llama"]]
    fails = _compare_quantized(config, "hf-vs-llama", runs.hf(config), runs.llama(config), stages,
                               runs.spec(config).n_expert_used, figures)
    assert not fails, f"{config}: transformers vs llama.cpp (quantized):\n  " + "\n  ".join(fails)


def test_causal_flips():
    f = np.zeros((4, 6), bool)
    f[1, 2] = True   # a tie flip
    f[3, 2] = True   # same token later: consequence
    f[3, 5] = True   # later token later: consequence (attention)
    f[2, 1] = True   # earlier token, later layer: independent
    got = _causal_flips(f)
    assert got[1, 2] and got[2, 1] and not got[3, 2] and not got[3, 5]


# ---------------------------------------------------------------- file-format compatibility


def test_llama_cpp_loads_synth_file_as_written(runs):
    """A moesnap synthetic file must load in llama.cpp as written (tensors named ``<name>.weight``)."""
    _need_llama()
    from moesnap.capture.llama import LlamaCrash, llama_forward

    path = runs.path("gqa-top2-d32-rope1e4")
    try:
        out = llama_forward(path, runs.tokens("gqa-top2-d32-rope1e4"), stages=False)
    except LlamaCrash as e:
        pytest.fail(f"llama.cpp cannot load {path.name} as moesnap.model.synth wrote it: {str(e).splitlines()[0]}")
    assert np.isfinite(out["logits"]).all()


def test_reference_on_independently_written_file(tmp_path, figures):
    """A file written by another writer (tests/crosscheck/ggufgen.py, converted-checkpoint tensor
    names ``blk.N.attn_q.weight`` as in real GGUFs): the reference must load it and match both engines."""
    _need_transformers()
    _need_llama()
    from moesnap.model.reference import run_reference

    from .ggufgen import GenSpec, write_gguf
    from .hf_model import hf_forward, load_hf_from_gguf
    from moesnap.capture.llama import llama_forward

    path = write_gguf(tmp_path / "ggufgen.gguf", GenSpec(n_layer=2, n_expert_used=2, seed=7))
    tokens = [1] + np.random.default_rng(7).integers(3, 300, N_TOKENS - 1).tolist()
    hf = hf_forward(load_hf_from_gguf(path), tokens)
    ll = llama_forward(path, tokens, stages=True, derive_attn_out=True)
    fails = _compare_f32("ggufgen", "hf-vs-llama", hf, ll, [s for s in PAIR_STAGES["hf"] if s in PAIR_STAGES["llama"]],
                         figures)
    assert not fails, "transformers vs llama.cpp on an independently written file:\n  " + "\n  ".join(fails)
    ref = run_reference(path, tokens).float().numpy()
    for pair, other in (("ref-vs-hf", hf), ("ref-vs-llama", ll)):
        d = float(np.abs(ref - other["logits"]).max())
        figures("ggufgen", pair, "max|Δlogits|", d)
        assert d <= LOGITS_ATOL
