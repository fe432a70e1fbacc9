"""Tensor x pipeline parallelism as ONE engine: a real CPU engine with
``tensor_parallel_size=2`` and ``pipeline_parallel_size=2`` (four worker ranks on two cores:
``VLLM_CPU_OMP_THREADS_BIND="0|1|0|1"``, ranks ordered [PP, TP], so the two ranks of each
stage sit on different cores and the stages share them) gives the TP=1 PP=1 engine's tokens and
log-probabilities for mixed arms in one batch, and runtime control reaches all four ranks: a
switch is read back from each, and a change one rank refuses is applied nowhere.

The model is test_vllm_pp's 4-layer random-weight Llama (8 query / 2 KV heads): TP rank 0 holds
query heads 0-3, rank 1 heads 4-7; stage 0 holds layers 0-1, stage 1 layers 2-3. The arms:
``a`` on heads of both TP ranks in every layer, ``late`` on layer 3 only (heads 1 and 5: one on
each TP rank of stage 1), ``off``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_vllm_pp import _RUN as _PP_RUN
from test_vllm_pp import ACT, _tiny_model

vllm = pytest.importorskip("vllm")

pytestmark = [pytest.mark.engine, pytest.mark.slow]

# test_vllm_pp's script (its receive-buffer workaround included), with TP and the refused change
_RUN = _PP_RUN.replace(
    'model, pp, act, out = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]',
    'model, pp, act, out, tp = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4], int(sys.argv[5])',
).replace(
    'os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1" if pp == 2 else "0-1"',
    'os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(["0", "1"] * pp) if tp * pp > 1 else "0-1"',
).replace(
    "pipeline_parallel_size=pp,", "pipeline_parallel_size=pp, tensor_parallel_size=tp,",
).replace(
    '    status = control.get_act_status(llm)\n',
    textwrap.indent(textwrap.dedent('''
        status = control.get_act_status(llm)
        if pp * tp > 1:
            # a change ONE rank refuses (the last: PP stage 1, TP rank 1, told that layer 3 is not
            # calibratable there) must leave all four ranks as they were
            llm.collective_rpc(refuse_layer_3_on_last_rank)
            bad = {"profiles": {**act["profiles"], "l3": {"beta": 0.5, "heads": {"3": [2]}}}, "default": "l3"}
            try:
                control.set_act_config(llm, bad)
                refused = None
            except Exception as e:
                refused = str(e)
            status = {**status, "refused": refused, "after_refusal": control.get_act_status(llm)}
    '''), "    ").lstrip("\n"),
)


_REFUSE = textwrap.dedent(
    """

    def refuse_layer_3_on_last_rank(worker):
        from act_plugin.vllm.worker_state import init_worker_state
        state = init_worker_state(worker.vllm_config)
        if state.pp.rank == 1 and state.tp.rank == 1:
            for row in state.layers:
                if row["layer"] == 3:
                    row["unsupported"] = ["refused on this rank for the test"]
    """
)
_RUN = _RUN.replace('\nif __name__ == "__main__":', _REFUSE + '\nif __name__ == "__main__":')


def _run(tmp_path, model: str, tp: int, pp: int) -> subprocess.CompletedProcess:
    script = tmp_path / "run_tp_pp.py"
    script.write_text(_RUN)
    env = {k: v for k, v in os.environ.items() if k not in ("ACT_CONFIG", "VLLM_CPU_OMP_THREADS_BIND")}
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the receive-buffer workaround goes to the workers
    args = [sys.executable, str(script), model, str(pp), json.dumps(ACT), str(tmp_path / f"tp{tp}pp{pp}.json"),
            str(tp)]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def runs(smollm2_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp_pp")
    model = _tiny_model("llama", tmp / "llama", smollm2_path)
    out = {}
    for tp, pp in ((1, 1), (2, 2)):
        proc = _run(tmp, model, tp, pp)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
        out[tp * pp] = json.loads((tmp / f"tp{tp}pp{pp}.json").read_text())
    return out


@pytest.mark.timeout(2400)
def test_tp2_pp2_equals_one_worker_for_mixed_arms(runs):
    one, four = runs[1]["results"], runs[4]["results"]
    assert one["a"] != one["off"] and one["late"] != one["off"]  # each arm changes something
    for arm in one:
        for r1, r4 in zip(one[arm], four[arm], strict=True):
            assert r1["tokens"] == r4["tokens"], arm
            for s1, s4 in zip(r1["lp"], r4["lp"]):
                for tid, lp in s1.items():
                    if tid in s4:
                        assert abs(s4[tid] - lp) < 1e-3, (arm, tid)


@pytest.mark.timeout(2400)
def test_control_and_status_reach_all_four_ranks(runs):
    status = runs[4]["status"]
    workers = status["workers"]
    assert [(w["pp_rank"], w["tp_rank"], w["stage_layers"]) for w in workers] == [
        (0, 0, [0, 2]), (0, 1, [0, 2]), (1, 0, [2, 4]), (1, 1, [2, 4])]
    assert status["config"]["default"] == "late" and all(w["config"]["default"] == "late" for w in workers)
    assert [row["layer"] for row in status["layers"]] == [0, 1, 2, 3]
    assert all(row["calibrator"] and not row["unsupported"] for row in status["layers"])
    assert status["refused"] and "PP stage 1 / TP rank 1" in status["refused"], status["refused"]
    assert "refused on this rank for the test" in status["refused"]
    after = status["after_refusal"]
    assert len(after["workers"]) == 4
    assert all(w["config"] == workers[0]["config"] for w in after["workers"])  # nowhere applied
    assert after["config"]["default"] == "late" and "l3" not in after["config"]["profiles"]
