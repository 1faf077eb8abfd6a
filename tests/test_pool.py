"""MaxPool2d, AvgPool2d and AdaptiveAvgPool2d(1) against the reference."""
import numpy as np
import pytest

from cyconv import nn
from cyconv.nn import array_pool

import reference as R
from conftest import DTYPES, FD_TOL, assert_close, distinct, finite_difference


def _random_cases(n=24, seed=777):
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < n:
        k = int(rng.integers(1, 5))
        s = None if rng.random() < 0.25 else int(rng.integers(1, 4))
        p = int(rng.integers(0, k // 2 + 1))
        N, C = int(rng.integers(1, 4)), int(rng.integers(1, 5))
        H, W = (int(v) for v in rng.integers(1, 13, 2))
        ss = k if s is None else s
        if R.pool_out_size(H, k, ss, p) >= 1 and R.pool_out_size(W, k, ss, p) >= 1:
            cases.append((N, C, H, W, k, s, p))
    return cases


EDGE_CASES = [
    (2, 3, 8, 8, 2, None, 0),   # the classic 2x2/2
    (1, 2, 7, 9, 2, None, 0),   # odd sizes, last row/col dropped
    (2, 2, 7, 7, 3, 2, 1),      # overlapping windows with padding
    (1, 1, 5, 5, 5, 1, 0),      # window == input
    (1, 2, 4, 6, 1, 2, 0),      # 1x1 window, stride 2
    (3, 1, 11, 10, 3, 3, 0),    # (H - k) % s != 0
    (1, 2, 6, 5, 4, 1, 2),      # even kernel, max padding
    (2, 2, 1, 1, 1, None, 0),   # 1x1 image
]
CASES = _random_cases() + EDGE_CASES


def _id(c):
    N, C, H, W, k, s, p = c
    return f"n{N}c{C}_{H}x{W}_k{k}_s{s}_p{p}"


def _out_shape(c):
    N, C, H, W, k, s, p = c
    ss = k if s is None else s
    return (N, C, R.pool_out_size(H, k, ss, p), R.pool_out_size(W, k, ss, p))


def _maxpool(c):
    _, _, _, _, k, s, p = c
    return nn.MaxPool2d(k) if (s is None and p == 0) else nn.MaxPool2d(k, stride=s, padding=p)


# ----------------------------------------------------------------------------
# MaxPool2d
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", CASES, ids=_id)
def test_maxpool_forward_backward(c, dtype, rng):
    N, C, H, W, k, s, p = c
    layer = _maxpool(c)
    x = distinct(rng, (N, C, H, W), dtype)
    x0 = x.copy()
    y = layer(x)
    assert y.dtype == dtype and y.shape == _out_shape(c)
    ref, _ = R.max_pool2d_forward(x, k, s, p)
    np.testing.assert_array_equal(y, ref.astype(dtype))  # max is exact
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dy)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert_close(dx, R.max_pool2d_backward(x, dy, k, s, p), dtype)
    np.testing.assert_array_equal(x, x0)
    assert list(layer.parameters()) == []


@pytest.mark.parametrize("c", [c for c in CASES if c[0] * c[1] * c[2] * c[3] <= 120][:8], ids=_id)
def test_maxpool_finite_differences(c, rng):
    N, C, H, W, k, s, p = c
    layer = _maxpool(c)
    x = distinct(rng, (N, C, H, W))  # distinct entries, gaps >> eps
    Rm = rng.standard_normal(_out_shape(c))
    layer(x)
    dx = layer.backward(Rm)
    num = finite_difference(lambda v: (layer(v) * Rm).sum(), x)
    np.testing.assert_allclose(dx, num, **FD_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_maxpool_ties_go_to_first_maximum(dtype):
    # all entries equal: every window's gradient goes to its first
    # (row-major) element; overlapping windows accumulate
    x = np.zeros((1, 1, 5, 5), dtype=dtype)
    layer = nn.MaxPool2d(3, stride=1, padding=1)
    y = layer(x)
    np.testing.assert_array_equal(y, np.zeros((1, 1, 5, 5)))
    dx = layer.backward(np.ones_like(y))
    expected = R.max_pool2d_backward(x, np.ones(y.shape), 3, 1, 1)
    np.testing.assert_array_equal(dx, expected)
    assert expected[0, 0, 0, 0] == 4 and expected[0, 0, 4, 4] == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_maxpool_ties_within_window(dtype):
    x = np.array([[[[1, 3, 3, 0],
                    [3, 2, 1, 3],
                    [5, 5, 2, 2],
                    [5, 5, 2, 2]]]], dtype=dtype)
    layer = nn.MaxPool2d(2)
    y = layer(x)
    np.testing.assert_array_equal(y[0, 0], [[3, 3], [5, 2]])
    dx = layer.backward(np.array([[[[1, 2], [3, 4]]]], dtype=dtype))
    np.testing.assert_array_equal(dx[0, 0], [[0, 1, 2, 0],
                                             [0, 0, 0, 0],
                                             [3, 0, 4, 0],
                                             [0, 0, 0, 0]])


# (kernel, stride, padding): the vectorised 2x2/2 rows, the per-window loop, and the
# tap-by-tap rows (windows inside the width) with the per-window edges
WINDOWS = [(2, 2, 0), (2, 1, 0), (3, 2, 0), (3, 2, 1), (3, 1, 1), (4, 3, 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel, stride, padding", WINDOWS)
def test_maxpool_nan_wins_its_window(kernel, stride, padding, dtype, rng):
    # the first NaN of a window wins, as in PyTorch; odd sizes so that every path
    # meets NaNs and ties
    x = rng.integers(-2, 3, (2, 3, 9, 11)).astype(dtype)
    x[rng.random(x.shape) < 0.05] = np.nan
    layer = nn.MaxPool2d(kernel, stride, padding)
    y = layer(x)
    ref, _ = R.max_pool2d_forward(x, kernel, stride, padding)
    np.testing.assert_array_equal(y, ref.astype(dtype))  # NaNs in the same places
    assert np.isnan(y).any() and not np.isnan(y).all()
    dy = rng.standard_normal(y.shape).astype(dtype)
    assert_close(layer.backward(dy), R.max_pool2d_backward(x, dy, kernel, stride, padding),
                 dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel, stride, padding", WINDOWS)
def test_maxpool_ties_and_infinities_go_to_first_maximum(kernel, stride, padding, dtype, rng):
    # few distinct values, some -inf (whole windows of them too): the first maximum
    # in row-major order gets the gradient, exactly as the reference picks it
    x = rng.integers(-1, 2, (2, 3, 9, 11)).astype(dtype)
    x[rng.random(x.shape) < 0.3] = -np.inf
    x[0, 0, :4, :5] = -np.inf
    layer = nn.MaxPool2d(kernel, stride, padding)
    y = layer(x)
    ref, _ = R.max_pool2d_forward(x, kernel, stride, padding)
    np.testing.assert_array_equal(y, ref.astype(dtype))
    dy = rng.standard_normal(y.shape).astype(dtype)
    assert_close(layer.backward(dy), R.max_pool2d_backward(x, dy, kernel, stride, padding),
                 dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 8, 10), (2, 3, 9, 11), (1, 2, 7, 6), (1, 1, 2, 3)])
def test_maxpool_2x2_gradient_overwrites_a_reused_buffer(shape, dtype, rng):
    # the input gradient goes to an array reused from step to step; the 2x2/2 backward
    # writes every element once (no zero fill first), also the row and column that no
    # window covers when H or W is odd
    model = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
    for step in range(2):
        x = np.abs(distinct(rng, shape, dtype)) + 1   # positive: ReLU passes every gradient
        y = model(x)
        dy = rng.standard_normal(y.shape).astype(dtype)
        if step:   # stale values must not survive
            array_pool.fill_free(np.nan)
        dx = model.backward(dy)
        np.testing.assert_array_equal(dx, R.max_pool2d_backward(x, dy, 2).astype(dtype))


def test_maxpool_negative_inputs_with_padding(rng):
    # padding is -inf, not 0: an all-negative input must never pool to 0
    x = -(distinct(rng, (1, 2, 5, 5)) ** 2) - 1.0
    layer = nn.MaxPool2d(3, stride=2, padding=1)
    y = layer(x)
    assert np.all(y < 0)
    np.testing.assert_array_equal(y, R.max_pool2d_forward(x, 3, 2, 1)[0])


def test_maxpool_stride_defaults_to_kernel(rng):
    x = distinct(rng, (2, 2, 9, 9))
    a = nn.MaxPool2d(3)(x)
    b = nn.MaxPool2d(3, stride=3)(x)
    assert a.shape == (2, 2, 3, 3)
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------
# AvgPool2d
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", CASES, ids=_id)
def test_avgpool_forward_backward(c, dtype, count_include_pad, rng):
    N, C, H, W, k, s, p = c
    if count_include_pad:
        layer = nn.AvgPool2d(k, stride=s, padding=p)
    else:
        layer = nn.AvgPool2d(k, stride=s, padding=p, count_include_pad=False)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == _out_shape(c)
    assert_close(y, R.avg_pool2d_forward(x, k, s, p, count_include_pad), dtype)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dy)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert_close(dx, R.avg_pool2d_backward(x, dy, k, s, p, count_include_pad), dtype)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("c", [c for c in CASES if c[0] * c[1] * c[2] * c[3] <= 120][:6], ids=_id)
def test_avgpool_finite_differences(c, count_include_pad, rng):
    N, C, H, W, k, s, p = c
    layer = nn.AvgPool2d(k, stride=s, padding=p, count_include_pad=count_include_pad)
    x = rng.standard_normal((N, C, H, W))
    Rm = rng.standard_normal(_out_shape(c))
    layer(x)
    dx = layer.backward(Rm)
    num = finite_difference(lambda v: (layer(v) * Rm).sum(), x)
    np.testing.assert_allclose(dx, num, **FD_TOL)


def test_avgpool_count_include_pad_default_is_true():
    x = np.ones((1, 1, 2, 2))
    y = nn.AvgPool2d(2, stride=1, padding=1)(x)
    np.testing.assert_allclose(y[0, 0], [[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]])
    y2 = nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False)(x)
    np.testing.assert_allclose(y2, np.ones((1, 1, 3, 3)))


# ----------------------------------------------------------------------------
# AdaptiveAvgPool2d(1)
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (3, 4, 12, 12), (2, 2, 1, 9)])
def test_global_avgpool(shape, dtype, rng):
    layer = nn.AdaptiveAvgPool2d(1)
    x = rng.standard_normal(shape).astype(dtype)
    y = layer(x)
    assert y.shape == shape[:2] + (1, 1) and y.dtype == dtype
    assert_close(y, R.global_avg_pool_forward(x), dtype)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dy)
    assert dx.shape == shape and dx.dtype == dtype
    assert_close(dx, R.global_avg_pool_backward(x, dy), dtype)


def test_global_avgpool_finite_differences(rng):
    layer = nn.AdaptiveAvgPool2d(1)
    x = rng.standard_normal((2, 3, 3, 4))
    Rm = rng.standard_normal((2, 3, 1, 1))
    layer(x)
    dx = layer.backward(Rm)
    np.testing.assert_allclose(dx, finite_difference(lambda v: (layer(v) * Rm).sum(), x), **FD_TOL)


# ----------------------------------------------------------------------------
# PyTorch
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("c", CASES[::2], ids=_id)
def test_pools_match_torch(c, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    N, C, H, W, k, s, p = c
    x = distinct(rng, (N, C, H, W))
    tx = torch.from_numpy(x)
    np.testing.assert_array_equal(_maxpool(c)(x), F.max_pool2d(tx, k, s, p).numpy())
    for cip in (True, False):
        np.testing.assert_allclose(
            nn.AvgPool2d(k, stride=s, padding=p, count_include_pad=cip)(x),
            F.avg_pool2d(tx, k, s, p, count_include_pad=cip).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(nn.AdaptiveAvgPool2d(1)(x),
                               F.adaptive_avg_pool2d(tx, 1).numpy(), rtol=1e-12, atol=1e-12)
