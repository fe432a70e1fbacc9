"""Per-layer cost of the Triton calibration kernels on a CUDA GPU, beside a plain attention
call of the same shape (torch SDPA over all heads, what the step pays anyway).

    python benchmarks/kernels_gpu.py                # Llama-8B-like shapes: 32 heads, 8 KV heads, D 128
    python benchmarks/kernels_gpu.py --quick        # a small sweep (smoke test)

Needs torch with CUDA and Triton, not vLLM. For each setting (decode: G sequences of L keys,
one query row each; prefill: G prompts of P tokens) it times, with CUDA events (median of
the repeats, after warm-up): the attention call over every head, the fused ACT kernel
(``act_plugin.kernels.calibrate_paged`` on CUDA tensors = Triton) for the calibrated heads
(default 6 of 32, about the paper's density), and the torch reference path, and prints the
fused kernel's time as a share of the attention call. The paged cache uses vLLM's
FLASH_ATTN layout (``[blocks, 2, block, kv_heads, D]``), block 16, a shuffled block table.
Keys get a moderate sink direction so that rows have real sink sets.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F


def _timed(fn, repeats: int, inner: int) -> float:
    """Median milliseconds per call over ``repeats`` batches of ``inner`` calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def build(G: int, L: int, P: int, H: int, Hkv: int, D: int, n_heads: int, dtype, block: int = 16, seed: int = 0):
    """A paged problem on the GPU: G sequences of L keys whose last P rows are this step's."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    nblk = (L + block - 1) // block
    total = G * nblk + 1
    raw = torch.randn(total, 2, block, Hkv, D, device=dev, dtype=dtype, generator=gen)
    sink = torch.randn(D, device=dev, generator=gen)
    sink = (sink / sink.norm() * 2.0 * D**0.5).to(dtype)
    raw[:, 0, 0] += sink  # the first slot of every block leans towards one direction: sinks
    key_cache = raw[:, 0].permute(0, 2, 1, 3)  # [blocks, Hkv, block, D] view, vLLM's strides
    value_cache = raw[:, 1].permute(0, 2, 1, 3)
    table = torch.randperm(total - 1, device=dev, generator=gen)[: G * nblk].view(G, nblk).to(torch.int32)
    T = G * P
    query = torch.randn(T, H, D, device=dev, dtype=dtype, generator=gen) + 0.3 * sink
    output = torch.randn(T, H, D, device=dev, dtype=dtype, generator=gen)
    heads = torch.arange(0, H, max(1, H // n_heads), device=dev)[:n_heads]
    return dict(
        query=query, output=output, key_cache=key_cache, value_cache=value_cache, block_table=table,
        seq_lens=torch.full((G,), L, dtype=torch.int32, device=dev),
        query_start=torch.arange(G, device=dev) * P, query_lens=torch.full((G,), P, device=dev),
        heads=heads, kv_heads=heads // (H // Hkv), max_query_len=P, max_seq_len=L, scale=D**-0.5,
    )


def dense_attention_call(p, G, L, P, H, Hkv, D):
    """The step's plain attention over all heads: SDPA on dense [G, H, *, D] tensors (GQA)."""
    q = p["query"].view(G, P, H, D).transpose(1, 2).contiguous()
    k = torch.randn(G, Hkv, L, D, device="cuda", dtype=q.dtype)
    v = torch.randn_like(k)
    causal = P > 1

    def run():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and P == L, enable_gqa=True)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--calibrated", type=int, default=6, help="calibrated heads in the layer")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()

    from act_plugin.kernels import calibrate_paged, calibrate_paged_reference, kernel_name

    if not torch.cuda.is_available():
        raise SystemExit("kernels_gpu.py needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    H, Hkv, D, n = args.heads, args.kv_heads, args.head_dim, args.calibrated
    print(f"device {torch.cuda.get_device_name()} | torch {torch.__version__} | kernel {kernel_name(torch.device('cuda'))}"
          f" | H {H}, KV heads {Hkv}, D {D}, {n} calibrated heads, {args.dtype}")
    decode = [(1, 256), (16, 2048), (64, 2048)] if args.quick else [
        (1, 256), (1, 2048), (16, 256), (16, 2048), (64, 256), (64, 2048), (64, 8192)]
    prefill = [(1, 256)] if args.quick else [(1, 256), (1, 2048), (4, 2048), (1, 8192)]
    settings = [("decode", G, L, 1) for G, L in decode] + [("prefill", G, P, P) for G, P in prefill]
    header = f"{'mode':8} {'G':>3} {'L':>5} | {'attention ms':>12} {'ACT fused ms':>12} {'share':>7} | {'reference ms':>12}"
    print(header)
    print("-" * len(header))
    for mode, G, L, P in settings:
        p = build(G, L, P, H, Hkv, D, n, dtype)
        attn = dense_attention_call(p, G, L, P, H, Hkv, D)
        kw = {k: p[k] for k in ("scale", "max_query_len", "max_seq_len")}
        tensors = [p[k] for k in ("query", "output", "key_cache", "value_cache", "block_table", "seq_lens",
                                  "query_start", "query_lens", "heads", "kv_heads")]
        out = p["output"]

        def fused(impl=calibrate_paged):
            impl(*tensors, beta=0.4, threshold=0.05, window=None, **kw)

        inner = 20 if mode == "decode" else 5
        t_attn = _timed(attn, args.repeats, inner)
        t_fused = _timed(fused, args.repeats, inner)
        ref = "-"
        if not args.no_reference and G * L * P <= 64 * 2048 * 1 + 4 * 2048 * 2048:
            ref = f"{_timed(lambda: fused(calibrate_paged_reference), 3, 2):12.3f}"
        print(f"{mode:8} {G:>3} {L:>5} | {t_attn:12.3f} {t_fused:12.3f} {t_fused / t_attn:6.0%} | {ref:>12}")
        del p, out, tensors
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
