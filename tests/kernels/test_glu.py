"""The variant table against closed forms written independently of hf_glu.glu, in float64."""


import pytest
import torch

from hf_glu.glu import VARIANTS, get_variant, glu_activation

from helpers import PARAMS, closed_form


def _grid():
    # Points straddling 0 and both clamp limits, avoiding the kinks themselves (one-sided derivatives).
    g = torch.linspace(-9.7, 9.3, 211, dtype=torch.float64)
    u = torch.linspace(3.1, -4.3, 211, dtype=torch.float64)
    return g, u


def test_table_lists_exactly_the_documented_variants():
    assert set(VARIANTS) == {"glu", "bilinear", "reglu", "geglu", "geglu_tanh", "swiglu", "swiglu_oai"}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_float64_forward_and_derivatives_match_closed_form(name):
    g, u = _grid()
    g.requires_grad_(True)
    u.requires_grad_(True)
    out = glu_activation(g, u, name, PARAMS)
    assert out.dtype == torch.float64
    ref, dg_ref, du_ref = closed_form(name, g.detach(), u.detach())
    torch.testing.assert_close(out.detach(), ref, rtol=1e-12, atol=1e-12)
    dg, du = torch.autograd.grad(out.sum(), (g, u))
    torch.testing.assert_close(dg, dg_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(du, du_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_low_precision_computes_in_fp32_and_rounds_once(name, dtype):
    g, u = (t.to(dtype) for t in _grid())
    out = glu_activation(g, u, name, PARAMS)
    assert out.dtype == dtype
    # One cast back: exactly the fp32 result rounded to the dtype, no intermediate rounding.
    assert torch.equal(out, glu_activation(g.float(), u.float(), name, PARAMS).to(dtype))
    # And within the dtype's rounding of the exact value (plus fp32 cancellation in the GELU tails).
    ref, _, _ = closed_form(name, g.double(), u.double())
    eps = torch.finfo(dtype).eps
    bound = eps * ref.abs() + 1e-6 * (u.double() * g.double()).abs()
    assert ((out.double() - ref).abs() <= bound).all()


def test_swiglu_default_beta_is_silu():
    g, u = _grid()
    torch.testing.assert_close(glu_activation(g, u, "swiglu"), u * torch.nn.functional.silu(g))


def test_unknown_variant_lists_known_ones():
    with pytest.raises(ValueError, match="not a known GLU variant.*'swiglu'"):
        get_variant("swish")


def test_mismatched_dtypes_are_refused():
    with pytest.raises(ValueError, match="share a dtype"):
        glu_activation(torch.ones(2), torch.ones(2, dtype=torch.float64), "glu")
