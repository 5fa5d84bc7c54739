"""longlm: long-context language models as Hugging Face models, trained with Lightning.

Importing the package registers the config and models with the `transformers` Auto classes.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from longlm.attention import MIXERS
from longlm.configuration_longlm import LongLMConfig
from longlm.memory import MEMORIES
from longlm.modeling_longlm import LongLMForCausalLM, LongLMModel, LongLMPreTrainedModel
from longlm.presets import PRESETS

AutoConfig.register(LongLMConfig.model_type, LongLMConfig, exist_ok=True)
AutoModel.register(LongLMConfig, LongLMModel, exist_ok=True)
AutoModelForCausalLM.register(LongLMConfig, LongLMForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "LongLMConfig",
    "LongLMModel",
    "LongLMForCausalLM",
    "LongLMPreTrainedModel",
    "MIXERS",
    "MEMORIES",
    "PRESETS",
]
