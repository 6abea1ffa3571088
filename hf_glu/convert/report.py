"""The fidelity report: how closely the converted model follows its source on evaluation text.

Two passes, so the two models need never be whole in memory at once:

1. :func:`record_source` runs the source over the evaluation windows and keeps what the comparison needs:
   each MLP's input and output, and the final hidden states (a language model's logits are recomputed
   from them and the head's weight, which the converted model shares) or the outputs of other heads.
2. Per layer, :class:`LayerStats` feeds the very same MLP inputs to the converted MLP, so the per-layer
   figures isolate the MLP change from error carried in from earlier layers; this needs only that
   layer's weights, so it runs while the conversion builds them.
3. :func:`compare` runs the converted model and measures the whole model: logits (or outputs) and
   perplexities. Large-vocabulary logits are made a slice of tokens at a time, never for a whole window.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..glu import GluParams, get_variant, glu_activation
from ..jsonio import without_non_finite
from .errors import ConversionError
from .init_schemes import UnitMap
from .perplexity import windows
from .source import all_finite
from .surgery import Surgery

# Tokens per slice of logits: 128 × a 50257-word vocabulary is 26 MB per float32 copy.
_LOGIT_ROWS = 128
# Memory bounds, whatever the number of evaluation tokens: the per-layer MLP figures use each layer's first
# MLP_STATS_TOKENS tokens (a 768-wide MLP's input and output: 12.6 MB per layer), and the source's per-window
# outputs stay in memory up to _OUTPUTS_IN_MEMORY bytes, the rest waiting on disk until compared.
MLP_STATS_TOKENS = 2048
_OUTPUTS_IN_MEMORY = 256 << 20


class WindowStore:
    """One tensor per window, in memory up to a byte budget and in a temporary folder beyond it."""

    def __init__(self, budget: int | None = None):
        self.budget = _OUTPUTS_IN_MEMORY if budget is None else budget
        self.held = 0
        self.items: list[torch.Tensor | Path] = []
        self._folder: tempfile.TemporaryDirectory | None = None

    def append(self, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.held + nbytes <= self.budget:
            self.items.append(tensor)
            self.held += nbytes
            return
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="hf-glu-report-")
        path = Path(self._folder.name) / f"{len(self.items)}.pt"
        torch.save(tensor, path)
        self.items.append(path)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self.items[index]
        return torch.load(item, weights_only=True) if isinstance(item, Path) else item

    def __len__(self) -> int:
        return len(self.items)

    @property
    def spilled(self) -> int:
        return sum(isinstance(item, Path) for item in self.items)


def is_causal_lm(model: PreTrainedModel) -> bool:
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


@dataclass
class SourceRecord:
    """What the source's pass over the evaluation windows leaves for the comparison."""

    input_ids: torch.Tensor
    max_length: int
    stride: int
    # Per window: a language model's final hidden states, otherwise the model's output.
    outputs: WindowStore = field(default_factory=WindowStore)
    # Per layer, per window: the MLP's input and output, over the layer's first MLP_STATS_TOKENS tokens.
    mlp_io: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    mlp_tokens: int = 0  # tokens the per-layer figures cover
    head: torch.nn.Module | None = None  # a language model's output layer (it shares the converted one's weight)


@torch.inference_mode()
def record_source(
    source: PreTrainedModel, surgery: Surgery, input_ids: torch.Tensor, max_length: int, stride: int
) -> SourceRecord:
    """Run ``source`` over the windows of ``input_ids``, keeping what :func:`compare` and
    :class:`LayerStats` need (a few MB per layer for 512 tokens: no logits).

    Each layer's MLP is recorded as its input and ``proj_out(act(proj_in(x)))``: the dense MLP alone, without
    the dropout or residual some families fold into it, which is what the GLU MLP replaces.
    """
    layers = surgery.source_layers(source)
    record = SourceRecord(input_ids, max_length, stride, mlp_io=[[] for _ in layers])

    def recorder(io: list, act: Callable, proj_out: torch.nn.Module) -> Callable:
        def record(module: torch.nn.Module, args: tuple, z: torch.Tensor) -> None:
            room = MLP_STATS_TOKENS - sum(x.shape[0] for x, _ in io)
            if room > 0:  # rows are tokens (inline MLPs such as OPT's see [tokens, hidden] already)
                x, z = args[0].reshape(-1, args[0].shape[-1])[:room], z.reshape(-1, z.shape[-1])[:room]
                io.append((x, proj_out(act(z))))

        return record

    hooks = []
    for io, layer in zip(record.mlp_io, layers, strict=True):
        proj_in, act, proj_out = surgery.source_mlp(layer)
        hooks.append(proj_in.register_forward_hook(recorder(io, act, proj_out)))
    is_lm = is_causal_lm(source)
    if is_lm:
        record.head = source.get_output_embeddings()
    was_training = source.training
    source.eval()
    try:
        for begin, end, _ in windows(input_ids.shape[-1], max_length, stride):
            ids = input_ids[:, begin:end]
            if is_lm:  # a causal LM's logits are its head on the base model's output: the head is applied later
                record.outputs.append(source.base_model(ids).last_hidden_state)
            else:
                record.outputs.append(_output(source, ids).float())
    finally:
        for hook in hooks:
            hook.remove()
        source.train(was_training)
    record.mlp_tokens = sum(x.shape[0] for x, _ in record.mlp_io[0]) if record.mlp_io else 0
    return record


class LayerStats:
    """One layer's MLP output error and elementwise activation error across the recorded windows."""

    def __init__(self, track_units: bool) -> None:
        self.diff_sq = 0.0
        self.ref_sq = 0.0
        # Only a preserved MLP has a unit-for-unit correspondence with the source's activation.
        self.max_unit_error = 0.0 if track_units else None

    @torch.inference_mode()
    def measure(
        self,
        io: list[tuple[torch.Tensor, torch.Tensor]],
        weights: dict[str, torch.Tensor],
        variant: str,
        params: GluParams,
        source_activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """The GLU MLP with ``weights`` (``gate_proj.weight``, ``gate_proj.bias``, … in the converted
        model's dtype) on each recorded input; ``source_activation(x)`` is the source MLP's activation
        output, the reference of each GLU unit."""
        spec = get_variant(variant)
        down = weights["down_proj.weight"]
        for x, y in io:
            x_glu = x.to(down.dtype)
            gate = F.linear(x_glu, weights["gate_proj.weight"], weights.get("gate_proj.bias"))
            up = F.linear(x_glu, weights["up_proj.weight"], weights.get("up_proj.bias"))
            activated = glu_activation(gate, up, spec, params)
            out = F.linear(activated, down, weights.get("down_proj.bias")).float()
            self.diff_sq += (out - y.float()).pow(2).sum().item()
            self.ref_sq += y.float().pow(2).sum().item()
            if self.max_unit_error is not None and source_activation is not None:
                reference = source_activation(x).float()
                self.max_unit_error = max(self.max_unit_error, (activated.float() - reference).abs().max().item())

    def result(self) -> dict:
        result = {"mlp_relative_error": math.sqrt(self.diff_sq / self.ref_sq) if self.ref_sq > 0 else 0.0}
        if self.max_unit_error is not None:
            result["max_unit_error"] = self.max_unit_error
        return result


def mlp_weights(mlp: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A GluMLP's weights, named as :meth:`LayerStats.measure` takes them."""
    return {k: v.detach() for k, v in mlp.named_parameters()}


@torch.inference_mode()
def compare(
    record: SourceRecord,
    converted: PreTrainedModel,
    stats: list[LayerStats],
    unit_maps: list[UnitMap] | None,
) -> dict:
    """Max |Δ output| and (for LMs) both perplexities of ``converted`` against the recorded source, and
    the per-layer figures of ``stats``."""
    converted.eval()
    input_ids, max_length, stride = record.input_ids, record.max_length, record.stride
    is_lm = is_causal_lm(converted)
    max_diff, nll, tokens = 0.0, [0.0, 0.0], 0
    finite = [True, True]  # source's, converted's outputs
    for index, (begin, end, target_len) in enumerate(windows(input_ids.shape[-1], max_length, stride)):
        ids = input_ids[:, begin:end]
        if is_lm:
            hidden = converted.base_model(ids).last_hidden_state
            heads = ((record.head, record.outputs[index]), (converted.get_output_embeddings(), hidden))
            n = min(target_len, ids.shape[-1] - 1)  # the window's scored tokens: predicted by rows -n-1 … -2
            first_scored = ids.shape[-1] - 1 - n
            for row in range(0, ids.shape[-1], _LOGIT_ROWS):
                rows = slice(row, min(row + _LOGIT_ROWS, ids.shape[-1]))
                logits = [head(h[:, rows]).float() for head, h in heads]
                finite = [f and all_finite(chunk) for f, chunk in zip(finite, logits, strict=True)]
                lo, hi = max(rows.start, first_scored), min(rows.stop, ids.shape[-1] - 1)
                if hi > lo:
                    targets = ids[0, lo + 1 : hi + 1]
                    for i, chunk in enumerate(logits):
                        predictions = chunk[0, lo - rows.start : hi - rows.start]
                        nll[i] += F.cross_entropy(predictions, targets, reduction="sum").item()
                # In place: logits of a large vocabulary are the biggest tensors the report holds.
                max_diff = _worst(max_diff, logits[0].sub_(logits[1]).abs_().max().item())
                del logits
            tokens += max(n, 0)
            del hidden
        else:
            out, expected = _output(converted, ids).float(), record.outputs[index]
            finite = [finite[0] and all_finite(expected), finite[1] and all_finite(out)]
            max_diff = _worst(max_diff, out.sub_(expected).abs_().max().item())

    layers = []
    for i, s in enumerate(stats):
        layer = {"layer": i, **s.result()}
        if unit_maps is not None:
            layer["unit_map"] = unit_maps[i].to_dict()
        layers.append(layer)
    output_name = "last_hidden_state" if converted.base_model is converted else "logits"
    source_finite, converted_finite = finite
    if source_finite and not converted_finite:
        raise ConversionError(
            f"the converted model's {output_name} are not finite (NaN or inf) on the evaluation text, while the "
            "source's are: its dtype overflows (float16 is the usual cause); convert to bfloat16 or float32"
        )
    for layer in layers:
        if not math.isfinite(layer["mlp_relative_error"]) and source_finite:
            raise ConversionError(
                f"layer {layer['layer']}'s converted MLP gives non-finite outputs on the source's MLP inputs, "
                "which are finite: its dtype overflows (float16 is the usual cause); convert to bfloat16 or float32"
            )
    report = {
        "eval_tokens": int(input_ids.shape[-1]),
        "window": {"max_length": max_length, "stride": stride},
        "compared_output": output_name,
        "mlp_stats_tokens": record.mlp_tokens,  # window tokens behind the per-layer figures (overlaps count)
        "max_abs_output_diff": max_diff,
        "layers": layers,
        "max_mlp_relative_error": reduce(_worst, (layer["mlp_relative_error"] for layer in layers), 0.0),
    }
    if output_name == "logits":
        report["max_abs_logit_diff"] = max_diff
    if is_lm and tokens:
        source_ppl, converted_ppl = (math.exp(v / tokens) for v in nll)
        report["perplexity"] = {
            "source": source_ppl,
            "converted": converted_ppl,
            "ratio": converted_ppl / source_ppl,
            "scored_tokens": tokens,
        }
    if not source_finite:  # nothing to compare against: say so, and keep the report strict JSON
        report["evaluation"] = (
            f"not measured: the source's own {output_name} are not finite (NaN or inf) on the evaluation text"
        )
        report = without_non_finite(report)
    return report


def _worst(a: float, b: float) -> float:
    """The larger of two errors, where NaN is worse than anything (Python's max would drop it)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _output(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    if getattr(out, "logits", None) is not None:
        return out.logits
    if getattr(out, "start_logits", None) is not None:  # question answering
        return torch.stack([out.start_logits, out.end_logits])
    return out.last_hidden_state
