"""The CUDA backends' wiring without a GPU: which backends let ACT's whole-layer decode replace
the native kernel (and on which steps), and FLASH_ATTN handing ACT the row log-sum-exp of its
own attention call for calibrated prefill steps (a stand-in for vLLM's kernel object)."""

from __future__ import annotations

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


def _state() -> WorkerState:
    return WorkerState(engine_cfg=ACTEngineConfig.from_any({"profiles": {"a": PROFILE}, "default": None}),
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
])
def test_only_plain_causal_decode_metadata_takes_the_fused_kernel(field, value, plain):
    metadata = SimpleNamespace(causal=True, mm_prefix_query_range_tensor=None, rswa_prefix_lens=None)
    if field is not None:
        setattr(metadata, field, value)
    assert backends.plain_decode_metadata(SimpleNamespace(), metadata) is plain
    assert backends.plain_decode_metadata(SimpleNamespace(chunk_lookback=64), SimpleNamespace()) is False


# ----------------------------------------------------------------------------- FLASH_ATTN's native LSE
def _plan(*query_lens):
    from act_plugin.vllm.plan import SeqGroup, StepPlan

    state = _state()
    groups = [SeqGroup(arm=_arm(state, "a"), block_table=torch.zeros(1, 1), seq_lens=torch.ones(1),
                       query_start=torch.zeros(1), query_lens=torch.ones(1), max_query_len=q, max_seq_len=q)
              for q in query_lens]
    return StepPlan(groups=groups, covers_step=True)


class _FakeFlashKernel:
    """Stands in for vLLM's _FA4_DENSE_ATTENTION_KERNEL: writes ``out``, returns (out, lse
    [H, T]) when asked for the LSE, as flash_attn_varlen_func does."""

    def __init__(self, lse):
        self.lse = lse
        self.calls = []

    def __call__(self, *, q, k, v, out, **kwargs):
        self.calls.append(kwargs)
        out.fill_(1.0)
        return (out, self.lse) if kwargs.get("return_softmax_lse") else out


def _flash_impl(monkeypatch, kernel, layer=1):
    """A FlashAttentionImplWithLSE whose native forward is vLLM's call of the module-level
    kernel object, reduced to that call."""
    import vllm.v1.attention.backends.flash_attn as fa_module
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    from act_plugin.vllm.backends.flash_attn import KERNEL_ATTR, FlashAttentionImplWithLSE

    monkeypatch.setattr(fa_module, KERNEL_ATTR, kernel)

    def native_forward(self, layer_, query, key, value, kv_cache, attn_metadata, output, *rest):
        getattr(fa_module, KERNEL_ATTR)(q=query, k=kv_cache, v=kv_cache, out=output, causal=True)
        return output

    monkeypatch.setattr(FlashAttentionImpl, "forward", native_forward)
    impl = object.__new__(FlashAttentionImplWithLSE)
    impl.num_heads, impl.dcp_world_size = H, 1
    impl.act = SimpleNamespace(layer_index=layer, head_source=_state())
    return impl, fa_module


def test_flash_attn_prefill_hands_act_the_native_lse_transposed(monkeypatch):
    from act_plugin.vllm.backends.flash_attn import KERNEL_ATTR
    from act_plugin.vllm.plan import PLAN_ATTR

    T = 5
    lse = torch.randn(H, T)
    kernel = _FakeFlashKernel(lse)
    impl, fa_module = _flash_impl(monkeypatch, kernel)
    out = torch.zeros(T + 2, H, 4)  # padded rows past num_actual_tokens
    metadata = SimpleNamespace(**{PLAN_ATTR: _plan(1, 4), "num_actual_tokens": T})
    impl.forward(None, torch.zeros(T + 2, H, 4), None, None, torch.zeros(1), metadata, out)
    assert kernel.calls[-1]["return_softmax_lse"] is True and kernel.calls[-1]["causal"] is True
    assert getattr(fa_module, KERNEL_ATTR) is kernel  # restored after the call
    got = impl.act_native_lse
    assert got.shape == (T, H) and got.data_ptr() == lse.data_ptr() and torch.equal(got, lse.t())
    assert out.eq(1.0).all()  # the native output is written as before


@pytest.mark.parametrize("case", ["decode only", "layer not calibrated", "not bound", "unexpected shape"])
def test_flash_attn_runs_untouched_without_calibrated_prefill_rows(monkeypatch, case):
    from act_plugin.vllm.plan import PLAN_ATTR

    T = 5
    kernel = _FakeFlashKernel(torch.randn(H, T + 1 if case == "unexpected shape" else T))
    impl, _ = _flash_impl(monkeypatch, kernel, layer={"layer not calibrated": 3, "not bound": None}.get(case, 1))
    plan = _plan(1, 1) if case == "decode only" else _plan(3)
    impl.forward(None, torch.zeros(T, H, 4), None, None, torch.zeros(1),
                 SimpleNamespace(**{PLAN_ATTR: plan, "num_actual_tokens": T}), torch.zeros(T, H, 4))
    assert impl.act_native_lse is None
    assert ("return_softmax_lse" in kernel.calls[-1]) is (case == "unexpected shape")


def test_the_native_lse_reaches_the_prefill_kernel(monkeypatch):
    """ACTImplMixin hands the impl's LSE to the calibrator once, which passes it to the bound
    paged kernel for the step's groups."""
    from act_plugin.vllm.plan import PLAN_ATTR

    calls = []
    record = lambda *x, **kw: calls.append(kw)  # noqa: E731
    monkeypatch.setattr("act_plugin.vllm.layer_calibrator.bind_paged", lambda *a, **k: record)
    monkeypatch.setattr("act_plugin.vllm.layer_calibrator.bind_decode_attention", lambda *a: None)
    monkeypatch.setattr("act_plugin.vllm.layer_calibrator.bind_decode_rows", lambda *a: None)
    state = _state()
    cal = LayerCalibrator(heads=state, num_heads=H, num_kv_heads=2, scale=0.125, sliding_window=None,
                          kv_split=lambda kv: (kv[..., :4], kv[..., 4:]))
    cal.bind_layer(1)

    class Native:
        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                    output_block_scale=None):
            self.act_native_lse = lse
            return output

    lse = torch.randn(3, H)
    impl = object.__new__(backends.act_impl(Native, lambda kv: (kv, kv)))
    impl.act, impl.act_whole_decode = cal, False
    metadata = SimpleNamespace(**{PLAN_ATTR: _plan(3)})
    impl.forward(None, torch.zeros(3, H, 4), None, None, torch.zeros(2, 2, 4, 8), metadata, torch.zeros(3, H, 4))
    assert calls and calls[-1]["lse"] is lse
    assert impl.act_native_lse is None  # used once
    Native.forward = lambda self, *a, **k: a[5]  # a step without an LSE
    impl.forward(None, torch.zeros(3, H, 4), None, None, torch.zeros(2, 2, 4, 8), metadata, torch.zeros(3, H, 4))
    assert calls[-1]["lse"] is None
