"""The CUDA backends' wiring without a GPU: which backends let ACT's whole-layer decode replace
the native kernel (and on which steps), and FLASH_ATTN handing ACT the row log-sum-exp of its
own attention call for calibrated prefill steps and for ``first_token`` rows, prefill and decode
(a stand-in for vLLM's kernel object; the first_token kernel itself under Triton's interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip("vllm")

import act_plugin.vllm.backends as backends  # noqa: E402
from act_plugin.config import ACTEngineConfig  # noqa: E402
from act_plugin.vllm.layer_calibrator import LayerCalibrator  # noqa: E402
from act_plugin.vllm.worker_state import Arm, TPSlice, WorkerState  # noqa: E402

H = 8
PROFILE = {"beta": 0.4, "threshold": 0.1, "heads": {"1": [0, 3], "2": [5]}}
FIRST = {"rule": "first_token", "scale": 3.0, "heads": {"1": [0, 3, 5, 6], "3": [1]}}  # layer 2: ACT only
SPANS = {"rule": "spans", "alpha": 0.5, "heads": {"1": [2]}}

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
case = pytest.mark.skipif(not INTERPRETED, reason="run under TRITON_INTERPRET=1 by test_first_token_under_interpreter")
outer = pytest.mark.skipif(INTERPRETED, reason="the outer session runs this")


def _state() -> WorkerState:
    profiles = {"a": PROFILE, "ft": FIRST, "sp": SPANS}
    return WorkerState(engine_cfg=ACTEngineConfig.from_any({"profiles": profiles, "default": None}),
                       tp=TPSlice(0, H, 4))


def _arm(state: WorkerState, name: str) -> Arm:
    return Arm(name, state.engine_cfg.profiles[name])


# ----------------------------------------------------------------------------- whole-layer decode
def test_cuda_backends_let_act_replace_the_native_decode_kernel(monkeypatch):
    """FLASH_ATTN and TRITON_ATTN (and FLASHINFER where installed) write the KV cache in
    do_kv_cache_update, so a decode step of ACT rows may skip their forward."""
    from act_plugin.vllm.backends.flash_attn import ACTFlashAttentionBackend
    from act_plugin.vllm.backends.triton_attn import ACTTritonAttentionBackend

    wrappers = [ACTFlashAttentionBackend, ACTTritonAttentionBackend]
    try:
        from act_plugin.vllm.backends.flashinfer import ACTFlashInferBackend
    except ImportError:  # flashinfer is a CUDA-only package
        pass
    else:
        wrappers.append(ACTFlashInferBackend)
    monkeypatch.setattr(backends, "act_enabled_for_current_engine", lambda: True)
    for wrapper in wrappers:
        assert wrapper.act_native_backend.forward_includes_kv_cache_update is False
        assert wrapper.get_impl_cls().act_whole_decode_backend is True, wrapper.__name__


def test_a_backend_that_writes_the_cache_in_forward_keeps_its_kernel(monkeypatch):
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    class WritesInForward(FlashAttentionBackend):
        forward_includes_kv_cache_update = True

    wrapper = backends.act_backend(WritesInForward, lambda kv: (kv, kv), whole_decode=True)
    monkeypatch.setattr(backends, "act_enabled_for_current_engine", lambda: True)
    assert wrapper.get_impl_cls().act_whole_decode_backend is False


@pytest.mark.parametrize(("field", "value", "plain"), [
    (None, None, True), ("causal", False, False), ("causal", torch.ones(2, dtype=torch.bool), False),
    ("mm_prefix_query_range_tensor", torch.zeros(1), False), ("mm_prefix_range_tensor", torch.zeros(1), False),
    ("rswa_prefix_lens", torch.zeros(1), False), ("use_cascade", True, False),
    ("dynamic_causal", torch.ones(2, dtype=torch.bool), False),
])
def test_only_plain_causal_decode_metadata_takes_the_fused_kernel(field, value, plain):
    metadata = SimpleNamespace(causal=True, mm_prefix_query_range_tensor=None, rswa_prefix_lens=None)
    if field is not None:
        setattr(metadata, field, value)
    assert backends.plain_causal_metadata(SimpleNamespace(), metadata) is plain
    assert backends.plain_causal_metadata(SimpleNamespace(chunk_lookback=64), SimpleNamespace()) is False


# ----------------------------------------------------------------------------- FLASH_ATTN's native LSE
def _group(name, q, **tensors):
    from act_plugin.vllm.plan import SeqGroup

    state = _state()
    shapes = dict(block_table=torch.zeros(1, 1), seq_lens=torch.ones(1), query_start=torch.zeros(1),
                  query_lens=torch.ones(1), max_query_len=q, max_seq_len=q)
    return SeqGroup(arm=_arm(state, name), **{**shapes, **tensors})


def _plan(*query_lens, rules=()):
    """ACT groups of profile ``a`` with these max query lengths, and rule groups ``(profile, q)``."""
    from act_plugin.vllm.plan import StepPlan

    return StepPlan(groups=[_group("a", q) for q in query_lens],
                    rule_groups=[_group(name, q) for name, q in rules], covers_step=True)


class _FakeFlashKernel:
    """Stands in for vLLM's _FA4_DENSE_ATTENTION_KERNEL: writes ``out`` (ones, or ``native``),
    returns (out, lse [H, T]) when asked for the LSE, as flash_attn_varlen_func does."""

    def __init__(self, lse, native=None):
        self.lse = lse
        self.native = native
        self.calls = []

    def __call__(self, *, q, k, v, out, **kwargs):
        self.calls.append(kwargs)
        if self.native is None:
            out.fill_(1.0)
        else:
            out.copy_(self.native)
        return (out, self.lse) if kwargs.get("return_softmax_lse") else out


def _calibrator(layer, kv_split=lambda kv: (kv[..., :4], kv[..., 4:]), scale=0.125, window=None):
    cal = LayerCalibrator(heads=_state(), num_heads=H, num_kv_heads=2, scale=scale, sliding_window=window,
                          kv_split=kv_split)
    if layer is not None:
        cal.bind_layer(layer)
    return cal


def _flash_impl(monkeypatch, kernel, layer=1, act_layer=False, kv_split=None, **calibrator):
    """A FlashAttentionImplWithLSE (with ``act_layer``: the ACT impl built on it, as the
    FLASH_ATTN wrapper makes) whose native forward is vLLM's call of the module-level kernel
    object on the step's actual tokens, reduced to that call."""
    import vllm.v1.attention.backends.flash_attn as fa_module
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    from act_plugin.vllm.backends.flash_attn import KERNEL_ATTR, FlashAttentionImplWithLSE

    monkeypatch.setattr(fa_module, KERNEL_ATTR, kernel)

    def native_forward(self, layer_, query, key, value, kv_cache, attn_metadata, output, *rest):
        n = attn_metadata.num_actual_tokens
        getattr(fa_module, KERNEL_ATTR)(q=query[:n], k=kv_cache, v=kv_cache, out=output[:n], causal=True)
        return output

    monkeypatch.setattr(FlashAttentionImpl, "forward", native_forward)
    split = kv_split or (lambda kv: (kv[..., :4], kv[..., 4:]))
    cls = backends.act_impl(FlashAttentionImplWithLSE, split) if act_layer else FlashAttentionImplWithLSE
    impl = object.__new__(cls)
    impl.num_heads, impl.dcp_world_size = H, 1
    impl.act = _calibrator(layer, split, **calibrator)
    # the whole-layer decode is on: steps with first_token rows must still run the native call
    impl.act_whole_decode = True
    return impl, fa_module


def _metadata(plan, T):
    from act_plugin.vllm.plan import PLAN_ATTR

    return SimpleNamespace(**{PLAN_ATTR: plan, "num_actual_tokens": T})


def test_flash_attn_prefill_hands_act_the_native_lse_transposed(monkeypatch):
    from act_plugin.vllm.backends.flash_attn import KERNEL_ATTR

    T = 5
    lse = torch.randn(H, T)
    kernel = _FakeFlashKernel(lse)
    impl, fa_module = _flash_impl(monkeypatch, kernel)
    out = torch.zeros(T + 2, H, 4)  # padded rows past num_actual_tokens
    impl.forward(None, torch.zeros(T + 2, H, 4), None, None, torch.zeros(1), _metadata(_plan(1, 4), T), out)
    assert kernel.calls[-1]["return_softmax_lse"] is True and kernel.calls[-1]["causal"] is True
    assert getattr(fa_module, KERNEL_ATTR) is kernel  # restored after the call
    got = impl.act_native_lse
    assert got.shape == (T, H) and got.data_ptr() == lse.data_ptr() and torch.equal(got, lse.t())
    assert out[:T].eq(1.0).all()  # the native output is written as before


@pytest.mark.parametrize("rules", [[("ft", 1)], [("ft", 1), ("ft", 1)], [("ft", 6)], [("sp", 1), ("ft", 1)]],
                         ids=["decode", "two decode groups", "prefill", "with spans rows"])
@pytest.mark.parametrize("act_rows", [(), (1,)], ids=["first_token only", "with act decode rows"])
def test_flash_attn_asks_the_native_lse_for_first_token_rows(monkeypatch, rules, act_rows):
    """A step whose only LSE reader is a first_token group (prefill or decode: the rule is
    O(1) per row given the LSE) asks the native call for it in a layer of the profile."""
    T = 5
    lse = torch.randn(H, T)
    kernel = _FakeFlashKernel(lse)
    impl, _ = _flash_impl(monkeypatch, kernel)
    impl.forward(None, torch.zeros(T, H, 4), None, None, torch.zeros(1), _metadata(_plan(*act_rows, rules=rules), T),
                 torch.zeros(T, H, 4))
    assert kernel.calls[-1]["return_softmax_lse"] is True
    assert torch.equal(impl.act_native_lse, lse.t())


@pytest.mark.parametrize("case", [
    "act decode only", "spans only", "first_token elsewhere", "act elsewhere", "layer not calibrated", "not bound",
    "unexpected shape", "no groups",
])
def test_flash_attn_runs_untouched_where_no_kernel_reads_the_lse(monkeypatch, case):
    """ACT decode rows and spans rows read no LSE, nor does a layer where the step's
    first_token (layers 1, 3) or ACT (layers 1, 2) arms have no heads; an LSE of another shape is
    dropped (the kernels compute their own)."""
    T = 5
    kernel = _FakeFlashKernel(torch.randn(H, T + 1 if case == "unexpected shape" else T))
    layer = {"first_token elsewhere": 2, "act elsewhere": 3, "layer not calibrated": 0, "not bound": None}.get(case, 1)
    plan = {"act decode only": _plan(1, 1), "spans only": _plan(1, rules=[("sp", 4)]),
            "first_token elsewhere": _plan(1, rules=[("ft", 1), ("ft", 4)]), "act elsewhere": _plan(4),
            "no groups": _plan()}.get(case, _plan(3))
    impl, _ = _flash_impl(monkeypatch, kernel, layer=layer)
    impl.act_native_lse = torch.zeros(T, H)  # an earlier step's: never handed on
    impl.forward(None, torch.zeros(T, H, 4), None, None, torch.zeros(1), _metadata(plan, T), torch.zeros(T, H, 4))
    assert impl.act_native_lse is None
    assert ("return_softmax_lse" in kernel.calls[-1]) is (case == "unexpected shape")


def test_the_native_lse_reaches_the_prefill_kernel(monkeypatch):
    """ACTImplMixin hands the impl's LSE to the calibrator once, which passes it to the bound
    paged kernel for the step's groups."""
    calls = []
    record = lambda *x, **kw: calls.append(kw)  # noqa: E731
    monkeypatch.setattr("act_plugin.vllm.layer_calibrator.bind_paged", lambda *a, **k: record)
    monkeypatch.setattr("act_plugin.vllm.layer_calibrator.bind_decode_attention", lambda *a: None)
    monkeypatch.setattr("act_plugin.vllm.layer_calibrator.bind_decode_rows", lambda *a: None)

    class Native:
        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                    output_block_scale=None):
            self.act_native_lse = lse
            return output

    lse = torch.randn(3, H)
    impl = object.__new__(backends.act_impl(Native, lambda kv: (kv, kv)))
    impl.act, impl.act_whole_decode = _calibrator(1), False
    metadata = _metadata(_plan(3), 3)
    impl.forward(None, torch.zeros(3, H, 4), None, None, torch.zeros(2, 2, 4, 8), metadata, torch.zeros(3, H, 4))
    assert calls and calls[-1]["lse"] is lse
    assert impl.act_native_lse is None  # used once
    Native.forward = lambda self, *a, **k: a[5]  # a step without an LSE
    impl.forward(None, torch.zeros(3, H, 4), None, None, torch.zeros(2, 2, 4, 8), metadata, torch.zeros(3, H, 4))
    assert calls[-1]["lse"] is None


@pytest.mark.parametrize("rules", [[("ft", 1)], [("ft", 4)], [("ft", 1), ("ft", 3)]],
                         ids=["decode", "prefill", "decode and prefill groups"])
@pytest.mark.parametrize("act_rows", [(), (1,), (3,)], ids=["first_token only", "act decode", "act prefill"])
def test_flash_attn_lse_reaches_first_token_paged(monkeypatch, rules, act_rows):
    """Through the FLASH_ATTN ACT impl (whole-layer decode on, declined for first_token rows):
    every first_token group of the step gets the native LSE as the [T, H] view of the native
    call's own [H, T] tensor, with query and output cut to the step's actual tokens (graph
    padding past them); ACT groups get the same LSE."""
    T, pad = 6, 3
    lse = torch.randn(H, T)
    kernel = _FakeFlashKernel(lse)
    impl, _ = _flash_impl(monkeypatch, kernel, act_layer=True)
    paged, first = [], []
    record = lambda *x, **kw: paged.append(kw)  # noqa: E731
    monkeypatch.setattr("act_plugin.vllm.layer_calibrator.bind_paged", lambda *a, **k: record)
    monkeypatch.setattr("act_plugin.vllm.layer_calibrator.bind_decode_attention", lambda *a: None)
    monkeypatch.setattr("act_plugin.vllm.layer_calibrator.bind_decode_rows", lambda *a: None)
    monkeypatch.setattr("act_plugin.vllm.layer_calibrator.first_token_paged",
                        lambda query, output, *a, **kw: first.append((query.shape[0], output.shape[0], a[-1], kw)))
    out = torch.zeros(T + pad, H, 4)
    impl.forward(None, torch.zeros(T + pad, H, 4), None, None, torch.zeros(2, 2, 4, 8),
                 _metadata(_plan(*act_rows, rules=rules), T), out)
    assert kernel.calls[-1]["return_softmax_lse"] is True  # the native call ran, with the LSE
    assert len(first) == len(rules) and len(paged) == len(act_rows)
    for rows, out_rows, gammas, kw in first:
        got = kw["lse"]
        assert got is not None and got.data_ptr() == lse.data_ptr() and torch.equal(got, lse.t())
        assert rows == out_rows == T and gammas.tolist() == [3.0] * 4
    assert all(kw["lse"] is first[0][3]["lse"] for kw in paged)
    assert impl.act_native_lse is None  # used once


def test_first_token_without_an_lse_computes_its_own(monkeypatch):
    """Backends that return no LSE (CPU_ATTN, TRITON_ATTN, FLASHINFER): first_token_paged is
    called with ``lse=None``."""
    first = []
    monkeypatch.setattr("act_plugin.vllm.layer_calibrator.bind_paged", lambda *a, **k: None)
    monkeypatch.setattr("act_plugin.vllm.layer_calibrator.bind_decode_attention", lambda *a: None)
    monkeypatch.setattr("act_plugin.vllm.layer_calibrator.bind_decode_rows", lambda *a: None)
    monkeypatch.setattr("act_plugin.vllm.layer_calibrator.first_token_paged", lambda *a, **kw: first.append(kw))
    cal = _calibrator(1)
    cal.apply(torch.zeros(4, H, 4), torch.zeros(2, 2, 4, 8), _metadata(_plan(rules=[("ft", 1)]), 4),
              torch.zeros(4, H, 4))
    assert len(first) == 1 and first[0]["lse"] is None


# ----------------------------------------------------------------------------- under Triton's interpreter
@outer
def test_first_token_under_interpreter():
    """Runs this file's ``case`` tests in a fresh process with ``TRITON_INTERPRET=1`` (set
    before triton is imported), as tests/test_kernels_triton_first_token.py does."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
         "-k", "interpreted"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    print("interpreter run:", *res.stdout.strip().splitlines()[-1:])
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and " failed" not in res.stdout


FT_SCENARIOS = {  # seq_lens, query_lens, window
    "decode": ([37, 130, 5], [1, 1, 1], None),
    "prefill": ([70, 40], [70, 40], None),
    "chunked_prefill_window": ([90, 50], [30, 50], 40),  # rows after cached keys; key 0 leaves some windows
}


@case
@pytest.mark.parametrize("scenario", list(FT_SCENARIOS))
def test_interpreted_first_token_with_flash_attn_lse_matches_the_rule(monkeypatch, scenario):
    """The whole path on CPU tensors routed to the Triton kernel (``ACT_KERNEL=triton``): the
    FLASH_ATTN ACT impl's native call (a stand-in writing the native output and returning
    the exact row LSE, [H, T]) and the first_token kernel given that LSE equal the dense
    rule; graph padding rows past the actual tokens stay as they were."""
    import act_plugin.kernels.triton_first_token as ft
    from act_plugin.kernels.testing import expected_first_token, make_problem, native_lse
    from act_plugin.vllm.plan import StepPlan

    monkeypatch.setenv("ACT_KERNEL", "triton")
    seq_lens, query_lens, window = FT_SCENARIOS[scenario]
    p = make_problem(seq_lens, query_lens, layout="flash_attn", num_heads=H, num_kv_heads=2, heads=FIRST["heads"]["1"],
                     window=window, sink_strength=1.5, seed=11)
    T, pad = p.query.shape[0], 3
    lse = native_lse(p).t().contiguous()  # FLASH_ATTN's [H, T]
    lse[torch.isinf(lse)] = 0.0  # rows of other requests: the native call returns finite values there
    kernel = _FakeFlashKernel(lse, native=p.output)
    impl, _ = _flash_impl(monkeypatch, kernel, act_layer=True, kv_split=lambda kv: (p.key_cache, p.value_cache),
                          scale=p.scale, window=window)
    given = []
    real = ft.first_token_triton

    def spy(*a, **k):
        given.append(k["lse"])
        return real(*a, **k)

    monkeypatch.setattr(ft, "first_token_triton", spy)
    group = _group("ft", p.max_query_len, block_table=p.block_table, seq_lens=p.seq_lens, query_start=p.query_start,
                   query_lens=p.query_lens, max_seq_len=p.max_seq_len)
    out = torch.full((T + pad, H, p.query.shape[-1]), 7.0)
    query = torch.cat([p.query, torch.zeros(pad, H, p.query.shape[-1])])
    impl.forward(None, query, None, None, p.raw_cache,
                 _metadata(StepPlan(rule_groups=[group], covers_step=True), T), out)
    assert len(given) == 1 and given[0] is not None and given[0].data_ptr() == lse.data_ptr()
    exp = expected_first_token(p, torch.full((4,), FIRST["scale"]))
    assert not torch.equal(out[:T], p.output)
    assert (out[:T] - exp).abs().max() <= 2e-5 * exp.abs().max()
    assert out[T:].eq(7.0).all()
