"""longlm: long-context language models as Hugging Face models, trained with Lightning.

Importing the package registers the config and models with the `transformers` Auto classes.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForQuestionAnswering

from longlm.attention import MIXERS
from longlm.configuration_longlm import LongLMConfig
from longlm.memory import MEMORIES
from longlm.modeling_longlm import (
    LongLMForCausalLM,
    LongLMForMaskedLM,
    LongLMForQuestionAnswering,
    LongLMModel,
    LongLMPreTrainedModel,
)
from longlm.pipelines import register_question_answering
from longlm.presets import PRESETS

AutoConfig.register(LongLMConfig.model_type, LongLMConfig, exist_ok=True)
AutoModel.register(LongLMConfig, LongLMModel, exist_ok=True)
AutoModelForCausalLM.register(LongLMConfig, LongLMForCausalLM, exist_ok=True)
AutoModelForMaskedLM.register(LongLMConfig, LongLMForMaskedLM, exist_ok=True)
AutoModelForQuestionAnswering.register(LongLMConfig, LongLMForQuestionAnswering, exist_ok=True)
register_question_answering()

__version__ = "0.1.0"
__all__ = [
    "LongLMConfig",
    "LongLMModel",
    "LongLMForCausalLM",
    "LongLMForMaskedLM",
    "LongLMForQuestionAnswering",
    "LongLMPreTrainedModel",
    "MIXERS",
    "MEMORIES",
    "PRESETS",
]
