"""Engine-level setup: read, validate and apply the ACT configuration of an engine.

Runs inside ``Platform.check_and_update_config`` (wrapped by :func:`install_config_hook`),
i.e. while vLLM builds its ``VllmConfig`` in the front-end process, before any worker
starts. Everything that can be judged from the configuration alone is judged here, with a
message naming the problem and the setting; what needs the loaded model (backends, layer
kinds, unsupported features) is judged by the workers' start-up check
(:mod:`act_plugin.vllm.startup_check`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from act_plugin.capabilities import SUPPORTED_KV_CACHE_DTYPES
from act_plugin.config import ACTEngineConfig
from act_plugin.kernels import KERNEL_ENV, whole_prefill_enabled
from act_plugin.vllm.backend_registry import BACKEND_HINT, wrapped_backend_names
from act_plugin.vllm.config_source import ADDITIONAL_CONFIG_KEY, act_explicitly_off, read_engine_settings
from act_plugin.vllm.frontend_state import frontend_state
from act_plugin.vllm.layer_support import ACTEngineError
from act_plugin.vllm.request_spans import install_span_mapping
from act_plugin.vllm.router import V1_ROUTER_FQCN, V2_ROUTER_FQCN

logger = logging.getLogger("act_plugin")

WORKER_EXTENSION_FQCN = "act_plugin.vllm.worker.ACTWorkerExtension"

__all__ = ["ACTEngineError", "install_config_hook", "apply_engine_settings"]


def install_config_hook() -> None:
    """Wrap the current platform's ``check_and_update_config`` (idempotent)."""
    from vllm.platforms import current_platform

    # Any: a classmethod of vLLM's platform class is replaced below (check_and_update_config wrapped), which its
    # declared type does not allow; the wrapper keeps the original signature.
    platform_cls: Any = type(current_platform)
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
    additional = getattr(vllm_config, "additional_config", None)
    settings = read_engine_settings(additional)
    if settings is None or vllm_config.model_config is None:
        frontend_state.set(None, explicitly_off=act_explicitly_off(additional))
        return None
    engine_cfg = settings.engine_cfg
    model_config = vllm_config.model_config
    engine_cfg.validate_for(model_config.hf_text_config)
    _check_supported(vllm_config)

    changed = []
    if settings.source != "additional_config":
        changed.append(f"configuration read from {settings.source}")
    changed += _one_call_prefill(vllm_config)
    changed += _limit_cuda_graphs(vllm_config, engine_cfg)
    runner = _install_router(vllm_config)
    install_span_mapping()  # before the engine builds its input processor
    _install_worker_extension(vllm_config.parallel_config)
    _note_ray(vllm_config.parallel_config)

    # Workers read the config from here: resolved once (ACT_CONFIG files included), so every
    # process calibrates with exactly the same settings.
    if not isinstance(vllm_config.additional_config, dict):
        raise ACTEngineError("additional_config must be a dict to carry the 'act' configuration")
    vllm_config.additional_config[ADDITIONAL_CONFIG_KEY] = engine_cfg.to_dict()

    frontend_state.set(engine_cfg)
    _log_engine_setup(engine_cfg, runner, changed)
    return engine_cfg


def _log_engine_setup(engine_cfg: ACTEngineConfig, runner: str, changed: list[str]) -> None:
    """The start-up line. What calibrates nothing is never silent: an engine with no profile
    says that it is "ACT ready" and why its scheduling changed anyway; each profile that
    calibrates nothing gets a warning."""
    ready = not engine_cfg.profiles
    changes = f"; {', '.join(changed)}" if changed else ""
    if ready and changed:
        changes += " (applied now: the profiles runtime control adds need them)"
    logger.info(
        "act-plugin: %s (profiles %s, default %s, model runner %s)%s",
        "ACT ready, no profile" if ready else "ACT on",
        sorted(engine_cfg.profiles),
        engine_cfg.default,
        runner.upper(),
        changes,
    )
    for note in engine_cfg.calibrates_nothing_notes():
        logger.warning("act-plugin: %s", note)


def _one_call_prefill(vllm_config: Any) -> list[str]:
    """Sink statistics are per forward call over the rows that call computes (spec §5): a
    prompt split into chunks, or partly served from the prefix cache, would see fewer rows
    and calibrate differently. One-call prefill, no prefix cache; returns what changed."""
    sched = vllm_config.scheduler_config
    cache = vllm_config.cache_config
    max_model_len = vllm_config.model_config.max_model_len
    changed = []
    if cache.enable_prefix_caching:
        cache.enable_prefix_caching = False
        changed.append("prefix caching off")
    if sched.enable_chunked_prefill:
        sched.enable_chunked_prefill = False
        changed.append("chunked prefill off")
    if getattr(sched, "long_prefill_token_threshold", 0):
        sched.long_prefill_token_threshold = 0
        changed.append("long_prefill_token_threshold=0")
    if sched.max_num_batched_tokens < max_model_len:
        sched.max_num_batched_tokens = max_model_len
        changed.append(f"max_num_batched_tokens={max_model_len}")
    max_scheduled = getattr(sched, "max_num_scheduled_tokens", None)
    if max_scheduled is not None and max_scheduled < max_model_len:
        sched.max_num_scheduled_tokens = max_model_len
    return changed


def _install_router(vllm_config: Any) -> str:
    """Per-request arms: add the router of the model runner this engine will use (and drop the
    other runner's); returns the runner, "v1" or "v2"."""
    model_config = vllm_config.model_config
    runner = "v2" if vllm_config.use_v2_model_runner else "v1"
    router, other = (V2_ROUTER_FQCN, V1_ROUTER_FQCN) if runner == "v2" else (V1_ROUTER_FQCN, V2_ROUTER_FQCN)
    procs = [p for p in (model_config.logits_processors or []) if p != other]
    if router not in procs:
        procs.append(router)
    model_config.logits_processors = procs
    return runner


def _install_worker_extension(parallel: Any) -> None:
    """Runtime control and status reach the workers through our worker extension."""
    if not parallel.worker_extension_cls:
        parallel.worker_extension_cls = WORKER_EXTENSION_FQCN
    elif parallel.worker_extension_cls != WORKER_EXTENSION_FQCN:
        raise ACTEngineError(
            f"worker_extension_cls is already {parallel.worker_extension_cls!r}; act-plugin needs "
            f"{WORKER_EXTENSION_FQCN!r} for runtime control and status. Remove the other worker extension."
        )


def _note_ray(parallel: Any) -> None:
    """On Ray, vLLM loads the plugin from each node's own environment; say so before a node
    without it stops the engine with a bare ``No module named 'act_plugin'``."""
    backend = getattr(parallel, "distributed_executor_backend", None)
    if backend == "ray" or "Ray" in getattr(backend, "__name__", ""):
        logger.info(
            "act-plugin: Ray executor: every Ray node needs act-plugin installed (the same version); a node "
            "without it stops the engine with \"No module named 'act_plugin'\". Check with: act-plugin ray-check"
        )


def _limit_cuda_graphs(vllm_config: Any, engine_cfg: ACTEngineConfig | None = None) -> list[str]:
    """CUDA graphs with ACT: FULL graphs for single-token decode steps, whose attention layers
    calibrate from persistent device tables rewritten before every step
    (:mod:`act_plugin.vllm.graph_plan`), and piecewise graphs for the other steps, whose
    attention (with its per-step host plan) stays outside the captured pieces. So FULL (every
    step in full graphs) becomes FULL_AND_PIECEWISE; FULL_AND_PIECEWISE and FULL_DECODE_ONLY
    stay. Where ACT cannot calibrate inside a graph (:func:`full_graph_refusal`) every mode
    with full graphs is lowered to PIECEWISE. The builders declare the same to vLLM
    (``get_cudagraph_support``), which lowers further for a backend that supports less.
    Returns what changed."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike():
        return []
    from vllm.config import CUDAGraphMode

    comp = vllm_config.compilation_config
    mode = comp.cudagraph_mode
    if mode is None or mode in (CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE):
        return []
    reason = full_graph_refusal(engine_cfg)
    if reason is not None:
        comp.cudagraph_mode = CUDAGraphMode.PIECEWISE
        return [f"CUDA graphs {mode.name} -> PIECEWISE (attention runs eagerly: {reason})"]
    if mode.mixed_mode() == CUDAGraphMode.FULL:
        comp.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
        return [f"CUDA graphs {mode.name} -> FULL_AND_PIECEWISE (full graphs for decode steps only)"]
    return []


def full_graph_refusal(engine_cfg: ACTEngineConfig | None) -> str | None:
    """Why ACT cannot run inside FULL CUDA graphs of this engine (None: it can)."""
    from vllm.platforms import current_platform

    if current_platform.is_rocm():
        return "ACT's per-row decode kernel is tested on CUDA only"
    forced = os.environ.get(KERNEL_ENV, "").strip().lower()
    if forced in ("reference", "cpu"):
        return f"{KERNEL_ENV}={forced} has no per-row decode kernel"
    if engine_cfg is not None:
        for name, prof in engine_cfg.profiles.items():
            if prof.rule != "act":
                return f"profile '{name}' uses rule '{prof.rule}', which runs on the host plan only"
    return None


def _check_supported(vllm_config: Any) -> None:
    model_config = vllm_config.model_config
    if getattr(model_config, "use_mla", False):
        raise ACTEngineError(
            "ACT does not support MLA attention models (latent KV cache: keys are not "
            "stored per head); remove the 'act' configuration for this model"
        )
    dtype = str(vllm_config.cache_config.cache_dtype)
    if dtype not in SUPPORTED_KV_CACHE_DTYPES:
        raise ACTEngineError(
            f"ACT does not support kv_cache_dtype={dtype!r} (quantized KV cache); use kv_cache_dtype='auto'"
        )
    if vllm_config.speculative_config is not None:
        raise ACTEngineError("ACT does not support speculative decoding; remove the speculative config")
    try:  # read again by each worker's start-up check (workers may run elsewhere, e.g. under Ray)
        whole_prefill_enabled()
    except ValueError as e:
        raise ACTEngineError(str(e)) from None
    if vllm_config.parallel_config.pipeline_parallel_size > 1 and vllm_config.use_v2_model_runner:
        # Model Runner V2 tells custom logits processors (the routers) about a request only on
        # the last pipeline stage; the earlier stages would not know its arm. The V1 runner
        # updates its persistent batch, and so the routers, on every stage.
        raise ACTEngineError(
            "ACT with pipeline parallelism (pipeline_parallel_size > 1) needs the V1 model runner: Model Runner "
            "V2 gives per-request settings to the last pipeline stage only. Start with VLLM_USE_V2_MODEL_RUNNER=0."
        )
    if getattr(vllm_config.parallel_config, "decode_context_parallel_size", 1) > 1:
        raise ACTEngineError("ACT does not support decode context parallelism (decode_context_parallel_size > 1)")
    if getattr(vllm_config.parallel_config, "prefill_context_parallel_size", 1) > 1:
        raise ACTEngineError("ACT does not support prefill context parallelism (prefill_context_parallel_size > 1)")
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    if backend is not None:
        name = getattr(backend, "name", str(backend))
        if name not in wrapped_backend_names():
            raise ACTEngineError(
                f"ACT is configured, but the attention backend is set to {name}, which act-plugin does not wrap. "
                "Choose a wrapped backend with " + BACKEND_HINT.format(choices="|".join(wrapped_backend_names()))
                + ", or start the engine without an ACT configuration."
            )
