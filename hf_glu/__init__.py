"""hf_glu: Gated Linear Unit feed-forward layers for Hugging Face Transformers.

Importing the package registers the GLU configs and every model head, the GPT-2-style ``GluFor*`` and
each family's ``Glu<FamilyClass>``, with the Auto classes (so ``AutoModelForCausalLM.from_pretrained``
finds them), and tells PEFT which modules LoRA targets by default. The model classes save their code into
checkpoints (so ``trust_remote_code=True`` users load them without hf_glu).

The import is lazy: the configs and model names are registered when Transformers' Auto modules are imported
(whoever imports them), the model classes are built on first use, as Transformers' own Auto mappings do; the
public names below resolve on first access; the conversion code loads only when used. A process that only
loads a GLU checkpoint never imports the other families' modeling code or ``hf_glu.convert``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GLU_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]

# public name -> the submodule defining it, imported on first access
_PUBLIC = {
    "GluConfig": "configuration_glu",
    "FAMILIES": "configuration_glu_families",
    "GLU_FAMILY_CONFIGS": "configuration_glu_families",
    "VARIANTS": "glu",
    "GluParams": "glu",
    "get_variant": "glu",
    "glu_activation": "glu",
    "GluModel": "modeling_glu",
    "GluForCausalLM": "modeling_glu",
    "GluForSequenceClassification": "modeling_glu",
    "GluForTokenClassification": "modeling_glu",
    "GluMLP": "modeling_glu",
    "GluPreTrainedModel": "modeling_glu",
    "GLU_FAMILY_MODELS": "modeling_glu_families",
    "convert_gpt2": "convert",
    "convert_checkpoint": "convert",
}

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: hf_glu.glu_triton…
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


class _ModelClassByName:
    """Stands in an Auto mapping for a model class not built yet: the class is imported on first use.

    Transformers' Auto mappings hold (config class → model class); building a family's GLU classes imports
    that family's modeling code, so the mapping is given this stand-in, and hands out the class it stands for
    (``_ResolvedOnRead``). ``config_class`` and ``auto_name`` answer at once (registration reads them); any
    other attribute, or a call, builds the class and defers to it.
    """

    _OWN_FIELDS = frozenset({"config_class", "_module", "_resolve", "auto_name", "_model_class"})

    def __init__(self, config_class: type, module: str, resolve: str, auto_name: str):
        self.config_class = config_class
        self._module, self._resolve, self.auto_name = module, resolve, auto_name
        self._model_class: type | None = None

    def resolved(self) -> type:
        if self._model_class is None:
            namespace = importlib.import_module(f".{self._module}", __name__)
            if self._resolve == "family":  # GLU_FAMILY_MODELS[source model_type][auto class name]
                glu_type = self.config_class.model_type
                family = next(f for f in namespace.FAMILIES.values() if f.glu_model_type == glu_type)
                self._model_class = namespace.GLU_FAMILY_MODELS[family.model_type][self.auto_name]
            else:
                self._model_class = getattr(namespace, self._resolve)
        return self._model_class

    def __getattr__(self, name: str) -> Any:
        if name in _ModelClassByName._OWN_FIELDS:  # read before __init__ ran (copy, pickle): never recurse
            raise AttributeError(name)
        return getattr(self.resolved(), name)

    def __call__(self, *args, **kwargs):
        return self.resolved()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.auto_name} model for {self.config_class.__name__}, built on first use>"


class _ResolvedOnRead(dict):
    """The entries registered in one Auto mapping (Transformers' ``_LazyAutoMapping._extra_content``), handing
    out real classes: a stand-in is built into its class the first time it is read, and replaced by it.

    So ``MODEL_FOR_CAUSAL_LM_MAPPING[config_class]`` is the model class itself (``isinstance``, ``issubclass``,
    subclassing behave) while registering costs no import: the mapping is read when a model is built, which
    builds the class anyway, as Transformers' own lazy mapping imports a model's module when it is read.
    """

    def __getitem__(self, key: Any) -> Any:
        value = super().__getitem__(key)
        if isinstance(value, _ModelClassByName):
            value = value.resolved()
            super().__setitem__(key, value)
        return value

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default

    def values(self) -> list[Any]:  # type: ignore[override]
        return [self[key] for key in self]

    def items(self) -> list[tuple[Any, Any]]:  # type: ignore[override]
        return [(key, self[key]) for key in self]


def _reads_real_classes(auto_class: type) -> bool:
    """Makes ``auto_class``'s mapping hand out real classes for stand-ins; False where its layout is not the one
    known (Transformers 5.17-5.25), and the caller must register real classes."""
    mapping = getattr(auto_class, "_model_mapping", None)
    registered = getattr(mapping, "_extra_content", None)
    if type(registered) is dict:
        mapping._extra_content = _ResolvedOnRead(registered)
    return isinstance(getattr(mapping, "_extra_content", None), _ResolvedOnRead)


# Transformers' Auto mappings live in these modules. Importing them imports torch (seconds), which
# `import transformers` does not: hf_glu registers into them when they are imported, by whoever, so
# `import hf_glu` costs what `import transformers` costs and the Auto classes know GLU models whenever used.
_AUTO_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
_AUTO_MODEL_MODULE = "transformers.models.auto.modeling_auto"
_FAMILY_CONFIG_MODULE = f"{__name__}.configuration_glu_families"
_registration = {"started": False}


def _imported(module: str, just_imported: str | None) -> bool:
    """Whether ``module`` has run to its end (``just_imported``'s hook fires as its import completes)."""
    loaded = sys.modules.get(module)
    if loaded is None:
        return False
    # importlib marks a module's spec while the module's code runs (a circular import sees it half-built)
    return module == just_imported or not getattr(getattr(loaded, "__spec__", None), "_initializing", False)


def _register_when_ready(just_imported: str | None = None) -> None:
    # The model mapping must be whole, and the family configs must not be half-built: importing a Transformers
    # config class imports modeling_auto (its docstring is built from the model mapping), so when the family
    # configs are imported first, modeling_auto completes in the middle of them; their own hook comes next.
    if _registration["started"] or not _imported(_AUTO_MODEL_MODULE, just_imported):
        return
    if _FAMILY_CONFIG_MODULE in sys.modules and not _imported(_FAMILY_CONFIG_MODULE, just_imported):
        return
    _registration["started"] = True
    _register_auto_classes()


def _register_auto_classes() -> None:
    from .configuration_glu import GluConfig
    from .configuration_glu_families import GLU_FAMILY_CONFIGS

    auto_config = sys.modules[_AUTO_CONFIG_MODULE].AutoConfig
    auto_models = sys.modules[_AUTO_MODEL_MODULE]
    for config_class in (GluConfig, *GLU_FAMILY_CONFIGS.values()):
        auto_config.register(config_class.model_type, config_class, exist_ok=True)
        config_class.register_for_auto_class()
    for stand_in in glu_model_classes().values():
        auto_class = getattr(auto_models, stand_in.auto_name)
        model_class = stand_in if _reads_real_classes(auto_class) else stand_in.resolved()
        auto_class.register(stand_in.config_class, model_class, exist_ok=True)


def _import_the_model_mapping() -> None:
    # AutoConfig used before any Auto model class: registration needs the model mapping too (its hook registers).
    if _AUTO_MODEL_MODULE not in sys.modules:
        importlib.import_module(_AUTO_MODEL_MODULE)


def glu_model_classes() -> dict[str, Any]:
    """Every GLU model class by the name saved configs give it (``architectures``), each built on first use."""
    from .configuration_glu import GLU_HEADS, GluConfig
    from .configuration_glu_families import FAMILIES, GLU_FAMILY_CONFIGS

    classes = {head: _ModelClassByName(GluConfig, "modeling_glu", head, auto) for auto, head in GLU_HEADS.items()}
    for family in FAMILIES.values():
        config_class = GLU_FAMILY_CONFIGS[family.model_type]
        for auto_name, base_name in family.heads.items():
            classes[f"Glu{base_name}"] = _ModelClassByName(config_class, "modeling_glu_families", "family", auto_name)
    return classes


def _register_lora_targets() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    from .configuration_glu import GluConfig
    from .configuration_glu_families import FAMILIES

    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(GluConfig.model_type, LORA_TARGET_MODULES)
    for family in FAMILIES.values():
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(
            family.glu_model_type, [*family.attention, *GLU_PROJECTIONS]
        )


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` once ``module`` has been imported, whoever imports it (Transformers' Auto mappings and
    PEFT's target table cost seconds to import, and are read only when used)."""

    def __init__(self, module: str, callback):
        self.module, self.callback = module, callback

    def find_spec(self, name, path=None, target=None):
        if name != self.module:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            self.callback()

        spec.loader.exec_module = exec_then_register
        return spec


def _after_import(module: str, callback: Callable[[], None]) -> None:
    """Runs ``callback`` now if ``module`` is imported, else right after it is."""
    if module in sys.modules:
        callback()
    elif importlib.util.find_spec(module.partition(".")[0]) is not None:
        sys.meta_path.insert(0, _AfterImport(module, callback))


def _register() -> None:
    for module in (_AUTO_MODEL_MODULE, _FAMILY_CONFIG_MODULE):
        _after_import(module, lambda module=module: _register_when_ready(just_imported=module))
    _after_import(_AUTO_CONFIG_MODULE, _import_the_model_mapping)
    _after_import("peft.utils.constants", _register_lora_targets)


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
    "glu_model_classes",
]
