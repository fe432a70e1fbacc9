"""Pipeline parallelism: each stage judges and calibrates the layers it holds, messages name
the stage and rank, the status is one row per TP x PP worker with preemptions counted once;
and a real PP=2 CPU engine gives the PP=1 engine's tokens and log-probabilities, for mixed
arms in one batch, and refuses a bad layer that only the second stage holds.

The engine tests build small random-weight models with SmolLM2's tokenizer: a 4-layer Llama
(stage 0 holds layers 0-1, stage 1 layers 2-3) and a 4-layer Gemma-2, whose attention uses
logit soft-capping, which ACT refuses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from act_plugin.config import ACTEngineConfig
from act_plugin.vllm.worker_state import PPStage, TPSlice, WorkerState

vllm = pytest.importorskip("vllm")


def _row(layer, **kw):
    base = {"layer_name": f"model.layers.{layer}.self_attn.attn", "layer": layer, "kind": "attention",
            "attn_type": "decoder", "backend": "CPU_ATTN", "impl": "ACTImpl", "calibrator": True, "unsupported": []}
    return {**base, **kw}


def _stage(rank: int, tp_rank: int = 0, rows=None) -> WorkerState:
    """A worker of a 4-layer, 8-head model split over two pipeline stages (layers 0-1 | 2-3)."""
    st = WorkerState(tp=TPSlice(rank=tp_rank, num_heads=8, num_layers=4), pp=PPStage(rank, ((0, 2), (2, 4))))
    st.layers = rows if rows is not None else [_row(layer) for layer in range(*st.pp.ranges[rank])]
    return st


def test_pp_stage_holds_its_layers_and_knows_where_the_others_are():
    no_pp = PPStage()
    assert no_pp.size == 1 and no_pp.layers is None and no_pp.holds(99) and no_pp.stage_of(99) == 0
    second = PPStage(1, ((0, 15), (15, 30)))
    assert second.size == 2 and second.layers == (15, 30)
    assert [second.holds(layer) for layer in (0, 14, 15, 29, 30)] == [False, False, True, True, False]
    assert [second.stage_of(layer) for layer in (0, 14, 15, 29, 30)] == [0, 0, 1, 1, None]


def test_pp_stage_follows_vllm_partition(monkeypatch):
    """The stage ranges are vLLM's own ``get_pp_indices``, including its uneven split and the
    ``VLLM_PP_LAYER_PARTITION`` override."""
    from types import SimpleNamespace

    from act_plugin.vllm.worker_state import pp_stage_of

    cfg = SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=3))
    assert pp_stage_of(cfg, 10).ranges == ((0, 3), (3, 7), (7, 10))  # remainder on the middle stage
    assert pp_stage_of(SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=1)), 10) == PPStage()
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", "2,5,3")
    assert pp_stage_of(cfg, 10).ranges == ((0, 2), (2, 7), (7, 10))


def test_each_stage_judges_only_the_layers_it_holds():
    bad_on_second = [_row(2), _row(3, unsupported=["it uses logit soft-capping"])]
    cfg = ACTEngineConfig.from_any({"heads": {"0": [1], "3": [2]}})
    _stage(0).check(cfg)  # layer 3 is not stage 0's to judge
    with pytest.raises(Exception, match=r"^PP stage 1 / TP rank 1: profile 'act': .*layer 3 .*soft-capping"):
        _stage(1, tp_rank=1, rows=bad_on_second).check(cfg)
    # a layer the stage holds but the model does not register is still refused there
    with pytest.raises(Exception, match=r"^PP stage 1 / TP rank 0: .*layer 3: the model registers no attention"):
        _stage(1, rows=[_row(2)]).check(cfg)


def test_a_layer_no_stage_holds_is_refused():
    st = _stage(0)
    st.tp = TPSlice(rank=0, num_heads=8, num_layers=6)  # ranges cover 0-3 only (a model vLLM built shorter)
    with pytest.raises(Exception, match=r"PP stage 0 / TP rank 0: .*layer 5: no pipeline stage holds it"):
        st.check(ACTEngineConfig.from_any({"heads": {"5": [0]}}))


def test_preemptions_logged_by_the_first_worker_only(caplog):
    from act_plugin.config import ACTConfig
    from act_plugin.vllm.worker_state import Arm

    arm = Arm("a", ACTConfig.from_any({"heads": {"0": [0]}}))
    with caplog.at_level("WARNING", logger="act_plugin"):
        for st in (_stage(1), _stage(0, tp_rank=1)):
            st.note_admitted(arm, resumed=True)
            assert st.preemptions == 1
        assert "preempted" not in caplog.text
        first = _stage(0)
        first.note_admitted(arm, resumed=True)
    assert first.preemptions == 1 and caplog.text.count("preempted") == 1


def test_status_is_one_row_per_worker_with_counts_taken_once():
    from act_plugin.vllm.control import aggregate_status

    cfg = ACTEngineConfig.from_any({"heads": {"0": [1], "3": [2]}}).to_dict()
    rows = []
    for pp_rank in (1, 0):
        for tp_rank in (1, 0):
            st = _stage(pp_rank, tp_rank)
            st.engine_cfg = ACTEngineConfig.from_any(cfg)
            st.preemptions = 2
            status = st.status()
            assert (status["pp_rank"], status["pp_size"], status["tp_rank"]) == (pp_rank, 2, tp_rank)
            assert status["stage_layers"] == list(st.pp.ranges[pp_rank])
            rows.append(status)
    out = aggregate_status(rows)
    assert [(w["pp_rank"], w["tp_rank"]) for w in out["workers"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert out["preemptions"] == 2  # every worker counted the same two requests
    assert [row["layer"] for row in out["layers"]] == [0, 1, 2, 3]  # TP rank 0 of each stage
    rows[0]["config"] = ACTEngineConfig.from_any({"heads": {"1": [1]}}).to_dict()
    with pytest.raises(RuntimeError, match="disagree"):
        aggregate_status(rows)


def test_pp_with_model_runner_v2_is_refused():
    from types import SimpleNamespace

    from act_plugin.vllm.config_hook import _check_supported
    from act_plugin.vllm.layer_support import ACTEngineError

    def cfg(pp, v2):
        return SimpleNamespace(
            model_config=SimpleNamespace(use_mla=False), cache_config=SimpleNamespace(cache_dtype="auto"),
            speculative_config=None, parallel_config=SimpleNamespace(pipeline_parallel_size=pp),
            use_v2_model_runner=v2, attention_config=None,
        )

    _check_supported(cfg(2, False))
    _check_supported(cfg(1, True))
    with pytest.raises(ACTEngineError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        _check_supported(cfg(2, True))


# ---------------------------------------------------------------------------- real engines

ACT = {"profiles": {"a": {"beta": 0.3, "threshold": 0.05, "heads": "0-3:0,3,4,7"},
                    "late": {"beta": 0.2, "threshold": 0.05, "heads": {"3": [1, 5]}}}, "default": None}

_RUN = textwrap.dedent(
    """
    import json, os, sys
    from act_plugin.vllm.env import cpu_engine_kwargs


    def allocate_receive_buffer(worker):
        # vLLM 0.32's CPU worker skips its warm-up run under enforce_eager with an explicit KV
        # cache size, and that run is what allocates a later stage's buffer for the activations
        # it receives (the first request then fails with an AssertionError, ACT or not). This
        # does what the warm-up run does (GPUModelRunner._dummy_run).
        from vllm.distributed import get_pp_group
        runner = worker.model_runner
        if not get_pp_group().is_first_rank and runner.intermediate_tensors is None:
            runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
                batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device)

    if __name__ == "__main__":
        model, pp, act, out = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1" if pp == 2 else "0-1"
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from act_plugin.vllm import control
        llm = LLM(model=model, seed=0, pipeline_parallel_size=pp, additional_config={"act": act},
                  **cpu_engine_kwargs(max_model_len=256))
        print("ENGINE STARTED", flush=True)
        if pp > 1:
            llm.collective_rpc(allocate_receive_buffer)  # a function: needs VLLM_ALLOW_INSECURE_SERIALIZATION
        prompts = [[1, 17, 230, 18, 9, 2048, 77, 13], [5, 9, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43],
                   [3, 1000, 7, 12, 99, 4]]
        # mixed arms in one batch: each prompt once per arm, all in one generate call
        arms = ["a", "late", "off"]
        reqs = [(arm, p) for arm in arms for p in prompts]
        sps = [SamplingParams(max_tokens=8, temperature=0.0, logprobs=5, extra_args={"act": arm}) for arm, _ in reqs]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for _, p in reqs], sps, use_tqdm=False)
        res = {arm: [] for arm in arms}
        for (arm, _), o in zip(reqs, outs):
            res[arm].append({"tokens": list(o.outputs[0].token_ids),
                             "lp": [{str(k): v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs]})
        # runtime control reaches every stage: switch the default, read it back from all workers
        control.set_act_config(llm, {"profiles": act["profiles"], "default": "late"})
        status = control.get_act_status(llm)
        json.dump({"results": res, "status": status}, open(out, "w"))
    """
)


def _tiny_model(kind: str, path, tok_path) -> str:
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_path)
    common = dict(vocab_size=len(tok), num_hidden_layers=4, num_attention_heads=8, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id or 0, eos_token_id=tok.eos_token_id or 0)
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_key_value_heads=2, head_dim=32,
                          tie_word_embeddings=True, **common)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Gemma2Config(hidden_size=128, intermediate_size=256, num_key_value_heads=2, head_dim=16,
                           attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=64,
                           pad_token_id=0, **common)
        model = Gemma2ForCausalLM(cfg)
    model.to(torch.float32).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _run(tmp_path, model: str, pp: int, act: dict) -> subprocess.CompletedProcess:
    script = tmp_path / "run.py"
    script.write_text(_RUN)
    env = {k: v for k, v in os.environ.items() if k not in ("ACT_CONFIG", "VLLM_CPU_OMP_THREADS_BIND")}
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the test's own workaround function goes to the workers
    args = [sys.executable, str(script), model, str(pp), json.dumps(act), str(tmp_path / f"pp{pp}.json")]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def pp_runs(smollm2_path, tmp_path_factory):
    """The PP=1 reference and the PP=2 engine, each once per module (subprocesses)."""
    tmp = tmp_path_factory.mktemp("pp")
    model = _tiny_model("llama", tmp / "llama", smollm2_path)
    out = {}
    for pp in (1, 2):
        proc = _run(tmp, model, pp, ACT)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        out[pp] = json.loads((tmp / f"pp{pp}.json").read_text())
    return out


@pytest.mark.engine
@pytest.mark.slow
def test_pp2_equals_pp1_for_mixed_arms(pp_runs):
    one, two = pp_runs[1]["results"], pp_runs[2]["results"]
    # Each calibrating arm must change something, or the comparison proves nothing; "late"
    # calibrates only layer 3, which stage 1 holds, so its arm must have reached stage 1.
    assert one["a"] != one["off"] and one["late"] != one["off"]
    for arm in one:
        for r1, r2 in zip(one[arm], two[arm]):
            assert r1["tokens"] == r2["tokens"], arm
            for s1, s2 in zip(r1["lp"], r2["lp"]):
                for tid, lp in s1.items():
                    if tid in s2:
                        assert abs(s2[tid] - lp) < 1e-3, (arm, tid)


@pytest.mark.engine
@pytest.mark.slow
def test_pp2_status_and_control_reach_every_stage(pp_runs):
    status = pp_runs[2]["status"]
    assert status["config"]["default"] == "late"  # the runtime switch, read back from every worker
    assert [(w["pp_rank"], w["tp_rank"], w["stage_layers"]) for w in status["workers"]] == [(0, 0, [0, 2]),
                                                                                            (1, 0, [2, 4])]
    assert all(w["config"]["default"] == "late" for w in status["workers"])
    # each stage reports the configured layers it holds; the engine's report is their union
    assert [row["layer"] for row in status["workers"][0]["layers"]] == [0, 1]
    assert [row["layer"] for row in status["workers"][1]["layers"]] == [2, 3]
    assert [row["layer"] for row in status["layers"]] == [0, 1, 2, 3]
    assert all(row["calibrator"] and not row["unsupported"] for row in status["layers"])
    assert status["preemptions"] == 0 and status["unroutable"] == 0


@pytest.mark.engine
@pytest.mark.slow
def test_bad_layer_on_second_stage_is_refused_naming_the_stage(smollm2_path, tmp_path):
    model = _tiny_model("gemma2", tmp_path / "gemma2", smollm2_path)
    proc = _run(tmp_path, model, 2, {"heads": {"3": [0, 2]}})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "ENGINE STARTED" not in out
    assert "PP stage 1 / TP rank 0: profile 'act': ACT cannot calibrate layer 3 (model.layers.3.self_attn.attn" \
        in out, out[-4000:]
    assert "logit soft-capping" in out
