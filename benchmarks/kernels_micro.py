"""Per-layer cost of the calibration kernels alone, beside vLLM's native CPU attention call.

    python benchmarks/kernels_micro.py                 # SmolLM2 shapes, 2 calibrated heads of 9
    python benchmarks/kernels_micro.py --threads 1

For each setting (decode: G sequences of L keys; prefill: G prompts of P tokens) it times,
per layer: vLLM's ``cpu_attention_with_kv_cache`` over all heads (what the step pays
anyway), the fused ACT kernel's separate pass after it (``ACT_KERNEL=cpu``; steps with rows
of ACT-off requests), the whole-layer kernel that computes every head in place of the native
call (steps whose rows all run ACT: ``decode_attention`` for decode, ``layer_attention`` for
prefill) and the torch reference, and prints each calibrated layer's cost against the
native call. Shapes and the cache layout are vLLM's CPU_ATTN ones (block 128, keys stored
transposed per tile). Records ``uptime``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def _time(fn, repeats: int, min_time: float = 0.2) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            el = time.perf_counter() - t0
            if el > min_time:
                break
        best = min(best, el / n)
    return best


def _native_inputs(p):
    """What vLLM's CPU attention call reads, from a test problem: the step's rows contiguous from
    row 0 (its kernel wants them so), their start offsets, vLLM's own K/V views of the raw cache
    (the problem holds cpu_attn_split views of it), and the int32 sequence lengths."""
    G = p.block_table.shape[0]
    qsl = torch.zeros(G + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(p.query_lens.long(), 0).to(torch.int32)
    T = int(qsl[-1])
    q = p.query[int(p.query_start[0]) : int(p.query_start[0]) + T].contiguous()
    nb, hkv, bs, d = p.key_cache.shape
    k_view, v_view = p.raw_cache.view(nb, hkv, 2 * bs, d).chunk(2, dim=2)
    return q, qsl, k_view, v_view, p.seq_lens.to(torch.int32)


def _native_attention(ops, p, q, out, qsl, k_view, v_view, seq_lens, meta) -> None:
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=k_view, value_cache=v_view, output=out, query_start_loc=qsl, seq_lens=seq_lens,
        scale=p.scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=p.block_table,
        softcap=0.0, scheduler_metadata=meta, s_aux=None,
    )


def _metadata(ops, p, q, qsl, seq_lens, num_heads: int, num_kv_heads: int):
    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=p.block_table.shape[0], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=q.shape[-1],
        seq_lens=seq_lens, dtype=q.dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa="vec",
        enable_kv_split=False,
    )


def _native_call(p, num_heads: int):
    """A closure running vLLM's CPU attention kernel on the problem's cache (all heads)."""
    from vllm import _custom_ops as ops

    q, qsl, k_view, v_view, seq_lens = _native_inputs(p)
    out = torch.empty_like(q)
    meta = _metadata(ops, p, q, qsl, seq_lens, num_heads, k_view.shape[1])
    return lambda: _native_attention(ops, p, q, out, qsl, k_view, v_view, seq_lens, meta)


def _whole_layer(p, out, kind: str, bind_decode, bind_layer):
    """A closure running ACT's whole-layer kernel on the problem (every head, ACT on its heads)."""
    if kind == "decode":
        decode = bind_decode(p.query, out, p.key_cache, p.value_cache)
        return lambda: decode(p.query, out, p.key_cache, p.value_cache, p.block_table, p.seq_lens, p.query_start,
                              p.heads, p.scale, 0.4, 0.1, p.window, p.max_seq_len)
    layer = bind_layer(p.query, out, p.key_cache, p.value_cache)
    return lambda: layer(p.query, out, p.key_cache, p.value_cache, p.block_table, p.seq_lens, p.query_start,
                         p.query_lens, p.heads, p.scale, 0.4, 0.1, p.window, p.max_seq_len)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny settings (CI)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    from act_plugin.kernels import (
        bind_decode_attention,
        bind_layer_attention,
        calibrate_paged,
        calibrate_paged_reference,
        cpu,
    )
    from act_plugin.kernels.testing import make_problem

    if cpu.load() is None:
        raise SystemExit("the fused CPU kernel is unavailable")
    H, Hkv, D, bs = 9, 3, 64, 128
    heads = [0, 4]
    settings = [("decode", G, [L] * G, [1] * G) for G, L in ((1, 320), (16, 320), (64, 320), (16, 2100))]
    settings += [("prefill", G, [P] * G, [P] * G) for G, P in ((1, 256), (16, 256), (1, 2048), (4, 2048))]
    if args.quick:
        settings = [("decode", 4, [64] * 4, [1] * 4), ("prefill", 2, [64] * 2, [64] * 2)]
    print(f"uptime: {open('/proc/loadavg').read().split()[:3]}, torch threads {torch.get_num_threads()}, "
          f"{args.dtype}, SmolLM2 layer shape ({H} heads, {Hkv} KV, D {D}, block {bs}), {len(heads)} calibrated")
    print(f"{'setting':22s}{'native ms':>11s}{'+pass ms':>10s}{'(n+p)/n':>9s}{'whole ms':>10s}{'whole/n':>9s}"
          f"{'reference ms':>14s}")
    os.environ["ACT_KERNEL"] = "cpu"
    os.environ["ACT_WHOLE_PREFILL"] = "1"  # the kernel timed here, whatever the caller's environment says
    for kind, G, sl, ql in settings:
        p = make_problem(sl, ql, num_heads=H, num_kv_heads=Hkv, head_size=D, block_size=bs, layout="cpu_attn",
                         dtype=dtype, heads=heads, extra_rows=0, sink_strength=1.0, seed=1)
        native = _native_call(p, H)
        out = p.output.clone()
        a = list(p.args())
        a[1] = out
        kw = p.kwargs(0.4, 0.1)
        t_native = _time(native, args.repeats)
        t_pass = _time(lambda: calibrate_paged(*a, **kw), args.repeats)
        t_whole = _time(_whole_layer(p, out, kind, bind_decode_attention, bind_layer_attention), args.repeats)
        t_ref = float("nan")
        if not args.no_reference and not (kind == "prefill" and sl[0] * G > 4096):
            t_ref = _time(lambda: calibrate_paged_reference(*a, **kw), args.repeats)
        n = t_native
        print(f"{f'{kind} {G} x {sl[0]}':22s}{n * 1e3:11.3f}{t_pass * 1e3:10.3f}{(n + t_pass) / n:9.3f}"
              f"{t_whole * 1e3:10.3f}{t_whole / n:9.3f}{t_ref * 1e3:14.3f}")
    print("native: vLLM's CPU attention, all heads; +pass: ACT's separate pass after it; whole: ACT's kernel "
          "computing every head in place of the native call (calibration included)")
    print(f"uptime after: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
