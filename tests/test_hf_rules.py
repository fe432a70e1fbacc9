"""The HF reference path runs every calibration rule (first_token, spans) as its formula says.

Like tests/test_hf.py: q/k/v are recomputed from each attention module's own weights on the
hidden states a spy recorded, and :func:`act_plugin.rules.rule_attention_dense` applied to
them is the reference for the per-head output ``o_proj`` received (prefill, decode steps,
left padding, GQA, sliding windows). The spans helpers (character spans -> token mask) are
tested here too.
"""

from __future__ import annotations

import pytest
import torch

from act_plugin import ACTConfig
from act_plugin.hf import act_enabled
from act_plugin.rules import FirstTokenRule, SpanRule, rule_attention_dense
from act_plugin.span_marks import SpanError, emphasis_by_position, spans_to_token_mask

pytest.importorskip("transformers")
from test_hf import PAD, VOCAB, AttnSpy, decode_loop, layer_window, left_pad, logits, qkv, tiny_llama, tiny_sliding  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FIRST = ACTConfig.from_any({"rule": "first_token", "scale": 3.0, "heads": {1: [0, 3, 6], 2: "all"}})
# per head: layer 1 heads 0 and 6 (KV heads 0 and 1) with different gammas, layer 2 all heads
FIRST_PER_HEAD = ACTConfig.from_any({"rule": "first_token", "scale": {"1:0": 0.25, "1:6": 4.0, "2:*": 2.0}})
SPANS = ACTConfig.from_any({"rule": "spans", "alpha": 0.05, "heads": {1: [1, 5], 2: "all"}})


def emphasis_for(length: int) -> list[bool]:
    """Positions 3..7 and 12..13 emphasised (whatever fits the sequence)."""
    return [3 <= p <= 7 or 12 <= p <= 13 for p in range(length)]


def rule_of(cfg: ACTConfig, layer: int, heads: list[int], emph_by_pos: torch.Tensor | None, k_pos: torch.Tensor):
    """The reference rule built independently of the plugin's own mapping code."""
    if cfg.rule == "first_token":
        gammas = [cfg.head_scales(layer, [h])[0] for h in heads]
        return FirstTokenRule(scale=torch.tensor(gammas))
    assert emph_by_pos is not None
    P = emph_by_pos.shape[1]
    marked = torch.zeros(k_pos.shape, dtype=torch.bool)
    for b in range(k_pos.shape[0]):
        for j, p in enumerate(k_pos[b].tolist()):
            marked[b, j] = 0 <= p < P and bool(emph_by_pos[b, p])
    return SpanRule(emphasised=marked, alpha=cfg.alpha)


def reference_calls(model, spy, layer: int, heads: list[int], cfg: ACTConfig, emph=None, window=None):
    """Per forward call of one unpadded sequence: (actual, rule reference, plain reference)."""
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    ht = torch.tensor(heads)
    scale = model.model.layers[layer].self_attn.scaling
    ks, vs, past, out = [], [], 0, []
    for (h, cos, sin), actual in zip(spy.inputs[layer], spy.outputs[layer]):
        q, k, v = qkv(model, layer, h, cos, sin)
        ks.append(k)
        vs.append(v)
        K, V = torch.cat(ks, 2), torch.cat(vs, 2)
        L = q.shape[2]
        q_pos = torch.arange(past, past + L).unsqueeze(0)
        k_pos = torch.arange(past + L).unsqueeze(0)
        past += L
        args = (q[:, ht], K[:, ht // group], V[:, ht // group], q_pos, k_pos)
        ref = rule_attention_dense(*args, rule_of(cfg, layer, heads, emph, k_pos), scale=scale, window=window)
        plain = rule_attention_dense(*args, FirstTokenRule(scale=1.0), scale=scale, window=window)
        out.append((actual[:, ht], ref.out, plain.out))
    return out


def heads_of(cfg: ACTConfig, layer: int) -> list[int]:
    h = cfg.heads[layer]
    return list(range(8)) if h == "all" else list(h)


# ============================================================================ prefill
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("cfg", [FIRST, FIRST_PER_HEAD, SPANS], ids=["first_token", "first_token_per_head", "spans"])
def test_prefill_matches_the_rule_formula(impl, cfg):
    m = tiny_llama(impl)
    ids = torch.randint(0, VOCAB - 1, (1, 24), generator=torch.Generator().manual_seed(4))
    emph = emphasis_by_position([emphasis_for(24)])
    with act_enabled(m, cfg) as h, AttnSpy(m, [1, 2]) as spy:
        h.set_emphasis(emph if cfg.rule == "spans" else None)
        logits(m, ids)
    for layer in (1, 2):
        [(actual, ref, plain)] = reference_calls(m, spy, layer, heads_of(cfg, layer), cfg, emph)
        torch.testing.assert_close(actual, ref, rtol=0, atol=1e-5)
        assert (actual - plain).abs().max() > 1e-3  # the rule did something


# ============================================================================ decode
@pytest.mark.parametrize("cfg", [FIRST_PER_HEAD, SPANS], ids=["first_token", "spans"])
def test_decode_steps_match_the_rule_formula(cfg):
    m = tiny_llama()
    ids = torch.randint(0, VOCAB - 1, (1, 12), generator=torch.Generator().manual_seed(6))
    steps = 5
    emph = emphasis_by_position([emphasis_for(12)])
    with act_enabled(m, cfg) as h, AttnSpy(m, [1, 2]) as spy:
        h.set_emphasis(emph)
        decode_loop(m, ids, steps)
    for layer in (1, 2):
        calls = reference_calls(m, spy, layer, heads_of(cfg, layer), cfg, emph)
        assert len(calls) == steps + 1 and calls[1][0].shape[2] == 1
        for actual, ref, _ in calls:
            torch.testing.assert_close(actual, ref, rtol=0, atol=1e-5)
        assert (calls[-1][0] - calls[-1][2]).abs().max() > 1e-4  # decode rows are reweighted too


# ============================================================================ padding
@pytest.mark.parametrize("cfg", [FIRST, SPANS], ids=["first_token", "spans"])
def test_left_padded_batch_equals_one_by_one(cfg):
    """Position 0 is the first *real* token and emphasis goes by position: padding never counts."""
    m = tiny_llama()
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(1, VOCAB - 1, (n,), generator=g).tolist() for n in (7, 16, 11)]
    ids, mask = left_pad(seqs)
    plain = logits(m, ids, attention_mask=mask)[:, -1]
    with act_enabled(m, cfg, capture=True) as h:
        h.set_emphasis([emphasis_for(len(s)) for s in seqs])
        batched = logits(m, ids, attention_mask=mask)[:, -1]
        rec = next(r for r in h.records if r["layer"] == 1)
        assert not (rec["key_set"] & (rec["k_pos"] == -1).unsqueeze(1)).any()  # padding is never in the set
        singles = []
        for s in seqs:
            h.set_emphasis([emphasis_for(len(s))])
            singles.append(logits(m, torch.tensor([s]))[0, -1])
        h.set_emphasis([emphasis_for(len(s)) for s in seqs])
        with torch.no_grad():
            gen = m.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
        one = []
        for s in seqs:
            h.set_emphasis([emphasis_for(len(s))])
            with torch.no_grad():
                one.append(m.generate(torch.tensor([s]), max_new_tokens=4, do_sample=False,
                                      pad_token_id=PAD)[0, len(s):])
    assert batched.isfinite().all()
    torch.testing.assert_close(batched, torch.stack(singles), rtol=0, atol=1e-4)
    assert (batched - plain).abs().max() > 1e-2
    assert torch.equal(gen[:, ids.shape[1]:], torch.stack(one))


# ============================================================================ GQA
def test_gqa_per_head_scales_follow_the_kv_mapping():
    """Heads 0 and 6 read KV heads 0 and 1 with gammas 0.25 and 4: the other KV head would differ."""
    m = tiny_llama()
    ids = torch.randint(0, VOCAB - 1, (1, 24), generator=torch.Generator().manual_seed(8))
    with AttnSpy(m, [1]) as base:
        logits(m, ids)
    with act_enabled(m, FIRST_PER_HEAD), AttnSpy(m, [1]) as spy:
        logits(m, ids)
    diff = (base.outputs[1][0] - spy.outputs[1][0]).abs().amax(dim=(0, 2, 3))
    assert (diff[[0, 6]] > 1e-3).all() and (diff[[1, 2, 3, 4, 5, 7]] == 0).all()
    h_inp, cos, sin = spy.inputs[1][0]
    q, k, v = qkv(m, 1, h_inp, cos, sin)
    pos = torch.arange(24).unsqueeze(0)
    wrong = rule_attention_dense(q[:, [6]], k[:, [0]], v[:, [0]], pos, pos, FirstTokenRule(scale=4.0),
                                 scale=m.model.layers[1].self_attn.scaling)
    assert (wrong.out - spy.outputs[1][0][:, [6]]).abs().max() > 1e-3


# ============================================================================ windows
@pytest.mark.parametrize("cfg", [FIRST, SPANS], ids=["first_token", "spans"])
@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_sliding_window_matches_the_rule_formula(kind, cfg):
    """Decoding past the window: the first token leaves the window (first_token then changes
    nothing), emphasised tokens leave it too; each call still equals the formula."""
    m = tiny_sliding(kind)
    ids = torch.randint(0, VOCAB - 1, (1, 14), generator=torch.Generator().manual_seed(9))
    emph = emphasis_by_position([emphasis_for(14)])
    steps = 4
    with act_enabled(m, cfg) as h, AttnSpy(m, [1, 2]) as spy:
        h.set_emphasis(emph)
        decode_loop(m, ids, steps)
    for layer in (1, 2):
        window = layer_window(m, layer)
        if kind == "qwen2" and layer == 1:
            window = None
        calls = reference_calls(m, spy, layer, heads_of(cfg, layer), cfg, emph, window=window)
        assert len(calls) == steps + 1
        for actual, ref, _ in calls:
            torch.testing.assert_close(actual, ref, rtol=0, atol=1e-5)
        if window is not None:  # the window matters: the reference without it differs
            actual, _, _ = calls[0]
            [(_, nowin, _)] = reference_calls(m, _first_call(spy, layer), layer, heads_of(cfg, layer), cfg, emph)
            assert (nowin - actual).abs().max() > 1e-4


def _first_call(spy, layer):
    class One:
        inputs = {layer: spy.inputs[layer][:1]}
        outputs = {layer: spy.outputs[layer][:1]}
    return One


# ============================================================================ identities, refusals
def test_scale_one_is_bitwise_identity():
    m = tiny_llama()
    ids = torch.randint(0, VOCAB - 1, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = logits(m, ids)
    with act_enabled(m, {"rule": "first_token", "scale": 1.0, "heads": "0-3:*"}):
        assert torch.equal(logits(m, ids), ref)


def test_spans_profile_without_emphasis_is_refused():
    m = tiny_llama()
    ids = torch.randint(0, VOCAB - 1, (1, 8), generator=torch.Generator().manual_seed(1))
    with act_enabled(m, SPANS), pytest.raises(RuntimeError, match="set_emphasis"):
        logits(m, ids)


# ============================================================================ character spans -> tokens
OFFSETS = [(0, 0), (0, 5), (5, 6), (6, 11), (11, 12), (12, 20)]  # a special token, then 5 tokens


def test_spans_map_to_the_tokens_they_overlap():
    assert spans_to_token_mask(OFFSETS, [[6, 11]], 20) == [False, False, False, True, False, False]
    assert spans_to_token_mask(OFFSETS, [[3, 7], [15, 16]], 20) == [False, True, True, True, False, True]


@pytest.mark.parametrize("spans,match", [
    ([[5, 30]], "past the end"),
    ([[4, 4]], "start < end"),
    ([[0, 6], [5, 8]], "overlap"),
    ([[1, "x"]], "two integer"),
    ([], "non-empty"),
])
def test_bad_spans_are_refused_with_the_span_named(spans, match):
    with pytest.raises(SpanError, match=match):
        spans_to_token_mask(OFFSETS, spans, 20)


def test_span_on_no_token_is_refused():
    with pytest.raises(SpanError, match="covers no token"):
        spans_to_token_mask([(0, 0), (0, 3), (5, 8)], [[3, 5]], 8)
