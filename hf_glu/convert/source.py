"""Loading a source of any supported family (GPT-2 and ``hf_glu.FAMILIES``): a model instance, a local folder
or a Hub id, checked before anything is built.

GPT-2 weights are read by us rather than by ``from_pretrained``, which would fill missing weights with
random values after only a warning; the other families go through ``from_pretrained`` (which knows each
family's legacy weight names) with its loading report checked. Either way a conversion fails loudly on a
missing, corrupt, misshapen or non-finite tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..configuration_glu_families import FAMILIES
from .checkpoint_names import CheckpointNames, tied_targets
from .errors import ConversionError
from .safetensors_io import Entry, read_header, read_tensor
from .source_files import WEIGHT_FILES, WeightFiles, check_source_folder, weight_files
from .surgery import SUPPORTED_MODEL_TYPES

GPT2_CLASSES: dict[str, type[PreTrainedModel]] = {
    cls.__name__: cls for cls in (GPT2LMHeadModel, GPT2Model, GPT2ForSequenceClassification, GPT2ForTokenClassification)
}
# Every class we convert from, by name: GPT-2's and each family's heads.
SOURCE_CLASSES: dict[str, type[PreTrainedModel]] = {
    **GPT2_CLASSES,
    **{name: getattr(transformers, name) for family in FAMILIES.values() for name in family.heads.values()},
}
# Buffers that old GPT-2 checkpoints saved (the causal mask and its fill value); today's models build
# the mask on the fly, so these are dropped rather than treated as unexpected weights.
_LEGACY_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".crossattention.bias", ".crossattention.masked_bias")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


@dataclass
class Source:
    """A loaded, validated source model (any supported family) with what travels with it into the converted
    checkpoint."""

    model: PreTrainedModel
    name: str  # the Hub id or folder it came from; "" for an in-memory model
    tokenizer: PreTrainedTokenizerBase | None = None
    generation_config: GenerationConfig | None = None


def supported_classes_text() -> str:
    return ", ".join(SOURCE_CLASSES)


def supported_types_text() -> str:
    return ", ".join(SUPPORTED_MODEL_TYPES)


def check_source_model(model: object) -> None:
    """Raise ConversionError unless ``model`` is an instance of one of the supported source classes."""
    if type(model).__name__ not in SOURCE_CLASSES or not isinstance(model, SOURCE_CLASSES[type(model).__name__]):
        raise ConversionError(
            f"cannot convert a {type(model).__name__}; supported source classes: {supported_classes_text()}"
        )
    check_finite(dict(model.state_dict()))


def check_finite(state_dict: dict[str, torch.Tensor]) -> None:
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and tensor.numel() and not all_finite(tensor.detach()):
            raise ConversionError(f"weight {key!r} holds non-finite values (NaN or inf); expected finite weights")


def all_finite(tensor: torch.Tensor) -> bool:
    # min and max propagate NaN and show ±inf: one pass, no temporaries (isfinite() builds |x| and
    # masks the size of the input, 300 MB for GPT-2's embedding).
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def load_source(source: str | Path | PreTrainedModel) -> Source:
    """Load ``source`` (an instance of a supported source class, a folder or a Hub id) and validate its config and
    weights."""
    if isinstance(source, PreTrainedModel):
        check_source_model(source)
        return Source(
            model=source,
            name=str(getattr(source, "name_or_path", "") or ""),
            generation_config=getattr(source, "generation_config", None),
        )
    if not isinstance(source, (str, Path)):
        raise ConversionError(
            f"source must be a model, a folder or a Hub id; got a {type(source).__name__} "
            f"(supported classes: {supported_classes_text()})"
        )
    folder = source_folder(source)
    config, model_cls = read_config(folder)
    if config.model_type == "gpt2":
        weights = checkpoint_weights(folder)
        loaded = _read_gpt2_weights(weights)
        model = _build_gpt2(model_cls, config, loaded, load_dtype(config, weights, loaded))
    else:
        model = _from_pretrained(model_cls, config, folder)
    tokenizer, generation_config = read_tokenizer(folder), read_generation_config(folder)
    return Source(model=model, name=str(source), tokenizer=tokenizer, generation_config=generation_config)


def source_folder(source: str | Path) -> Path:
    """The checkpoint folder ``source`` names: a local folder, or the snapshot of a Hub id."""
    if not str(source).strip():
        raise ConversionError(f"source {str(source)!r} is empty; expected a checkpoint folder or a Hub id")
    folder = Path(source)
    if not folder.exists():
        folder = download(str(source))
    if not folder.is_dir():
        raise ConversionError(f"source {str(source)!r} is not a folder; expected a checkpoint folder or a Hub id")
    # Before any file is read: whatever Transformers opens in it stays the checkpoint's own.
    return check_source_folder(folder)


def download(repo_id: str) -> Path:
    """The local snapshot of the Hub model ``repo_id``; a ConversionError when there is none to be had."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as e:  # offline, unknown repo, bad id: all mean "no such source"
        raise ConversionError(
            f"source {repo_id!r} is neither a local folder nor a downloadable Hub model id ({type(e).__name__}: {e})"
        ) from None


def read_config(folder: Path) -> tuple[PretrainedConfig, type[PreTrainedModel]]:
    """The source's config and the class it names (its ``architectures``, else the family's causal LM), each
    checked against the supported families before anything is built."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{str(folder)!r} has no config.json; expected a Transformers checkpoint folder")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{str(path)!r} is not valid JSON: {e}") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"model_type={model_type!r} in {str(path)!r} is not supported; supported: {supported_types_text()}"
        )
    heads = GPT2_CLASSES if model_type == "gpt2" else FAMILIES[model_type].heads.values()
    default = "GPT2LMHeadModel" if model_type == "gpt2" else FAMILIES[model_type].heads["AutoModelForCausalLM"]
    architectures = raw.get("architectures")
    if architectures is not None and (
        not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures)
    ):
        raise ConversionError(
            f"architectures={architectures!r} in {str(path)!r} is invalid; expected a list of class names "
            f"such as [{default!r}]"
        )
    architecture = (architectures or [default])[0]
    if architecture not in heads:
        raise ConversionError(
            f"architecture {architecture!r} is not supported for model_type={model_type!r}; "
            f"supported: {', '.join(heads)}"
        )
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise ConversionError(f"{str(path)!r} is not a valid {model_type} config: {e}") from None
    check_sizes(config, path)
    return config, SOURCE_CLASSES[architecture]


def read_streamable_config(folder: Path, route: str, without: str) -> tuple[PretrainedConfig, type[PreTrainedModel]]:
    """:func:`read_config`, refusing a source the streamed routes cannot take: GPT-2 changes architecture (it
    is rebuilt in memory), so only ``FAMILIES`` stream. ``route`` says what the refused option does and
    ``without`` how to name it in the advice."""
    config, model_cls = read_config(folder)
    if config.model_type not in FAMILIES:
        raise ConversionError(
            f"model_type={config.model_type!r}: {route} the families that keep their architecture "
            f"({', '.join(FAMILIES)}); convert GPT-2 without {without} (it is rebuilt in memory)"
        )
    return config, model_cls


# Sizes every decoder config states (through its attribute_map), which must be positive integers.
_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers")


def check_sizes(config, where: Path | str) -> None:
    """Refuse a config whose sizes cannot build a model (zero, negative, fractional, indivisible) before
    anything is built, naming the field; Transformers' configs accept such values and fail later, deep."""
    for field in _SIZE_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConversionError(f"{field}={value!r} in {str(where)!r} is invalid; expected an integer > 0")
    if config.hidden_size % config.num_attention_heads:
        raise ConversionError(
            f"hidden_size={config.hidden_size} in {str(where)!r} is invalid; expected a multiple of "
            f"num_attention_heads={config.num_attention_heads}"
        )


def build_skeleton(model_cls: type[PreTrainedModel], config) -> PreTrainedModel:
    """``model_cls`` on the meta device (names and shapes, no memory); a config it cannot build is bad input."""
    try:
        with torch.device("meta"):
            return model_cls(config)
    except Exception as e:  # Transformers' own checks and whatever a bad size trips deeper down
        raise ConversionError(f"the config cannot build a {model_cls.__name__}: {type(e).__name__}: {e}") from None


def checkpoint_weights(folder: Path) -> WeightFiles:
    """The weight files Transformers loads from ``folder`` (checked: see :mod:`.source_files`)."""
    found = weight_files(folder)
    if found is None:
        raise ConversionError(f"no weights in {str(folder)!r}; expected one of {list(WEIGHT_FILES)}")
    return found


def load_dtype(config, weights: WeightFiles, loaded: dict[str, torch.Tensor] | None = None) -> torch.dtype:
    """The dtype Transformers gives every floating weight of this source (``from_pretrained``'s default
    ``dtype="auto"``): the config's, else the index's ``metadata.dtype``, else the first floating tensor's of
    the first file in name order (``loaded``, the tensors read already, stands in for a pickle's). Both
    routes write the converted weights in it, so a checkpoint mixing dtypes (fp32 embeddings, bf16 layers)
    converts to what Transformers loads from it, whichever route converts it."""
    if isinstance(getattr(config, "dtype", None), torch.dtype):
        return config.dtype
    if weights.index is not None:
        try:
            named = json.loads(weights.index.read_text(encoding="utf-8")).get("metadata", {}).get("dtype")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            named = None  # read already by weight_files: a corrupt index was refused there
        if isinstance(named, str) and isinstance(getattr(torch, named.removeprefix("torch."), None), torch.dtype):
            return getattr(torch, named.removeprefix("torch."))
    if weights.safetensors:
        dtypes = {entry.name: entry.dtype for entry in checked_header(weights.files[0]) or []}
    else:
        dtypes = {name: tensor.dtype for name, tensor in (loaded or {}).items()}
    return next((dtypes[name] for name in sorted(dtypes) if dtypes[name].is_floating_point), torch.float32)


def _read_gpt2_weights(weights: WeightFiles) -> dict[str, torch.Tensor]:
    """Every tensor of a GPT-2 checkpoint, read by us (see the module's docstring for why GPT-2 only)."""
    state_dict: dict[str, torch.Tensor] = {}
    for path in weights.files:
        state_dict.update(_read_weight_file(path))
    return state_dict


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConversionError(f"weight file {str(path)!r} is missing")
    try:
        if path.suffix == ".safetensors":
            return _read_safetensors(path)
        # Legacy pickles: weights_only refuses anything but tensors, so a hostile file cannot run code.
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(
            f"weight file {str(path)!r} is corrupt or unsafe to load ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConversionError(f"weight file {str(path)!r} does not hold a state dict of tensors")
    return state_dict


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file read into one freshly allocated tensor per entry.

    ``safetensors.torch.load_file`` returns views of one memory map of the whole file, which stays
    resident (and counted in the process's memory) until the last tensor is gone; separate tensors let
    the conversion free each source weight as soon as it is converted. Files this reader does not
    handle (other dtypes, a big-endian machine) go through ``load_file``.
    """
    entries = read_header(path)
    if entries is None:
        from safetensors.torch import load_file

        return load_file(path)
    with open(path, "rb") as f:  # in file order, so the reads are sequential
        return {entry.name: read_tensor(f, entry) for entry in entries}


def checked_header(path: Path) -> list[Entry] | None:
    """``read_header`` of a checkpoint file, a corrupt one being bad input (one line naming the file)."""
    try:
        return read_header(path)
    except (OSError, ValueError) as e:
        raise ConversionError(f"weight file {str(path)!r} is corrupt: {e}") from None


def _check_safetensors_headers(model_cls: type[PreTrainedModel], config, files: list[Path]) -> None:
    """Every safetensors header against the model the config builds (names, shapes, dtypes), one line per
    problem, before Transformers reads a tensor (its own errors say only "look at the report above")."""
    names = CheckpointNames(build_skeleton(model_cls, config))
    for path in files:
        for entry in checked_header(path) or []:
            name = names.model_name(entry.name)
            if name is not None:
                names.check_entry(entry, name)
    names.check_complete()


def _from_pretrained(model_cls: type[PreTrainedModel], config, folder: Path) -> PreTrainedModel:
    """The family's own loader (it maps legacy weight names), refusing what it would only warn about."""
    # The files Transformers will read, checked before it reads any (names, links, headers).
    weights = checkpoint_weights(folder)
    if weights.safetensors:
        _check_safetensors_headers(model_cls, config, weights.files)
    try:
        model, info = model_cls.from_pretrained(folder, output_loading_info=True, dtype="auto")
    except Exception as e:  # corrupt or truncated files, bad shapes: all mean "cannot read this source"
        raise ConversionError(
            f"the weights in {str(folder)!r} are corrupt or cannot be loaded ({type(e).__name__}: {e})"
        ) from None
    for problem in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(problem):
            found = sorted(str(k) for k in info[problem])
            raise ConversionError(
                f"the checkpoint in {str(folder)!r} has {problem.replace('_', ' ')}: {found[:5]}"
                f"{' …' if len(found) > 5 else ''}; expected exactly the weights of a {model_cls.__name__}"
            )
    check_finite(dict(model.state_dict()))
    return model.eval()


def _build_gpt2(
    model_cls: type[PreTrainedModel], config: GPT2Config, loaded: dict[str, torch.Tensor], dtype: torch.dtype
) -> PreTrainedModel:
    """Put ``loaded`` into a ``model_cls`` built on the meta device (no second copy of the weights), each
    floating weight in ``dtype`` as Transformers would load it."""
    model = build_skeleton(model_cls, config)
    expected = model.state_dict()
    state_dict: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in loaded.items():
        # Checkpoints saved from a head keep the `transformer.` prefix; GPT2Model and the original
        # OpenAI conversions do not.
        target = next((k for k in (key, f"transformer.{key}", key.removeprefix("transformer.")) if k in expected), None)
        if target is None:
            if not key.endswith(_LEGACY_BUFFER_SUFFIXES):
                unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[target].shape):
            raise ConversionError(
                f"weight {key!r} has shape {tuple(tensor.shape)}; the config expects {tuple(expected[target].shape)}"
            )
        if tensor.is_floating_point() != expected[target].is_floating_point():
            raise ConversionError(
                f"weight {key!r} has dtype {tensor.dtype}; expected a "
                f"{'floating-point' if expected[target].is_floating_point() else 'non-floating'} dtype"
            )
        state_dict[target] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    tied = tied_targets(model)  # {head: embedding} that the config ties
    in_file = [(state_dict[h], state_dict[e]) for h, e in tied.items() if h in state_dict and e in state_dict]
    if any(not torch.equal(head, embedding) for head, embedding in in_file):
        # As Transformers loads it: a file whose head differs from the embedding is untied, whatever the
        # config says; the converted config then says so too.
        config.tie_word_embeddings = False
        tied = {}
    missing = sorted(set(expected) - set(state_dict) - set(tied))
    if missing:
        raise ConversionError(f"weights missing from the checkpoint: {missing[:5]}{' …' if len(missing) > 5 else ''}")
    if unexpected:
        raise ConversionError(
            f"checkpoint holds weights a {model_cls.__name__} does not have: {unexpected[:5]}"
            f"{' …' if len(unexpected) > 5 else ''}"
        )
    check_finite(state_dict)
    model.load_state_dict(state_dict, strict=False, assign=True)
    if tied:
        model.tie_weights()
    return model.eval()


def read_tokenizer(folder: Path) -> PreTrainedTokenizerBase | None:
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise ConversionError(f"the tokenizer in {str(folder)!r} cannot be loaded: {e}") from None


def read_generation_config(folder: Path) -> GenerationConfig | None:
    if not (folder / "generation_config.json").is_file():
        return None
    try:
        return GenerationConfig.from_pretrained(folder)
    except Exception as e:
        raise ConversionError(f"generation_config.json in {str(folder)!r} cannot be loaded: {e}") from None
