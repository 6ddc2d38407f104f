import math

import pytest
import torch

from lrcompile.math.features import feature_dim, monomial_table, monomials, monomials_backward
from lrcompile.math.polynomial import exp_polynomial


@pytest.mark.parametrize("head_dim, degree", [(1, 3), (3, 2), (5, 4), (8, 3), (64, 2)])
def test_feature_dim_is_the_number_of_monomials(head_dim, degree):
    table = monomial_table(head_dim, degree)
    assert table.feature_dim == feature_dim(head_dim, degree) == math.comb(head_dim + degree, degree)
    assert monomials(torch.randn(4, head_dim), table).shape == (4, table.feature_dim)


def test_d64_degree2_has_2145_features():
    assert feature_dim(64, 2) == 2145


@pytest.mark.parametrize("head_dim, degree", [(1, 3), (3, 2), (5, 4), (8, 3), (16, 2)])
def test_feature_inner_product_is_the_polynomial_of_the_dot_product(head_dim, degree):
    table = monomial_table(head_dim, degree)
    p = exp_polynomial(degree, 0.5)
    q = torch.randn(7, head_dim, dtype=torch.float64) / head_dim**0.5
    k = torch.randn(9, head_dim, dtype=torch.float64) / head_dim**0.5
    phi = monomials(q, table) * table.coefficients(p.coefficients, torch.float64, "cpu")
    psi = monomials(k, table)
    torch.testing.assert_close(phi @ psi.T, p(q @ k.T), rtol=1e-12, atol=1e-12)


def test_chebyshev_signs_stay_on_the_query_side():
    p = exp_polynomial(3, 1.0, "chebyshev")
    table = monomial_table(4, 3)
    k = torch.randn(5, 4, dtype=torch.float64)
    # keys carry no coefficient at all: psi is the bare monomials, whatever the polynomial
    torch.testing.assert_close(monomials(k, table)[:, 1:5], k)
    q = torch.randn(3, 4, dtype=torch.float64)
    phi = monomials(q, table) * table.coefficients(p.coefficients, torch.float64, "cpu")
    torch.testing.assert_close(phi @ monomials(k, table).T, p(q @ k.T))


@pytest.mark.parametrize("head_dim, degree", [(3, 1), (4, 2), (5, 3), (3, 5)])
def test_explicit_backward_matches_autograd(head_dim, degree):
    table = monomial_table(head_dim, degree)
    x = torch.randn(2, 6, head_dim, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 6, table.feature_dim, dtype=torch.float64)
    (expected,) = torch.autograd.grad(monomials(x, table), x, grad)
    torch.testing.assert_close(monomials_backward(x.detach(), grad, table), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("head_dim, degree", [(3, 1), (4, 2), (5, 3), (3, 5), (64, 2)])
def test_eager_slices_and_traced_gathers_agree(head_dim, degree):
    from lrcompile.math.features import (_gathered_monomials_backward_t, _gathered_monomials_t, monomials_backward_t,
                                    monomials_t)

    table = monomial_table(head_dim, degree)
    x_t = torch.randn(2, head_dim, 7, dtype=torch.float64)
    grad_t = torch.randn(2, table.feature_dim, 7, dtype=torch.float64)
    torch.testing.assert_close(monomials_t(x_t, table), torch.cat(_gathered_monomials_t(x_t, table), dim=-2))
    torch.testing.assert_close(monomials_backward_t(x_t, grad_t, table), _gathered_monomials_backward_t(x_t, grad_t, table))
