"""hf_glu: Gated Linear Unit feed-forward layers for Hugging Face Transformers.

Importing the package registers the GLU configs and every model head, the GPT-2-style ``GluFor*`` and
each family's ``Glu<FamilyClass>``, with the Auto classes (so ``AutoModelForCausalLM.from_pretrained``
finds them), marks them to save their code into checkpoints (so ``trust_remote_code=True`` users load
them without hf_glu), and tells PEFT which modules LoRA targets by default.
"""

import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_glu import GluConfig
from .configuration_glu_families import FAMILIES, GLU_FAMILY_CONFIGS
from .convert import convert_checkpoint, convert_gpt2
from .glu import VARIANTS, GluParams, get_variant, glu_activation
from .modeling_glu import (
    GluForCausalLM,
    GluForSequenceClassification,
    GluForTokenClassification,
    GluMLP,
    GluModel,
    GluPreTrainedModel,
)
from .modeling_glu_families import GLU_FAMILY_MODELS

__version__ = "0.1.0"

LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GLU_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]

_AUTO_CLASSES = (
    (AutoModel, GluModel),
    (AutoModelForCausalLM, GluForCausalLM),
    (AutoModelForSequenceClassification, GluForSequenceClassification),
    (AutoModelForTokenClassification, GluForTokenClassification),
)


def _register() -> None:
    AutoConfig.register(GluConfig.model_type, GluConfig, exist_ok=True)
    GluConfig.register_for_auto_class()
    for auto_class, model_class in _AUTO_CLASSES:
        auto_class.register(GluConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(GluConfig.model_type, LORA_TARGET_MODULES)
    for family in FAMILIES.values():
        config_class = GLU_FAMILY_CONFIGS[family.model_type]
        AutoConfig.register(family.glu_model_type, config_class, exist_ok=True)
        config_class.register_for_auto_class()
        for auto_name, model_class in GLU_FAMILY_MODELS[family.model_type].items():
            getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)
            model_class.register_for_auto_class(auto_name)
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(
            family.glu_model_type, [*family.attention, *GLU_PROJECTIONS]
        )


_register()

__all__ = [
    "GluConfig",
    "GluModel",
    "GluForCausalLM",
    "GluForSequenceClassification",
    "GluForTokenClassification",
    "GluMLP",
    "GluPreTrainedModel",
    "GluParams",
    "VARIANTS",
    "LORA_TARGET_MODULES",
    "get_variant",
    "glu_activation",
    "convert_gpt2",
    "convert_checkpoint",
    "FAMILIES",
    "GLU_FAMILY_CONFIGS",
    "GLU_FAMILY_MODELS",
]
