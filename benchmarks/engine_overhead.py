"""Throughput of vanilla vLLM vs vLLM with ACT, same model, same workload, one run.

    python benchmarks/engine_overhead.py                       # SmolLM2, paper-density head set
    python benchmarks/engine_overhead.py --model PATH --heads "2-27:0,4" --prompts 32

Two engines run side by side for the whole measurement: a vanilla engine (no ACT
configuration: the plugin hands vLLM its native backend) and an ACT engine serving requests
with ACT off and with the profile. Every repeat times the three arms (vanilla, ACT-off,
calibrated) in a rotating order, so a change of machine load hits every arm alike and the
ratios are paired. An idle engine costs nothing (its scheduler blocks on its input queue).
Both engines get identical arguments: one-call prefill without prefix caching, which ACT
needs, so the comparison isolates the calibration itself.

Each request batch is driven step by step through the engine (``LLMEngine.step``), with the
time of every step's outputs taken at the client: *prefill* is the time until every prompt
has its first token (prompt tokens / that time), *decode* the time from then to the last
token (tokens produced after it / that time). Decode is thus measured on the decode steps
themselves, not as the difference of two end-to-end runs. Figures: best of ``--repeats``
(the usual benchmark estimator) and the median beside it.

Then the cost curve, on the ACT engine with ACT off and on interleaved: per decode step for
``--decode-seqs`` (1, 16, 64) sequences, and per prefill of one prompt of each
``--prefill-lens`` (256, 2048) tokens: step time off/on, the calibration's own time per
step and its share of the calibrated step, and the peak transient memory of the
calibration kernel in that step (the fused CPU kernel's scratch, read from the worker; it
allocates nothing else). ``uptime`` load is printed with every block of figures (the
machine may be shared).

The calibration's own time is accounted inside the worker (``act_plugin.vllm.profiling``:
plan building and every calibrated layer's ``apply``), so its share does not rest on the
difference of two end-to-end timings, which on a shared machine is noisier than the cost
being measured.

    python benchmarks/engine_overhead.py --tiny        # seconds of work (CI: tests/test_kernels_bench.py)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import time
from dataclasses import dataclass


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


def _profiling(worker, on: bool) -> dict:
    """On the worker: switch the calibration's host-time accounting on/off; returns what it
    accumulated since the last call (act_plugin.vllm.profiling)."""
    from act_plugin.vllm.profiling import set_profiling

    return set_profiling(on)


def _whole_layer_s(snapshot: dict, kind: str) -> float:
    """Seconds of calibrated layers computed whole by ACT's kernel in steps of this kind."""
    return snapshot.get(f"{kind}_whole_layer", {}).get("seconds", 0.0)


def _whole_layer_calls(snapshot: dict, kind: str) -> int:
    return int(snapshot.get(f"{kind}_whole_layer", {}).get("calls", 0))


@dataclass
class Timing:
    """One batch of requests driven to completion."""

    prefill_s: float  # until every prompt has its first token
    decode_s: float  # from then until the last token
    # tokens produced after every prompt had its first one (the engine may start on the first
    # requests before the last is added, so this can fall short of prompts x (max_tokens - 1))
    decode_tokens: int
    decode_steps: int  # engine steps that produced them
    calib: dict | None = None  # the worker's calibration accounting during the batch (profiled runs)


class StepRunner:
    """Runs a batch through ``llm.llm_engine`` one step at a time, timing the steps' outputs."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self._next = 0

    def run(self, prompts: list[list[int]], max_tokens: int, extra: dict | None, profile: bool = False) -> Timing:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        sp = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            extra_args=extra, output_kind=RequestOutputKind.DELTA)
        if profile:
            self.llm.collective_rpc(_profiling, args=(True,))
        start = time.perf_counter()
        for p in prompts:
            engine.add_request(f"bench-{self._next}", TokensPrompt(prompt_token_ids=p), sp)
            self._next += 1
        started: set[str] = set()
        first_done = None
        tokens = steps = 0
        while engine.has_unfinished_requests():
            outputs = engine.step()
            now = time.perf_counter()
            new = 0
            for out in outputs:
                n = sum(len(c.token_ids) for c in out.outputs)
                if first_done is None:
                    if n:
                        started.add(out.request_id)
                else:
                    new += n
            if first_done is None:
                if len(started) == len(prompts):
                    first_done = now
            elif new:
                tokens += new
                steps += 1
        end = time.perf_counter()
        calib = self.llm.collective_rpc(_profiling, args=(False,))[0] if profile else None
        assert first_done is not None, "the batch finished without every prompt producing a token"
        return Timing(first_done - start, end - first_done, tokens, steps, calib)


def _measure(runners: dict, arms: dict[str, tuple[str, dict | None]], prompts, decode_tokens: int, repeats: int,
             profiled: tuple[str, ...] = ()) -> dict:
    """Per arm (engine name, request extra_args): best and median over ``repeats`` of prefill
    and decode throughput; the arms run in a rotating order within each repeat. For the
    ``profiled`` arms also the calibration's own time (accounted inside the worker) in the
    prefill and decode steps of the fastest run."""
    from act_plugin.vllm.profiling import per_kind

    names = list(arms)
    for name, (engine, extra) in arms.items():
        runners[engine].run(prompts, 3, extra)  # warm-up
    runs: dict[str, list[Timing]] = {a: [] for a in arms}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            engine, extra = arms[name]
            runs[name].append(runners[engine].run(prompts, decode_tokens + 1, extra, profile=name in profiled))
    n_prompt = sum(len(p) for p in prompts)
    out = {}
    for name, ts in runs.items():
        prefill = [n_prompt / t.prefill_s for t in ts]
        decode = [t.decode_tokens / t.decode_s for t in ts]
        out[name] = {
            "prefill_tok_s": max(prefill), "decode_tok_s": max(decode),
            "prefill_tok_s_median": statistics.median(prefill), "decode_tok_s_median": statistics.median(decode),
            "prefill_s": min(t.prefill_s for t in ts), "decode_s": min(t.decode_s for t in ts),
            "decode_step_ms": 1e3 * min(t.decode_s / max(t.decode_steps, 1) for t in ts),
            "runs": [{"prefill_s": t.prefill_s, "decode_s": t.decode_s, "decode_tokens": t.decode_tokens,
                      "decode_steps": t.decode_steps} for t in ts],
        }
        if name in profiled:
            out[name]["calib_prefill_s"] = min(per_kind(t.calib, "prefill")[0] for t in ts)
            out[name]["calib_decode_s"] = min(per_kind(t.calib, "decode")[0] for t in ts)
            out[name]["calib_decode_step_ms"] = 1e3 * min(
                per_kind(t.calib, "decode")[0] / max(per_kind(t.calib, "decode")[1], 1) for t in ts)
            # steps whose rows all run ACT: calibrated layers' whole attention (fused)
            for kind in ("prefill", "decode"):
                out[name][f"whole_layer_{kind}_s"] = min(_whole_layer_s(t.calib, kind) for t in ts)
                out[name][f"whole_layer_{kind}_calls"] = max(_whole_layer_calls(t.calib, kind) for t in ts)
    return out


def _scratch_peak(worker, reset: bool) -> tuple[str, dict]:
    """On the worker: the calibration kernel in use and its peak scratch bytes per call
    (decode-only calls, calls with prefill rows) since the last reset."""
    import torch

    from act_plugin.kernels import cpu, kernel_name

    name = kernel_name(torch.device("cpu"))
    return name, (cpu.scratch_peak_bytes(reset) if name == "cpu" else {})


def _load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def _curve(runner: StepRunner, tokenizer, args, act_extra: dict) -> list[dict]:
    """Per step, for decode batches and single prefills: step time with ACT off and on
    (interleaved, best of repeats), the calibration's own time per calibrated step as the
    worker accounts it (best of repeats) and its share of the calibrated step, and the
    kernel's peak scratch."""
    from act_plugin.vllm.profiling import per_kind

    llm = runner.llm
    arms = {"off": {"act": "off"}, "act": act_extra}
    rows = []
    settings = [("decode", n, args.curve_prompt_len) for n in args.decode_seqs]
    settings += [("prefill", 1, n) for n in args.prefill_lens]
    for kind, n_seqs, plen in settings:
        prompts = _workload(tokenizer, n_seqs, plen, seed=1)
        max_tokens = 1 if kind == "prefill" else args.curve_decode_tokens + 1
        best = {a: float("inf") for a in arms}
        calib_step = whole_step = native_step = float("inf")
        peak = 0
        name = "?"
        for extra in arms.values():
            runner.run(prompts, 3, extra)  # warm-up
        for r in range(args.repeats):
            for arm in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
                if arm == "act":
                    llm.collective_rpc(_scratch_peak, args=(True,))
                t = runner.run(prompts, max_tokens, arms[arm], profile=True)
                step = t.prefill_s if kind == "prefill" else t.decode_s / max(t.decode_steps, 1)
                best[arm] = min(best[arm], step)
                if arm == "off":  # the native kernel in the layers the act arm computes whole
                    native = t.calib.get(f"{kind}_native_layer", {})
                    if native.get("calls"):  # no chunked prefill here: one prefill step per prompt
                        native_step = min(native_step, native["seconds"] / (t.decode_steps if kind == "decode" else 1))
                if arm == "act":
                    seconds, steps = per_kind(t.calib, kind)
                    if steps:
                        calib_step = min(calib_step, seconds / steps)
                        whole_step = min(whole_step, _whole_layer_s(t.calib, kind) / steps)
                    name, peaks = llm.collective_rpc(_scratch_peak, args=(True,))[0]
                    peak = max(peak, peaks.get(kind, -1))
        rows.append({"kind": kind, "seqs": n_seqs, "prompt_len": plen, "off_ms": best["off"] * 1e3,
                     "act_ms": best["act"] * 1e3, "calib_ms": calib_step * 1e3,
                     "whole_layer_ms": whole_step * 1e3, "native_layer_ms": native_step * 1e3,
                     "whole_cost": ((whole_step - native_step) / best["act"]
                                    if 0 < whole_step < float("inf") and native_step < float("inf") else float("nan")),
                     "share": calib_step / best["act"], "on_minus_off": 1.0 - best["off"] / best["act"],
                     "scratch_peak_bytes": peak, "kernel": name, "load": _load()})
    return rows


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="path or embedded model name")
    ap.add_argument("--heads", default="2-27:0,4", help="ACT head spec (default: 2 of 9 heads in layers 2..27)")
    ap.add_argument("--beta", type=float, default=0.4)
    ap.add_argument("--threshold", type=float, default=0.1)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--decode-seqs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    ap.add_argument("--prefill-lens", type=lambda s: [int(x) for x in s.split(",")], default=[256, 2048])
    ap.add_argument("--curve-prompt-len", type=int, default=256, help="prompt length of the decode batches")
    ap.add_argument("--curve-decode-tokens", type=int, default=16)
    ap.add_argument("--no-curve", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long setting (CI): figures, no conclusions")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--separate-pass", action="store_true",
                    help="switch the CPU whole-layer prefill off (ACT_WHOLE_PREFILL=0): ACT-only prefill steps then "
                         "run the native kernel and the separate calibration pass, as mixed steps always do")
    args = ap.parse_args()
    if args.tiny:
        args.prompts, args.prompt_len, args.decode_tokens, args.repeats = 2, 32, 4, 1
        args.decode_seqs, args.prefill_lens, args.curve_prompt_len, args.curve_decode_tokens = [1, 4], [32, 96], 32, 4
    return args


def main() -> None:
    args = _parse_args()
    act = {"beta": args.beta, "threshold": args.threshold, "heads": args.heads}
    results = _run_engines(args, act)
    ratios = _print_summary(args, act, results)
    if results.get("curve"):
        _print_curve(results["curve"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "ratios": ratios}, f, indent=1)


def _run_engines(args: argparse.Namespace, act: dict) -> dict:
    """Vanilla and ACT engines side by side, arms interleaved; the cost curve on the ACT one."""
    from act_plugin.models import ensure_model
    from act_plugin.vllm.env import apply_cpu_defaults, cpu_engine_kwargs

    apply_cpu_defaults()
    # The cost curve reads the kernel's scratch peak in the worker by sending it a function
    # (LLM.collective_rpc with a callable needs pickle); local benchmark processes only.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    # read by the engines' workers when they start
    os.environ["ACT_WHOLE_PREFILL"] = "0" if args.separate_pass else "1"
    from vllm import LLM

    model = ensure_model(args.model)
    max_len = max(args.prompt_len + args.decode_tokens, args.curve_prompt_len + args.curve_decode_tokens + 2,
                  max(args.prefill_lens) + 2) + 16
    common = cpu_engine_kwargs(
        dtype=args.dtype, max_model_len=max_len, enable_prefix_caching=False, enable_chunked_prefill=False,
        max_num_batched_tokens=max(max_len, 2048), seed=0,
    )
    # Both engines live for the whole measurement, so that their arms can be interleaved.
    llms = {
        "vanilla": LLM(model=model, **common),
        "act": LLM(model=model, **common, additional_config={"act": {"profiles": {"act": act}, "default": None}}),
    }
    runners = {name: StepRunner(llm) for name, llm in llms.items()}
    tokenizer = llms["act"].get_tokenizer()
    prompts = _workload(tokenizer, args.prompts, args.prompt_len, seed=0)
    arms = {"vanilla": ("vanilla", None), "act-engine, off": ("act", {"act": "off"}), "act": ("act", {"act": "act"})}
    load_before = _load()
    results = _measure(runners, arms, prompts, args.decode_tokens, args.repeats, profiled=("act",))
    results["load"] = f"{load_before} -> {_load()}"
    if not args.no_curve:
        results["curve"] = _curve(runners["act"], tokenizer, args, {"act": "act"})
    for llm in llms.values():
        llm.llm_engine.engine_core.shutdown()
    del llms, runners
    gc.collect()
    return results


def _print_summary(args: argparse.Namespace, act: dict, results: dict) -> dict:
    """Throughput per arm, the ratios against vanilla and the calibration's own share; returns the ratios."""
    from act_plugin.config import ACTConfig

    cfg = ACTConfig.from_any(act)
    v, a, off = results["vanilla"], results["act"], results["act-engine, off"]
    print(f"\nmodel {args.model}; {args.prompts} prompts x {args.prompt_len} tokens, {args.decode_tokens} decode tokens "
          f"each; {args.repeats} repeats, arms interleaved")
    print(f"ACT heads: {args.heads} ({cfg.num_heads_selected(9) if args.model == 'smollm2-135m' else '?'} heads), beta {args.beta}")
    print(f"load average (1/5/15 min) before -> after: {results['load']}")
    print(f"{'':18s}{'prefill tok/s':>15s}{'decode tok/s':>15s}{'decode step ms':>16s}   "
          f"(best of {args.repeats}; median: prefill, decode)")
    for arm in ("vanilla", "act-engine, off", "act"):
        r = results[arm]
        print(f"{arm:18s}{r['prefill_tok_s']:15.1f}{r['decode_tok_s']:15.1f}{r['decode_step_ms']:16.2f}   "
              f"({r['prefill_tok_s_median']:.1f}, {r['decode_tok_s_median']:.1f})")
    ratios = {"prefill": a["prefill_tok_s"] / v["prefill_tok_s"], "decode": a["decode_tok_s"] / v["decode_tok_s"],
              "prefill_vs_off": a["prefill_tok_s"] / off["prefill_tok_s"], "decode_vs_off": a["decode_tok_s"] / off["decode_tok_s"],
              "prefill_median": a["prefill_tok_s_median"] / v["prefill_tok_s_median"],
              "decode_median": a["decode_tok_s_median"] / v["decode_tok_s_median"]}
    print(f"{'act / vanilla':18s}{ratios['prefill']:15.3f}{ratios['decode']:15.3f}   (targets: prefill >= 0.95, decode >= 0.95)")
    print(f"{'  median':18s}{ratios['prefill_median']:15.3f}{ratios['decode_median']:15.3f}")
    print(f"{'act / off':18s}{ratios['prefill_vs_off']:15.3f}{ratios['decode_vs_off']:15.3f}   (same engine)")
    # The calibration's own time, accounted in the worker: independent of the noise between
    # two end-to-end timings (the ratios above), which on a shared machine can exceed it.
    share = {"prefill": a["calib_prefill_s"] / a["prefill_s"], "decode": a["calib_decode_s"] / max(a["decode_s"], 1e-9)}
    ratios.update({"calib_share_prefill": share["prefill"], "calib_share_decode": share["decode"]})
    print(f"{'calibration time':18s}{a['calib_prefill_s'] * 1e3:12.1f} ms{a['calib_decode_s'] * 1e3:12.1f} ms"
          f"   (host time inside the worker, best of {args.repeats}; {a['calib_decode_step_ms']:.2f} ms per decode step)")
    print(f"{'  share of act':18s}{share['prefill'] * 100:14.1f}%{share['decode'] * 100:14.1f}%"
          f"   (act / act-without-calibration = {1 - share['prefill']:.3f}, {1 - share['decode']:.3f})")
    for kind in ("prefill", "decode"):
        whole, spent = a[f"whole_layer_{kind}_s"], a[f"{kind}_s"]
        print(f"{'whole-layer ' + kind:18s}{whole * 1e3 if kind == 'prefill' else 0:12.1f} ms"
              f"{whole * 1e3 if kind == 'decode' else 0:12.1f} ms   (calibrated layers' attention, calibration "
              f"included, computed in place of the native kernel: {whole / max(spent, 1e-9) * 100:.1f}% of {kind}; "
              f"{a[f'whole_layer_{kind}_calls']} layer calls)")
    print("  (in steps whose rows all run ACT the calibration is inside the whole-layer time, not in 'calibration "
          "time': its cost there is act / off)")
    return ratios


def _print_curve(curve: list[dict]) -> None:
    print(f"\ncalibration cost per step (ACT engine, off/on interleaved; kernel: {curve[0]['kernel']})")
    print(f"{'step':26s}{'off ms':>10s}{'act ms':>10s}{'calib ms':>10s}{'share':>8s}{'on-off':>8s}"
          f"{'whole ms':>10s}{'native ms':>10s}{'cost':>7s}{'peak scratch':>14s}  load (1/5/15 min)")
    for r in curve:
        what = (f"decode, {r['seqs']} seqs x {r['prompt_len']}" if r["kind"] == "decode"
                else f"prefill, 1 x {r['prompt_len']} tokens")
        mem = f"{r['scratch_peak_bytes'] / 1024:.0f} KiB" if r["scratch_peak_bytes"] >= 0 else "n/a"
        print(f"{what:26s}{r['off_ms']:10.2f}{r['act_ms']:10.2f}{r['calib_ms']:10.2f}{r['share'] * 100:7.1f}%"
              f"{r['on_minus_off'] * 100:7.1f}%{r['whole_layer_ms']:10.2f}{r['native_layer_ms']:10.2f}"
              f"{r['whole_cost'] * 100:6.1f}%{mem:>14s}  {r['load']}")
    print("calib ms: the calibration's own time per calibrated step (plan + separate-pass kernel), accounted in "
          "the worker; share: of the act step; on-off: 1 - off/act from the two end-to-end timings; whole ms: "
          "calibrated layers' attention computed by ACT's kernel in place of the native one (steps whose rows all "
          "run ACT), calibration included; native ms: the native kernel in the same layers for the ACT-off "
          "requests; cost: (whole - native) / act step, the calibration's share where layers are computed whole")


if __name__ == "__main__":
    main()
