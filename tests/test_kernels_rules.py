"""The first_token rule over the paged cache (act_plugin.kernels.first_token) against the
dense rule reference (act_plugin.rules.rule_attention_dense) on the same keys and values."""

from __future__ import annotations

import pytest
import torch

from act_plugin.kernels.first_token import first_token_paged
from act_plugin.kernels.testing import LAYOUTS, make_problem
from act_plugin.rules import FirstTokenRule, rule_attention_dense

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}

SCENARIOS = {
    "decode": ([37, 130, 5, 64], [1, 1, 1, 1], None),
    "prefill": ([40, 70], [40, 70], None),
    "mixed": ([90, 33], [25, 1], None),
    "window": ([60, 45, 20], [60, 1, 7], 9),  # key 0 leaves the window: those rows stay native
    "padded_group": ([40, 1, 66, 1], [1, 0, 12, 0], None),
}


def expected(p, gammas: torch.Tensor) -> torch.Tensor:
    out = p.output.to(torch.float32).clone()
    for g, (k, v) in enumerate(zip(p.keys, p.values)):
        L, ql, q0 = int(p.seq_lens[g]), int(p.query_lens[g]), int(p.query_start[g])
        if ql == 0:
            continue
        q = p.query[q0 : q0 + ql].index_select(1, p.heads).permute(1, 0, 2)[None]
        res = rule_attention_dense(q, k.index_select(0, p.kv_heads)[None], v.index_select(0, p.kv_heads)[None],
                                   torch.arange(L - ql, L)[None], torch.arange(L)[None], FirstTokenRule(scale=gammas),
                                   scale=p.scale, window=p.window)
        out[q0 : q0 + ql, p.heads] = res.out[0].permute(1, 0, 2)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_token_paged_matches_the_rule_formula(layout, scenario, dtype):
    seq_lens, query_lens, window = SCENARIOS[scenario]
    p = make_problem(seq_lens, query_lens, layout=layout, dtype=dtype, window=window, num_heads=8,
                     num_kv_heads=2, heads=[0, 3, 5, 6], sink_strength=1.5, seed=len(scenario))
    gammas = torch.tensor([0.2, 3.0, 1.0, 8.0])  # GQA: heads over both KV heads; gamma 1 changes nothing
    out = p.output.clone()
    first_token_paged(p.query, out, p.key_cache, p.value_cache, p.block_table, p.seq_lens, p.query_start,
                      p.query_lens, p.heads, p.kv_heads, gammas, scale=p.scale, window=p.window,
                      max_query_len=p.max_query_len, max_seq_len=p.max_seq_len, max_block_elems=512)
    exp = expected(p, gammas)
    err = (out.to(torch.float32) - exp).abs().max().item()
    assert err <= TOL[dtype] * exp.abs().max().item(), err
    assert not torch.equal(out, p.output)
    untouched = torch.ones(out.shape[1], dtype=torch.bool)
    untouched[p.heads[gammas != 1.0]] = False
    assert torch.equal(out[:, untouched], p.output[:, untouched])  # other heads and gamma-1 heads: bit for bit
    assert torch.equal(out[:2], p.output[:2])  # rows of other requests
