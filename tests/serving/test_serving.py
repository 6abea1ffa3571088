"""What serving engines see of a GLU model: the MLP's traced eager form, the kernels-hub hook, `transformers serve`."""

import json
import operator
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
import transformers
from torch import fx, nn
from transformers.utils.import_utils import is_serve_available

from hf_glu import GluMLP
from hf_glu.glu import VARIANTS, GluParams, activation_module, glu_activation

from helpers import FAMILY_CONFIGS, tiny_config, tiny_gpt2


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
        ("geglu_tanh", 1.0, "gelu"),  # nn.GELU(approximate="tanh"): engines read `approximate`
        ("reglu", 1.0, "relu"),
        ("glu", 1.0, "sigmoid"),
        ("bilinear", 1.0, "identity"),
        ("swiglu", 1.702, None),  # z * sigmoid(1.702 z) is not SiLU
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
    reference = {nn.SiLU: nn.SiLU(), nn.ReLU: nn.ReLU(), nn.Sigmoid: nn.Sigmoid()}
    if isinstance(act, nn.GELU):
        reference[nn.GELU] = nn.GELU(approximate=act.approximate)
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

    def forward(self, x):  # GluMLP.forward's contract: the GLU maths alone (dropout and residual stay the MLP's)
        _CALLS.append(self.variant.name)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


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


def test_no_hub_tag_where_the_activation_guard_cannot_be_passed(monkeypatch):
    import hf_glu.modeling_glu as modeling

    def name_only(layer_name):  # Transformers 5.17's wrapper when `kernels` is installed
        return lambda cls: setattr(cls, "kernel_layer_name", layer_name) or cls

    class Layer(nn.Module):
        pass

    monkeypatch.setattr(modeling, "use_kernel_forward_from_hub", name_only)
    assert modeling._hub_kernel_layer(Layer) is Layer
    assert not hasattr(Layer, "kernel_layer_name")


def test_loading_with_no_hub_mapping_keeps_the_forward_without_a_warning(tmp_path, caplog):
    from hf_glu import GluForCausalLM

    GluForCausalLM(tiny_config()).save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        model = GluForCausalLM.from_pretrained(tmp_path, use_kernels=True)  # 5.25's default; explicit for 5.17
    assert "No kernel mapping found for layer `GluMLP`" not in caplog.text
    assert "forward" not in vars(model.transformer.h[0].mlp)  # kernels swapped nothing in


# ----------------------------------------------------------------------------------------------------
# `transformers serve` of converted checkpoints, through `python -m hf_glu.serve` (upstream cannot load them).

SERVE_STARTUP_S = 240  # model processes start by spawn: imports torch and transformers again on 2 busy cores


@pytest.fixture(scope="module")
def served_checkpoints(tmp_path_factory):
    """A converted GPT-2 and a converted GPT-NeoX checkpoint, each with a tokenizer the server can load."""
    from hf_glu import convert_checkpoint, convert_gpt2
    from hf_glu.data import builtin_corpus, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(builtin_corpus(max_chars=20_000), vocab_size=300)
    root = tmp_path_factory.mktemp("served")
    neox_config = FAMILY_CONFIGS["gpt_neox"]()
    neox_config.vocab_size = len(tokenizer)
    sources = {
        "gpt2": lambda: convert_gpt2(tiny_gpt2(vocab_size=len(tokenizer)), "geglu_tanh", eval_tokens=16),
        "gpt_neox": lambda: convert_checkpoint(
            transformers.GPTNeoXForCausalLM(neox_config).eval(), "swiglu", eval_tokens=16
        ),
    }
    paths = {}
    for name, convert in sources.items():
        paths[name] = root / name
        convert().save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def _greedy_text(path, prompt: str, new_tokens: int) -> str:
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_transformers_serve_completions_equal_generate(served_checkpoints, tmp_path):
    if not is_serve_available():
        pytest.skip("`transformers serve` needs its serving extra: pip install fastapi uvicorn openai")
    port = _free_port()
    log = open(tmp_path / "server.log", "w+b")  # a file, not a pipe: progress bars would fill a pipe and stall it
    server = subprocess.Popen(
        [sys.executable, "-m", "hf_glu.serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its model processes go with it
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/completions"
        prompt, new_tokens = "The house", 5
        for name, path in served_checkpoints.items():
            body = {"model": str(path), "prompt": prompt, "max_tokens": new_tokens, "temperature": 0}
            deadline = time.monotonic() + SERVE_STARTUP_S
            while True:
                try:
                    reply = _post(url, body, timeout=SERVE_STARTUP_S)
                    break
                except urllib.error.HTTPError as refused:  # listening, and refused the request
                    pytest.fail(f"{name}: HTTP {refused.code}: {refused.read().decode()[:2000]}")
                except (urllib.error.URLError, ConnectionError):  # not listening yet
                    if server.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"server did not answer: {(tmp_path / 'server.log').read_text()[-3000:]}")
                    time.sleep(1)
            expected = _greedy_text(path, prompt, new_tokens)
            assert expected, f"{name}: greedy decoding ends at once; the comparison would prove nothing"
            assert reply["choices"][0]["text"] == expected, name
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_upstream_serve_loader_cannot_find_glu_classes_without_the_wrapper(served_checkpoints):
    """Upstream behaviour the wrapper exists for: the server looks the class up in `transformers`' namespace."""
    from hf_glu.serve import glu_classes_in_transformers

    architecture = transformers.AutoConfig.from_pretrained(served_checkpoints["gpt_neox"]).architectures[0]
    assert not hasattr(transformers, architecture)
    with glu_classes_in_transformers():
        model = getattr(transformers, architecture).from_pretrained(served_checkpoints["gpt_neox"])
    assert type(model).__name__ == architecture == "GluGPTNeoXForCausalLM"
    assert not hasattr(transformers, architecture)  # removed again


def _serve_module(tmp_path, args: list[str], prelude: str = "") -> subprocess.CompletedProcess:
    """``python -m hf_glu.serve ARGS`` in a fresh process, after ``prelude``."""
    script = prelude + "import runpy, sys\nsys.argv[0] = 'serve'\nrunpy.run_module('hf_glu.serve', run_name='__main__')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_serve_help_shows_the_command_line_that_works(tmp_path):
    """The usage line is `python -m hf_glu.serve [OPTIONS] [FORCE_MODEL]` (it read `python -m hf_glu.serve serve …`,
    and following it made "serve" the model to load)."""
    result = _serve_module(tmp_path, ["--help"])
    assert result.returncode == 0, result.stderr
    usage = next(line for line in result.stdout.splitlines() if "Usage:" in line)
    assert "python -m hf_glu.serve [OPTIONS]" in usage and "serve serve" not in usage, usage


def test_serve_without_the_server_packages_names_what_to_install(tmp_path):
    """fastapi and uvicorn missing (None in sys.modules: what an uninstalled package looks like to import and to
    find_spec): one line naming them and the install command, exit 2, no traceback."""
    missing = "import sys\nsys.modules.update(fastapi=None, uvicorn=None)\n"
    result = _serve_module(tmp_path, ["some-model"], prelude=missing)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "fastapi, uvicorn" in result.stderr and 'pip install "transformers[serving]"' in result.stderr
