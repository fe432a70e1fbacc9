"""Engine-level setup: read, validate and apply the ACT configuration of an engine.

Runs inside ``Platform.check_and_update_config`` (wrapped by :func:`install_config_hook`),
i.e. while vLLM builds its ``VllmConfig`` in the front-end process, before any worker
starts. Everything that can be wrong with an ACT configuration is reported here, with a
message naming the problem, instead of as a failure deep inside a worker.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from act_plugin.config import ACTConfigError, ACTEngineConfig

logger = logging.getLogger("act_plugin")

ENV_CONFIG = "ACT_CONFIG"
ADDITIONAL_CONFIG_KEY = "act"
ROUTER_FQCN = "act_plugin.vllm.router:ACTRequestRouter"
WORKER_EXTENSION_FQCN = "act_plugin.vllm.worker.ACTWorkerExtension"


class ACTEngineError(ACTConfigError):
    """An engine setting that ACT cannot work with."""


def raw_act_config(additional_config: Any) -> Any:
    """The engine's ACT configuration as given (None when ACT is not configured)."""
    if isinstance(additional_config, dict) and ADDITIONAL_CONFIG_KEY in additional_config:
        return additional_config[ADDITIONAL_CONFIG_KEY]
    path = os.environ.get(ENV_CONFIG)
    if path:
        return path
    return None


def act_configured(vllm_config: Any) -> bool:
    return vllm_config is not None and raw_act_config(getattr(vllm_config, "additional_config", None)) is not None


def install_config_hook() -> None:
    """Wrap the current platform's ``check_and_update_config`` (idempotent)."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    original = platform_cls.__dict__.get("check_and_update_config")
    if original is None or getattr(original.__func__, "_act_wrapped", False):
        return
    original_func = original.__func__

    def check_and_update_config(cls, vllm_config):
        original_func(cls, vllm_config)
        apply_engine_settings(vllm_config)

    check_and_update_config._act_wrapped = True  # type: ignore[attr-defined]
    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def apply_engine_settings(vllm_config: Any) -> ACTEngineConfig | None:
    """Validate the ACT config against the model and set the engine up for it."""
    raw = raw_act_config(getattr(vllm_config, "additional_config", None))
    if raw is None or vllm_config.model_config is None:
        return None
    engine_cfg = ACTEngineConfig.from_any(raw)
    model_config = vllm_config.model_config
    engine_cfg.validate_for(model_config.hf_text_config)
    _check_supported(vllm_config)

    sched = vllm_config.scheduler_config
    cache = vllm_config.cache_config
    changed = []
    # Sink statistics are per forward call over the rows that call computes (spec §5):
    # a prompt split into chunks, or partly served from the prefix cache, would see
    # fewer rows and calibrate differently. One-call prefill, no prefix cache.
    if cache.enable_prefix_caching:
        cache.enable_prefix_caching = False
        changed.append("prefix caching off")
    if sched.enable_chunked_prefill:
        sched.enable_chunked_prefill = False
        changed.append("chunked prefill off")
    if getattr(sched, "long_prefill_token_threshold", 0):
        sched.long_prefill_token_threshold = 0
        changed.append("long_prefill_token_threshold=0")
    if sched.max_num_batched_tokens < model_config.max_model_len:
        sched.max_num_batched_tokens = model_config.max_model_len
        changed.append(f"max_num_batched_tokens={model_config.max_model_len}")
    if getattr(sched, "max_num_scheduled_tokens", None) is not None and sched.max_num_scheduled_tokens < model_config.max_model_len:
        sched.max_num_scheduled_tokens = model_config.max_model_len

    from vllm.platforms import current_platform

    if current_platform.is_cuda_alike():
        # The calibration plans each step on the host from the live batch; a captured
        # CUDA graph would replay a stale plan.
        from vllm.config import CUDAGraphMode

        comp = vllm_config.compilation_config
        if comp.cudagraph_mode != CUDAGraphMode.NONE:
            comp.cudagraph_mode = CUDAGraphMode.NONE
            changed.append("CUDA graphs off")

    procs = list(model_config.logits_processors or [])
    if ROUTER_FQCN not in procs:
        procs.append(ROUTER_FQCN)
        model_config.logits_processors = procs

    parallel = vllm_config.parallel_config
    if not parallel.worker_extension_cls:
        parallel.worker_extension_cls = WORKER_EXTENSION_FQCN
    elif parallel.worker_extension_cls != WORKER_EXTENSION_FQCN:
        logger.warning(
            "act-plugin: worker_extension_cls is already %s; runtime reconfiguration "
            "(act_plugin.vllm.set_act_config) will not be available",
            parallel.worker_extension_cls,
        )

    # Workers re-read the config from here: resolved once (ACT_CONFIG files included), so
    # every process calibrates with exactly the same settings.
    if not isinstance(vllm_config.additional_config, dict):
        raise ACTEngineError("additional_config must be a dict to carry the 'act' configuration")
    vllm_config.additional_config[ADDITIONAL_CONFIG_KEY] = engine_cfg.to_dict()

    from act_plugin.vllm.runtime import frontend_state

    frontend_state.set(engine_cfg)
    logger.info(
        "act-plugin: ACT on (profiles %s, default %s)%s",
        sorted(engine_cfg.profiles),
        engine_cfg.default,
        f"; {', '.join(changed)}" if changed else "",
    )
    return engine_cfg


def _check_supported(vllm_config: Any) -> None:
    model_config = vllm_config.model_config
    if getattr(model_config, "use_mla", False):
        raise ACTEngineError(
            "ACT does not support MLA attention models (latent KV cache: keys are not "
            "stored per head); remove the 'act' configuration for this model"
        )
    dtype = str(vllm_config.cache_config.cache_dtype)
    if dtype not in ("auto", "bfloat16", "float16", "float32", "half", "float"):
        raise ACTEngineError(
            f"ACT does not support kv_cache_dtype={dtype!r} (quantized KV cache); use kv_cache_dtype='auto'"
        )
    if vllm_config.speculative_config is not None:
        raise ACTEngineError("ACT does not support speculative decoding; remove the speculative config")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ACTEngineError("ACT supports tensor parallelism but not pipeline parallelism (pipeline_parallel_size > 1)")
    if getattr(vllm_config.parallel_config, "decode_context_parallel_size", 1) > 1:
        raise ACTEngineError("ACT does not support decode context parallelism")
