"""The fidelity pass of a streamed conversion, with bounded memory (``hf-glu convert --max-memory SIZE``).

The streamed route (:mod:`.stream`) writes the converted checkpoint without building a model. This pass then
measures it as the in-memory route does, with the same functions (:func:`.report.record_source`,
:class:`.report.LayerStats`, :func:`.report.compare`), on models that never hold more than one module's
weights: each model is built on the meta device (buffers real: rotary frequencies, masks), so its own forward
still builds the position embeddings, ALiBi biases and attention masks, and Accelerate's offload hooks
(:func:`accelerate.cpu_offload`) read each module's tensors from the safetensors files just before its forward
and drop them after it. The files are read a tensor at a time without a memory map
(:func:`.safetensors_io.read_tensor`), so nothing of them stays resident. The source's pass keeps only what
the comparison needs (final hidden states, each MLP's inputs and outputs on the first tokens: a few MB per
layer), then the converted model runs over the same windows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ..configuration_glu_families import FAMILIES
from .checkpoint_names import CheckpointNames
from .errors import ConversionError
from .init_schemes import UnitMap
from .report import LayerStats, compare, record_source
from .safetensors_io import Entry, read_tensor
from .source import (
    build_skeleton,
    checked_header,
    checkpoint_weights,
    load_dtype,
    read_config,
    read_streamable_config,
    source_folder,
)
from .surgery import FamilySurgery


def parse_max_memory(size: str | int) -> int:
    """``size`` (``"500MB"``, ``"4GB"``, ``"4GiB"`` or bytes) in bytes; anything else is a ConversionError."""
    from .stream import parse_size

    return parse_size(size, f"max_memory={size!r}", "500MB or 4GB")


class FileWeights(Mapping):
    """A model's tensors by the model's names, each read from the checkpoint's safetensors files when asked
    for (a fresh tensor, in ``dtype`` if floating: the dtype Transformers loads the checkpoint in)."""

    def __init__(self, files: list[Path], names: CheckpointNames, dtype: torch.dtype):
        self.dtype = dtype
        self.where: dict[str, tuple[Path, Entry]] = {}
        for path in files:
            entries = checked_header(path)
            if entries is None:
                raise ConversionError(f"{str(path)!r} holds dtypes this reader does not handle")
            for entry in entries:
                name = names.model_name(entry.name)
                if name is not None:
                    names.check_entry(entry, name)
                    self.where[name] = (path, entry)
        names.check_complete()
        for head, embedding in names.tied.items():  # a head saved tied is the embedding's tensor
            if head not in self.where and embedding in self.where:
                self.where[head] = self.where[embedding]

    def __getitem__(self, name: str) -> torch.Tensor:
        path, entry = self.where[name]
        with open(path, "rb") as f:
            tensor = read_tensor(f, entry)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def largest_module_bytes(model: torch.nn.Module, dtype: torch.dtype) -> tuple[str, int]:
    """The module whose own parameters (what one offload hook loads at once) are largest, and their bytes in
    ``dtype``."""
    size = torch.empty((), dtype=dtype).element_size()
    sizes = {name or "(root)": sum(p.numel() for p in module.parameters(recurse=False)) * size
             for name, module in model.named_modules()}  # fmt: skip
    name = max(sizes, key=sizes.get)
    return name, sizes[name]


def check_budget(source: str | Path, max_memory: int) -> None:
    """Refuse, before any work, a source this pass cannot measure: a family without a streamed route, or one
    whose largest module alone needs more than ``max_memory``."""
    folder = source_folder(source)
    config, model_cls = read_streamable_config(folder, "--max-memory measures the streamed conversion of", "it")
    skeleton = build_skeleton(model_cls, config)
    dtype = load_dtype(config, checkpoint_weights(folder))
    name, needed = largest_module_bytes(skeleton, dtype)
    if needed > max_memory:
        raise ConversionError(
            f"max_memory={max_memory:,} bytes is below the {needed:,} bytes the largest module ({name}) holds at once "
            f"in the layer-by-layer pass; expected at least that, with room for activations"
        )


def offloaded(
    model_cls: type[PreTrainedModel], config, folder: Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, FileWeights]:
    """``model_cls`` whose parameters live in ``folder``'s safetensors files: each module reads its own just
    before its forward and drops them after (Accelerate's offload hooks), so one module's weights at most are
    in memory at a time, and the file-backed tensors it reads. Buffers are real (the class computes them);
    persistent ones are read from the files."""
    from accelerate import cpu_offload, init_empty_weights

    with init_empty_weights():  # parameters on the meta device, buffers computed as the class computes them
        model = model_cls(config)
    model.eval()
    cast: dict[int, torch.nn.Parameter] = {}  # tied parameters stay one parameter
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None and p.is_floating_point():
                module._parameters[key] = cast.setdefault(id(p), torch.nn.Parameter(p.to(dtype), requires_grad=False))
    weights = checkpoint_weights(folder)
    if not weights.safetensors:
        raise ConversionError(f"no safetensors weights in {str(folder)!r}; --max-memory reads safetensors only")
    tensors = FileWeights(weights.files, CheckpointNames(model), dtype)
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for name, buffer in model.named_buffers():
        if name in tensors and name not in parameters:  # a persistent buffer: its value is the file's
            buffer.copy_(tensors[name])
    return cpu_offload(model, execution_device=torch.device("cpu"), state_dict=tensors), tensors


@torch.inference_mode()
def layerwise_fidelity(
    source: Path, converted: Path, glu_config, target: type[PreTrainedModel], unit_map: UnitMap,
    input_ids: torch.Tensor, max_length: int,
) -> dict:  # fmt: skip
    """The in-memory route's comparison (max |Δ output|, perplexities, per-layer MLP error and unit error) of
    the checkpoint in ``converted`` against the one in ``source``, one module's weights in memory at a time."""
    config, model_cls = read_config(source)
    dtype = load_dtype(config, checkpoint_weights(source))  # as Transformers loads it; the streamed route's too
    src, _ = offloaded(model_cls, config, source, dtype)
    surgery = FamilySurgery(FAMILIES[config.model_type])
    record = record_source(src, surgery, input_ids, max_length, max_length // 2)
    model, glu_weights = offloaded(target, glu_config, converted, dtype)
    module_names = {id(m): name for name, m in model.named_modules()}
    stats = []
    for i, (source_layer, mlp) in enumerate(zip(surgery.source_layers(src), surgery.glu_mlps(model), strict=True)):
        prefix = module_names[id(mlp)]
        weights = {key: glu_weights[f"{prefix}.{key}"] for key, _ in mlp.named_parameters()}
        s = LayerStats(True)  # a preserved MLP: each GLU unit has its source unit as reference
        s.measure(record.mlp_io[i], weights, glu_config.glu_variant, glu_config.glu_params,
                  partial(surgery.preactivation, source_layer))  # fmt: skip
        record.mlp_io[i] = []  # measured: free it
        stats.append(s)
    return compare(record, model, stats, [unit_map] * len(stats))


def stream_convert_measured(
    source: str | Path,
    dst: str | Path,
    variant: str,
    max_memory: str | int,
    *,
    eval_text: str | None = None,
    eval_tokens: int = 256,
    force: bool = False,
    max_shard_size: str | int = "5GB",
) -> dict:
    """:func:`.stream.stream_convert` with the in-memory route's fidelity report, measured layer by layer in
    at most about ``max_memory`` of weights (``"4GB"``); returns the report written beside the weights."""
    from .pipeline import describe_eval, evaluation_ids, evaluation_window
    from .source import read_tokenizer
    from .stream import stream_convert

    budget = parse_max_memory(max_memory)  # every check before any work
    if isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int) or eval_tokens < 2:
        raise ConversionError(f"eval_tokens={eval_tokens!r} is invalid; expected an integer >= 2")
    check_budget(source, budget)
    folder = source_folder(source)
    tokenizer = read_tokenizer(folder)
    if eval_text is not None and tokenizer is None:
        raise ConversionError(
            "eval_text was given but the source has no tokenizer to read it with; add the tokenizer files to the "
            "source folder, or leave eval_text out (random token ids are then used)"
        )
    config, _ = read_config(folder)
    input_ids = evaluation_ids(eval_text, tokenizer, config.vocab_size, eval_tokens)
    max_length = evaluation_window(FamilySurgery(FAMILIES[config.model_type]), config)

    def evaluate(written: Path, glu_config, target: type[PreTrainedModel], unit_map: UnitMap) -> dict:
        measured = layerwise_fidelity(folder, written, glu_config, target, unit_map, input_ids, max_length)
        return {
            "eval_data": describe_eval(eval_text, tokenizer),
            **measured,
            "fidelity_pass": f"layer by layer (--max-memory {budget:,} bytes): the source's and the written "
            "checkpoint's files read one module's weights at a time, in the dtype Transformers loads them in",
        }

    return stream_convert(source, dst, variant, force=force, max_shard_size=max_shard_size, evaluate=evaluate)
