"""The GLU versions of the GPT-2-style families: each family's own model classes with a GLU MLP.

``Glu<FamilyClass>`` (``GluGPTNeoXForCausalLM``, ``GluOPTModel``…) subclasses the family's Transformers
class and, once that has built itself, replaces every decoder layer's MLP with :class:`GluMLP`, the one
GLU MLP of this package. Attention, positions, norms, residual layout and every parameter name outside
the MLP stay the family's own. Classes are generated from the rows of ``configuration_glu_families``.

Where a family writes its MLP inline in the layer (OPT, BioGPT, XGLM call ``fc1``, ``activation_fn``
and ``fc2`` in turn), the GLU MLP is registered as the layer's ``mlp`` and called in ``fc1``'s place;
the activation and ``fc2`` become identities. Dropout the layer applies after ``fc2`` then follows the
GLU output, as it followed the dense MLP's.

Copied into checkpoints for ``trust_remote_code`` users: imports only torch, transformers and the other
flat files of this package.
"""

from __future__ import annotations

from operator import attrgetter

import torch
import transformers
from torch import nn
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .configuration_glu_families import FAMILIES, GLU_FAMILY_CONFIGS, Family, family_of, mlp_attribute
from .modeling_glu import GluMLP, ShardedModelMixin


def glu_mlp(config: transformers.PretrainedConfig, family: Family) -> GluMLP:
    """A GLU MLP sized and wired as ``config`` (a ``Glu<Family>Config``) says."""
    return GluMLP(
        config,
        intermediate_size=config.glu_width,
        bias=config.glu_gate_down_bias,
        up_bias=config.glu_up_proj_bias,
        dropout=family.dropout(config),
        adds_residual=family.adds_residual,
    )


def decoder_layers(model: transformers.PreTrainedModel, family: Family) -> nn.ModuleList:
    """The model's decoder layers (for any head: they live in its base model)."""
    return attrgetter(family.layers)(model.base_model)


def _swap_in_glu_mlps(model: transformers.PreTrainedModel, family: Family) -> type[nn.Module] | None:
    """Replaces every layer's MLP with a GLU MLP; returns the family's MLP class (``None`` when inline)."""
    family_mlp_class = None
    for layer in decoder_layers(model, family):
        mlp = glu_mlp(model.config, family)
        if family.mlp is not None:
            family_mlp_class = type(getattr(layer, family.mlp))
            setattr(layer, family.mlp, mlp)
            continue
        # Inline MLP: the layer keeps calling proj_in, act, proj_out; proj_in now runs the whole GLU MLP.
        delattr(layer, family.proj_in)
        setattr(layer, mlp_attribute(family), mlp)
        object.__setattr__(layer, family.proj_in, mlp.__call__)  # a plain callable: no second registration
        setattr(layer, family.act, nn.Identity())
        setattr(layer, family.proj_out, nn.Identity())
    return family_mlp_class


def _family_mlp_stand_in(family_mlp_class: type[nn.Module], family: Family, proj_in: nn.Module, proj_out: nn.Module):
    """An instance of the family's MLP class holding GLU projections under the family's names: what the
    family's ``_init_weights`` recognises and initialises (GPT-BigCode scales its MLP's ``c_proj``)."""
    stand_in = family_mlp_class.__new__(family_mlp_class)
    nn.Module.__init__(stand_in)
    stand_in.add_module(family.proj_in, proj_in)
    stand_in.add_module(family.proj_out, proj_out)
    return stand_in


def auto_map(family: Family) -> dict[str, str]:
    """Every Auto class a saved checkpoint of ``family`` answers to, pointing into the copied files."""
    return {
        "AutoConfig": f"configuration_glu_families.{GLU_FAMILY_CONFIGS[family.model_type].__name__}",
        **{auto: f"modeling_glu_families.Glu{name}" for auto, name in family.heads.items()},
    }


class GluFamilyModelMixin(ShardedModelMixin):
    """Builds the family's model, then swaps each layer's MLP for a GLU MLP; saves a complete auto_map; works
    under FSDP2 (see ``ShardedModelMixin``)."""

    # The family's own Transformers class this GLU class extends (set on each generated class).
    family_class: type[transformers.PreTrainedModel]

    # Transformers answers these by reading the source file of the module defining the class (an attention class
    # there that does not call `ALL_ATTENTION_FUNCTIONS.get_interface(` means "no"), caching the answer on the
    # class it was asked of. This file defines no attention class, so each GLU class would claim the attention
    # interface (and the experts one) whatever its family does; the family's own class answers instead.
    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return cls.family_class._can_set_attn_implementation()

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return cls.family_class._can_set_experts_implementation()

    def __init__(self, config: transformers.PretrainedConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self._family_mlp_class = _swap_in_glu_mlps(self, family_of(config))
        self.post_init()  # initialises the new projections only; the rest is initialised already

    @classmethod
    def is_custom_code(cls) -> bool:
        # Transformers treats classes outside its package as custom code, and initialises custom code differently:
        # it marks parameter-less modules initialised without running _init_weights on them (their parameters live
        # in children), in the model and in every sub-model (a head's base model is the family's own class). The
        # _init_weights here is the family's own, written with transformers.initialization (which leaves loaded
        # tensors alone): initialised as Transformers initialises the family's own classes, a model built on the
        # meta device and filled by from_pretrained gets the family's rules on container modules (GPT-BigCode's
        # scaled attention c_proj) as one built in memory does. Its other use, module tying, does not occur here.
        return False

    @torch.no_grad()
    def initialize_weights(self) -> None:
        super().initialize_weights()
        family_mlp_class = getattr(self, "_family_mlp_class", None)  # unset while the family builds itself
        if family_mlp_class is None:
            return
        # The GLU MLP takes the family MLP's place: apply the family's rule for its MLP (GPT-BigCode scales
        # c_proj) to both input projections and the output projection. Run from the top model because the
        # base model inside a head is the family's own class, whose init does not know GLU MLPs. Loaded
        # tensors are left alone (transformers.initialization skips them). Through _initialize_weights, as
        # Transformers initialises every module: whatever it wraps around each module's init (a seed, in its own
        # tests) applies here too, so a model built on the meta device and filled by from_pretrained gets the
        # same weights as one built in memory.
        family = family_of(self.config)
        for module in self.modules():
            if isinstance(module, GluMLP):
                for proj_in in (module.gate_proj, module.up_proj):
                    stand_in = _family_mlp_stand_in(family_mlp_class, family, proj_in, module.down_proj)
                    self._initialize_weights(stand_in)

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:  # the code files travel with the weights: name every head
            existing = getattr(self.config, "auto_map", None) or {}
            self.config.auto_map = {**existing, **auto_map(family_of(self.config))}
        return super().save_pretrained(save_directory, *args, **kwargs)


def _glu_model_class(family: Family, base_name: str) -> type[transformers.PreTrainedModel]:
    base = getattr(transformers, base_name)
    name = f"Glu{base_name}"
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"{base_name} with every MLP a GLU MLP (see {__name__}).",
        "config_class": GLU_FAMILY_CONFIGS[family.model_type],
        "family_class": base,
    }
    cls = type(name, (GluFamilyModelMixin, base), namespace)
    # The family's own key renamings (GPT-NeoX's head is `embed_out` in its files, `lm_head` in the model) apply to
    # this class too: Transformers looks them up by class name, so without this a GLU checkpoint would save the
    # head under the model's name, not the family's (and could not load a file that uses the family's).
    renamings = get_checkpoint_conversion_mapping(base_name)
    if renamings:
        register_checkpoint_conversion_mapping(name, renamings, overwrite=True)
    return cls


# model_type of the source family -> Auto class name -> GLU model class
GLU_FAMILY_MODELS: dict[str, dict[str, type[transformers.PreTrainedModel]]] = {}
for _family in FAMILIES.values():
    GLU_FAMILY_MODELS[_family.model_type] = {}
    for _auto, _base_name in _family.heads.items():
        _cls = _glu_model_class(_family, _base_name)
        _cls.register_for_auto_class(_auto)  # checkpoints carry this file and name the head in auto_map
        GLU_FAMILY_MODELS[_family.model_type][_auto] = globals()[_cls.__name__] = _cls
del _family, _auto, _base_name, _cls

__all__ = ["GLU_FAMILY_MODELS", "GluFamilyModelMixin", "auto_map", "decoder_layers", "glu_mlp"]
