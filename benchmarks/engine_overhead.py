"""Throughput of vanilla vLLM vs vLLM with ACT, same model, same workload, one run.

    python benchmarks/engine_overhead.py                       # SmolLM2, paper-density head set
    python benchmarks/engine_overhead.py --model PATH --heads "2-27:0,4" --prompts 32

Prints prefill tok/s, decode tok/s and the calibrated/vanilla ratios, plus the ratio to
ACT-off requests on the ACT engine itself, timed interleaved with the calibrated ones (robust
to changes of machine load between the two engines). Both engines use
identical engine arguments (the ACT engine additionally runs one-call prefill without prefix
caching, which it needs; the vanilla engine is given the same settings so the comparison
isolates the calibration itself). Each measurement is the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import time


def _workload(tokenizer, n: int, prompt_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = [t for t in range(200, 20000)]
    out = []
    for _ in range(n):
        # Text-like ids with punctuation/newlines sprinkled in: hidden-sink candidates.
        ids = [rng.choice(vocab) for _ in range(prompt_len)]
        for pos in range(7, prompt_len, 11):
            ids[pos] = tokenizer.convert_tokens_to_ids(rng.choice([".", ",", "Ċ"]))
        out.append(ids)
    return out


def _measure(llm, prompts, decode_tokens: int, arms: dict[str, dict | None], repeats: int) -> dict:
    """Best-of-``repeats`` timings per arm; arms are interleaved within each repeat so that a
    change in machine load hits every arm alike."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tp = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    def run(max_tokens: int, extra_args) -> float:
        sp = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra_args)
        t = time.perf_counter()
        llm.generate(tp, sp, use_tqdm=False)
        return time.perf_counter() - t

    for extra in arms.values():
        run(2, extra)  # warm-up
    prefill = {a: float("inf") for a in arms}
    full = {a: float("inf") for a in arms}
    for _ in range(repeats):
        for arm, extra in arms.items():
            prefill[arm] = min(prefill[arm], run(1, extra))
            full[arm] = min(full[arm], run(decode_tokens + 1, extra))
    n_prompt = sum(len(p) for p in prompts)
    n_decode = len(prompts) * decode_tokens
    return {
        arm: {
            "prefill_s": prefill[arm],
            "prefill_tok_s": n_prompt / prefill[arm],
            "decode_s": full[arm] - prefill[arm],
            "decode_tok_s": n_decode / max(full[arm] - prefill[arm], 1e-9),
        }
        for arm in arms
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="path or embedded model name")
    ap.add_argument("--heads", default="2-27:0,4", help="ACT head spec (default: 2 of 9 heads in layers 2..27)")
    ap.add_argument("--beta", type=float, default=0.4)
    ap.add_argument("--threshold", type=float, default=0.1)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    from act_plugin.models import ensure_model
    from act_plugin.vllm.env import apply_cpu_defaults, cpu_engine_kwargs

    apply_cpu_defaults()
    from vllm import LLM

    model = ensure_model(args.model)
    max_len = args.prompt_len + args.decode_tokens + 16
    common = cpu_engine_kwargs(
        dtype=args.dtype, max_model_len=max_len, enable_prefix_caching=False, enable_chunked_prefill=False,
        max_num_batched_tokens=max(max_len, 2048), seed=0,
    )
    act = {"beta": args.beta, "threshold": args.threshold, "heads": args.heads}
    results = {}
    # 1) a vanilla engine (no ACT configuration: the plugin hands vLLM its native backend)
    # 2) an ACT engine, timing requests with ACT off and on, interleaved
    for engine_name, extra, arms in (
        ("vanilla", {}, {"vanilla": None}),
        ("act", {"additional_config": {"act": {"profiles": {"act": act}, "default": None}}},
         {"act-engine, off": {"act": "off"}, "act": {"act": "act"}}),
    ):
        llm = LLM(model=model, **common, **extra)
        prompts = _workload(llm.get_tokenizer(), args.prompts, args.prompt_len, seed=0)
        load = os.getloadavg()[0]
        results.update(_measure(llm, prompts, args.decode_tokens, arms, args.repeats))
        results[f"{engine_name}_loadavg"] = load
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        time.sleep(2)

    from act_plugin.config import ACTConfig

    cfg = ACTConfig.from_any(act)
    v, a = results["vanilla"], results["act"]
    print(f"\nmodel {args.model}; {args.prompts} prompts x {args.prompt_len} tokens, {args.decode_tokens} decode tokens each")
    print(f"ACT heads: {args.heads} ({cfg.num_heads_selected(9) if args.model == 'smollm2-135m' else '?'} heads), beta {args.beta}")
    off = results["act-engine, off"]
    print(f"load average while measuring: vanilla engine {results['vanilla_loadavg']:.2f}, ACT engine {results['act_loadavg']:.2f}")
    print(f"{'':18s}{'prefill tok/s':>15s}{'decode tok/s':>15s}")
    for arm in ("vanilla", "act-engine, off", "act"):
        print(f"{arm:18s}{results[arm]['prefill_tok_s']:15.1f}{results[arm]['decode_tok_s']:15.1f}")
    ratios = {"prefill": a["prefill_tok_s"] / v["prefill_tok_s"], "decode": a["decode_tok_s"] / v["decode_tok_s"],
              "prefill_vs_off": a["prefill_tok_s"] / off["prefill_tok_s"], "decode_vs_off": a["decode_tok_s"] / off["decode_tok_s"]}
    print(f"{'act / vanilla':18s}{ratios['prefill']:15.3f}{ratios['decode']:15.3f}   (targets: prefill >= 0.85, decode >= 0.90)")
    print(f"{'act / off':18s}{ratios['prefill_vs_off']:15.3f}{ratios['decode_vs_off']:15.3f}   (same engine, interleaved)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "ratios": ratios}, f, indent=1)


if __name__ == "__main__":
    main()
