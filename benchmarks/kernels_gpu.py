"""Per-layer cost of ACT on a CUDA GPU against the native attention call of the same shape,
and the bytes each reads (the roofline argument, computed from shapes: no GPU needed).

    python benchmarks/kernels_gpu.py                # 32 heads, 8 KV heads, D 128, bf16, 6 calibrated heads
    python benchmarks/kernels_gpu.py --quick        # a small sweep (smoke test)
    python benchmarks/kernels_gpu.py --bytes-only   # the bytes table alone, on any machine

Needs torch with CUDA and Triton, not vLLM. Per setting (decode: G sequences of L keys, one
query row each; prefill: G prompts of P tokens) it times with CUDA events (median of the
repeats after warm-up):

* ``native``: one plain attention call over every head (torch SDPA with GQA on dense K/V --
  what the step pays anyway, and a lower bound for vLLM's paged kernel);
* decode ``fused``: the Triton whole-layer decode (every head, ACT on the calibrated ones),
  which *replaces* the native call; ``native+ACT``: the native time plus that of
  ``calibrate_paged`` (timed apart);
* prefill ``native+ACT``: the native time plus ``calibrate_paged`` given the row
  log-sum-exp FLASH_ATTN returns (computed once, untimed, by torch's flash kernel); ``own
  lse``: without it, one more K-only pass.
* ``first_token`` (decode and prefill): the native time plus ``first_token_paged`` (the
  ZeroTuning rule, gamma 0.5 and 2 alternating over the calibrated heads) given the native
  row LSE (one key and one value per row), and without it (one K-only pass).

Bytes (HBM traffic per call, modelled from shapes; the KV cache dominates): ``native`` reads
Q, K, V and writes O; the fused decode adds its split scratch (partials, statistics,
candidates, written and read back) and the candidates' V rows; the prefill ACT pass reads
the calibrated heads' K per block of 64 rows, the column buffer, and -- only in blocks with
a row whose non-sink mass is below the recompute cut -- K and V once more ("worst": every
block). first_token reads per calibrated head and row its query, native output (read and
written) and LSE, and per block of rows ``k0``/``v0``; without the LSE, the visible keys once
per block of rows (16 rows in decode, 64 in prefill), per calibrated head (heads sharing a
KV head each read it); "worst" is the latter plus K and V again (every block below the
recompute cut: only gamma < 1 rows with a large share on key 0). Paged cache in vLLM's
FLASH_ATTN layout, block 16, shuffled block table; keys get a sink direction so that rows
have real sink sets.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import torch

DECODE = [(1, 256), (1, 2048), (1, 8192), (16, 256), (16, 2048), (16, 8192), (64, 256), (64, 2048), (64, 8192)]
PREFILL = [(1, 256), (1, 2048), (4, 2048), (1, 8192)]
QUICK_DECODE = [(1, 2048), (64, 2048)]
QUICK_PREFILL = [(1, 2048)]


@dataclass(frozen=True)
class Shape:
    H: int
    Hkv: int
    D: int
    n: int  # calibrated heads
    elem: int  # bytes per cache element
    sms: int = 132


def decode_bytes(s: Shape, G: int, L: int, tau: float) -> dict[str, float]:
    """Bytes per decode call: native, the fused whole-layer kernel, native + calibration."""
    from act_plugin.kernels.triton_decode import candidate_slots, plan_splits

    qo = 2 * G * s.H * s.D * s.elem
    kv = 2 * G * s.Hkv * L * s.D * s.elem
    native = qo + kv
    splits, _ = plan_splits(G, s.Hkv, L, 64, 4 * s.sms)
    cand = candidate_slots(tau)
    scratch = 2 * G * s.H * splits * (4 * s.D + 16 + 8 * cand)  # written by the splits, read by the reduce
    cand_v = G * s.n * splits * min(cand, int(1 / tau)) * s.D * s.elem  # upper bound: every slot holds a key
    fused = native + scratch + cand_v
    kv_heads = min(s.n, s.Hkv)  # KV heads holding a calibrated head (at most)
    after = native + qo * s.n / s.H + 2 * G * kv_heads * L * s.D * s.elem + scratch * kv_heads / s.Hkv + cand_v
    return {"native": native, "fused": fused, "native+ACT": after}


def prefill_bytes(s: Shape, G: int, P: int, block_m: int = 64, fa_block: int = 128) -> dict[str, float]:
    """Bytes per causal prefill call: native flash attention (K/V re-read per block of
    ``fa_block`` rows, per KV head); the ACT passes with the native LSE."""
    qo = 2 * G * P * s.H * s.D * s.elem
    visible = P * P / 2  # causal (row, key) pairs per sequence and head
    native = qo + 2 * G * s.Hkv * (s.H // s.Hkv) * visible / fa_block * s.D * s.elem
    k_pass = G * s.n * visible / block_m * (s.D * s.elem + 4)  # K per block of rows + the column atomics
    col_read = G * s.n * visible / block_m * 4
    act = qo * s.n / s.H * 2 + k_pass + col_read
    worst = act + G * s.n * visible / block_m * 2 * s.D * s.elem
    return {"native": native, "native+ACT": native + act, "worst": native + worst}


def first_token_bytes(s: Shape, G: int, L: int, P: int) -> dict[str, float]:
    """Bytes per call of the first_token kernel after the native call (``P`` rows per
    sequence of ``L`` keys: decode ``P = 1``, prefill ``P = L``), as ratios' numerators."""
    block_m = 16 if P <= 16 else 64
    blocks = G * s.n * -(-P // block_m)
    rows = G * P * s.n * (3 * s.D * s.elem + 4) + blocks * 2 * s.D * s.elem  # q, O in/out, lse; k0, v0
    visible = L if P == 1 else P * P / 2  # (row, key) pairs per sequence and head
    k_pass = G * s.n * visible / (1 if P == 1 else block_m) * s.D * s.elem
    native = decode_bytes(s, G, L, 0.1)["native"] if P == 1 else prefill_bytes(s, G, P)["native"]
    return {"native": native, "lse": native + rows, "own": native + rows + k_pass,
            "worst": native + rows + 3 * k_pass}


def print_first_token_bytes(s: Shape, decode, prefill) -> None:
    print(f"\nfirst_token bytes per call (model; {s.n} calibrated heads): (native + rule) / native")
    print(f"{'mode':8} {'G':>3} {'L/P':>5} | {'native lse':>10} {'own lse':>8} {'worst':>7}")
    for mode, G, L, P in [("decode", G, L, 1) for G, L in decode] + [("prefill", G, P, P) for G, P in prefill]:
        b = first_token_bytes(s, G, L, P)
        print(f"{mode:8} {G:>3} {L:>5} | {b['lse'] / b['native']:10.3f} {b['own'] / b['native']:8.3f}"
              f" {b['worst'] / b['native']:7.3f}")


def print_bytes(s: Shape, decode, prefill, tau: float) -> None:
    print(f"bytes per call (model; H {s.H}, KV heads {s.Hkv}, D {s.D}, {s.n} calibrated, {s.elem}-byte cache)")
    print(f"{'mode':8} {'G':>3} {'L/P':>5} | {'native MB':>10} {'fused/native':>12} {'(native+ACT)/native':>19}"
          f" {'worst/native':>12}")
    for G, L in decode:
        b = decode_bytes(s, G, L, tau)
        print(f"{'decode':8} {G:>3} {L:>5} | {b['native'] / 1e6:10.2f} {b['fused'] / b['native']:12.3f}"
              f" {b['native+ACT'] / b['native']:19.3f} {'-':>12}")
    for G, P in prefill:
        b = prefill_bytes(s, G, P)
        print(f"{'prefill':8} {G:>3} {P:>5} | {b['native'] / 1e6:10.2f} {'-':>12}"
              f" {b['native+ACT'] / b['native']:19.3f} {b['worst'] / b['native']:12.3f}")


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


def build(G: int, L: int, P: int, s: Shape, dtype, block: int = 16, seed: int = 0) -> dict:
    """A paged problem on the GPU (G sequences of L keys whose last P rows are this step's)
    and the same keys and values dense, for the native call."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    nblk = (L + block - 1) // block
    total = G * nblk + 1
    raw = torch.randn(total, 2, block, s.Hkv, s.D, device=dev, dtype=dtype, generator=gen)
    sink = torch.randn(s.D, device=dev, generator=gen)
    sink = (sink / sink.norm() * 2.0 * s.D**0.5).to(dtype)
    raw[:, 0, 0] += sink  # the first slot of every block leans towards one direction: sinks
    table = torch.randperm(total - 1, device=dev, generator=gen)[: G * nblk].view(G, nblk).to(torch.int32)
    dense = raw[table.long()]  # [G, nblk, 2, block, Hkv, D]
    k = dense[:, :, 0].reshape(G, nblk * block, s.Hkv, s.D)[:, :L].transpose(1, 2).contiguous()
    v = dense[:, :, 1].reshape(G, nblk * block, s.Hkv, s.D)[:, :L].transpose(1, 2).contiguous()
    T = G * P
    query = torch.randn(T, s.H, s.D, device=dev, dtype=dtype, generator=gen) + 0.3 * sink
    heads = torch.arange(0, s.H, max(1, s.H // s.n), device=dev)[: s.n]
    return dict(
        query=query, output=torch.empty_like(query), key_cache=raw[:, 0].permute(0, 2, 1, 3),
        value_cache=raw[:, 1].permute(0, 2, 1, 3), block_table=table,
        seq_lens=torch.full((G,), L, dtype=torch.int32, device=dev), query_start=torch.arange(G, device=dev) * P,
        query_lens=torch.full((G,), P, device=dev), heads=heads, kv_heads=heads // (s.H // s.Hkv),
        k=k, v=v, max_query_len=P, max_seq_len=L, scale=s.D**-0.5,
    )


def native_call(p: dict, G: int, P: int, s: Shape):
    """The plain attention call over all heads (SDPA with GQA on the dense K/V), and the row
    log-sum-exp FLASH_ATTN would return with it (``[T, H]``, natural log),
    computed once outside the timing by the flash kernel on K/V expanded to every head."""
    import torch.nn.functional as F  # noqa: N812

    q = p["query"].view(G, P, s.H, s.D).transpose(1, 2)
    out = p["output"].view(G, P, s.H, s.D)

    def run():
        o = F.scaled_dot_product_attention(q, p["k"], p["v"], is_causal=P > 1, scale=p["scale"], enable_gqa=True)
        out.copy_(o.transpose(1, 2))

    k = p["k"].repeat_interleave(s.H // s.Hkv, 1)
    v = p["v"].repeat_interleave(s.H // s.Hkv, 1)
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, P > 1, False, scale=p["scale"])
    lse = res[1].transpose(1, 2).reshape(G * P, s.H).contiguous()  # decode: for first_token only
    del k, v, res
    return run, lse


def time_first_token(p: dict, tensors: list, lse, t_native: float, s: Shape, repeats: int, inner: int) -> str:
    """``native + first_token`` with the native LSE and with its own, as ratios to native."""
    from act_plugin.kernels.first_token import first_token_paged

    gammas = torch.tensor([0.5, 2.0] * s.n, device="cuda")[: s.n]
    kw = dict(scale=p["scale"], window=None, max_query_len=p["max_query_len"], max_seq_len=p["max_seq_len"])
    t_lse = t_native + _timed(lambda: first_token_paged(*tensors, gammas, **kw, lse=lse), repeats, inner)
    t_own = t_native + _timed(lambda: first_token_paged(*tensors, gammas, **kw), repeats, inner)
    return f" | first_token {t_lse / t_native:5.2f}x own lse {t_own / t_native:5.2f}x"


def time_setting(mode: str, G: int, L: int, s: Shape, dtype, repeats: int) -> str:
    from act_plugin.kernels import calibrate_paged
    from act_plugin.kernels.triton_act import decode_attention_triton

    P = 1 if mode == "decode" else L
    p = build(G, L, P, s, dtype)
    native, lse = native_call(p, G, P, s)
    names = ("query", "output", "key_cache", "value_cache", "block_table", "seq_lens", "query_start", "query_lens",
             "heads", "kv_heads")
    tensors = [p[k] for k in names]
    kw = dict(scale=p["scale"], beta=0.4, threshold=0.1, window=None, max_query_len=P, max_seq_len=L)
    inner = 20 if mode == "decode" else 5
    t_native = _timed(native, repeats, inner)
    t_act = _timed(lambda: calibrate_paged(*tensors, **kw, lse=lse), repeats, inner)  # after the native call
    t_after = t_native + t_act
    if mode == "decode":
        t_fused = _timed(lambda: decode_attention_triton(
            p["query"], p["output"], p["key_cache"], p["value_cache"], p["block_table"], p["seq_lens"],
            p["query_start"], p["heads"], p["scale"], 0.4, 0.1, None, L), repeats, inner)
        return (f"{mode:8} {G:>3} {L:>5} | {t_native:9.3f} {t_fused:9.3f} {t_fused / t_native:6.2f}x"
                f" | {t_after:12.3f} {t_after / t_native:6.2f}x"
                + time_first_token(p, tensors, lse, t_native, s, repeats, inner))
    t_own = t_native + _timed(lambda: calibrate_paged(*tensors, **kw), repeats, inner)
    return (f"{mode:8} {G:>3} {L:>5} | {t_native:9.3f} {'-':>9} {'-':>7} | {t_after:12.3f} {t_after / t_native:6.2f}x"
            f" | own lse {t_own:8.3f} {t_own / t_native:6.2f}x"
            + time_first_token(p, tensors, lse, t_native, s, repeats, inner))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--calibrated", type=int, default=6, help="calibrated heads in the layer")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bytes-only", action="store_true", help="print the bytes model and stop (no GPU needed)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    decode, prefill = (QUICK_DECODE, QUICK_PREFILL) if args.quick else (DECODE, PREFILL)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
    s = Shape(args.heads, args.kv_heads, args.head_dim, args.calibrated, torch.empty(0, dtype=dtype).element_size(),
              sms)
    print_bytes(s, decode, prefill, tau=0.1)
    print_first_token_bytes(s, decode, prefill)
    if args.bytes_only:
        return
    if not torch.cuda.is_available():
        raise SystemExit("timing needs a CUDA device (--bytes-only prints the bytes model alone)")
    print(f"\ndevice {torch.cuda.get_device_name()} | torch {torch.__version__} | times in ms, median of"
          f" {args.repeats} batches")
    print(f"{'mode':8} {'G':>3} {'L/P':>5} | {'native':>9} {'fused':>9} {'ratio':>7} | {'native+ACT':>12} {'ratio':>7}"
          " | (prefill: ACT with its own lse) | native+first_token / native, native lse and own")
    for mode, G, L in [("decode", G, L) for G, L in decode] + [("prefill", G, P) for G, P in prefill]:
        print(time_setting(mode, G, L, s, dtype, args.repeats), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
