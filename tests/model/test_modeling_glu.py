"""The GLU model family: MLP maths, training, attention backends, cache, checkpointing, compile, save/load."""

import ast
import inspect
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import hf_glu
from hf_glu import GluForCausalLM, GluForSequenceClassification, GluForTokenClassification, GluMLP, GluModel
from hf_glu.glu import VARIANTS, GluParams
from hf_glu.modeling_glu import GluClampedMLP

from helpers import PARAMS, closed_form, tiny_config, tiny_gpt2

ALL_VARIANTS = sorted(VARIANTS)


def _mlp_config(variant, bias=True):
    return tiny_config(glu_variant=variant, glu_beta=PARAMS.beta, glu_limit=PARAMS.limit, mlp_bias=bias)


def _closed_form_mlp(mlp, x):
    """The whole MLP in float64 with the hand-derived activation, on copies of the module's weights."""
    w = {name: p.detach().double().requires_grad_(True) for name, p in mlp.named_parameters()}

    def lin(prefix, t):
        out = t @ w[f"{prefix}.weight"].T
        return out + w[f"{prefix}.bias"] if f"{prefix}.bias" in w else out

    x = x.detach().double().requires_grad_(True)
    act, _, _ = closed_form(mlp.variant.name, lin("gate_proj", x), lin("up_proj", x))
    return lin("down_proj", act), x, w


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_mlp_matches_float64_closed_form_forward_and_backward(variant, bias):
    mlp = GluMLP(_mlp_config(variant, bias))
    with torch.no_grad():  # pre-activations past the clamp limits and both sides of 0; outputs of order 1
        for name, p in mlp.named_parameters():
            p.normal_(0.0, 0.02 if name.startswith("down") else 0.4)
    x = torch.randn(3, 7, 32, requires_grad=True)
    out = mlp(x)
    ref, x64, w64 = _closed_form_mlp(mlp, x)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)

    grad_out = 0.1 * torch.randn_like(out)  # keeps every gradient of order 1, where atol 1e-5 is meaningful
    out.backward(grad_out)
    ref.backward(grad_out.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=0, atol=1e-5)
    for name, p in mlp.named_parameters():
        torch.testing.assert_close(
            p.grad.double(), w64[name].grad, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_causal_lm_overfits_a_tiny_batch(variant):
    model = GluForCausalLM(tiny_config(glu_variant=variant))
    batch = torch.randint(1, 101, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = model(batch, labels=batch).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 2


@pytest.mark.parametrize(
    "options",
    [{}, {"scale_attn_by_inverse_layer_idx": True}, {"reorder_and_upcast_attn": True}, {"scale_attn_weights": False}],
)
def test_eager_and_sdpa_agree(options):
    config = tiny_config(**options)
    eager = GluForCausalLM._from_config(config, attn_implementation="eager").eval()
    sdpa = GluForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    ids = torch.randint(1, 101, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second row
    with torch.no_grad():
        a = eager(ids, attention_mask=mask).logits
        b = sdpa(ids, attention_mask=mask).logits
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(a[1, 4:], b[1, 4:], rtol=0, atol=1e-5)


def test_attention_scaling_options_change_the_output():
    ids = torch.randint(1, 101, (1, 10))
    base = GluForCausalLM(tiny_config()).eval()
    for option in ("scale_attn_by_inverse_layer_idx", "scale_attn_weights"):
        other = GluForCausalLM(tiny_config(**{option: not getattr(base.config, option)})).eval()
        other.load_state_dict(base.state_dict())
        with torch.no_grad():
            assert not torch.allclose(base(ids).logits, other(ids).logits, atol=1e-4), option


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_generate_with_cache_equals_without(attn):
    model = GluForCausalLM._from_config(tiny_config(), attn_implementation=attn).eval()
    prompt = torch.randint(1, 101, (2, 5))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    prompt[0, :2] = 0  # left-padded batch, the way generate wants it
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 17)
    assert torch.equal(with_cache, without)


def test_incremental_decoding_matches_full_forward_under_both_cache_names():
    model = GluForCausalLM(tiny_config()).eval()
    ids = torch.randint(1, 101, (1, 9))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        for name in ("cache", "past_key_values"):
            cache = DynamicCache(config=model.config)
            first = model(ids[:, :6], use_cache=True, **{name: cache})
            rest = model(ids[:, 6:], use_cache=True, **{name: cache})
            torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, rtol=0, atol=1e-5)
            assert cache.get_seq_length() == 9


def test_gradient_checkpointing_gives_the_same_gradients():
    config = tiny_config(glu_variant="geglu")
    model = GluForCausalLM(config).train()
    ids = torch.randint(1, 101, (2, 10))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.transformer.h[0].gradient_checkpointing
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6, msg=name)


def test_compiled_forward_fullgraph_matches_eager():
    model = GluForCausalLM(tiny_config(glu_variant="swiglu_oai")).eval()
    ids = torch.randint(1, 101, (2, 8))
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        got = compiled(ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["swiglu", "geglu_tanh"])
def test_save_and_load_round_trip_bit_exact_in_safetensors(tmp_path, variant):
    model = GluForCausalLM(tiny_config(glu_variant=variant, mlp_bias=False)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is GluForCausalLM
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    ids = torch.randint(1, 101, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_weights_missing_from_a_checkpoint_are_initialised_not_garbage(tmp_path):
    GluModel(tiny_config(initializer_range=0.02)).save_pretrained(tmp_path)
    classifier = GluForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    weight = classifier.score.weight
    assert torch.isfinite(weight).all() and 0.005 < weight.std().item() < 0.05


def test_residual_projections_use_gpt2_scaled_init():
    config = tiny_config(n_embd=256, n_head=4, n_inner=512, n_layer=8, initializer_range=0.02)
    model = GluModel(config)
    scaled = 0.02 / (2 * 8) ** 0.5
    block = model.h[3]
    assert abs(block.attn.o_proj.weight.std().item() - scaled) < 0.15 * scaled
    assert abs(block.mlp.down_proj.weight.std().item() - scaled) < 0.15 * scaled
    assert abs(block.mlp.gate_proj.weight.std().item() - 0.02) < 0.15 * 0.02
    assert torch.equal(block.mlp.up_proj.bias, torch.zeros_like(block.mlp.up_proj.bias))


def test_resize_token_embeddings_keeps_the_tie():
    model = GluForCausalLM(tiny_config())
    assert model.lm_head.weight is model.transformer.wte.weight
    model.resize_token_embeddings(120)
    assert model.config.vocab_size == 120
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model(torch.tensor([[119, 3]])).logits.shape == (1, 2, 120)


def test_untied_head_stays_untied_through_save_and_load(tmp_path):
    model = GluForCausalLM(tiny_config(tie_word_embeddings=False))
    assert model.lm_head.weight is not model.transformer.wte.weight
    model.save_pretrained(tmp_path)
    loaded = GluForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is not loaded.transformer.wte.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_token_type_ids_add_token_embeddings_like_gpt2():
    model = GluModel(tiny_config()).eval()
    ids = torch.randint(1, 101, (1, 6))
    types = torch.randint(1, 101, (1, 6))
    with torch.no_grad():
        with_types = model(ids, token_type_ids=types).last_hidden_state
        by_hand = model(inputs_embeds=model.wte(ids) + model.wte(types)).last_hidden_state
    torch.testing.assert_close(with_types, by_hand)


def test_hidden_states_and_attentions_are_returned_on_request():
    model = GluModel._from_config(tiny_config(), attn_implementation="eager")
    out = model(torch.randint(1, 101, (1, 5)), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert out.attentions[0].shape == (1, 4, 5, 5)
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)


def test_an_explicit_none_output_flag_means_the_configs_value():
    """PEFT passes ``output_attentions``, ``output_hidden_states`` and ``return_dict`` as ``None``: each is the
    config's value then, for the bare model and for a head."""
    config = tiny_config(output_hidden_states=True, output_attentions=True, return_dict=False)
    ids = torch.randint(1, 101, (1, 5))
    for model_class in (GluModel, GluForCausalLM):
        model = model_class._from_config(config, attn_implementation="eager").eval()
        out = model(ids, output_attentions=None, output_hidden_states=None, return_dict=None)
        assert isinstance(out, tuple), model_class
        hidden_states, attentions = out[-2:]
        assert len(hidden_states) == 3 and len(attentions) == 2, model_class


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_output_flags_answer_as_stock_gpt2_does(attn_implementation):
    """Hidden states and attentions come back as GPT-2's own classes return them: one per layer (and the
    embeddings), or no attentions at all where the attention kernel cannot give them (sdpa)."""
    ids = torch.randint(1, 101, (1, 5))
    glu = GluForCausalLM._from_config(tiny_config(), attn_implementation=attn_implementation).eval()
    stock = tiny_gpt2()
    stock.set_attn_implementation(attn_implementation)
    ours, theirs = (m(ids, output_attentions=True, output_hidden_states=True) for m in (glu, stock))
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    assert [a.shape for a in ours.attentions] == [a.shape for a in theirs.attentions]
    assert len(ours.attentions) == (2 if attn_implementation == "eager" else 0)


def test_head_signatures_name_what_peft_and_generate_look_up():
    """Both read a head's ``forward`` signature: PEFT's prefix tuning calls a head itself only where it names
    ``past_key_values`` (else it calls the base model and pools on its own); ``generate`` passes ``position_ids``,
    ``attention_mask`` and ``logits_to_keep`` only where they are named."""
    def named(cls):
        return set(inspect.signature(cls.forward).parameters)

    assert {"past_key_values", "cache", "attention_mask", "position_ids", "logits_to_keep"} <= named(GluForCausalLM)
    assert {"past_key_values", "cache", "attention_mask", "position_ids"} <= named(GluForSequenceClassification)
    assert "past_key_values" not in named(GluForTokenClassification)  # never a cache: PEFT's base-model route


def test_sequence_classification_pools_the_last_non_padding_token():
    model = GluForSequenceClassification(tiny_config(num_labels=3)).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    with torch.no_grad():
        out = model(ids, attention_mask=(ids != 0).long(), labels=torch.tensor([1, 2]))
        alone = model(ids[:1, :3]).logits
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0
    torch.testing.assert_close(out.logits[0], alone[0], rtol=0, atol=1e-5)


def test_token_classification_gives_per_token_logits_and_loss():
    model = GluForTokenClassification(tiny_config(num_labels=5))
    ids = torch.randint(1, 101, (2, 7))
    labels = torch.randint(0, 5, (2, 7))
    labels[0, 0] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 7, 5)
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 5), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_causal_lm_loss_shifts_labels():
    model = GluForCausalLM(tiny_config())
    ids = torch.randint(1, 101, (2, 9))
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 101), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_triton_kernel_without_triton_fails_clearly(monkeypatch):
    monkeypatch.setattr(hf_glu.glu_triton, "TRITON_AVAILABLE", False)
    model = GluForCausalLM(tiny_config(glu_kernel="triton"))
    with pytest.raises(ImportError, match="needs triton"):
        model(torch.randint(1, 101, (1, 4)))


def test_token_classification_ignores_a_requested_cache():
    model = GluForTokenClassification(tiny_config(num_labels=2))
    assert model(torch.randint(1, 101, (1, 4)), use_cache=True).logits.shape == (1, 4, 2)


@pytest.mark.parametrize(
    "kernel, cuda, dtype, triton, fused",
    [
        ("auto", True, torch.bfloat16, True, True),
        ("auto", True, torch.float32, True, True),
        ("auto", True, torch.float64, True, False),  # no kernel for float64: the eager reference
        ("auto", False, torch.bfloat16, True, False),  # CPU tensors stay eager
        ("auto", True, torch.bfloat16, False, False),  # no triton installed
        ("eager", True, torch.bfloat16, True, False),
    ],
)
def test_auto_dispatch_decision_without_cuda(monkeypatch, kernel, cuda, dtype, triton, fused):
    monkeypatch.setattr(hf_glu.glu_triton, "on_cuda", lambda x: cuda)
    monkeypatch.setattr(hf_glu.glu_triton, "TRITON_AVAILABLE", triton)
    assert hf_glu.glu_triton.fused_path_wanted(kernel, torch.zeros(2, dtype=dtype)) is fused


@pytest.mark.skipif(not hf_glu.glu_triton.TRITON_AVAILABLE, reason="needs triton (the interpreter runs it on CPU)")
def test_auto_model_takes_the_fused_path_where_cuda_would_be(monkeypatch):
    """With the device predicate standing in for CUDA, ``auto`` runs the fused op (in the Triton interpreter)
    and the model's output is the eager one."""
    model = GluForCausalLM(tiny_config(glu_kernel="auto")).eval()
    ids = torch.randint(1, 101, (2, 6))
    with torch.no_grad():
        eager = model(ids).logits
    calls = []
    real = hf_glu.modeling_glu.fused_mlp_forward
    monkeypatch.setattr(hf_glu.modeling_glu, "fused_mlp_forward", lambda mlp, x: calls.append(x.shape) or real(mlp, x))
    monkeypatch.setattr(hf_glu.glu_triton, "on_cuda", lambda x: True)
    # The device decision only: small no-grad calls falling back to eager is tested in test_glu_triton.
    monkeypatch.setattr(hf_glu.glu_triton, "INFERENCE_EAGER_BELOW_TOKENS", 0)
    with torch.no_grad():
        fused = model(ids).logits
    assert len(calls) == model.config.n_layer
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)


def test_past_key_values_warns_only_where_cache_is_the_name():
    import warnings

    from transformers.cache_utils import DynamicCache

    model = GluForCausalLM(tiny_config()).eval()
    ids = torch.randint(1, 101, (1, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(ids, past_key_values=DynamicCache(config=model.config))
        model(ids, cache=DynamicCache(config=model.config))
    deprecations = [w for w in caught if issubclass(w.category, FutureWarning) and "past_key_values" in str(w.message)]
    if hf_glu.modeling_glu._MASK_CACHE_ARG == "cache":
        assert len(deprecations) == 1 and "cache=" in str(deprecations[0].message)
    else:
        assert deprecations == []


# ----------------------------------------------------------------------------------------------------
# The traced-pattern contract with serving engines (vLLM's GLU fuser), checked without the engine: it fx-traces
# the MLP class, then rewrites `forward`'s source, where each of act_fn, gate_proj and up_proj must be called
# exactly once as `self.name(arg)`, and maps the activation by its exact class.

# The class engines map for each variant with default parameters; None: a class of its own, never fused.
_ENGINE_CLASS = {
    "swiglu": (torch.nn.SiLU, {}),
    "geglu": (torch.nn.GELU, {"approximate": "none"}),
    "geglu_tanh": (torch.nn.GELU, {"approximate": "tanh"}),
    "glu": None,
    "bilinear": None,
    "reglu": None,
    "swiglu_oai": None,
}


def _forward_calls(cls) -> tuple[list[str], list[ast.AST]]:
    """The ``self.<name>(...)`` calls and the branches in ``cls.forward``'s source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    calls = [
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "self"
    ]
    branches = [node for node in ast.walk(tree) if isinstance(node, (ast.If, ast.IfExp, ast.Match, ast.Try))]
    return calls, branches


def test_mlp_forward_source_is_the_one_glu_expression_engines_rewrite():
    calls, branches = _forward_calls(GluMLP)
    assert sorted(calls) == ["act_fn", "down_proj", "gate_proj", "up_proj"]  # each exactly once
    assert branches == []
    body = ast.parse(textwrap.dedent(inspect.getsource(GluMLP.forward))).body[0].body
    expected = ast.parse("return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))").body[0]
    assert [ast.dump(statement) for statement in body[-1:]] == [ast.dump(expected)]
    assert all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) for s in body[:-1])  # a docstring


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("beta", [1.0, 1.702])
def test_activation_is_exactly_the_class_engines_map_and_the_mlp_traces(variant, beta):
    mlp = GluMLP(tiny_config(glu_variant=variant, glu_beta=beta, glu_kernel="triton"))
    mapped = _ENGINE_CLASS[variant] if variant != "swiglu" or beta == 1.0 else None
    if mapped is None:
        assert type(mlp.act_fn) not in (torch.nn.SiLU, torch.nn.GELU)
        assert type(mlp.act_fn).__module__ == "hf_glu.glu"
    else:
        cls, fields = mapped
        assert type(mlp.act_fn) is cls
        assert {name: getattr(mlp.act_fn, name) for name in fields} == fields
    # Plain fx (nn.Linear and torch's activations are leaves; hf_glu's own activations are traced through).
    traced = torch.fx.symbolic_trace(mlp)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(traced(x), mlp.forward(x), rtol=0, atol=0)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert targets.count("gate_proj") == targets.count("up_proj") == targets.count("down_proj") == 1
    if variant == "swiglu_oai":  # its own class: the activation takes up too, so it is no act(gate) * up
        assert type(mlp) is GluClampedMLP
    else:
        assert type(mlp) is GluMLP


def test_engine_activations_compute_the_variant_table_and_round_once():
    for variant in (v for v, mapped in _ENGINE_CLASS.items() if mapped):
        act = GluMLP(tiny_config(glu_variant=variant)).act_fn
        gate = torch.linspace(-12, 12, 20001, dtype=torch.float64)
        torch.testing.assert_close(act(gate), VARIANTS[variant].gate_act(gate, GluParams()), rtol=1e-15, atol=1e-15)
        bf16 = gate.to(torch.bfloat16)  # fp32 inside, one rounding: the table's rounding exactly
        assert torch.equal(act(bf16), VARIANTS[variant].gate_act(bf16.float(), GluParams()).to(torch.bfloat16))


def test_fused_dispatch_stays_outside_forward_and_defers_to_a_swapped_in_forward(monkeypatch):
    mlp = GluMLP(tiny_config(glu_variant="swiglu", glu_kernel="triton"))
    fused = []
    monkeypatch.setattr(hf_glu.modeling_glu, "fused_mlp_forward", lambda m, x: fused.append(x.shape) or m.forward(x))
    x = torch.randn(1, 3, 32)
    mlp(x)
    assert fused == [(1, 3, 32)]
    # An engine (vLLM's fuser, a kernels-hub layer) binds its own forward on the instance: that one runs.
    mlp.forward = lambda hidden_states: torch.zeros_like(hidden_states)
    fused.clear()
    assert torch.equal(mlp.eval()(x), torch.zeros_like(x)) and fused == []


# ----------------------------------------------------------------------------------------------------
# The kernels-hub guard: a one-variant hub layer knows its variant's defaults only.


class _Repository:
    def __init__(self, layer_name: str):
        self.layer_name = layer_name


@pytest.mark.parametrize(
    "variant, fields, layer_name, accepted",
    [
        ("swiglu", {}, "GluMLP_swiglu", True),
        ("swiglu", {"glu_beta": 2.0}, "GluMLP_swiglu", False),  # standard SwiGLU is not z * sigmoid(2 z)
        ("swiglu", {"glu_beta": 2.0}, "GluMLP", True),  # reads the MLP's own parameters
        ("swiglu", {"glu_limit": 3.0}, "GluMLP_swiglu", True),  # a parameter swiglu does not read
        ("swiglu_oai", {}, "GluMLP_swiglu_oai", True),
        ("swiglu_oai", {"glu_alpha": 1.0}, "GluMLP_swiglu_oai", False),
        ("swiglu_oai", {"glu_limit": 3.0}, "GluMLP_swiglu_oai", False),
        ("geglu", {"glu_beta": 2.0}, "GluMLP_geglu", True),
        ("geglu", {}, "GluMLP_swiglu", False),
    ],
)
def test_hub_guard_accepts_a_layer_only_for_the_variant_and_parameters_it_computes(
    monkeypatch, variant, fields, layer_name, accepted
):
    import hf_glu.modeling_glu as modeling

    mlp = GluMLP(tiny_config(glu_variant=variant, **fields))
    monkeypatch.setattr(modeling, "_mapped_hub_layers", lambda: [_Repository(layer_name)])
    assert modeling.hub_kernel_matches(mlp) is accepted
