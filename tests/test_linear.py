"""Linear: y = x W^T + b."""
import numpy as np
import pytest

import cyconv
from cyconv import nn

import reference as R
from conftest import DTYPES, FD_TOL, assert_close, finite_difference


def _cases(n=20, seed=99):
    rng = np.random.default_rng(seed)
    cases = [(1, 1, 1, True), (1, 7, 3, False), (3, 1, 5, True), (2, 64, 4, True),
             (3, 5, 1, False)]
    while len(cases) < n:
        cases.append((int(rng.integers(1, 4)), int(rng.integers(1, 13)),
                      int(rng.integers(1, 6)), bool(rng.integers(0, 2))))
    return cases


CASES = _cases()


def _id(c):
    return "n{}_in{}_out{}_{}".format(c[0], c[1], c[2], "b" if c[3] else "nb")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", CASES, ids=_id)
def test_forward_backward_matches_reference(c, dtype, rng):
    N, F, O, bias = c
    layer = nn.Linear(F, O, bias=bias, dtype=dtype, seed=1)
    params = layer.parameters()
    assert len(params) == (2 if bias else 1)
    w = params[0].data
    b = params[1].data if bias else None
    assert w.shape == (O, F) and w.dtype == dtype
    x = rng.standard_normal((N, F)).astype(dtype)
    x0 = x.copy()
    y = layer(x)
    assert y.shape == (N, O) and y.dtype == dtype
    assert_close(y, R.linear_forward(x, w, b), dtype)
    dy = rng.standard_normal((N, O)).astype(dtype)
    dx = layer.backward(dy)
    rdx, rdw, rdb = R.linear_backward(x, w, dy, bias)
    assert dx.shape == (N, F) and dx.dtype == dtype
    assert_close(dx, rdx, dtype, err_msg="dx")
    assert_close(params[0].grad, rdw, dtype, err_msg="dW")
    if bias:
        assert_close(params[1].grad, rdb, dtype, err_msg="db")
    np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("c", CASES[:8], ids=_id)
def test_finite_differences(c, rng):
    N, F, O, bias = c
    layer = nn.Linear(F, O, bias=bias, dtype=np.float64, seed=1)
    x = rng.standard_normal((N, F))
    Rm = rng.standard_normal((N, O))
    layer(x)
    dx = layer.backward(Rm)
    np.testing.assert_allclose(dx, finite_difference(lambda v: (layer(v) * Rm).sum(), x), **FD_TOL)
    for p in layer.parameters():
        g = p.grad.copy()
        np.testing.assert_allclose(g, finite_difference(lambda _: (layer(x) * Rm).sum(), p.data),
                                   **FD_TOL)


def test_param_grads_accumulate(rng):
    layer = nn.Linear(4, 3, dtype=np.float64, seed=0)
    x = rng.standard_normal((2, 4))
    dy = rng.standard_normal((2, 3))
    layer.zero_grad()
    layer(x)
    layer.backward(dy)
    g1 = [p.grad.copy() for p in layer.parameters()]
    layer(x)
    layer.backward(dy)
    for p, g in zip(layer.parameters(), g1):
        np.testing.assert_allclose(p.grad, 2 * g, rtol=1e-12)
    layer.zero_grad()
    assert all(not np.any(p.grad) for p in layer.parameters())


@pytest.mark.parametrize("fan_in,fan_out", [(10, 3), (512, 64), (1, 200)])
def test_kaiming_uniform_init(fan_in, fan_out):
    layer = nn.Linear(fan_in, fan_out, seed=0)
    w, b = (p.data for p in layer.parameters())
    bound = 1.0 / np.sqrt(fan_in)
    assert w.dtype == np.float32 and b.dtype == np.float32
    assert np.all(np.abs(w) <= bound * (1 + 1e-6))
    assert np.all(np.abs(b) <= bound * (1 + 1e-6))
    if w.size >= 1000:
        assert abs(w.std() - bound / np.sqrt(3)) < 0.05 * bound
        assert np.abs(w).max() > 0.95 * bound
    if b.size >= 100:
        assert np.abs(b).max() > 0.8 * bound


def test_seed_and_manual_seed():
    a, b = nn.Linear(5, 4, seed=3), nn.Linear(5, 4, seed=3)
    np.testing.assert_array_equal(a.parameters()[0].data, b.parameters()[0].data)
    cyconv.manual_seed(11)
    c = nn.Linear(5, 4)
    cyconv.manual_seed(11)
    d = nn.Linear(5, 4)
    np.testing.assert_array_equal(c.parameters()[0].data, d.parameters()[0].data)
    np.testing.assert_array_equal(c.parameters()[1].data, d.parameters()[1].data)


def test_state_dict_keys():
    assert list(nn.Linear(3, 2).state_dict()) == ["weight", "bias"]
    assert list(nn.Linear(3, 2, bias=False).state_dict()) == ["weight"]
    assert nn.Linear(3, 2).state_dict()["weight"].shape == (2, 3)


def test_matches_torch(rng):
    torch = pytest.importorskip("torch")
    layer = nn.Linear(6, 4, dtype=np.float64, seed=0)
    tl = torch.nn.Linear(6, 4).double()
    with torch.no_grad():
        tl.weight.copy_(torch.from_numpy(layer.parameters()[0].data))
        tl.bias.copy_(torch.from_numpy(layer.parameters()[1].data))
    x = rng.standard_normal((3, 6))
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = tl(tx)
    np.testing.assert_allclose(layer(x), ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal((3, 4))
    ty.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(layer.backward(dy), tx.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.parameters()[0].grad, tl.weight.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(layer.parameters()[1].grad, tl.bias.grad.numpy(), rtol=1e-12)
