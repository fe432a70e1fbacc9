"""Runtime control on the async engine (``AsyncLLM``, what ``vllm serve`` runs), on the real
SmolLM2: the awaitable API switches workers first and the front end last; the sync API
refuses an async engine without changing anything; a bad config changes nothing."""

from __future__ import annotations

import asyncio
import gc
import uuid

import pytest

from act_plugin.config import ACTConfigError
from act_plugin.vllm.env import apply_cpu_defaults, cpu_engine_kwargs

pytestmark = [pytest.mark.engine, pytest.mark.slow]
vllm = pytest.importorskip("vllm")

A = {"beta": 0.4, "heads": "2-27:0,4"}
PROMPT = "Review: an utterly charming, funny film.\nSentiment:"


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()
    gc.collect()


@pytest.fixture(scope="module")
def engine(smollm2_path, loop):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    apply_cpu_defaults()
    kw = cpu_engine_kwargs(max_model_len=512)

    async def make():
        return AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=smollm2_path, seed=0, additional_config={"act": {"profiles": {"a": A}, "default": None}}, **kw))

    eng = loop.run_until_complete(make())
    yield eng

    async def close(eng):
        # Shut down inside the loop and wait out its tasks (the output handler): a task
        # left pending is destroyed later by the garbage collector, wherever that runs; on
        # Python 3.11 its logged traceback then parses source inside a running ast.parse and
        # fails an unrelated test ("AST constructor recursion depth mismatch").
        eng.shutdown()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    loop.run_until_complete(close(eng))
    loop.run_until_complete(loop.shutdown_asyncgens())
    del eng
    gc.collect()  # AsyncLLM.__del__ runs now, not at interpreter exit when vLLM's modules are gone


def _text(loop, engine, arm) -> str:
    async def run():
        sp = vllm.SamplingParams(max_tokens=10, temperature=0.0, extra_args={"act": arm})
        final = None
        async for out in engine.generate(PROMPT, sp, request_id=str(uuid.uuid4())):
            final = out
        return final.outputs[0].text

    return loop.run_until_complete(run())


def test_async_runtime_control(loop, engine):
    from act_plugin.vllm import control

    ref_a, ref_off = _text(loop, engine, "a"), _text(loop, engine, "off")
    assert ref_a != ref_off, "profile 'a' changed nothing: useless reference"

    # The sync API on an async engine: a clear TypeError, and nothing changed anywhere.
    with pytest.raises(TypeError, match="aset_act_config"):
        control.set_act_config(engine, {"profiles": {"a": A, "x": A}, "default": None})
    with pytest.raises(Exception, match="unknown ACT profile 'x'"):
        _text(loop, engine, "x")
    status = loop.run_until_complete(control.aget_act_status(engine))
    assert set(status["config"]["profiles"]) == {"a"}

    # The awaitable API: workers switch, then the front end accepts 'x', which calibrates.
    new = loop.run_until_complete(control.aset_act_config(engine, {"profiles": {"a": A, "x": A}, "default": None}))
    assert set(new.profiles) == {"a", "x"}
    assert _text(loop, engine, "x") == ref_a
    status = loop.run_until_complete(control.aget_act_status(engine))
    assert set(status["config"]["profiles"]) == {"a", "x"} and status["runner"] == "v1"

    # A config the workers cannot run changes nothing.
    with pytest.raises(ACTConfigError, match="layer 30"):
        loop.run_until_complete(control.aset_act_config(engine, {"heads": {"30": [0]}}))
    assert set(loop.run_until_complete(control.aget_act_config(engine)).profiles) == {"a", "x"}
    assert _text(loop, engine, "x") == ref_a and _text(loop, engine, "off") == ref_off
