"""act-plugin: attention calibration (ACT, Yu et al., ICML 2024) for vLLM and transformers.

Importing this package is cheap: it never imports vLLM (the engine plugin lives in
``act_plugin.vllm`` and is loaded by vLLM through its ``vllm.general_plugins`` entry point).
"""

from act_plugin.config import ACTConfig, ACTConfigError, ACTEngineConfig, ModelShape, model_shape

__version__ = "0.1.0"
__all__ = ["ACTConfig", "ACTEngineConfig", "ACTConfigError", "ModelShape", "model_shape", "__version__"]
