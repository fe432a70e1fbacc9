"""The first_token rule's torch path on CPU: its mass step as it was (the probability
matrix ``exp(s - lse)`` formed and ``N`` summed from it) against the closed form it uses now
(only ``p0 = exp(s0 - lse)``, ``N = 1 - p0``).

    python benchmarks/first_token_cpu.py [--threads 1] [--dtype bfloat16] [--quick]

Per setting (decode: G sequences of L keys; prefill: G prompts of P tokens; SmolLM2's layer
shape, every head calibrated, gamma 0.5..2) it times :func:`act_plugin.kernels.first_token.
first_token_paged` with either mass step, interleaved, best of the repeats. Accuracy is the
tests' business (tests/test_kernels_rules.py). Records the load average.
"""

from __future__ import annotations

import argparse

import torch
from kernels_micro import _time  # this folder is on the path when a script of it runs


def matrix_masses(q, kt, q_pos, k_pos, scale, window, max_block_elems):
    """The previous mass step: the whole probability matrix, ``p0`` and ``N`` summed from it
    (``N`` then unused here: the path now takes ``1 - p0``; it is computed for its cost)."""
    from act_plugin.core import visibility_mask

    G, Hs, Lq, _ = q.shape
    Lk = kt.shape[-1]
    lse_all = torch.zeros(G, Hs, Lq, dtype=torch.float32, device=q.device)
    p0 = torch.zeros_like(lse_all)
    rest = torch.zeros_like(lse_all)
    rows_per_block = max(1, max_block_elems // max(1, G * Hs * Lk))
    for r0 in range(0, Lq, rows_per_block):
        r1 = min(Lq, r0 + rows_per_block)
        vis = visibility_mask(q_pos[:, r0:r1], k_pos, window).unsqueeze(1)
        s = (torch.matmul(q[:, :, r0:r1], kt) * scale).masked_fill(~vis, float("-inf"))
        lse = torch.logsumexp(s, dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
        p = torch.exp(s - lse).masked_fill(~vis, 0.0)
        lse_all[:, :, r0:r1] = lse[..., 0]
        p0[:, :, r0:r1] = p[..., 0]
        rest[:, :, r0:r1] = p[..., 1:].sum(-1)
    return lse_all, p0


def time_both(p, gammas: torch.Tensor, repeats: int) -> dict[str, float]:
    """Seconds per call of ``first_token_paged`` on problem ``p`` with either mass step."""
    from act_plugin.kernels import first_token as ft

    current = ft._lse_and_first_mass

    def run(mass, out):
        ft._lse_and_first_mass = mass
        try:
            ft.first_token_paged(p.query, out, p.key_cache, p.value_cache, p.block_table, p.seq_lens, p.query_start,
                                 p.query_lens, p.heads, p.kv_heads, gammas, scale=p.scale, window=None,
                                 max_query_len=p.max_query_len, max_seq_len=p.max_seq_len)
        finally:
            ft._lse_and_first_mass = current

    times = {"matrix": float("inf"), "closed": float("inf")}
    for _ in range(repeats):  # interleaved: the machine's load drifts
        for name, mass in (("matrix", matrix_masses), ("closed", current)):
            out = p.output.clone()
            times[name] = min(times[name], _time(lambda m=mass, o=out: run(m, o), 1))  # type: ignore[misc]
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quick", action="store_true", help="tiny settings (CI)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    from act_plugin.kernels.testing import make_problem

    H, Hkv, D, bs = 9, 3, 64, 128
    settings = [("decode", G, [L] * G, [1] * G) for G, L in ((1, 320), (16, 320), (64, 320), (16, 2100))]
    settings += [("prefill", G, [P] * G, [P] * G) for G, P in ((1, 256), (4, 256), (1, 2048))]
    if args.quick:
        settings = [("decode", 4, [64] * 4, [1] * 4), ("prefill", 2, [64] * 2, [64] * 2)]
    print(f"load: {open('/proc/loadavg').read().split()[:3]}, torch threads {torch.get_num_threads()}, {args.dtype},"
          f" SmolLM2 layer shape ({H} heads, {Hkv} KV, D {D}, block {bs}), every head calibrated")
    print(f"{'setting':22s}{'matrix ms':>12s}{'closed ms':>11s}{'closed/matrix':>15s}")
    for kind, G, sl, ql in settings:
        p = make_problem(sl, ql, num_heads=H, num_kv_heads=Hkv, head_size=D, block_size=bs, layout="cpu_attn",
                         dtype=dtype, heads=list(range(H)), extra_rows=0, sink_strength=1.0, seed=1)
        times = time_both(p, torch.linspace(0.5, 2.0, H), args.repeats)
        label = f"{kind} {G} x {sl[0]}"
        print(f"{label:22s}{times['matrix'] * 1e3:12.3f}{times['closed'] * 1e3:11.3f}"
              f"{times['closed'] / times['matrix']:15.3f}", flush=True)
    print(f"load after: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
