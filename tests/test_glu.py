"""The variant table against closed forms written independently of hf_glu.glu, in float64."""

import math

import pytest
import torch

from hf_glu.glu import VARIANTS, GluParams, get_variant, glu_activation

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
PARAMS = GluParams(beta=1.3, alpha=1.702, limit=2.5)  # a small limit so the clamps are exercised


def _sig(z):
    return 1.0 / (1.0 + torch.exp(-z))


def _phi(z):  # standard normal density
    return torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _cdf(z):
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def _tanh_inner(z):
    return SQRT_2_OVER_PI * (z + 0.044715 * z**3)


def closed_form(name, g, u, p=PARAMS):
    """(out, d out/d gate, d out/d up) of each variant, derived by hand."""
    if name == "glu":
        s = _sig(g)
        return u * s, u * s * (1 - s), s
    if name == "bilinear":
        return u * g, u, g
    if name == "reglu":
        pos = (g > 0).double()
        return u * g * pos, u * pos, g * pos
    if name == "geglu":
        return u * g * _cdf(g), u * (_cdf(g) + g * _phi(g)), g * _cdf(g)
    if name == "geglu_tanh":
        t = torch.tanh(_tanh_inner(g))
        act = 0.5 * g * (1 + t)
        dact = 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * 0.044715 * g * g)
        return u * act, u * dact, act
    if name == "swiglu":
        s = _sig(p.beta * g)
        act = g * s
        return u * act, u * (s + p.beta * g * s * (1 - s)), act
    if name == "swiglu_oai":
        gc = torch.minimum(g, torch.tensor(p.limit, dtype=g.dtype))
        uc = u.clamp(-p.limit, p.limit)
        s = _sig(p.alpha * gc)
        act = gc * s
        dact = (s + p.alpha * gc * s * (1 - s)) * (g < p.limit).double()
        return (uc + 1) * act, (uc + 1) * dact, act * ((u > -p.limit) & (u < p.limit)).double()
    raise AssertionError(name)


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
