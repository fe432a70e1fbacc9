"""Tensor parallelism: global head index -> (rank, local head); the first_token rule's
per-head gammas reaching the rank of their heads, and a rank-sharded step of act,
first_token and off rows equal to the unsharded one (no engine); and a real TP=2 CPU engine
giving the same outputs as TP=1 for act, first_token (scalar and per-head gamma) and off
arms, alone and mixed in one batch.

SmolLM2 has 9 query heads, which no TP size > 1 divides (vLLM refuses it), so the engine
test builds a small random-weight Llama with 8 query heads / 2 KV heads (head_dim 64) that
uses SmolLM2's tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from act_plugin.config import ACTConfig
from act_plugin.vllm.worker_state import TPSlice


@pytest.mark.parametrize("tp_size", [1, 2, 4, 8])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(8, 8), (8, 2), (32, 8), (16, 1)])
def test_global_to_local_head_mapping(tp_size, num_heads, num_kv_heads):
    global_heads = (0, 1, 5, num_heads - 1)
    local_count = num_heads // tp_size
    seen = []
    for rank in range(tp_size):
        local = TPSlice(rank, num_heads, 4).local_heads(global_heads, local_count)
        assert all(0 <= h < local_count for h in local)
        seen += [rank * local_count + h for h in local]
        # vLLM's rank-local GQA grouping: local query head h reads local KV head
        # h // (local heads per local KV head); that KV head is global KV head g // group.
        kv_local = max(1, num_kv_heads // tp_size)
        per_kv = local_count // kv_local
        for h in local:
            g = rank * local_count + h
            global_kv = g // (num_heads // num_kv_heads)
            if num_kv_heads >= tp_size:
                assert rank * kv_local + h // per_kv == global_kv
            else:  # KV heads replicated: each rank holds the one its query heads need
                assert kv_local == 1 and h // per_kv == 0
    assert sorted(seen) == sorted(set(global_heads))


# first_token under TP: gamma per (layer, global head), each value distinct so that a head
# getting another head's gamma shows; layer 1's heads sit on both ranks of TP=2 (0-3 | 4-7)
# and on all four of TP=4.
ZT_GAMMAS = {(1, 1): 3.0, (1, 2): 0.25, (1, 5): 6.0, (1, 6): 0.5, **{(2, h): 1.5 for h in range(8)}}
RULE_PROFILES = {
    "act": {"beta": 0.3, "threshold": 0.05, "heads": "1:0,3"},
    "zt": {"rule": "first_token", "scale": 4.0, "heads": "1-2:2,7"},
    "zth": {"rule": "first_token", "scale": {"1:1": 3.0, "1:2": 0.25, "1:5": 6.0, "1:6": 0.5, "2:*": 1.5}},
}


def _rule_state(rank: int):
    from act_plugin.config import ACTEngineConfig
    from act_plugin.vllm.worker_state import WorkerState

    cfg = ACTEngineConfig.from_any({"profiles": RULE_PROFILES, "default": None})
    return cfg, WorkerState(engine_cfg=cfg, tp=TPSlice(rank, 8, 4))


@pytest.mark.parametrize("tp_size", [1, 2, 4, 8])
def test_first_token_gammas_reach_the_rank_of_their_heads(tp_size):
    """Rank r gets, for each layer, its local heads (global h -> h - r * H/tp) and exactly
    their gammas, in the same order; every configured head lands on one rank only."""
    local_count = 8 // tp_size
    seen: dict[tuple[int, int], float] = {}
    for rank in range(tp_size):
        cfg, state = _rule_state(rank)
        prof = cfg.profiles["zth"]
        for layer in range(4):
            heads = state.local_heads(prof, layer, local_count, torch.device("cpu"))
            gammas = state.local_head_scales(prof, layer, local_count, torch.device("cpu"))
            want = [(g - rank * local_count, gamma) for (lyr, g), gamma in sorted(ZT_GAMMAS.items())
                    if lyr == layer and g // local_count == rank]
            if not want:
                assert heads is None and gammas is None, (rank, layer)
                continue
            assert heads is not None and gammas is not None
            assert list(zip(heads.tolist(), gammas.tolist())) == want, (rank, layer)
            for h, gamma in want:
                assert (layer, rank * local_count + h) not in seen
                seen[(layer, rank * local_count + h)] = gamma
    assert seen == ZT_GAMMAS


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tp_sliced_rule_step_equals_unsliced(tp_size):
    """One step mixing act, first_token (scalar and per-head gamma) and off rows, run by one
    layer calibrator over all 8 heads (TP=1) and by one per rank over its slice of the query
    heads, KV heads (replicated when fewer than ranks) and output, as vLLM shards them: the
    ranks' outputs side by side equal the TP=1 output, and every first_token arm changes its
    rows on some rank."""
    import types

    from act_plugin.kernels.cache_layout import cpu_attn_split
    from act_plugin.kernels.testing import make_problem
    from act_plugin.vllm.layer_calibrator import LayerCalibrator
    from act_plugin.vllm.plan import SeqGroup, StepPlan
    from act_plugin.vllm.worker_state import Arm

    p = make_problem([40, 23, 31, 17], [1, 6, 1, 1], num_heads=8, num_kv_heads=2, head_size=32, heads=[0],
                     sink_strength=1.5, seed=5)

    def group(arm, i):
        return SeqGroup(arm=arm, block_table=p.block_table[i : i + 1], seq_lens=p.seq_lens[i : i + 1],
                        query_start=p.query_start[i : i + 1], query_lens=p.query_lens[i : i + 1],
                        max_query_len=int(p.query_lens[i]), max_seq_len=int(p.seq_lens[i]))

    def run(rank, num_heads, num_kv_heads, query, cache, output):
        cfg, state = _rule_state(rank)
        arms = {name: Arm(name, prof) for name, prof in cfg.profiles.items()}
        step = types.SimpleNamespace(act_plan=StepPlan(  # sequence 3 runs without ACT (off)
            groups=[group(arms["act"], 0)], rule_groups=[group(arms["zt"], 1), group(arms["zth"], 2)]))
        cal = LayerCalibrator(heads=state, num_heads=num_heads, num_kv_heads=num_kv_heads, scale=p.scale,
                              sliding_window=None, kv_split=cpu_attn_split)
        cal.bind_layer(1)
        out = output.clone()
        cal.apply(query, cache, step, out)
        return out

    whole = run(0, 8, 2, p.query, p.raw_cache, p.output)
    lh, kvl = 8 // tp_size, max(1, 2 // tp_size)
    parts = []
    for rank in range(tp_size):
        heads = slice(rank * lh, (rank + 1) * lh)
        kv0 = rank * kvl if tp_size <= 2 else (rank * lh) // 4  # replicated: the KV head of its queries
        cache = p.raw_cache[:, kv0 : kv0 + kvl].contiguous()
        parts.append(run(rank, lh, kvl, p.query[:, heads].contiguous(), cache, p.output[:, heads].contiguous()))
    sharded = torch.cat(parts, dim=1)
    assert (sharded - whole).abs().max() <= 1e-6 * whole.abs().max()
    rows = [slice(int(p.query_start[i]), int(p.query_start[i] + p.query_lens[i])) for i in range(4)]
    assert torch.equal(whole[rows[3]], p.output[rows[3]])  # the off row: native
    assert torch.equal(whole[: int(p.query_start[0])], p.output[: int(p.query_start[0])])  # other requests
    for seq, changed in ((1, [2, 7]), (2, [1, 2, 5, 6])):  # zt: heads 2 and 7; zth: layer 1's heads
        others = [h for h in range(8) if h not in changed]
        assert torch.equal(whole[rows[seq]][:, others], p.output[rows[seq]][:, others])
        for h in changed:
            assert not torch.equal(whole[rows[seq]][:, h], p.output[rows[seq]][:, h]), (seq, h)


ACT = {
    "profiles": {
        "a": {"beta": 0.3, "threshold": 0.05, "heads": "1-3:0,3,4,7"},
        "zt": {"rule": "first_token", "scale": 4.0, "heads": "1-3:*"},
        # per-head gammas, in each layer one head on each rank of TP=2 (heads 0-3 | 4-7)
        "zth": {"rule": "first_token", "scale": {"1:1": 4.0, "1:6": 0.25, "2:2,5": 5.0, "3:0,7": 0.2}},
    },
    "default": None,
}
MIXED_ARMS = ("a", "zt", "zth", "off")
LOGPROB_TOL = 1e-3

_RUN = textwrap.dedent(
    """
    import json, os, sys
    from act_plugin.vllm.env import cpu_engine_kwargs
    if __name__ == "__main__":
        model, tp, out, act = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
        arms = sys.argv[5].split(",")
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1" if tp == 2 else "0-1"
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        # TP=1 reads its ACT config from the ACT_CONFIG file, TP=2 from additional_config:
        # equal results also show that both ways configure the same calibration.
        extra = {} if os.environ.get("ACT_CONFIG") else {"additional_config": {"act": act}}
        llm = LLM(model=model, seed=0, tensor_parallel_size=tp, **extra, **cpu_engine_kwargs(max_model_len=256))
        prompts = [[1, 17, 230, 18, 9, 2048, 77, 13], [5, 9, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43]]
        def sp(arm):
            return SamplingParams(max_tokens=8, temperature=0.0, logprobs=5, extra_args={"act": arm})
        def run(batch):  # batch: [(prompt, arm)], one generate call
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in batch], [sp(a) for _, a in batch],
                                use_tqdm=False)
            return [{"tokens": list(o.outputs[0].token_ids),
                     "lp": {str(k): v.logprob for k, v in o.outputs[0].logprobs[0].items()}} for o in outs]
        res = {arm: run([(p, arm) for p in prompts]) for arm in ("a", "off")}
        # one batch mixing every arm: act, first_token (scalar and per-head gamma) and off rows
        mixed = run([(p, arm) for arm in arms for p in prompts])
        for i, arm in enumerate(arms):
            res["mixed_" + arm] = mixed[i * len(prompts) : (i + 1) * len(prompts)]
        json.dump(res, open(out, "w"))
    """
)


def _max_logprob_change(xs: list[dict], ys: list[dict]) -> float:
    """The largest change of a first-token log-prob (top-5 ids both hold) over the prompts;
    inf where the greedy tokens differ."""
    worst = 0.0
    for x, y in zip(xs, ys):
        if x["tokens"] != y["tokens"]:
            return float("inf")
        worst = max([worst] + [abs(lp - y["lp"][t]) for t, lp in x["lp"].items() if t in y["lp"]])
    return worst


@pytest.fixture(scope="module")
def tiny_gqa_model(tmp_path_factory, smollm2_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    path = tmp_path_factory.mktemp("tiny_gqa")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    ACTConfig.from_any({"heads": "1-3:0,3,4,7"}).validate_for(cfg)
    return str(path)


@pytest.mark.engine
@pytest.mark.slow
def test_tp2_equals_tp1(tiny_gqa_model, tmp_path):
    """act and off alone, then one batch of act, first_token (scalar gamma; per-head gamma
    on both ranks) and off rows: TP=2 gives TP=1's greedy tokens and log-probs."""
    pytest.importorskip("vllm")
    script = tmp_path / "run.py"
    script.write_text(_RUN)
    results = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}.json"
        env = {k: v for k, v in os.environ.items() if k not in ("ACT_CONFIG", "VLLM_CPU_OMP_THREADS_BIND")}
        if tp == 1:
            cfg = tmp_path / "act.yaml"
            cfg.write_text(yaml.safe_dump({"act": ACT}))
            env["ACT_CONFIG"] = str(cfg)
        proc = subprocess.run(
            [sys.executable, str(script), tiny_gqa_model, str(tp), str(out), json.dumps(ACT), ",".join(MIXED_ARMS)],
            env=env, capture_output=True, text=True, timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        results[tp] = json.loads(out.read_text())
    one, two = results[1], results[2]
    # Every calibrated arm must change its rows clearly beyond the TP tolerance, or the
    # comparison proves nothing (e.g. a rank dropping its half of the heads).
    assert one["a"] != one["off"]
    for arm in ("a", "zt", "zth"):
        assert _max_logprob_change(one["mixed_" + arm], one["mixed_off"]) > 10 * LOGPROB_TOL, arm
    assert set(one) == set(two) == {"a", "off"} | {"mixed_" + arm for arm in MIXED_ARMS}
    for key in one:
        for r1, r2 in zip(one[key], two[key]):
            assert r1["tokens"] == r2["tokens"], key
            for tid, lp in r1["lp"].items():
                if tid in r2["lp"]:
                    assert abs(r2["lp"][tid] - lp) < LOGPROB_TOL, (key, tid)
    shutil.rmtree(tiny_gqa_model, ignore_errors=True)
