"""The candidate's family kernels (model/kernels.py, model/kvcache.py) against plain formulas and transformers.

Attention with sinks and a sliding window against an explicit softmax in float64; YaRN's frequencies
against transformers' ``_compute_yarn_parameters`` for gpt-oss's configuration; the clamped SwiGLU
against ``GptOssExperts._apply_gate``'s formula; a sliding layer's decode steps through the KV cache
(contiguous and paged) against the rows of one masked forward.
"""

from __future__ import annotations

import math

import pytest
import torch

from moesnap.model.config import ModelConfig
from moesnap.model.kernels import rope_frequencies, sdpa_masked, swiglu, window_mask
from moesnap.model.kvcache import KVCache, cached_attention


def explicit_attention(q, k, v, mask, sinks):
    """softmax([q.k / sqrt(D) masked, sink]) without the sink column, times v; float64, heads repeated."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])                 # [B, Hq, Tq, S]
    s = s.masked_fill(~mask[:, None], float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks[None, :, None, None].expand(*s.shape[:3], 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    return (p[..., : k.shape[2]] if sinks is not None else p) @ v


@pytest.mark.parametrize("gqa", [True, False])
@pytest.mark.parametrize("window", [0, 1, 3, 6])
@pytest.mark.parametrize("with_sinks", [True, False])
def test_sdpa_masked_is_the_explicit_softmax(gqa, window, with_sinks):
    g = torch.Generator().manual_seed(window)
    B, Hq, Hkv, T, D = 2, 4, 2, 6, 8
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    sinks = torch.randn(Hq, generator=g, dtype=torch.float64) * 3 if with_sinks else None
    mask = window_mask(torch.arange(T), T, window or T).expand(B, T, T)
    got = sdpa_masked(q, k, v, mask, sinks, gqa)
    want = explicit_attention(q, k, v, mask, sinks)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    if with_sinks:   # the sinks take a share of every softmax: the output is not the sink-free one
        assert not torch.allclose(got, explicit_attention(q, k, v, mask, None), atol=1e-3)


def test_window_mask_keeps_the_query_and_the_window_minus_one_before():
    m = window_mask(torch.arange(6), 6, 3)
    for qp in range(6):
        assert m[qp].nonzero().flatten().tolist() == list(range(max(0, qp - 2), qp + 1))


def test_yarn_frequencies_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    c = transformers.GptOssConfig(head_dim=64)
    p = c.rope_parameters
    inv_hf, factor_hf = ROPE_INIT_FUNCTIONS["yarn"](c)
    inv, factor = rope_frequencies(64, p["rope_theta"], scaling="yarn", factor=p["factor"],
                                   orig_context=p["original_max_position_embeddings"], beta_fast=p["beta_fast"],
                                   beta_slow=p["beta_slow"], truncate=p["truncate"])
    assert p["truncate"] is False
    assert factor == pytest.approx(factor_hf, rel=1e-12) and factor == pytest.approx(0.1 * math.log(32) + 1)
    assert torch.allclose(inv, inv_hf.double(), rtol=3e-7, atol=0)   # theirs is float32
    c.rope_parameters["truncate"] = True                                  # transformers' default, llama.cpp's way
    inv_t, _ = rope_frequencies(64, p["rope_theta"], scaling="yarn", factor=p["factor"],
                                orig_context=p["original_max_position_embeddings"], truncate=True)
    assert torch.allclose(inv_t, ROPE_INIT_FUNCTIONS["yarn"](c)[0].double(), rtol=3e-7, atol=0)
    assert not torch.allclose(inv_t, inv, rtol=1e-3)
    plain, one = rope_frequencies(64, p["rope_theta"])
    assert one == 1.0 and inv[0] == plain[0] and float(inv[-1]) == pytest.approx(float(plain[-1]) / 32, rel=1e-12)


def test_swiglu_variants():
    g = torch.Generator().manual_seed(1)
    gate, up = torch.randn(5, 16, generator=g) * 6, torch.randn(5, 16, generator=g) * 6
    assert torch.equal(swiglu(gate, up), torch.nn.functional.silu(gate) * up)
    gc, uc = gate.clamp(max=7.0), up.clamp(-7.0, 7.0)                       # transformers' _apply_gate
    want = (uc + 1) * (gc * torch.sigmoid(gc * 1.702))
    assert torch.equal(swiglu(gate, up, 7.0, 1.702, oai=True), want)
    assert (gate > 7).any() and (up.abs() > 7).any()                          # the clamps were exercised


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("with_sinks", [True, False])
def test_sliding_decode_through_the_cache_is_the_masked_forward(paged, with_sinks):
    """Prefill 5 rows, then 6 decode steps, on a 4-position window: each step's output is the matching row
    of one masked forward over all 11 positions (the older keys stay cached but are never attended)."""
    cfg = ModelConfig(n_layer=1, hidden=16, n_head=4, n_head_kv=2, head_dim=8, n_expert=4, n_expert_used=2,
                      expert_ff=8, vocab_size=32, rope_base=10000.0, rms_eps=1e-6, context_length=64)
    g = torch.Generator().manual_seed(2)
    T, W = 11, 4
    q = torch.randn(T, 4, 8, generator=g, dtype=torch.float64)
    k, v = torch.randn(T, 2, 8, generator=g, dtype=torch.float64), torch.randn(T, 2, 8, generator=g, dtype=torch.float64)
    sinks = torch.randn(4, generator=g, dtype=torch.float64) if with_sinks else None
    mask = window_mask(torch.arange(T), T, W)[None]
    want = sdpa_masked(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask, sinks,
                       True)[0].transpose(0, 1)                                  # [T, Hq, D]
    cache = KVCache(cfg, n_seqs=1, capacity=T, paged=paged, block_size=4, dtype=torch.float64)
    b = cache.batch([(0, 5)])
    got = [cached_attention(q[:5], k[:5], v[:5], cache.k[0], cache.v[0], b, True, window=W, sinks=sinks)]
    for p in range(5, T):
        b = cache.batch([(0, 1)], step=p - 5)
        got.append(cached_attention(q[p:p + 1], k[p:p + 1], v[p:p + 1], cache.k[0], cache.v[0], b, True,
                                    window=W, sinks=sinks))
    assert torch.allclose(torch.cat(got), want, atol=1e-12, rtol=0)
    full = sdpa_masked(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       window_mask(torch.arange(T), T, T)[None], sinks, True)[0].transpose(0, 1)
    assert not torch.allclose(torch.cat(got)[W:], full[W:], atol=1e-6)        # the window did cut keys off
