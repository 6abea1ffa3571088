"""What serving engines see of a GLU model: the MLP's traced eager form, the kernels-hub hook, `transformers serve`."""

import operator

import pytest
import torch
from conftest import tiny_config
from torch import fx, nn

from hf_glu import GluMLP
from hf_glu.glu import VARIANTS, GluParams, activation_module, glu_activation


class _ActivationIsLeaf(fx.Tracer):
    """A tracer that stops at the activation module, as an engine matching activation classes does."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname == "act_fn" or super().is_leaf_module(m, qualname)


def _trace(mlp: GluMLP) -> fx.Graph:
    return _ActivationIsLeaf().trace(mlp)


def _gated_pattern(graph: fx.Graph) -> fx.Node | None:
    """The ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` node of ``graph``, or None."""
    modules = {n.target: n for n in graph.nodes if n.op == "call_module"}
    down, act, gate, up = (modules.get(k) for k in ("down_proj", "act_fn", "gate_proj", "up_proj"))
    if None in (down, act, gate, up):
        return None
    product = down.args[0]
    if product.op != "call_function" or product.target not in (operator.mul, torch.mul):
        return None
    x = next(n for n in graph.nodes if n.op == "placeholder")
    if set(product.args) != {act, up} or act.args != (gate,) or gate.args != (x,) or up.args != (x,):
        return None
    return down


@pytest.mark.parametrize("variant", sorted(v for v in VARIANTS if VARIANTS[v].gate_act is not None))
def test_fx_trace_of_the_mlp_is_down_of_act_gate_times_up(variant):
    mlp = GluMLP(tiny_config(glu_variant=variant, glu_kernel="triton"))  # the fused path must not be traced
    assert _gated_pattern(_trace(mlp)) is not None
    assert all(type(getattr(mlp, p)) is nn.Linear for p in ("gate_proj", "up_proj", "down_proj"))


def test_clamped_swiglu_does_not_trace_as_act_gate_times_up():
    mlp = GluMLP(tiny_config(glu_variant="swiglu_oai"))
    graph = _trace(mlp)
    assert _gated_pattern(graph) is None
    act = next(n for n in graph.nodes if n.target == "act_fn")
    assert [a.target for a in act.args] == ["gate_proj", "up_proj"]  # both halves go into the one activation


def test_traced_graph_computes_the_module():
    mlp = GluMLP(tiny_config(glu_variant="geglu_tanh"))
    traced = fx.GraphModule(mlp, _trace(mlp))
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(traced(x), mlp(x), rtol=0, atol=0)


# What an engine that maps activation modules to its own fused kernels would conclude from each class.
_STANDARD = {nn.SiLU: "silu", nn.GELU: "gelu", nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Identity: "identity"}


@pytest.mark.parametrize(
    "variant, beta, standard",
    [
        ("swiglu", 1.0, "silu"),
        ("geglu", 1.0, "gelu"),
        ("reglu", 1.0, "relu"),
        ("glu", 1.0, "sigmoid"),
        ("bilinear", 1.0, "identity"),
        ("swiglu", 1.702, None),  # z * sigmoid(1.702 z) is not SiLU
        ("geglu_tanh", 1.0, None),  # the tanh GELU is not nn.GELU's default erf form
        ("swiglu_oai", 1.0, None),
    ],
)
def test_activation_class_matches_a_standard_pattern_only_when_it_computes_it(variant, beta, standard):
    params = GluParams(beta=beta)
    act = activation_module(variant, params)
    matches = [name for cls, name in _STANDARD.items() if isinstance(act, cls)]
    assert matches == ([standard] if standard else [])
    if standard is None:
        assert type(act).__name__ not in {"SiLU", "GELU", "ReLU", "Sigmoid", "Identity"}
        return
    gate, up = torch.randn(64, dtype=torch.float64) * 4, torch.randn(64, dtype=torch.float64)
    reference = {nn.SiLU: nn.SiLU(), nn.GELU: nn.GELU(), nn.ReLU: nn.ReLU(), nn.Sigmoid: nn.Sigmoid()}
    standard_module = next((m for cls, m in reference.items() if isinstance(act, cls)), nn.Identity())
    # The engine's replacement computes the same function as the variant table
    torch.testing.assert_close(standard_module(gate) * up, glu_activation(gate, up, variant, params))


def test_checkpoint_keys_are_unchanged_by_the_activation_module():
    mlp = GluMLP(tiny_config(glu_variant="swiglu", mlp_bias=True))
    assert sorted(mlp.state_dict()) == sorted(f"{p}.{t}" for p in ("gate_proj", "up_proj", "down_proj")
                                              for t in ("weight", "bias"))  # fmt: skip


def test_tensor_parallel_plan_names_the_mlp_projections():
    plan = tiny_config().base_model_tp_plan
    assert plan["h.*.mlp.gate_proj"] == plan["h.*.mlp.up_proj"] == "colwise"
    assert plan["h.*.mlp.down_proj"] == "rowwise"


# ----------------------------------------------------------------------------------------------------
# Kernels hub: `use_kernels=True` / `kernels.kernelize` swap GluMLP's forward only for a layer of its variant.

_CALLS: list[str] = []


class _RecordingGluMLP(nn.Module):
    """A stand-in hub layer: records the call, then computes what GluMLP's eager form computes."""

    def forward(self, hidden_states, residual=None):
        _CALLS.append(self.variant.name)
        out = self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))
        return self.dropout(out) if residual is None else residual + self.dropout(out)


class _StandInRepository:
    """A kernels repository protocol object serving the stand-in layer under a hub layer name."""

    def __init__(self, layer_name: str):
        self.layer_name = layer_name

    def load(self) -> type[nn.Module]:
        return type(self.layer_name, (_RecordingGluMLP,), {})


def _kernelized_forward(variant: str, layer_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    kernels = pytest.importorskip("kernels", reason="the kernels library (a dependency of transformers 5.2x) is absent")
    from hf_glu import GluForCausalLM

    model = GluForCausalLM(tiny_config(glu_variant=variant)).eval()
    ids = torch.randint(1, 101, (1, 6))
    with torch.no_grad():
        before = model(ids).logits
    mapping = {"GluMLP": {"cpu": {kernels.Mode.INFERENCE: _StandInRepository(layer_name)}}}
    with kernels.use_kernel_mapping(mapping, inherit_mapping=False):
        kernels.kernelize(model, mode=kernels.Mode.INFERENCE, device="cpu")
    _CALLS.clear()
    with torch.no_grad():
        after = model(ids).logits
    return before, after


@pytest.mark.parametrize("layer_name", ["GluMLP", "GluMLP_geglu_tanh"])
def test_hub_layer_of_the_same_variant_replaces_the_forward(layer_name):
    before, after = _kernelized_forward("geglu_tanh", layer_name)
    assert _CALLS == ["geglu_tanh", "geglu_tanh"]  # one call per block
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("layer_name", ["GluMLP_swiglu", "SwiGLUMLP", "GeGLUMLP"])
def test_hub_layer_of_another_activation_is_never_swapped_in(layer_name):
    before, after = _kernelized_forward("geglu_tanh", layer_name)
    assert _CALLS == []
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_hub_guard_refuses_when_the_mapping_cannot_be_read(monkeypatch):
    import hf_glu.modeling_glu as modeling

    mlp = GluMLP(tiny_config(glu_variant="swiglu"))
    assert GluMLP.kernel_layer_name == "GluMLP"
    monkeypatch.setattr(modeling, "_mapped_hub_layers", lambda: [_StandInRepository("GluMLP_swiglu")])
    assert GluMLP.kernel_condition(mlp)
    monkeypatch.setattr(modeling, "_mapped_hub_layers", lambda: None)
    assert not GluMLP.kernel_condition(mlp)


def test_loading_with_no_hub_mapping_keeps_the_forward_without_a_warning(tmp_path, caplog):
    from hf_glu import GluForCausalLM

    GluForCausalLM(tiny_config()).save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        model = GluForCausalLM.from_pretrained(tmp_path, use_kernels=True)  # 5.25's default; explicit for 5.17
    assert "No kernel mapping found for layer `GluMLP`" not in caplog.text
    assert "forward" not in vars(model.transformer.h[0].mlp)  # kernels swapped nothing in
