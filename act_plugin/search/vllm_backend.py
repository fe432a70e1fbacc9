"""Exact calibration-set scores in ONE running vLLM engine.

The engine starts once with an (empty) ACT configuration, which gives it runtime control;
each configuration under test is installed with :func:`act_plugin.vllm.control.set_act_config`
(no restart) as the profile ``search``, and all calibration prompts go out in one
``generate`` call with ``SamplingParams(max_tokens=1, logprob_token_ids=<answer tokens>,
extra_args={"act": "search"})`` -- one prefill per prompt; the log-probabilities are the
raw full-vocabulary log-softmax of the last prompt row (``act_plugin.lmeval`` relies on the
same). The baseline uses ``extra_args={"act": "off"}``. The ACT engine runs each prompt's
prefill in one call with prefix caching off (ACT_SPEC section 5), so every score is the
paper's single-prefill score.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from act_plugin.heads import group_by_layer
from act_plugin.search.scoring import CalibrationSet

__all__ = ["VLLMSearchBackend", "PROFILE"]

logger = logging.getLogger("act_plugin.search")
PROFILE = "search"
Head = tuple[int, int]


class VLLMSearchBackend:
    name = "vllm"

    def __init__(self, model_path: str, calib: CalibrationSet, *, beta: float, threshold: float,
                 engine: dict[str, Any] | None = None, seed: int = 0, llm: Any = None,
                 max_prompt_tokens: int | None = None):
        from act_plugin.vllm.env import apply_cpu_defaults, cpu_engine_kwargs

        self.calib = calib
        self.beta = float(beta)
        self.threshold = float(threshold)
        self._owned = llm is None
        if llm is None:
            import os

            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # read when vLLM is first imported
            apply_cpu_defaults()
            from vllm import LLM

            kwargs = cpu_engine_kwargs(**{"seed": seed, **(engine or {})})
            longest = max(max_prompt_tokens or 0, max(len(p) for p in calib.prompts)) + 1
            if kwargs.get("max_model_len") and kwargs["max_model_len"] < longest:
                kwargs["max_model_len"] = longest
            llm = LLM(model=model_path, additional_config={"act": {"profiles": {}, "default": None}}, **kwargs)
        self.llm = llm
        from vllm.inputs import TokensPrompt

        self._prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in calib.prompts]

    def _params(self, arm: str):
        from vllm import SamplingParams

        return [SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, logprob_token_ids=list(ids),
                               extra_args={"act": arm}) for ids in self.calib.choice_ids]

    def evaluate(self, heads: Iterable[Head], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Answer log-probabilities ``[N, Cmax]`` with ``heads`` calibrated (none: baseline)."""
        from act_plugin.vllm import control

        heads = sorted({(int(a), int(b)) for a, b in heads})
        if heads:
            by_layer = {str(layer): hs for layer, hs in group_by_layer(heads).items()}
            control.set_act_config(self.llm, {"profiles": {PROFILE: {
                "beta": self.beta, "threshold": self.threshold, "heads": by_layer}}, "default": None})
            arm = PROFILE
        else:
            arm = "off"
        outs = self.llm.generate(self._prompts, self._params(arm), use_tqdm=False)
        lp = np.full((len(self.calib), self.calib.max_choices), np.nan)
        for i, (out, ids) in enumerate(zip(outs, self.calib.choice_ids)):
            step = out.outputs[0].logprobs[0]
            for c, tid in enumerate(ids):
                v = step.get(int(tid))
                if v is None:  # pragma: no cover - vLLM returns every requested id
                    raise RuntimeError(f"vLLM returned no log-probability for token {tid}")
                lp[i, c] = float(getattr(v, "logprob", v))
        if progress:
            progress(len(self.calib))
        return lp

    def cost_fraction(self, heads: Iterable[Head]) -> float:
        return 1.0

    def close(self) -> None:
        if self._owned and self.llm is not None:
            llm, self.llm = self.llm, None
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # pragma: no cover - best effort
                pass
            del llm
