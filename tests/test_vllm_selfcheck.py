"""The start-up self-check on a real engine: a configured layer ACT cannot calibrate stops
the engine at start with a message naming the layer and the reason, never at a request.

The model is a tiny random Gemma-2 (2 layers; Gemma-2 attention uses logit soft-capping,
which the ACT maths does not model), built here with transformers and SmolLM2's tokenizer.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]
vllm = pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def tiny_gemma2(smollm2_path, tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    out = tmp_path_factory.mktemp("tiny_gemma2")
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    cfg = Gemma2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, sliding_window=64, bos_token_id=tok.bos_token_id or 0,
        eos_token_id=tok.eos_token_id or 0, pad_token_id=0,
    )
    torch.manual_seed(0)
    Gemma2ForCausalLM(cfg).to(torch.float32).save_pretrained(out)
    tok.save_pretrained(out)
    assert cfg.attn_logit_softcapping  # the feature under test
    return str(out)


_START = """
import json, sys
from act_plugin.vllm.env import apply_cpu_defaults, cpu_engine_kwargs
if __name__ == "__main__":
    apply_cpu_defaults()
    import vllm
    vllm.LLM(model=sys.argv[1], **cpu_engine_kwargs(max_model_len=256), additional_config={"act": json.loads(sys.argv[2])})
    print("ENGINE STARTED")
"""


def test_soft_capped_layer_is_refused_at_engine_start(tiny_gemma2, tmp_path):
    """What a user sees: the engine does not start, and the output names the layer, the
    reason and the setting. (vLLM re-raises worker start-up failures in the calling process
    as "Engine core initialization failed. See root cause above"; the root cause printed
    above it is ours.)"""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "start.py"
    script.write_text(_START)
    env = {k: v for k, v in os.environ.items() if k != "ACT_CONFIG"}
    proc = subprocess.run([sys.executable, str(script), tiny_gemma2, json.dumps({"heads": {"1": [0, 2]}})],
                          env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "ENGINE STARTED" not in out
    assert "ACT cannot calibrate layer 1 (model.layers.1.self_attn.attn" in out, out[-4000:]
    assert "it uses logit soft-capping. Remove this layer from the ACT configuration." in out
