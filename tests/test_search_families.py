"""Head search on the transformers path across decoder families: tiny random models built
from transformers configs (Llama; Gemma-3 with sliding and full layers, scaled embeddings,
QK-norm and soft-capped logits; Qwen2 with attention bias; Qwen3 with QK-norm; Mistral with
a sliding window; Phi-3 with a fused QKV projection). For each: the backend starts (its
self-check passes), the baseline equals the model's own forward, an exact score restarted
from a cached layer input equals the reference path (``act_plugin.hf``) on the same
weights, and the ranking pass gives finite gradients at the baseline. Also: Gemma-3's
multimodal checkpoint class, a model that cannot restart mid-way (full passes instead), and
a refused model (an error naming its type)."""

from __future__ import annotations

import copy
import logging
import random

import numpy as np
import pytest
import torch

from act_plugin import ACTConfig
from act_plugin.search.scoring import CalibrationSet

VOCAB = 96
BETA, TAU = 0.3, 0.08
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(num_hidden_layers=3, **COMMON)
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            final_logit_softcapping=8.0, **COMMON)
    if family == "qwen2":
        return tf.Qwen2Config(num_hidden_layers=3, **COMMON)  # q/k/v projections with bias
    if family == "qwen3":
        return tf.Qwen3Config(num_hidden_layers=3, head_dim=16, **COMMON)  # per-head RMSNorm on q and k
    if family == "mistral":
        return tf.MistralConfig(num_hidden_layers=3, sliding_window=8, **COMMON)
    if family == "phi3":
        return tf.Phi3Config(num_hidden_layers=3, **COMMON)  # fused qkv_proj
    raise ValueError(family)


# the exact-score heads of each family: a restart layer > 0 (cached input), and for the
# Gemma-3 model one sliding and one full layer
HEADS = {"llama": [(1, 2)], "gemma3": [(1, 0), (2, 3)], "qwen2": [(1, 1)], "qwen3": [(2, 0)],
         "mistral": [(1, 3)], "phi3": [(2, 1)]}
FAMILIES = list(HEADS)


def _sharpen(model: torch.nn.Module, factor: float = 6.0) -> None:
    """Sharper attention than the default init, so that real sinks exceed tau and calibrating
    a head changes the answer (else the exact-score checks would be vacuous)."""
    with torch.no_grad():
        for mod in model.modules():
            for name in ("q_proj", "k_proj", "qkv_proj"):
                lin = getattr(mod, name, None)
                if lin is not None:
                    lin.weight.mul_(factor)
            for name in ("q_norm", "k_norm"):  # QK-norm undoes a projection scale: scale the norm
                norm = getattr(mod, name, None)
                if norm is not None:
                    # Gemma norms multiply by (1 + weight), initialised to zero
                    norm.weight.fill_(factor - 1.0) if not norm.weight.any() else norm.weight.mul_(factor)


def _model(family: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    cfg = _config(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    _sharpen(model)
    return model


def _calib(seed: int = 0, n: int = 10, lengths: tuple[int, int] = (5, 24)) -> CalibrationSet:
    rng = random.Random(seed)
    prompts, choices, gold, tasks = [], [], [], []
    for i in range(n):
        prompts.append([rng.randrange(4, VOCAB) for _ in range(rng.randint(*lengths))])
        k = 2 if i % 2 else 3
        choices.append(tuple(rng.sample(range(4, VOCAB), k)))
        gold.append(rng.randrange(k))
        tasks.append("a" if i % 2 else "b")
    return CalibrationSet(prompts, choices, gold, tasks)


def _backend(model, calib=None, **kw):
    from act_plugin.search.hf_backend import HFSearchBackend

    return HFSearchBackend("unused", calib or _calib(), beta=BETA, threshold=TAU, batch_tokens=64, threads=1,
                           model=model, **kw)


def _reference(model, calib: CalibrationSet, heads: dict[int, list[int]] | None = None) -> np.ndarray:
    """Answer log-probs one prompt at a time through the model's own forward (with ``heads``
    calibrated by the reference HF path)."""
    from act_plugin.hf import act_enabled

    out = np.full((len(calib), calib.max_choices), np.nan)

    def run():
        for i, (p, ids) in enumerate(zip(calib.prompts, calib.choice_ids)):
            lp = torch.log_softmax(model(torch.tensor([p])).logits[0, -1].float(), -1)
            out[i, : len(ids)] = lp[list(ids)].numpy()

    with torch.no_grad():
        if heads:
            with act_enabled(model, ACTConfig(beta=BETA, threshold=TAU, heads=heads)):
                run()
        else:
            run()
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(family, backend, an untouched copy of the same weights)."""
    model = _model(request.param)
    ref = copy.deepcopy(model)
    be = _backend(model)
    assert len(be.batches) > 2  # several right-padded batches
    assert be.cache_hidden, "restarting from a cached layer input should work for this family"
    return request.param, be, ref


def test_baseline_is_the_models_own_forward(family):
    name, be, ref = family
    np.testing.assert_allclose(be.evaluate([]), _reference(ref, be.calib), atol=1e-5, rtol=0)


def test_exact_score_restarted_from_cache_matches_hf_reference(family):
    name, be, ref = family
    layers = sorted({lyr for lyr, _ in HEADS[name]})
    be.plan_cache(layers)
    base = be.evaluate([])
    for head in HEADS[name]:
        assert be.cost_fraction([head]) < 1.0  # the score restarts at the head's layer
        got = be.evaluate([head])
        want = _reference(ref, be.calib, {head[0]: [head[1]]})
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"{name} head {head}")
        assert np.nanmax(np.abs(got - base)) > 1e-4, f"calibrating {head} changed nothing: the check is vacuous"


def test_ranking_gradient_is_finite_at_the_baseline(family):
    name, be, ref = family
    heads = [(lyr, h) for lyr in range(be.num_layers) for h in range(be.num_heads)]
    grad, lp = be.gradients(heads)
    assert np.isfinite(grad).all() and np.abs(grad).max() > 1e-4
    np.testing.assert_allclose(lp, _reference(ref, be.calib), atol=1e-5, rtol=0)  # alpha = 0 is the baseline


def test_gemma3_gradient_matches_finite_difference():
    """Central differences of the gated objective. A small step: the objective curves strongly
    in some heads (head (0, 1) here: the difference quotient at 1e-2 is a third of the
    derivative, at 1e-3 within 5 %, at 1e-4 within 0.5 %); float32 noise sets the absolute
    tolerance."""
    be = _backend(_model("gemma3", seed=1))
    heads = [(0, 1), (1, 0), (1, 3), (2, 2), (3, 0)]  # sliding and full layers
    grad, _ = be.gradients(heads)
    eps = 1e-4
    for head in heads:
        fd = (be.gated_objective({head: eps}) - be.gated_objective({head: -eps})) / (2 * eps)
        assert grad[head] == pytest.approx(fd, rel=1e-2, abs=5e-4), head
    assert max(abs(grad[h]) for h in heads) > 1e-1


class _SideState:
    """Layer ``late``'s input depends on state layer 0's forward leaves behind in the same
    call (as in models whose layers share state across layers): a full forward is unchanged,
    a forward that skips layer 0 is not. Layer 0's forward is wrapped on the instance (as
    accelerate's device hooks do), so the backend must also restore it after a restart."""

    def __init__(self, model, late: int):
        layers = model.model.layers
        self.ran = False
        inner = layers[0].forward

        def forward(*args, **kwargs):
            self.ran = True
            return inner(*args, **kwargs)

        layers[0].forward = forward
        layers[late].register_forward_pre_hook(self._use)

    def _use(self, module, args):
        scale = 1.0 if self.ran else 2.0
        self.ran = False
        return (args[0] * scale, *args[1:])


def test_model_that_cannot_restart_falls_back_to_full_passes(caplog):
    model = _model("llama", seed=2)
    ref = copy.deepcopy(model)
    _SideState(model, late=2)
    _SideState(ref, late=2)
    with caplog.at_level(logging.WARNING, logger="act_plugin.search"):
        be = _backend(model)
    assert not be.cache_hidden and "exact scores run the whole model" in caplog.text and "'llama'" in caplog.text
    be.plan_cache([2])
    assert be.cost_fraction([(2, 1)]) == 1.0
    np.testing.assert_allclose(be.evaluate([(2, 1)]), _reference(ref, be.calib, {2: [1]}), atol=1e-5, rtol=0)


def test_unsupported_model_is_refused_naming_its_type():
    """Bidirectional attention breaks the right-padding assumption: the self-check refuses
    the model with an error naming its type rather than searching on wrong answers."""
    from act_plugin.search.hf_backend import HFSearchUnsupported

    model = _model("gemma3", use_bidirectional_attention=True)
    calib = _calib(n=2, lengths=(8, 8))
    calib.prompts[1] = calib.prompts[1] + [7, 8, 9]  # one batch, the first prompt padded
    with pytest.raises(HFSearchUnsupported, match=r"model type 'gemma3_text' \(Gemma3ForCausalLM\).*method 'exact'"):
        _backend(model, calib)


def test_gemma3_multimodal_checkpoint_class():
    """Gemma-3 checkpoints from 4B up load as Gemma3ForConditionalGeneration (text decoder
    inside ``model.language_model``, a vision tower beside it): text prompts search the same."""
    import transformers as tf

    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                   image_size=28, patch_size=14)
    cfg = tf.Gemma3Config(text_config=_config("gemma3").to_dict(), vision_config=vision.to_dict(),
                          mm_tokens_per_image=4, image_token_index=95, boi_token_index=93, eoi_token_index=94)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration(cfg).float().eval()
    _sharpen(model)
    ref = copy.deepcopy(model)
    be = _backend(model)
    assert type(be.inner).__name__ == "Gemma3TextModel" and be.cache_hidden
    np.testing.assert_allclose(be.evaluate([]), _reference(ref, be.calib), atol=1e-5, rtol=0)
    be.plan_cache([2])
    be.evaluate([])
    assert be.cost_fraction([(2, 3)]) == 0.5
    np.testing.assert_allclose(be.evaluate([(2, 3)]), _reference(ref, be.calib, {2: [3]}), atol=1e-5, rtol=0)
