"""The fidelity report: how closely the converted model follows its source on evaluation text.

One pass over the evaluation windows runs both models. Hooks on each source MLP feed the very same
input to the converted MLP, so the per-layer figures isolate the MLP change from error carried in from
earlier layers; the logits and perplexities measure the whole model.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel

from ..glu import glu_activation
from ..modeling_glu import GluForCausalLM, GluModel, GluPreTrainedModel
from .init_schemes import UnitMap
from .perplexity import window_nll, windows


def _blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    return model.h if hasattr(model, "h") else model.transformer.h


class _LayerStats:
    """Accumulates one layer's MLP output error and elementwise activation error across windows."""

    def __init__(self, track_units: bool) -> None:
        self.diff_sq = 0.0
        self.ref_sq = 0.0
        # Only a preserved MLP has a unit-for-unit correspondence with the source's activation.
        self.max_unit_error = 0.0 if track_units else None

    def update(self, source_mlp: torch.nn.Module, glu_mlp: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        x_glu = x.to(glu_mlp.down_proj.weight.dtype)
        gate, up = glu_mlp.gate_proj(x_glu), glu_mlp.up_proj(x_glu)
        activated = glu_activation(gate, up, glu_mlp.variant, glu_mlp.params)
        out = glu_mlp.down_proj(activated).float()
        self.diff_sq += (out - y.float()).pow(2).sum().item()
        self.ref_sq += y.float().pow(2).sum().item()
        if self.max_unit_error is not None:
            reference = source_mlp.act(source_mlp.c_fc(x)).float()
            self.max_unit_error = max(self.max_unit_error, (activated.float() - reference).abs().max().item())

    def result(self) -> dict:
        result = {"mlp_relative_error": math.sqrt(self.diff_sq / self.ref_sq) if self.ref_sq > 0 else 0.0}
        if self.max_unit_error is not None:
            result["max_unit_error"] = self.max_unit_error
        return result


@torch.inference_mode()
def fidelity_report(
    source: PreTrainedModel,
    converted: GluPreTrainedModel,
    input_ids: torch.Tensor,
    max_length: int,
    stride: int,
    unit_maps: list[UnitMap] | None,
) -> dict:
    """Per-layer MLP relative error, max |Δ output| and (for LMs) both perplexities on ``input_ids``."""
    source_was_training = source.training
    source.eval()
    converted.eval()
    stats = [_LayerStats(unit_maps is not None) for _ in _blocks(source)]
    hooks = [
        src_block.mlp.register_forward_hook(
            lambda module, args, output, s=s, glu_mlp=glu_block.mlp: s.update(module, glu_mlp, args[0], output)
        )
        for s, src_block, glu_block in zip(stats, _blocks(source), _blocks(converted), strict=True)
    ]
    is_lm = isinstance(converted, GluForCausalLM)
    max_diff, nll, tokens = 0.0, [0.0, 0.0], 0
    try:
        for begin, end, target_len in windows(input_ids.shape[-1], max_length, stride):
            ids = input_ids[:, begin:end]
            outputs = [_output(model, ids).float() for model in (source, converted)]
            if is_lm:
                for i, logits in enumerate(outputs):
                    window_sum, n = window_nll(logits, ids, target_len)
                    nll[i] += window_sum
                tokens += n
            # In place: logits of a large vocabulary are the biggest tensors the report holds.
            max_diff = max(max_diff, outputs[0].sub_(outputs[1]).abs_().max().item())
            del outputs
    finally:
        for hook in hooks:
            hook.remove()
        source.train(source_was_training)

    layers = []
    for i, s in enumerate(stats):
        layer = {"layer": i, **s.result()}
        if unit_maps is not None:
            layer["unit_map"] = unit_maps[i].to_dict()
        layers.append(layer)
    output_name = "last_hidden_state" if isinstance(converted, GluModel) else "logits"
    report = {
        "eval_tokens": int(input_ids.shape[-1]),
        "window": {"max_length": max_length, "stride": stride},
        "compared_output": output_name,
        "max_abs_output_diff": max_diff,
        "layers": layers,
        "max_mlp_relative_error": max((layer["mlp_relative_error"] for layer in layers), default=0.0),
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
    return report


def _output(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
