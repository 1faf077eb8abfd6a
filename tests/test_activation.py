"""ReLU, LeakyReLU and Flatten."""
import numpy as np
import pytest

from cyconv import nn

import reference as R
from conftest import DTYPES, FD_TOL, distinct, finite_difference

SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (3, 4, 12, 11), (2, 4, 8, 8), (5, 7)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_relu(shape, dtype, rng):
    layer = nn.ReLU()
    x = distinct(rng, shape, dtype)
    x0 = x.copy()
    y = layer(x)
    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_array_equal(y, R.relu_forward(x).astype(dtype))
    dy = rng.standard_normal(shape).astype(dtype)
    dx = layer.backward(dy)
    assert dx.dtype == dtype and dx.shape == shape
    np.testing.assert_array_equal(dx, R.relu_backward(x, dy).astype(dtype))
    np.testing.assert_array_equal(x, x0)  # not in place
    assert list(layer.parameters()) == []


def test_relu_zero_input_has_zero_gradient():
    # PyTorch convention: d relu / dx at 0 is 0
    layer = nn.ReLU()
    x = np.array([[-1.0, 0.0, 2.0]])
    np.testing.assert_array_equal(layer(x), [[0.0, 0.0, 2.0]])
    np.testing.assert_array_equal(layer.backward(np.ones((1, 3))), [[0.0, 0.0, 1.0]])


@pytest.mark.parametrize("slope", [0.01, 0.2, 1.5])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_leaky_relu(shape, dtype, slope, rng):
    layer = nn.LeakyReLU(negative_slope=slope) if slope != 0.01 else nn.LeakyReLU()
    x = distinct(rng, shape, dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == shape
    tol = dict(rtol=1e-6) if dtype == np.float32 else dict(rtol=1e-15)
    np.testing.assert_allclose(y, R.leaky_relu_forward(x, slope), **tol)
    dy = rng.standard_normal(shape).astype(dtype)
    dx = layer.backward(dy)
    assert dx.dtype == dtype
    np.testing.assert_allclose(dx, R.leaky_relu_backward(x, dy, slope), **tol)


@pytest.mark.parametrize("layer_factory", [nn.ReLU, lambda: nn.LeakyReLU(0.1)],
                         ids=["relu", "leaky"])
def test_activation_finite_differences(layer_factory, rng):
    layer = layer_factory()
    x = distinct(rng, (2, 3, 4, 3))  # |x| >= 0.05 >> eps: no kink crossed
    Rm = rng.standard_normal(x.shape)
    layer(x)
    dx = layer.backward(Rm)
    np.testing.assert_allclose(dx, finite_difference(lambda v: (layer(v) * Rm).sum(), x), **FD_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (3, 4, 2, 2)])
def test_flatten(shape, dtype, rng):
    layer = nn.Flatten()
    x = rng.standard_normal(shape).astype(dtype)
    y = layer(x)
    assert y.shape == (shape[0], int(np.prod(shape[1:]))) and y.dtype == dtype
    np.testing.assert_array_equal(y, x.reshape(shape[0], -1))
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dy)
    assert dx.shape == shape
    np.testing.assert_array_equal(dx, dy.reshape(shape))


def test_flatten_non_contiguous(rng):
    x = rng.standard_normal((2, 3, 8, 6))
    xs = x[:, :, ::2, ::3]
    np.testing.assert_array_equal(nn.Flatten()(xs), np.ascontiguousarray(xs).reshape(2, -1))
    xt = x.transpose(0, 1, 3, 2)
    np.testing.assert_array_equal(nn.Flatten()(xt), np.ascontiguousarray(xt).reshape(2, -1))


def test_activations_match_torch(rng):
    torch = pytest.importorskip("torch")
    x = distinct(rng, (2, 3, 4, 5))
    tx = torch.from_numpy(x)
    np.testing.assert_array_equal(nn.ReLU()(x), torch.relu(tx).numpy())
    np.testing.assert_allclose(nn.LeakyReLU(0.2)(x),
                               torch.nn.functional.leaky_relu(tx, 0.2).numpy(), rtol=1e-15)
    np.testing.assert_allclose(nn.LeakyReLU()(x),
                               torch.nn.LeakyReLU()(tx).numpy(), rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path", ["relu", "relu6", "conv+relu fused", "conv fuse_relu",
                                  "direct conv fuse_relu", "bn+relu fused", "bn+relu6 fused"])
def test_nan_stays_nan_through_relu_plain_and_fused(path, dtype):
    """ReLU (and ReLU6) keep a NaN, as PyTorch does, in every kernel that applies it;
    its gradient there is 0."""
    x = np.ones((1, 3, 5, 5), dtype)
    x[0, :, 2, 2] = np.nan
    layer = {
        "relu": lambda: nn.ReLU(),
        "relu6": lambda: nn.ReLU6(),
        "conv+relu fused": lambda: nn.Sequential(nn.Conv2d(3, 40, 3, padding=1, dtype=dtype,
                                                           seed=0), nn.ReLU()),
        "conv fuse_relu": lambda: nn.Conv2d(3, 40, 3, padding=1, dtype=dtype, seed=0,
                                            fuse_relu=True),
        "direct conv fuse_relu": lambda: nn.Conv2d(3, 2, 3, padding=1, dtype=dtype, seed=0,
                                                   fuse_relu=True),   # K = 27: direct kernel
        "bn+relu fused": lambda: nn.Sequential(nn.BatchNorm2d(3, dtype=dtype), nn.ReLU()),
        "bn+relu6 fused": lambda: nn.Sequential(nn.BatchNorm2d(3, dtype=dtype), nn.ReLU6()),
    }[path]()
    if path.startswith("bn+"):
        layer.eval()
    y = layer(x)
    assert np.isnan(y).any(), "a NaN became a number"
    if path.startswith(("relu", "conv+")) or path == "relu6":
        assert np.isnan(y[0, :, 2, 2]).all() if y.shape[1] == 3 else np.isnan(y).any()
    grad = layer.backward(np.ones_like(y))
    assert grad.shape == x.shape


def test_relu6_matches_pytorch(rng):
    torch = pytest.importorskip("torch")
    x = rng.uniform(-3, 9, (2, 3, 4, 5))
    layer = nn.ReLU6()
    y = layer(x)
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = torch.nn.functional.relu6(tx)
    g = rng.standard_normal(x.shape)
    ty.backward(torch.from_numpy(g))
    np.testing.assert_array_equal(y, ty.detach().numpy())
    np.testing.assert_array_equal(layer.backward(g), tx.grad.numpy())
