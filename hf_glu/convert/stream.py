"""Streaming conversion: checkpoints larger than memory, converted shard by shard (``--no-eval``).

Every tensor of a family checkpoint but the MLP projections keeps its name and value, so the model need
never be built: each source shard becomes one output shard, tensor by tensor (read one, transform it if it
is an MLP projection, write it). Only the ``preserve`` scheme's fixed maps can be applied this way (the
calibrated variants fit each layer on recorded pre-activations, which needs the model to run); no fidelity
pass runs, and the report and the card say so. Peak memory is about the largest single tensor, whatever the
checkpoint's size.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from transformers.dynamic_module_utils import get_relative_import_files

from ..configuration_glu_families import FAMILIES, mlp_attribute
from ..jsonio import write_json
from ..modeling_glu_families import __file__ as MODELING_FILE
from .checkpoint_names import CheckpointNames
from .errors import ConversionError
from .init_schemes import CALIBRATED_VARIANTS, UnitMap, fit_unit_map, preserved_projections
from .pipeline import write_report_and_card
from .safetensors_io import Entry, Planned, read_tensor, write_streamed
from .save import atomic_folder, check_destination, writing_to
from .source import (
    all_finite,
    build_skeleton,
    checked_header,
    checkpoint_weights,
    load_dtype,
    read_generation_config,
    read_streamable_config,
    read_tokenizer,
    source_folder,
)
from .source_files import SAFETENSORS_FILE, SAFETENSORS_INDEX
from .surgery import FamilySurgery

# --max-memory's fidelity pass: (the folder the weights were written to, the converted config, its class, the
# unit map) -> the report's measured part, which replaces the "not measured" note.
Evaluate = Callable[[Path, object, type, UnitMap], dict]


def stream_convert(
    source: str | Path,
    dst: str | Path,
    variant: str,
    *,
    force: bool = False,
    max_shard_size: str | int = "5GB",
    evaluate: Evaluate | None = None,
) -> dict:
    """Convert the family checkpoint ``source`` (folder or Hub id) to ``variant`` into ``dst``, one tensor at a
    time, without a fidelity pass; returns the report written beside the weights. ``dst`` is replaced only
    once complete (a non-empty one only with ``force``). Each source shard is written as one or more output
    shards of at most ``max_shard_size`` (as ``save_pretrained`` takes it: ``"500MB"`` or bytes) each; a
    tensor larger than that gets a shard of its own. ``evaluate`` (:mod:`.layerwise`) measures the written
    weights before ``dst`` is replaced, so a failed measurement publishes nothing."""
    max_bytes = parse_size(max_shard_size, f"max_shard_size={max_shard_size!r}", "500MB or 5GB")
    dst = check_destination(dst, force, source)  # before the work, so a refusal costs nothing
    folder = source_folder(source)
    config, model_cls = read_streamable_config(folder, "--no-eval streams", "--no-eval")
    if variant in CALIBRATED_VARIANTS:
        raise ConversionError(
            f"glu_variant={variant!r} is fitted on pre-activations recorded by running the model, which --no-eval "
            f"does not do; use it without --no-eval, or one of the fixed-map variants"
        )
    family = FAMILIES[config.model_type]
    surgery = FamilySurgery(family)
    skeleton = build_skeleton(model_cls, config)  # names and shapes only: no memory
    glu_config = surgery.config(skeleton, variant, "preserve", None)
    unit_map = fit_unit_map(variant, surgery.activation(skeleton), glu_config.glu_params)
    weights = checkpoint_weights(folder)  # the files Transformers loads, names and links checked
    if not weights.safetensors:
        raise ConversionError(
            f"no safetensors weights in {str(folder)!r}; --no-eval streams model.safetensors or its sharded index"
        )
    shards = weights.files
    dtype = load_dtype(config, weights)  # every floating weight written as Transformers loads the source
    names = _TensorNames(skeleton, surgery)
    if _head_differs(shards, names):  # as Transformers loads it: untied, whatever the config says
        glu_config.tie_word_embeddings = False
        names.tied = {}

    tokenizer, generation = read_tokenizer(folder), read_generation_config(folder)  # refused before any write
    with atomic_folder(dst, force, source) as tmp:
        weight_map: dict[str, str] = {}
        total_size = 0
        with ExitStack() as open_files:  # every output shard is planned (names, shapes) before any is written
            groups: list[list[Planned]] = []
            for shard in shards:
                entries = checked_header(shard)
                if entries is None:
                    raise ConversionError(f"{str(shard)!r} holds dtypes this streaming reader does not handle")
                f = open_files.enter_context(open(shard, "rb"))
                groups += _split(_plan_shard(f, entries, names, unit_map, glu_config, family.conv1d, dtype), max_bytes)
            names.check_complete()
            for index, planned in enumerate(groups):
                out_name = (
                    SAFETENSORS_FILE if len(groups) == 1 else f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
                )
                with writing_to(dst):
                    write_streamed(tmp / out_name, planned, metadata={"format": "pt"})
                for t in planned:
                    weight_map[t.name] = out_name
                    total_size += t.nbytes
        if len(groups) > 1:
            index_json = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            with writing_to(dst):
                write_json(tmp / SAFETENSORS_INDEX, index_json)  # as Transformers writes it: indent 2, keys in order
        target = surgery.target_class(skeleton)
        glu_config.dtype = dtype
        glu_config.architectures = [target.__name__]
        measured = evaluate(tmp, copy.deepcopy(glu_config), target, unit_map) if evaluate is not None else None
        report = {
            "source": str(source),
            "source_class": model_cls.__name__,
            "source_model_type": config.model_type,
            "converted_class": target.__name__,
            "source_activation": surgery.activation(skeleton),
            "source_projections": list(surgery.projections),
            "variant": variant,
            "init": "preserve",
            "intermediate_size": glu_config.glu_width,
            "up_bias_added": bool(glu_config.glu_up_bias) and not glu_config.glu_bias,
            "dtype": str(glu_config.dtype).removeprefix("torch."),
            "evaluation": "skipped (--no-eval): the checkpoint was streamed shard by shard, tensor by tensor, and "
            "the model was never built or run",
            "layers": [{"layer": i, "unit_map": unit_map.to_dict()} for i in range(names.num_layers)],
        }
        if measured is not None:
            del report["evaluation"]
            report.update(measured)  # the measured layers (with their unit maps) replace the bare ones
        with writing_to(dst):
            _write_config_and_code(glu_config, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if generation is not None:
                generation.save_pretrained(tmp)
            write_report_and_card(report, tmp, dst.name)
    return report


def parse_size(size: str | int, label: str, example: str) -> int:
    """``size`` (``"500MB"``, ``"4GiB"`` or bytes) in bytes, as Transformers reads ``max_shard_size``; anything else is
    a ConversionError saying ``{label} is invalid`` and naming ``example`` as what is accepted."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        limit = convert_file_size_to_int(size)
    except (ValueError, TypeError):
        limit = None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ConversionError(f"{label} is invalid; expected a size such as {example}")
    return limit


def _split(planned: list[Planned], max_bytes: int) -> list[list[Planned]]:
    """``planned`` in order, cut into runs of at most ``max_bytes`` (as Transformers cuts a state dict)."""
    groups: list[list[Planned]] = []
    size = 0
    for t in planned:
        if not groups or (size + t.nbytes > max_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    return groups


def _head_differs(shards: list[Path], names: CheckpointNames) -> bool:
    """Whether the checkpoint holds a tied head of its own whose values differ from the embedding's (read
    one pair of tensors at a time: the only step that holds two tensors)."""
    where: dict[str, tuple[Path, Entry]] = {}
    wanted = {*names.tied, *names.tied.values()}
    for shard in shards:
        for entry in checked_header(shard) or []:
            name = names.model_name(entry.name)
            if name in wanted:
                names.check_entry(entry, name)
                where[name] = (shard, entry)
    for head, embedding in names.tied.items():
        if head in where and embedding in where:
            tensors = []
            for shard, entry in (where[head], where[embedding]):
                with open(shard, "rb") as f:
                    tensors.append(read_tensor(f, entry))
            if not torch.equal(*tensors):
                return True
    return False


class _TensorNames(CheckpointNames):
    """The checkpoint's names mapped onto the model's, and which of them are MLP projections."""

    def __init__(self, skeleton: torch.nn.Module, surgery: FamilySurgery):
        super().__init__(skeleton)
        module_names = {id(m): name for name, m in skeleton.named_modules()}
        layers = surgery.source_layers(skeleton)
        self.num_layers = len(layers)
        # model tensor name -> (layer, "in"/"out", "weight"/"bias", the GLU MLP's name prefix)
        self.mlp: dict[str, tuple[int, str, str, str]] = {}
        for i, layer in enumerate(layers):
            proj_in, _, proj_out = surgery.source_mlp(layer)
            glu = f"{module_names[id(layer)]}.{mlp_attribute(surgery.family)}"
            for role, module in (("in", proj_in), ("out", proj_out)):
                for kind in ("weight", "bias"):
                    self.mlp[f"{module_names[id(module)]}.{kind}"] = (i, role, kind, glu)


def _plan_shard(
    f, entries: list[Entry], names: _TensorNames, m: UnitMap, config, conv1d: bool, dtype: torch.dtype
) -> list[Planned]:
    """The output tensors of one source shard: the MLP projections mapped, everything else as it is, each
    floating tensor in ``dtype`` (integer ones as they are)."""
    planned = []
    for entry in entries:
        name = names.model_name(entry.name)
        if name is None:
            continue
        names.check_entry(entry, name)
        cast = dtype if entry.dtype.is_floating_point else entry.dtype
        read: Callable[[], torch.Tensor] = lambda entry=entry, cast=cast: _finite(  # noqa: E731
            read_tensor(f, entry), entry
        ).to(cast)
        entry = dataclasses.replace(entry, dtype=cast)  # the planned tensor's dtype from here on
        if name not in names.mlp:  # under the name the family's own save gives it (GPT-NeoX's embed_out)
            planned.append(Planned(names.saved_name(name), entry.shape, entry.dtype, read))
            continue
        _, role, kind, glu = names.mlp[name]
        if conv1d and kind == "weight":  # GPT-2-style [in, out] storage
            read = lambda read=read: read().t().contiguous()  # noqa: E731
        shape = entry.shape[::-1] if conv1d and kind == "weight" else entry.shape
        if role == "out":
            planned.append(Planned(f"{glu}.down_proj.{kind}", shape, entry.dtype, read))
            continue
        for proj in ("gate_proj", "up_proj"):
            keep = kind == "weight" or (config.glu_gate_down_bias if proj == "gate_proj" else config.glu_up_proj_bias)
            if keep:
                planned.append(Planned(f"{glu}.{proj}.{kind}", shape, entry.dtype, _mapped(read, kind, proj, m)))
        bias_free = kind == "weight" and f"{name.removesuffix('.weight')}.bias" not in names.expected
        if bias_free and config.glu_up_proj_bias:  # the constant up path of a bias-free MLP lives in a new bias
            zeros = lambda n=shape[0], dtype=entry.dtype: torch.zeros(n, dtype=dtype)  # noqa: E731
            planned.append(Planned(f"{glu}.up_proj.bias", shape[:1], entry.dtype, _mapped(zeros, "bias", "up_proj", m)))
    return planned


def _finite(tensor: torch.Tensor, entry: Entry) -> torch.Tensor:
    """``tensor``, refused as the in-memory route refuses it when it holds NaN or inf."""
    if tensor.is_floating_point() and tensor.numel() and not all_finite(tensor):
        raise ConversionError(f"weight {entry.name!r} holds non-finite values (NaN or inf); expected finite weights")
    return tensor


def _mapped(read: Callable[[], torch.Tensor], kind: str, proj: str, m: UnitMap) -> Callable[[], torch.Tensor]:
    """The gate or up tensor of the preserve map, from the source's input projection weight or bias."""

    def produce() -> torch.Tensor:
        tensor = read()
        if kind == "weight":
            return preserved_projections(tensor, None, tensor, None, m)[f"{proj}.weight"]
        empty_weight = tensor.new_empty(tensor.shape[0], 0)  # a bias goes through the same map alone
        return preserved_projections(empty_weight, tensor, empty_weight, None, m)[f"{proj}.bias"]

    return produce


def _write_config_and_code(config, folder: Path) -> None:
    """config.json with a complete auto_map, and the flat modeling files a ``trust_remote_code`` load needs."""
    from ..modeling_glu_families import auto_map

    config.auto_map = auto_map(FAMILIES[config.model_type.removeprefix("glu_")])
    config.to_json_file(folder / "config.json")
    module_file = Path(MODELING_FILE)
    for path in [module_file, *map(Path, get_relative_import_files(module_file))]:
        shutil.copy(path, folder / path.name)
